"""Shipped profiles: installed as edgeft._shipped.profiles (pyproject.toml), so importlib.resources finds them."""
