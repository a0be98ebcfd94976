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
from pathlib import Path

from ..errors import DeviceError
from . import RunResult, Transport, local_tree, remote_relpath


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
            ) from None

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
            raise self._fail(f"put {local} to {remote}", exc) from None

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
            raise self._fail(f"put {local} to {remote}", exc) from None

    def get_file(self, remote: str, local: Path) -> None:
        src = self._path(remote)
        local = Path(local)
        if not src.is_file():
            raise DeviceError(f"device '{self.name}': cannot fetch {remote}: no such file in the workdir")
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            self._copy(src, local)
        except OSError as exc:
            raise self._fail(f"fetch {remote} to {local}", exc) from None

    def remove(self, remote: str) -> None:
        path = self._path(remote)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._fail(f"remove {remote}", exc) from None

    # ------------------------------------------------------------------------------------ run
    def run(self, argv: list[str], timeout: float | None = None) -> RunResult:
        if not argv:
            raise ValueError("run() needs a non-empty argv")
        cwd = self._path(".", allow_root=True)
        argv = [str(a) for a in argv]
        try:
            # Own session, so a timeout kills the command's children too (as sshd's killpg would).
            proc = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError:
            # What a remote shell reports for a missing command, so both transports agree.
            return RunResult(127, "", f"{argv[0]}: not found\n")
        except PermissionError:
            return RunResult(126, "", f"{argv[0]}: permission denied\n")
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            proc.communicate()
            raise DeviceError(
                f"device '{self.name}': {Path(argv[0]).name} did not finish within {timeout:g} s and was killed; "
                "raise the timeout or make the run shorter"
            ) from None
        except BaseException:
            _killpg(proc)
            proc.wait()
            raise
        return RunResult(proc.returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"))


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
