"""This machine as the device: put = copy into a workdir, run = subprocess in it.

Same calls, same path rules and same verification as the SSH transport; only the transport differs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

from ..errors import DeviceError
from . import FEED_BLOCK, OutputCollector, RunResult, Sent, Transport, local_tree, remote_relpath


class LocalTransport(Transport):
    def __init__(self, workdir: Path | None = None, python: str = sys.executable, name: str = "local"):
        self.name = name
        self.python = python
        self._given_workdir = Path(workdir) if workdir is not None else None
        self.workdir: Path | None = None
        self._made_workdir = False

    # ------------------------------------------------------------------------------ lifecycle
    def connect(self) -> None:
        if self.workdir is not None:
            return
        try:
            if self._given_workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix="edgeft-local-"))
                self._made_workdir = True
            else:
                self._given_workdir.mkdir(parents=True, exist_ok=True)
                self.workdir = self._given_workdir.resolve()
        except OSError as exc:
            raise DeviceError(
                f"device '{self.name}': cannot create workdir {self._given_workdir or tempfile.gettempdir()}: "
                f"{exc.strerror or exc}; pick a writable directory"
            ) from exc

    def close(self) -> None:
        if self.workdir is not None and self._made_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None
        self._made_workdir = False

    # ---------------------------------------------------------------------------------- paths
    def _path(self, remote: str, *, allow_root: bool = False) -> Path:
        if self.workdir is None:
            self.connect()
        assert self.workdir is not None
        return self.workdir / remote_relpath(self.name, remote, allow_root=allow_root)

    def _fail(self, what: str, exc: OSError) -> DeviceError:
        return DeviceError(f"device '{self.name}': cannot {what}: {exc.strerror or exc}")

    # ------------------------------------------------------------------------------- transfer
    def _copy(self, src: Path, dest: Path) -> None:
        """Copy to a temp name beside `dest`, then rename, so `dest` is never half-written."""
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(name)
        try:
            shutil.copyfile(src, tmp)
            shutil.copymode(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_file(self, local: Path, remote: str) -> None:
        dest = self._path(remote)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._copy(Path(local), dest)
        except OSError as exc:
            raise self._fail(f"put {local} to {remote}", exc) from exc

    def put_dir(self, local: Path, remote: str) -> None:
        local = Path(local)
        if not local.is_dir():
            raise DeviceError(f"device '{self.name}': cannot push {local}: not a directory")
        dest = self._path(remote)
        dirs, files = local_tree(local)
        try:
            dest.mkdir(parents=True, exist_ok=True)
            for rel in dirs:
                (dest / rel).mkdir(exist_ok=True)
            for rel, path in files:
                self._copy(path, dest / rel)
        except OSError as exc:
            raise self._fail(f"put {local} to {remote}", exc) from exc

    def get_file(self, remote: str, local: Path) -> None:
        src = self._path(remote)
        local = Path(local)
        if not src.is_file():
            raise DeviceError(f"device '{self.name}': cannot fetch {remote}: no such file in the workdir")
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            self._copy(src, local)
        except OSError as exc:
            raise self._fail(f"fetch {remote} to {local}", exc) from exc

    def remove(self, remote: str) -> None:
        path = self._path(remote)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._fail(f"remove {remote}", exc) from exc

    # ------------------------------------------------------------------------------------ run
    def _spawn(self, argv: list[str], stdin: int) -> subprocess.Popen | RunResult:
        """Start `argv` in the workdir in its own session (so a timeout kills its children too, as sshd's
        killpg would); a missing or unrunnable command is the RunResult a remote shell would give."""
        try:
            return subprocess.Popen(argv, cwd=self._path(".", allow_root=True), stdin=stdin, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            return RunResult(127, "", f"{argv[0]}: not found\n")
        except PermissionError:
            return RunResult(126, "", f"{argv[0]}: permission denied\n")

    def run(self, argv: list[str], timeout: float | None = None) -> RunResult:
        if not argv:
            raise ValueError("run() needs a non-empty argv")
        argv = [str(a) for a in argv]
        proc = self._spawn(argv, subprocess.DEVNULL)
        if isinstance(proc, RunResult):
            return proc
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            proc.communicate()
            raise DeviceError(
                f"device '{self.name}': {Path(argv[0]).name} did not finish within {timeout:g} s and was killed; "
                "raise the timeout or make the run shorter"
            )
        except BaseException:
            _killpg(proc)
            proc.wait()
            raise
        return RunResult(proc.returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"))

    def run_with_input(
        self, argv: list[str], local: Path, offset: int = 0, length: int | None = None, *,
        timeout: float | None = None, progress: Sent | None = None, ready: bool = False,
    ) -> RunResult:
        if not argv:
            raise ValueError("run_with_input() needs a non-empty argv")
        argv = [str(a) for a in argv]
        try:
            src = open(local, "rb")
        except OSError as exc:
            raise DeviceError(f"device '{self.name}': cannot read {local}: {exc.strerror or exc}") from None
        with src:
            proc = self._spawn(argv, subprocess.PIPE)
            if isinstance(proc, RunResult):
                return proc
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            out, err = OutputCollector(), OutputCollector()
            # Drain both pipes while feeding stdin: a full pipe would block the command and so the feed.
            readers = [
                threading.Thread(target=_collect, args=(proc.stdout, out), daemon=True),
                threading.Thread(target=_collect, args=(proc.stderr, err), daemon=True),
            ]
            for t in readers:
                t.start()
            try:
                end = None if length is None else offset + length
                start = out.wait_ready(None) if ready else offset
                if start is not None:
                    src.seek(start)
                    sent = 0
                    while end is None or start + sent < end:
                        block = src.read(FEED_BLOCK if end is None else min(FEED_BLOCK, end - start - sent))
                        if not block:
                            break
                        try:
                            proc.stdin.write(block)
                        except BrokenPipeError:
                            break  # the command stopped reading; its output says why
                        sent += len(block)
                        if progress is not None:
                            progress(sent)
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _killpg(proc)
                proc.wait()
                raise DeviceError(
                    f"device '{self.name}': {Path(argv[0]).name} did not finish within {timeout:g} s and was killed; "
                    "raise the timeout or make the run shorter"
                ) from None
            except BaseException:
                _killpg(proc)
                proc.wait()
                raise
            finally:
                for t in readers:
                    t.join()
        return RunResult(proc.returncode, out.value().decode("utf-8", "replace"), err.value().decode("utf-8", "replace"))

    def reconnect(self) -> None:
        """Nothing to reconnect: the device is this machine (and close() would delete a temp workdir)."""
        self.connect()


def _collect(pipe: IO[bytes], sink: OutputCollector) -> None:
    try:
        for data in iter(lambda: pipe.read1(65536), b""):  # type: ignore[attr-defined]
            sink.add(data)
    finally:
        sink.close()


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
