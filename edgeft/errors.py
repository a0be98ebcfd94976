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


class QualityCheckFailed(ModelError):
    """A stage's own check of its result against its reference failed (e.g. int8 agrees with fp32 on too
    few next tokens): not bad input but a result that misses a bar, so exit 1 like a failed budget. The
    message names the check, the measured value, the bar and the setting to try."""

    exit_code = 1

    def __init__(self, message: str, check: str, value: float, limit: float, setting: str):
        super().__init__(message)
        self.check, self.value, self.limit, self.setting = check, value, limit, setting


class DeviceError(EdgeftError):
    """A device is unreachable, refuses auth, has an unknown host key, or its runner failed."""


class ConnectionLost(DeviceError):
    """The network path to a device failed (unreachable, or the connection dropped): a retry may work,
    unlike a refused key or a failing command. Resumable work (edgeft.flash.transfer) reconnects on it."""


class BundleError(EdgeftError):
    """A bundle is incomplete, tampered with, or cannot be written."""


class GateFailed(EdgeftError):
    """A measured value broke a budget."""

    exit_code = 1
