"""Content-addressed, resumable transfer into a device's store: every file lands at `<root>/store/<sha256>`.

    root = resolve_root(transport, "edgeft-install")          # relative roots hang off the device's workdir
    stats = send_to_store(transport, root, [(sha256, Path("bundle/model.onnx")), ...],
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    stats.bytes_sent, stats.files_present                     # a re-send of an unchanged set sends 0 bytes

One round trip asks the device which files are complete in the store and how far each partial in
`store/.partial/` got. A missing file is sent from its partial's size rounded down to a chunk boundary
(so at most one chunk goes again: the tail of a file cut by a power loss is not trusted), over SFTP
(pipelined writes into the partial; then one device call verifies the whole set) or, when the device's
sshd has no SFTP, through the exec channel into a device-side receiver that hashes as it writes. The
device fsyncs each file and renames it into the store (mode 0444) only if its sha256 is the one asked
for; a mismatch deletes the partial and the file is sent once more, then the transfer fails. A dropped connection is reconnected and the file resumed, up to
MAX_FAILURES times in a row without progress. A full disk is a one-line DeviceError, every unfinished partial removed.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..device import Sent, Transport, receive_into
from ..errors import BundleError, ConnectionLost, DeviceError

log = logging.getLogger("edgeft.flash")

CHUNK_BYTES = 256 * 1024  # resume granularity: a partial is trusted up to its last whole chunk
MAX_FAILURES = 20  # connection losses in a row without progress before giving up
BACKOFF_S = 0.25  # reconnect at once after progress, then wait n * BACKOFF_S (at most BACKOFF_MAX_S)
BACKOFF_MAX_S = 2.0
STORE_MODE = 0o444
_ARGV_BUDGET = 64 * 1024  # bytes of arguments per probe, well under any ARG_MAX
_SHA256 = re.compile(r"[0-9a-f]{64}")

Progress = Callable[[int, int], None]  # progress(bytes_done, bytes_total)


@dataclass
class TransferStats:
    files_total: int = 0  # distinct files asked for
    files_sent: int = 0  # stored by this call
    files_present: int = 0  # already complete in the store: nothing sent
    bytes_sent: int = 0  # payload bytes put on the wire (re-sends after a cut or a mismatch included)
    bytes_resumed_from: int = 0  # bytes of partials left by an earlier call that were kept, not sent again
    seconds: float = 0.0
    reconnects: int = 0
    channel: str = ""  # "sftp" or "exec": how the bytes travelled


# Runs on the device (stdlib only, Python 3.6+). argv: probe|finalize ROOT SHA:SIZE... | drop ROOT SHA...
# probe: creates ROOT/store/.partial, prints {"present": [sha complete in the store], "partial": {sha: bytes},
# "free": bytes free for the store}; a store file of the wrong size is removed (sent again). finalize: for
# each uploaded partial, sha256 it, fsync, chmod 0444 and rename it into the store if it matches, else
# delete it; prints {"results": {sha: {"result": ok|short|mismatch|error, ...}}}. drop: removes the
# partials named. Any other OSError: {"error": "<strerror>"}. All wait on the lock of the partials' dir,
# which receivers hold while writing: a receiver orphaned by a cut connection finishes before we look.
_STORE_SCRIPT = r"""
import errno, fcntl, hashlib, json, os, sys
cmd, root = sys.argv[1], sys.argv[2]
store = os.path.join(root, 'store')
partials = os.path.join(store, '.partial')
try:
    try:
        os.makedirs(partials)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
    lock = os.open(partials, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_SH if cmd == 'probe' else fcntl.LOCK_EX)
    if cmd == 'drop':
        for sha in sys.argv[3:]:
            try:
                os.unlink(os.path.join(partials, sha))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
        print(json.dumps({}))
        sys.exit(0)
    if cmd == 'finalize':
        results = {}
        for item in sys.argv[3:]:
            sha, size = item.split(':')
            size, src, dst = int(size), os.path.join(partials, sha), os.path.join(store, sha)
            try:
                if os.path.isfile(dst) and os.stat(dst).st_size == size:
                    results[sha] = {'result': 'ok'}
                    continue
                try:
                    f = open(src, 'rb')
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise
                    results[sha] = {'result': 'short', 'size': 0}
                    continue
                with f:
                    n = os.fstat(f.fileno()).st_size
                    if n < size:
                        results[sha] = {'result': 'short', 'size': n}
                        continue
                    h = hashlib.sha256()
                    for b in iter(lambda: f.read(1 << 20), b''):
                        h.update(b)
                    if h.hexdigest() != sha:
                        os.unlink(src)
                        results[sha] = {'result': 'mismatch', 'sha256': h.hexdigest()}
                        continue
                    os.fsync(f.fileno())
                os.chmod(src, 0o444)
                os.replace(src, dst)
                results[sha] = {'result': 'ok'}
            except OSError as e:
                results[sha] = {'result': 'error', 'errno': errno.errorcode.get(e.errno, str(e.errno)),
                                'detail': e.strerror or str(e)}
        d = os.open(store, os.O_RDONLY)
        os.fsync(d)
        os.close(d)
        print(json.dumps({'results': results}))
        sys.exit(0)
    present, partial = [], {}
    for item in sys.argv[3:]:
        sha, size = item.split(':')
        path = os.path.join(store, sha)
        try:
            if os.stat(path).st_size == int(size):
                present.append(sha)
                continue
            os.unlink(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        try:
            partial[sha] = os.stat(os.path.join(partials, sha)).st_size
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
    vfs = os.statvfs(store)
    print(json.dumps({'present': present, 'partial': partial, 'free': vfs.f_bavail * vfs.f_frsize}))
except OSError as e:
    print(json.dumps({'error': '%s: %s' % (e.filename or root, e.strerror or e)}))
"""


def resolve_root(transport: Transport, root: str) -> str:
    """The absolute install root on the device: `root` itself if absolute, else relative to the workdir."""
    text = str(root).strip()
    if not text:
        raise DeviceError(f"device '{transport.name}': the install root is empty; set install.root in the lab file")
    if posixpath.isabs(text):
        return posixpath.normpath(text)
    transport.connect()
    return posixpath.normpath(posixpath.join(str(transport.workdir), text))


def send_to_store(
    transport: Transport,
    root: str,
    files: list[tuple[str, Path]],
    *,
    progress: Progress | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> TransferStats:
    """Put every (sha256, local path) into `<root>/store/<sha256>` on the device unless it is already there.

    `root` is absolute on the device (resolve_root). Resumes partials, verifies every file's sha256 on the
    device before it enters the store, reconnects after a dropped connection. progress(done, total): bytes
    of the missing files that are on the device, of those to send. Raises BundleError for a local file
    that cannot be read or a malformed sha256, DeviceError for a full disk, a file that arrives corrupted
    twice or a connection that keeps dropping without progress."""
    if not posixpath.isabs(root):
        raise ValueError(f"root must be absolute on the device (use resolve_root): {root!r}")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    wanted: dict[str, tuple[Path, int]] = {}
    for sha, path in files:
        path = Path(path)
        if not _SHA256.fullmatch(sha):
            raise BundleError(f"{path}: {sha!r} is not a sha256 (64 lowercase hex digits); rebuild the bundle")
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise BundleError(f"cannot send {path}: not a file; rebuild the bundle")
        except OSError as exc:
            raise BundleError(f"cannot send {path}: {exc.strerror or exc}; rebuild the bundle") from None
        wanted.setdefault(sha, (path, size))
    return _Transfer(transport, posixpath.normpath(root), chunk_bytes, progress).run(wanted)


@dataclass
class _File:
    """One missing file's progress through the transfer."""

    sha: str
    path: Path
    size: int
    partial: int  # bytes of its partial on the device, as last seen
    first_offset: int = 0  # where the first attempt resumed (bytes kept from an earlier call)
    on_device: int = 0  # bytes past first_offset on the device, for progress
    uploaded: bool = False  # SFTP: all bytes written into the partial, to be verified
    stored: bool = False
    resent: bool = False  # the one re-send after a sha256 mismatch is spent
    failures: int = 0  # attempts in a row without progress
    started: bool = False


class _Transfer:
    def __init__(self, transport: Transport, root: str, chunk_bytes: int, progress: Progress | None):
        self.transport = transport
        self.name = transport.name
        self.root = root
        self.store = f"{root}/store"
        self.chunk = chunk_bytes
        self.progress = progress
        self.stats = TransferStats()
        self.files: list[_File] = []
        self.total = 0  # bytes to send, for progress
        self.sftp = False  # whether files go over SFTP (else the exec channel)

    # ------------------------------------------------------------------------------------ flow
    def run(self, wanted: dict[str, tuple[Path, int]]) -> TransferStats:
        started = time.monotonic()
        self.stats.files_total = len(wanted)
        if not wanted:
            return self.stats
        state = self._probe_retrying([(sha, size) for sha, (_, size) in wanted.items()])
        present = set(state["present"])
        self.files = [
            _File(sha, path, size, min(int(state["partial"].get(sha, 0)), size))
            for sha, (path, size) in wanted.items() if sha not in present
        ]
        self.stats.files_present = len(wanted) - len(self.files)
        needed = sum(f.size - f.partial for f in self.files)
        if needed > state["free"]:
            raise self._no_space(needed, state["free"], f"{len(self.files)} file(s)")
        for f in self.files:
            f.first_offset = self._resume_offset(f.partial, f.size)
        self.total = sum(f.size - f.first_offset for f in self.files)
        self.sftp = self.transport.has_sftp
        self.stats.channel = "sftp" if self.sftp else "exec"
        self._report()
        if self.sftp:
            self._run_sftp()
        else:
            for f in self.files:
                while not f.stored:
                    answer = self._attempt(f, self._receive)
                    if answer is not None:
                        self._judge(f, answer)
        self.stats.seconds = time.monotonic() - started
        return self.stats

    def _run_sftp(self) -> None:
        """Upload every missing file into its partial, then verify and store them all in one device call
        (one interpreter start for the set); what fails verification goes round again."""
        todo = list(self.files)
        for _ in range(3):  # a mismatch is re-sent once; a silently short upload resumes once more
            for f in todo:
                while not (f.uploaded or f.stored):
                    if self._attempt(f, self._upload) is not None:
                        f.uploaded = True
            answers = self._finalize([f for f in todo if not f.stored])
            for f in todo:
                if not f.stored:
                    self._judge(f, answers.get(f.sha, {"result": "short", "size": 0}))
            todo = [f for f in todo if not f.stored]
            if not todo:
                return
        raise DeviceError(
            f"device '{self.name}': {todo[0].path.name} did not arrive complete after three tries; "
            "check the device's storage, then send again"
        )

    def _resume_offset(self, partial: int, size: int) -> int:
        return min(partial, size) // self.chunk * self.chunk

    # ------------------------------------------------------------------------------ attempts
    def _upload(self, f: _File, offset: int, on_sent: Sent) -> dict[str, Any]:
        self.transport.write_range(f"{self.store}/.partial/{f.sha}", f.path, offset, f.size - offset, progress=on_sent)
        return {"result": "uploaded", "from": offset}

    def _receive(self, f: _File, offset: int, on_sent: Sent) -> dict[str, Any]:
        # The receiver resumes where the partial ends when it runs (an orphan of a cut may have added to it).
        return receive_into(self.transport, f.path, f"{self.store}/.partial/{f.sha}", offset=None, end=f.size,
                            chunk=self.chunk, sha256=f.sha, mode=STORE_MODE, rename_to=f"{self.store}/{f.sha}",
                            progress=on_sent)

    def _attempt(self, f: _File, action: Callable[[_File, int, Sent], dict[str, Any]]) -> dict[str, Any] | None:
        """Run one send of `f` from its resume point; on a cut or a failed write, reconnect if needed,
        look again at the partial and return None (the caller tries again); raise when it is hopeless."""
        offset = self._resume_offset(f.partial, f.size)
        sent = [0]

        def on_sent(n: int) -> None:
            sent[0] = n
            f.on_device = max(0, offset + n - f.first_offset)
            self._report()

        lost = False
        error: DeviceError | None = None
        answer: dict[str, Any] | None = None
        try:
            answer = action(f, offset, on_sent)
        except ConnectionLost as exc:
            lost, error = True, exc
        except DeviceError as exc:  # the link is up but a write failed (SFTP says "Failure" on a full disk)
            error = exc
        finally:
            self.stats.bytes_sent += sent[0]
        if not f.started:
            f.started = True
            self.stats.bytes_resumed_from += int(answer.get("from", offset)) if answer is not None else offset
        if answer is not None:
            return answer
        # Cut or failed: where does the partial stand now?
        if lost:
            f.failures += 1
            state = self._reconnect_and_probe([(f.sha, f.size)], f.failures, error)
        else:
            state = self._probe_retrying([(f.sha, f.size)])
        if f.sha in state["present"]:  # a receiver orphaned by the cut finished the job
            self._stored(f)
            return None
        now = min(int(state["partial"].get(f.sha, 0)), f.size)
        if now > f.partial:
            f.failures = 0
        elif not lost:
            f.failures += 1
            if f.failures >= 2:  # the same failure with the link up: retrying will not help
                assert error is not None
                raise error
        f.partial = now
        if f.size - now > state["free"]:
            self._drop_unstored()
            raise self._no_space(f.size, self._free(), f.path.name, dropped=True)
        if f.failures > MAX_FAILURES:
            raise ConnectionLost(
                f"device '{self.name}': sending {f.path.name} failed {f.failures} times in a row without progress "
                f"(last: {error}); check the link, then run the same command again: it resumes where it stopped"
            )
        return None

    def _judge(self, f: _File, answer: dict[str, Any]) -> None:
        """Act on the device's verdict on a file that arrived: stored, or set up the next attempt."""
        result = answer["result"]
        if result == "ok":
            self._stored(f)
        elif result == "mismatch":
            if f.resent:
                raise DeviceError(
                    f"device '{self.name}': {f.path} arrived with another sha256 twice "
                    f"({str(answer.get('sha256'))[:16]}... instead of {f.sha[:16]}...); the local file may have "
                    "changed since the bundle was hashed (check it with `edgeft verify`) or the device's "
                    "storage corrupts data; nothing was stored"
                )
            log.info("device '%s': %s arrived corrupted; sending it again", self.name, f.path.name)
            f.resent, f.partial, f.uploaded, f.on_device = True, 0, False, 0  # the device deleted the partial
            self._report()
        elif result == "error":
            if answer.get("errno") == "ENOSPC":
                self._drop_unstored()
                raise self._no_space(f.size, self._free(), f.path.name, dropped=True)
            raise DeviceError(
                f"device '{self.name}': cannot write {self.store}/.partial/{f.sha}: {answer.get('detail')}; "
                "check the install root's filesystem"
            )
        else:  # short: fewer bytes on the device than were sent
            size = int(answer.get("size", 0))
            f.failures = 0 if size > f.partial else f.failures + 1
            if f.failures >= 2:
                raise DeviceError(
                    f"device '{self.name}': {f.path.name} keeps arriving short ({size} of {f.size} bytes); "
                    "check that the local file is not being changed, then send again"
                )
            f.partial, f.uploaded = size, False

    def _stored(self, f: _File) -> None:
        f.stored = True
        f.on_device = f.size - f.first_offset
        self.stats.files_sent += 1
        self._report()

    # ------------------------------------------------------------------------------ the device
    def _store_script(self, command: str, args: list[str], timeout: float = 120) -> dict[str, Any]:
        argv = [self.transport.python, "-c", _STORE_SCRIPT, command, self.root, *args]
        result = self.transport.run(argv, timeout=timeout)
        try:
            answer = json.loads(result.stdout.strip().splitlines()[-1])
            assert isinstance(answer, dict)
        except (IndexError, ValueError, AssertionError):
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DeviceError(
                f"device '{self.name}': could not inspect the store in {self.root} with {self.transport.python!r} "
                f"(exit {result.returncode}: {detail}); check that this interpreter works there ('python' in the lab file)"
            ) from None
        if "error" in answer:
            raise DeviceError(
                f"device '{self.name}': cannot use the install root {self.root}: {answer['error']}; "
                "choose a writable install root (install.root in the lab file)"
            )
        return answer

    def _batches(self, items: list[tuple[str, int]]) -> list[list[str]]:
        batches: list[list[str]] = [[]]
        used = 0
        for sha, size in items:
            if used >= _ARGV_BUDGET:
                batches.append([])
                used = 0
            batches[-1].append(f"{sha}:{size}")
            used += len(batches[-1][-1]) + 1
        return batches

    def _probe(self, items: list[tuple[str, int]]) -> dict[str, Any]:
        state: dict[str, Any] = {"present": [], "partial": {}, "free": 0}
        for batch in self._batches(items):
            answer = self._store_script("probe", batch)
            state["present"] += answer["present"]
            state["partial"].update(answer["partial"])
            state["free"] = answer["free"]
        return state

    def _probe_retrying(self, items: list[tuple[str, int]]) -> dict[str, Any]:
        try:
            return self._probe(items)
        except ConnectionLost as exc:
            return self._reconnect_and_probe(items, 1, exc)

    def _finalize(self, files: list[_File]) -> dict[str, dict[str, Any]]:
        """Verify and store uploaded partials on the device: {sha: answer} (see _STORE_SCRIPT)."""
        items = [(f.sha, f.size) for f in files]
        answers: dict[str, dict[str, Any]] = {}
        for batch in self._batches(items):
            for failures in range(1, MAX_FAILURES + 2):
                try:  # idempotent: a file stored by a run cut before it answered is reported ok
                    answers.update(self._store_script("finalize", batch, timeout=3600)["results"])
                    break
                except ConnectionLost as exc:
                    if failures > MAX_FAILURES:
                        raise
                    self._reconnect_and_probe([], failures, exc)
        return answers

    def _reconnect_and_probe(self, items: list[tuple[str, int]], failures: int, error: DeviceError | None) -> dict[str, Any]:
        """Reconnect until a probe answers: at once after a cut that followed progress (a flaky link is to
        be used while it works), backing off the more tries failed; ConnectionLost after MAX_FAILURES."""
        for attempt in range(MAX_FAILURES):
            time.sleep(min(BACKOFF_MAX_S, BACKOFF_S * (failures - 1 + attempt)))
            log.info("device '%s': connection lost (%s); reconnecting to resume", self.name, error)
            try:
                self.transport.reconnect()
                self.stats.reconnects += 1
                return self._probe(items)
            except ConnectionLost as exc:
                error = exc
        raise ConnectionLost(
            f"device '{self.name}': the connection kept dropping ({MAX_FAILURES} tries in a row without progress; "
            f"last: {error}); check the link, then run the same command again: it resumes where it stopped"
        )

    def _free(self) -> int:
        try:
            return int(self._store_script("probe", [])["free"])
        except DeviceError:
            return 0

    def _drop_unstored(self) -> None:
        """A full disk: remove the partial of every file of this transfer not yet stored (not only the one that
        hit the limit: earlier uploads wait in .partial for one batched verify), best effort."""
        shas = [f.sha for f in self.files if not f.stored]
        try:
            self._store_script("drop", shas)
        except DeviceError:
            pass

    # ------------------------------------------------------------------------------- messages
    def _report(self) -> None:
        if self.progress is not None:
            self.progress(min(sum(f.on_device for f in self.files), self.total), self.total)

    def _no_space(self, needed: int, free: int, what: str, *, dropped: bool = False) -> DeviceError:
        removed = "; the partial files of this transfer were removed" if dropped else ""
        return DeviceError(
            f"device '{self.name}': not enough space in {self.store} for {what}: {free} bytes free, {needed} needed"
            f"{removed}; free space on the device (or choose another install root), then send again"
        )
