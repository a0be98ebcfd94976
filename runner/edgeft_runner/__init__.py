"""edgeft device runner: verify a bundle, run its model on this device, and report what it measured.

Copied to devices that have only python3, numpy and a runtime, so it imports nothing beyond
the stdlib and numpy (the runtime is imported lazily by its backend).
"""

__version__ = "0.1.0"

BUNDLE_FORMAT = "edgeft-bundle/1"
REPORT_FORMAT = "edgeft-device-report/1"


class RunnerError(Exception):
    """A failure the user can act on; the CLI prints it as one `edgeft-runner: ` line and exits 2."""
