"""The targets and profiles shipped with edgeft, as package data.

The repository keeps them at the top level (targets/, profiles/); pyproject.toml installs those folders as
edgeft._shipped.targets and edgeft._shipped.profiles, so an editable install, `pip install .` and a wheel
all find them with importlib.resources (see edgeft.config.search_dirs).
"""
