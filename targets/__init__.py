"""Shipped targets: installed as edgeft._shipped.targets (pyproject.toml), so importlib.resources finds them."""
