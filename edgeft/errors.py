"""User-facing error families. Each carries one line: what, where, and what to do.

The CLI maps them to exit codes (see EXIT_CODES) and prints no traceback unless --debug.
"""


class EdgeftError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 2


class ConfigError(EdgeftError):
    """A target, profile, lab or dataset file is wrong or missing."""


class ModelError(EdgeftError):
    """A model dir is unusable, or a stage's validation against its reference failed."""


class DeviceError(EdgeftError):
    """A device is unreachable, refuses auth, has an unknown host key, or its runner failed."""


class BundleError(EdgeftError):
    """A bundle is incomplete, tampered with, or cannot be written."""


class GateFailed(EdgeftError):
    """A measured value broke a budget."""

    exit_code = 1
