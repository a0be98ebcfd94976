"""Talking to a device: one Transport interface, two implementations.

`LocalTransport` (edgeft.device.local) treats this machine as the device; `SshTransport`
(edgeft.device.ssh) reaches a lab device over SSH/SFTP with paramiko. Everything above this
module (push a bundle, run the runner, fetch its report) goes through the same calls for both:

    transport, device = open_transport("rpi5-lab-1", lab_path, trust_new_host_key=False)
    with transport:
        push_verified(transport, bundle_dir, "bundle")
        result = transport.run([transport.python, "runner.pyz", "bundle"], timeout=600)
        transport.get_file("bundle/report.json", local_report)

Remote paths are always relative to the transport's workdir (POSIX separators); a path that is
absolute or climbs out of the workdir with '..' is refused. Every failure that reaches the user
is a one-line DeviceError naming the device and what to do.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifact import sha256_file
from ..errors import DeviceError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import LabDevice
    from .local import LocalTransport
    from .ssh import SshTransport

__all__ = [
    "RunResult",
    "Transport",
    "LocalTransport",
    "SshTransport",
    "sha256_file",
    "open_transport",
    "push_verified",
    "verify_remote",
    "local_tree",
]

LOCAL_DEVICE = "local"


@dataclass(frozen=True)
class RunResult:
    """What a command run on the device left behind (output decoded as UTF-8, bad bytes replaced)."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Transport:
    """The interface both transports provide. Use it as a context manager: enter connects, exit closes."""

    name: str  # the device's name, for messages
    python: str  # the interpreter to run on the device

    def connect(self) -> None:  # idempotent
        raise NotImplementedError

    def put_file(self, local: Path, remote: str) -> None:
        raise NotImplementedError

    def put_dir(self, local: Path, remote: str) -> None:
        raise NotImplementedError

    def run(self, argv: list[str], timeout: float | None = None) -> RunResult:
        raise NotImplementedError

    def get_file(self, remote: str, local: Path) -> None:
        raise NotImplementedError

    def remove(self, remote: str) -> None:
        raise NotImplementedError

    def close(self) -> None:  # idempotent
        raise NotImplementedError

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------- helpers
def remote_relpath(transport_name: str, remote: str, *, allow_root: bool = False) -> str:
    """Normalise a workdir-relative remote path; refuse absolute paths and escapes with '..'."""
    text = str(remote)
    norm = posixpath.normpath(text) if text else "."
    if posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
        raise DeviceError(
            f"device '{transport_name}': remote path {remote!r} is outside the workdir; "
            "use a path relative to the device's workdir"
        )
    if norm == "." and not allow_root:
        raise DeviceError(
            f"device '{transport_name}': remote path {remote!r} names the workdir itself; name a file or dir inside it"
        )
    return norm


def local_tree(local: Path) -> tuple[list[str], list[tuple[str, Path]]]:
    """The dirs and files under `local`, as POSIX paths relative to it (sorted, symlinks followed).

    Both transports' put_dir and push_verified walk a tree with this, so they agree on what is in it.
    """
    dirs: list[str] = []
    files: list[tuple[str, Path]] = []
    for root, dirnames, filenames in os.walk(local, followlinks=True):
        dirnames.sort()
        rel_root = Path(root).relative_to(local).as_posix()
        for d in dirnames:
            dirs.append(d if rel_root == "." else f"{rel_root}/{d}")
        for f in sorted(filenames):
            files.append((f if rel_root == "." else f"{rel_root}/{f}", Path(root) / f))
    return dirs, files


def _local_files(transport: Transport, local: Path, remote: str) -> list[tuple[str, Path]]:
    """(remote path, local path) of every file that pushing `local` to `remote` puts on the device."""
    local = Path(local)
    remote = remote_relpath(transport.name, remote)
    if local.is_dir():
        return [(f"{remote}/{rel}", path) for rel, path in local_tree(local)[1]]
    if local.is_file():
        return [(remote, local)]
    raise DeviceError(f"device '{transport.name}': cannot push {local}: no such file or directory")


# Runs on the device with whatever python it has (keep it stdlib-only and Python-3.6-compatible).
# Prints one `sha256  path` line per argument, in order; a file it cannot read prints `!  path`.
_HASH_SCRIPT = """\
import hashlib, sys
for p in sys.argv[1:]:
    try:
        h = hashlib.sha256()
        with open(p, 'rb') as f:
            for b in iter(lambda: f.read(1 << 20), b''):
                h.update(b)
        d = h.hexdigest()
    except OSError:
        d = '!'
    sys.stdout.write('%s  %s\\n' % (d, p))
"""

_ARGV_BUDGET = 64 * 1024  # bytes of paths per verifier run, well under any ARG_MAX


def remote_sha256(transport: Transport, remote_paths: list[str], timeout: float | None = 600) -> list[str | None]:
    """Hash files ON THE DEVICE with its own python; None where a file is missing or unreadable."""
    out: list[str | None] = []
    batch: list[str] = []

    def flush() -> None:
        if not batch:
            return
        result = transport.run([transport.python, "-c", _HASH_SCRIPT, *batch], timeout=timeout)
        lines = result.stdout.splitlines()
        if result.returncode != 0 or len(lines) != len(batch):
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DeviceError(
                f"device '{transport.name}': could not hash pushed files with {transport.python!r} "
                f"(exit {result.returncode}: {detail}); check that this interpreter works there ('python' in the lab file)"
            )
        for line in lines:
            digest = line.split("  ", 1)[0]
            out.append(None if digest == "!" else digest)
        batch.clear()

    size = 0
    for path in remote_paths:
        if batch and size + len(path) > _ARGV_BUDGET:
            flush()
            size = 0
        batch.append(path)
        size += len(path) + 1
    flush()
    return out


def verify_remote(transport: Transport, local: Path, remote: str) -> None:
    """Check that every file of `local` (a file or dir) is on the device at `remote` with the same sha256."""
    pairs = _local_files(transport, local, remote)
    remote_hashes = remote_sha256(transport, [r for r, _ in pairs])
    for (remote_path, local_path), remote_hash in zip(pairs, remote_hashes):
        if remote_hash is None:
            raise DeviceError(
                f"device '{transport.name}': pushed file {remote_path} is missing or unreadable on the device; push again"
            )
        if remote_hash != sha256_file(local_path):
            raise DeviceError(
                f"device '{transport.name}': pushed file {remote_path} does not match {local_path} "
                "(sha256 differs); the copy was corrupted or changed on the device; push again"
            )


def push_verified(transport: Transport, local: Path, remote: str) -> None:
    """Put a file or dir on the device, then verify the sha256 of every pushed file there."""
    local = Path(local)
    if local.is_dir():
        transport.put_dir(local, remote)
    elif local.is_file():
        transport.put_file(local, remote)
    else:
        raise DeviceError(f"device '{transport.name}': cannot push {local}: no such file or directory")
    verify_remote(transport, local, remote)


def open_transport(
    device_name: str, lab_path: Path | None, trust_new_host_key: bool
) -> tuple[Transport, LabDevice | None]:
    """A connected transport for `device_name`: "local" is this machine, anything else a lab device.

    Connecting is idempotent, so `with transport:` afterwards is fine; close it when done.
    """
    if device_name == LOCAL_DEVICE:
        from .local import LocalTransport

        transport: Transport = LocalTransport()
        device = None
    else:
        from ..config import load_lab
        from .ssh import SshTransport

        lab = load_lab(lab_path)
        device = lab.device(device_name)
        transport = SshTransport(device, trust_new_host_key=trust_new_host_key, lab_file=lab.source)
    transport.connect()
    return transport, device


def __getattr__(name: str) -> Any:
    # Lazy, so `import edgeft.device` doesn't pay for paramiko when only the local device is used.
    if name == "LocalTransport":
        from .local import LocalTransport

        return LocalTransport
    if name == "SshTransport":
        from .ssh import SshTransport

        return SshTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
