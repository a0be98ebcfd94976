"""The install root on a device: content store, A/B slots, the `current` link, state.json, install.log, lock.

```
<root>/store/<sha256>            every file by content, mode 0444; partials in store/.partial/<sha256>
<root>/slots/a/, <root>/slots/b/ hard links into the store (copies where linking fails)
<root>/current -> slots/a        what the application reads; switched by temp link + os.replace + fsync
<root>/state.json                active slot, both slots, the pending install, highest version per channel
<root>/install.log               JSON lines: time, step, result, bundle, version, channel, slot, detail
<root>/keys/<key_id>.pub         the public keys this device trusts
<root>/.install.lock             flock'ed by whoever installs, rolls back or commits
```
Every change of state is a new file written beside the old one, fsynced, renamed over it and the directory
fsynced, so a power cut leaves the old file or the new one, never a torn one. state.json is the truth;
`current` is made to follow it (`InstallRoot.point_current`), and recovery re-points it after a crash.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import RunnerError

STATE_FORMAT = "edgeft-install-state/1"
SLOT_NAMES = ("a", "b")
SLOT_STATUSES = ("good", "pending", "failed")
FAULT_ENV = "EDGEFT_INSTALL_FAULT"  # tests: SIGKILL this process when it reaches the named step
BOOT_ID_ENV = "EDGEFT_BOOT_ID_FILE"  # tests: read the boot id here instead (a changed id = a reboot)
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def fault_point(step: str) -> None:
    """Die like a power cut (SIGKILL: no cleanup, no finally) when the test harness asks for this step."""
    if os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def boot_id() -> str:
    """This boot's id; '' where the system has none (then only a dead installer triggers recovery)."""
    try:
        return Path(os.environ.get(BOOT_ID_ENV) or BOOT_ID_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """temp + fsync + rename + fsync of the directory: after a crash, the old content or the new, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(str(tmp), mode)  # the umask may have narrowed it
        os.replace(str(tmp), str(path))
        fsync_dir(path.parent)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise RunnerError(f"cannot write {path}: {exc.strerror or exc}") from None


def empty_state() -> dict:
    return {"format": STATE_FORMAT, "active": None, "slots": {name: None for name in SLOT_NAMES}, "pending": None,
            "highest_version": {}, "highest_bundle": {}}


def _check_state(state: object, path: Path) -> dict:
    """The fields every command relies on, so a hand-edited or foreign file is refused with its name."""
    def bad(what: str) -> RunnerError:
        return RunnerError(f"{path}: {what}; restore it from a backup or move the install root away to start over")

    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise bad(f"not an {STATE_FORMAT} file")
    if state.get("active") not in (None, *SLOT_NAMES):
        raise bad(f"active is {state.get('active')!r}, expected one of {', '.join(SLOT_NAMES)} or null")
    slots = state.get("slots")
    if not isinstance(slots, dict) or set(slots) != set(SLOT_NAMES):
        raise bad("slots must be an object with exactly the keys " + ", ".join(SLOT_NAMES))
    for name, slot in slots.items():
        if slot is not None and not (isinstance(slot, dict) and isinstance(slot.get("bundle"), str)
                                     and isinstance(slot.get("version"), int) and slot.get("status") in SLOT_STATUSES):
            raise bad(f"slots.{name} must be null or {{bundle, version, channel, status, installed_at}}")
    pending = state.get("pending")
    if pending is not None and not (isinstance(pending, dict) and pending.get("slot") in SLOT_NAMES
                                    and pending.get("previous") in (None, *SLOT_NAMES)):
        raise bad("pending must be null or {slot, previous, boot_id, pid, since}")
    if not isinstance(state.get("highest_version"), dict):
        raise bad("highest_version must be an object of channel -> version")
    state.setdefault("highest_bundle", {})  # ours: which bundle holds the highest version (same version, other bundle: refused)
    return state


class InstallRoot:
    """One install root; every path the layout names, and the durable writes that change it."""

    def __init__(self, root: str | Path):
        root = Path(os.path.abspath(str(root)))  # a relative --root is taken from the working directory
        self.root = root
        self.store = root / "store"
        self.partial = self.store / ".partial"
        self.slots = root / "slots"
        self.current = root / "current"
        self.state_path = root / "state.json"
        self.log_path = root / "install.log"
        self.keys = root / "keys"
        self.lock_path = root / ".install.lock"

    def slot_dir(self, name: str) -> Path:
        return self.slots / name

    def store_path(self, sha256: str) -> Path:
        return self.store / sha256

    def ensure_layout(self) -> None:
        try:
            for path in (self.root, self.store, self.partial, self.slots, self.keys):
                path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunnerError(f"cannot create the install root {self.root}: {exc.strerror or exc} "
                              "(choose a writable --root)") from None

    # --- state ---------------------------------------------------------------------------------------------

    def read_state(self) -> dict:
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return empty_state()
        except OSError as exc:
            raise RunnerError(f"cannot read {self.state_path}: {exc.strerror or exc}") from None
        try:
            state = json.loads(text)
        except ValueError as exc:
            raise RunnerError(f"{self.state_path} is not valid JSON ({exc}); restore it or move the root away") from None
        return _check_state(state, self.state_path)

    def write_state(self, state: dict) -> None:
        write_bytes_durably(self.state_path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    # --- install.log ---------------------------------------------------------------------------------------

    def log(self, step: str, result: str, *, bundle: str | None = None, version: int | None = None,
            channel: str | None = None, slot: str | None = None, detail: object = None) -> None:
        """Append one JSON line and fsync it: what happened survives the power cut that may follow."""
        line = json.dumps({"time": now_iso(), "step": step, "result": result, "bundle": bundle, "version": version,
                           "channel": channel, "slot": slot, "detail": detail}, sort_keys=True) + "\n"
        try:
            fd = os.open(str(self.log_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise RunnerError(f"cannot append to {self.log_path}: {exc.strerror or exc}") from None

    def read_log(self, last: int) -> list[dict]:
        """The last `last` entries; a line torn by a power cut is skipped."""
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines[-last:] if last > 0 else []:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    # --- the current link ----------------------------------------------------------------------------------

    def current_slot(self) -> str | None:
        """The slot `current` points at ('a'/'b'), or None when there is no link (or a foreign one)."""
        try:
            target = os.readlink(str(self.current))
        except OSError:
            return None
        parts = Path(target).parts
        return parts[1] if len(parts) == 2 and parts[0] == "slots" and parts[1] in SLOT_NAMES else None

    def point_current(self, slot: str | None) -> None:
        """Atomically re-point `current` (a relative link, so the root can move): new link beside it, rename
        over it, fsync the root so the rename itself is durable. None removes the link."""
        try:
            if slot is None:
                if os.path.lexists(str(self.current)):
                    os.unlink(str(self.current))
                    fsync_dir(self.root)
                return
            tmp = self.root / "current.tmp"
            if os.path.lexists(str(tmp)):
                os.unlink(str(tmp))
            os.symlink(f"slots/{slot}", str(tmp))
            os.replace(str(tmp), str(self.current))
            fsync_dir(self.root)
        except OSError as exc:
            raise RunnerError(f"cannot switch {self.current}: {exc.strerror or exc}") from None

    # --- the lock ------------------------------------------------------------------------------------------

    @contextmanager
    def locked(self, wait_s: float) -> Iterator[None]:
        """Hold <root>/.install.lock (flock: the kernel drops it when its holder dies, SIGKILL included).
        Waits up to wait_s for another installer, then refuses. The fd is close-on-exec, so commands the
        installer runs (post_install, health check) never inherit the lock."""
        self.ensure_layout()
        fd = os.open(str(self.lock_path), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise RunnerError(f"cannot lock {self.lock_path}: {exc.strerror}") from None
                    if time.monotonic() >= deadline:
                        raise RunnerError(f"another installer holds {self.lock_path} (waited {wait_s:g} s); "
                                          "let it finish, then run this again") from None
                    time.sleep(0.2)
            yield
        finally:
            os.close(fd)  # closing the only fd releases the flock

    def try_lock(self) -> int | None:
        """Non-blocking: an fd holding the lock, or None when another process holds it (status reads then)."""
        self.ensure_layout()
        fd = os.open(str(self.lock_path), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            os.close(fd)
            return None

