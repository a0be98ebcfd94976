"""Talking to a device: one Transport interface, two implementations.

`LocalTransport` (edgeft.device.local) treats this machine as the device; `SshTransport`
(edgeft.device.ssh) reaches a lab device over SSH/SFTP with paramiko (or over the exec channel alone
when the device's sshd has no SFTP). Everything above this
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

import json
import os
import posixpath
import threading
import time
from collections.abc import Callable
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
    "receive_into",
    "Sent",
]

LOCAL_DEVICE = "local"
FEED_BLOCK = 1 << 20  # bytes read from a local file per send when streaming it into a device command

Sent = Callable[[int], None]  # progress(bytes sent so far) of one streamed file range


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
    workdir: Any  # absolute path of the workdir on the device (str or Path), known after connect()

    def connect(self) -> None:  # idempotent
        raise NotImplementedError

    def reconnect(self) -> None:
        """Drop the link and open a new one (after a ConnectionLost); the device keeps its files."""
        self.close()
        self.connect()

    @property
    def has_sftp(self) -> bool:
        """Whether write_range goes over SFTP (else files travel through run_with_input's stdin)."""
        return False

    def run_with_input(
        self, argv: list[str], local: Path, offset: int = 0, length: int | None = None, *,
        timeout: float | None = None, progress: Sent | None = None, ready: bool = False,
    ) -> RunResult:
        """run(argv) with bytes [offset, offset+length) of the local file `local` as the command's stdin,
        then EOF (length None: to the end of the file). progress(n) after each block: n bytes sent so far.

        ready=True: nothing is sent until the command prints a line `ready START` on stdout (so no bytes
        pile up in buffers while it starts, where a dropped connection would lose them); the input then
        runs from START (the command's choice, e.g. where its partial file ends) to the same end. A
        command that exits without that line gets no input. `timeout` counts from the end of the input;
        if the command exits before reading it all, the rest is dropped and its RunResult says why."""
        raise NotImplementedError

    def write_range(self, remote_path: str, local: Path, offset: int, length: int, *, progress: Sent | None = None) -> None:
        """Write bytes [offset, offset+length) of `local` into the device file `remote_path` (absolute: an
        install root may lie outside the workdir) at the same offset, dropping whatever followed `offset`
        there; offset 0 creates the file. A short write is not an error: the caller checks the size."""
        answer = receive_into(self, local, remote_path, offset=offset, end=offset + length, progress=progress)
        if answer["result"] not in ("ok", "short"):
            raise DeviceError(f"device '{self.name}': cannot write {remote_path}: {answer.get('detail') or answer['result']}")

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


# Runs on the device (stdlib only, Python 3.6+). argv: PATH OFFSET END CHUNK SHA256 MODE DEST (the last
# three may be ''). Keeps PATH's first START bytes, START = OFFSET, or with OFFSET -1 the size PATH already
# has rounded down to CHUNK (resume; the tail of a file cut by a power loss is not trusted); prints
# `ready START`, appends bytes START..END from stdin and fsyncs, so a cut connection leaves a partial that
# a later call resumes. With SHA256: the whole file must hash to it, else PATH is deleted ('mismatch').
# Then chmod MODE (octal) and rename onto DEST (atomic; its dir fsynced). One receiver per directory at a
# time (flock), so a receiver orphaned by a cut connection finishes before the next one truncates. Last
# line, JSON: result ok | short (fewer bytes arrived, or PATH is shorter than OFFSET) | mismatch | error
# (an OSError: errno name + detail), with `from` (START) and `size` (bytes in PATH at the end).
_RECEIVE_SCRIPT = r"""
import errno, fcntl, hashlib, json, os, sys
path, want, mode, dest = sys.argv[1], sys.argv[5], sys.argv[6], sys.argv[7]
offset, end, chunk = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
start, got = max(offset, 0), 0
def answer(result, **extra):
    extra.update(result=result, size=start + got)
    extra['from'] = start
    try:
        sys.stdout.write(json.dumps(extra) + '\n')
        sys.stdout.flush()
    except Exception:
        pass
    sys.exit(0 if result == 'ok' else 3)
try:
    lock = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if offset <= 0 else 0), 0o600)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
        start = 0
        answer('short')
    with os.fdopen(fd, 'r+b') as f:
        size = os.fstat(fd).st_size
        if offset < 0:
            start = min(size, end) // chunk * chunk if chunk > 0 else min(size, end)
        elif size < offset:
            start = size
            answer('short')
        f.truncate(start)
        h = hashlib.sha256() if want else None
        left = start if h is not None else 0
        while left:
            b = f.read(min(left, 1 << 20))
            if not b:
                break
            h.update(b)
            left -= len(b)
        f.seek(start)
        sys.stdout.write('ready %d\n' % start)
        sys.stdout.flush()
        inp = sys.stdin.buffer
        while start + got < end:
            b = inp.read(min(1 << 20, end - start - got))
            if not b:
                break
            f.write(b)
            if h is not None:
                h.update(b)
            got += len(b)
        f.flush()
        os.fsync(fd)
    if start + got < end:
        answer('short')
    if h is not None and h.hexdigest() != want:
        os.unlink(path)
        answer('mismatch', sha256=h.hexdigest())
    if mode:
        os.chmod(path, int(mode, 8))
    if dest:
        os.replace(path, dest)
        d = os.open(os.path.dirname(dest) or '.', os.O_RDONLY)
        os.fsync(d)
        os.close(d)
    answer('ok')
except OSError as e:
    answer('error', errno=errno.errorcode.get(e.errno, str(e.errno)), detail=e.strerror or str(e))
"""


def receive_into(
    transport: Transport, local: Path, remote_path: str, *, offset: int | None, end: int, chunk: int = 0,
    sha256: str | None = None, mode: int | None = None, rename_to: str | None = None,
    progress: Sent | None = None, timeout: float | None = None,
) -> dict[str, Any]:
    """Stream bytes [start, end) of `local` into the device file `remote_path` (absolute) at that offset
    through a command's stdin (no SFTP needed), fsynced there; optionally verify the whole file's sha256,
    chmod it and rename it onto `rename_to`. start = `offset`, or with offset None the size the device
    file already has, rounded down to `chunk` (resume). The device says where it starts before any byte
    is sent. Returns its answer: {"result": "ok" | "short" | "mismatch" | "error", "from": start, "size":
    bytes in the file at the end, ["errno", "detail"]} (see _RECEIVE_SCRIPT)."""
    argv = [
        transport.python, "-c", _RECEIVE_SCRIPT, remote_path, str(-1 if offset is None else offset), str(end),
        str(chunk), sha256 or "", f"{mode:o}" if mode is not None else "", rename_to or "",
    ]
    result = transport.run_with_input(
        argv, local, offset or 0, end - (offset or 0), timeout=timeout, progress=progress, ready=True
    )
    lines = result.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
        assert isinstance(answer, dict) and "result" in answer
    except (IndexError, ValueError, AssertionError):
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(
            f"device '{transport.name}': could not write {remote_path} with {transport.python!r} "
            f"(exit {result.returncode}: {detail}); check that this interpreter works there ('python' in the lab file)"
        ) from None
    return answer


class OutputCollector:
    """What a reader thread collects from a command's stdout or stderr, with a wait for a `ready N` line."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._cond = threading.Condition()
        self._closed = False

    def add(self, data: bytes) -> None:
        with self._cond:
            self._chunks.append(data)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def value(self) -> bytes:
        with self._cond:
            return b"".join(self._chunks)

    def wait_ready(self, timeout: float | None) -> int | None:
        """START from the first `ready START` line; None if the output ended (or timed out) without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                for line in b"".join(self._chunks).split(b"\n")[:-1]:  # complete lines only
                    if line.startswith(b"ready "):
                        return int(line.split()[1])
                left = None if deadline is None else deadline - time.monotonic()
                if self._closed or (left is not None and left <= 0):
                    return None
                self._cond.wait(left)


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
