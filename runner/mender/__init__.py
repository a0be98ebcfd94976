"""The Mender update module `edgeft-model` (a POSIX sh file beside this one): installed as edgeft._shipped.mender (pyproject.toml)."""
