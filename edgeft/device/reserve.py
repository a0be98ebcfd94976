"""Reserving a device: two runs never share one.

    with reserve("rpi5-lab-1", lab_path=lab, wait_s=60, bundle_manifest=manifest) as r:
        push_verified(r.transport, bundle_dir, f"{r.run_dir}/bundle")
        ...                                   # r.run_dir is this run's own dir; removed on release

The lock lives ON THE DEVICE, so small labs need no server: an atomic `mkdir` of `.edgeft-lock/` in
the device's workdir, holding `lock.json` = {owner, host, pid, since, expires, token, run, lease_s}.
All lock operations run as one small stdlib script with the device's own python, so the device's
clock decides expiry, never two hosts' clocks. The holder renews its lease every lease_s/4 from a
background thread; a holder that died stops renewing and, lease_s after its last renewal, the next
reservation takes the lock over (and says so). Whoever acquires the lock removes the run dirs left
under `runs/` by killed runs; each run works in its own `runs/<random id>`, removed on release.
Release only removes a lock whose token is ours.

`lock: labgrid` labs additionally lock the labgrid place named like the device (through
`labgrid-client`), so people and tools using labgrid see the board as taken. labgrid never expires
an acquired place, so the device-side lease stays the source of truth for liveness: the lease records
the labgrid identity (host/user) that locks the place, and whoever takes over an expired lease kicks a
place still held by that identity. A place held by anyone else (a person at the board) is respected.

Health: `edgeft lab check` records unhealthy devices in `<lab dir>/.edgeft-lab-state.json`; reservations
skip them until a later check passes.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..artifact import cache_root, write_atomic
from ..config import Lab, LabDevice, load_lab, load_target
from ..errors import ConfigError, DeviceError
from . import LOCAL_DEVICE, Transport

DEFAULT_LEASE_S = 120.0
LOCK_DIR = ".edgeft-lock"
RUNS_DIR = "runs"
STATE_FILE = ".edgeft-lab-state.json"
POLL_S = 1.0  # how often a waiting reservation retries
SCRIPT_TIMEOUT_S = 30.0
LABGRID_TIMEOUT_S = 30.0

# Runs on the device with its own python (stdlib only, Python 3.6+). argv: OP JSON-ARGS; prints one
# JSON object. The flock on a guard file makes each operation atomic against the others (and so a
# takeover of a stale lock, which is read-check-replace); the lock itself is the mkdir'ed dir.
LOCK_SCRIPT = r"""
import errno, fcntl, json, os, shutil, sys, time
LOCK, RUNS = ".edgeft-lock", "runs"
RECORD = os.path.join(LOCK, "lock.json")
op, args = sys.argv[1], json.loads(sys.argv[2])

def read():
    try:
        with open(RECORD) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def write(lock):
    tmp = RECORD + ".tmp"
    with open(tmp, "w") as f:
        json.dump(lock, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, RECORD)

def runs():
    try:
        return sorted(os.listdir(RUNS))
    except OSError:
        return []

guard = open(".edgeft-lock.guard", "a")
fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
now = time.time()
out = {"now": now}
held = read() if os.path.isdir(LOCK) else None
if op == "acquire":
    try:
        os.mkdir(LOCK)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        # No record: its creator died between mkdir and write (the guard rules out a writer in progress).
        if held is not None and held.get("expires", 0) > now:
            out.update(acquired=False, lock=held)
            print(json.dumps(out))
            sys.exit(0)
        out["took_over"] = held or {}
        shutil.rmtree(LOCK)
        os.mkdir(LOCK)
    lock = dict(args["lock"], since=now, expires=now + args["lock"]["lease_s"])
    write(lock)
    out["removed_runs"] = runs()  # the lock is ours: every run dir left is a killed run's
    for name in out["removed_runs"]:
        shutil.rmtree(os.path.join(RUNS, name), ignore_errors=True)
    os.makedirs(os.path.join(RUNS, lock["run"]))
    out.update(acquired=True, lock=lock)
elif op == "renew":
    ok = held is not None and held.get("token") == args["token"]
    if ok:
        held["expires"] = now + held["lease_s"]
        write(held)
    out.update(renewed=ok, lock=held)
elif op == "release":
    if args.get("run"):
        shutil.rmtree(os.path.join(RUNS, args["run"]), ignore_errors=True)
    ok = held is not None and held.get("token") == args["token"]
    if ok:
        shutil.rmtree(LOCK)
    out.update(released=ok, lock=held)
elif op == "status":
    out.update(lock=held, locked=os.path.isdir(LOCK), runs=runs())
elif op == "unlock":
    locked = os.path.isdir(LOCK)
    stale = held is None or held.get("expires", 0) <= now
    ok = locked and (stale or args.get("force", False))
    if ok:
        shutil.rmtree(LOCK)
        out["removed_runs"] = runs()
        for name in out["removed_runs"]:
            shutil.rmtree(os.path.join(RUNS, name), ignore_errors=True)
    out.update(unlocked=ok, locked=locked, stale=stale, lock=held)
else:
    sys.exit("unknown op " + op)
print(json.dumps(out))
"""


@dataclass
class Reservation:
    name: str  # device name ("local" for this machine)
    device: LabDevice | None  # None for "local"
    transport: Transport  # connected
    run_dir: str  # workdir-relative, "runs/<random hex id>", created; removed on release
    lock: dict  # {"owner","host","pid","since","expires",...} as written on the device
    emulated: bool
    lost: threading.Event = field(default_factory=threading.Event)  # set when a renewal found the lock not ours

    def check_lease(self) -> None:
        """Raise DeviceError if the lease was lost while this run held it: its numbers cannot be trusted."""
        if self.lost.is_set():
            raise DeviceError(
                f"device '{self.name}': this run's lease was lost while it ran (another run may have used the "
                "device at the same time); its measurement is discarded; re-run it"
            )


def me() -> dict[str, Any]:
    """Who is reserving: what goes into the lock record and what `lab list` shows."""
    host = socket.gethostname()
    return {"owner": f"{getpass.getuser()}@{host}", "host": host, "pid": os.getpid()}


def labgrid_identity() -> str:
    """The host/user labgrid-client records as a place's holder (same environment overrides)."""
    return f"{os.environ.get('LG_HOSTNAME', socket.gethostname())}/{os.environ.get('LG_USERNAME', getpass.getuser())}"


# ------------------------------------------------------------------------------------ lock script
def lock_op(transport: Transport, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one lock operation on the device; its JSON answer."""
    result = transport.run([transport.python, "-c", LOCK_SCRIPT, op, json.dumps(args or {})], timeout=SCRIPT_TIMEOUT_S)
    try:
        answer = json.loads(result.stdout.strip().splitlines()[-1]) if result.ok else None
    except (ValueError, IndexError):
        answer = None
    if not isinstance(answer, dict):
        detail = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(
            f"device '{transport.name}': the lock script failed with {transport.python!r} (exit {result.returncode}: "
            f"{detail}); check 'python' and 'workdir' for this device in the lab file"
        )
    return answer


def describe_holder(lock: dict[str, Any] | None, now: float | None = None) -> str:
    """'user@host (pid 123, since 12:01:02, lease expires in 97 s)'."""
    if not lock:
        return "an unknown holder (lock dir without a record)"
    since = _clock(lock.get("since"))
    left = ""
    if now is not None and lock.get("expires") is not None:
        secs = lock["expires"] - now
        left = f", lease expires in {secs:.0f} s" if secs >= 0 else f", lease expired {-secs:.0f} s ago"
    return f"{lock.get('owner', '?')} (pid {lock.get('pid', '?')}, since {since}{left})"


def _clock(epoch: float | None) -> str:
    if epoch is None:
        return "?"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


# ------------------------------------------------------------------------------------------ health
def state_path(lab: Lab) -> Path:
    return Path(lab.source or "hil/lab.yaml").parent / STATE_FILE


def read_health(lab: Lab) -> dict[str, dict[str, Any]]:
    """{device name: {"healthy", "reason", "since", "checked"}} from the last `edgeft lab check`."""
    path = state_path(lab)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable lab state ({exc}); delete it and run `edgeft lab check`") from exc
    return data.get("devices", {}) if isinstance(data, dict) else {}


def record_health(lab: Lab, results: dict[str, str | None]) -> dict[str, dict[str, Any]]:
    """Record check results ({name: None if healthy else reason}); an unhealthy device keeps the time it
    first failed as `since`. Read-modify-write under a file lock, written atomically."""
    path = state_path(lab)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with FileLock(str(path) + ".lock", timeout=30):
        states = read_health(lab)
        for name, reason in results.items():
            before = states.get(name, {})
            healthy = reason is None
            since = before.get("since") if before.get("healthy") == healthy and before.get("since") else now
            states[name] = {"healthy": healthy, "reason": reason, "since": since, "checked": now}
        write_atomic(path, json.dumps({"devices": states}, indent=2) + "\n")
    return states


# ------------------------------------------------------------------------------------- target match
def check_target(device: LabDevice, target: str, arch: str | None = None, runtime: str | None = None,
                 what: str = "the bundle was built") -> None:
    """Refuse a device whose target is not `target` (nor the same arch and runtime), naming both."""
    if device.target == target:
        return
    theirs = load_target(device.target)
    if arch is None or runtime is None:
        ours = load_target(target)
        arch, runtime = ours.arch, ours.runtime
    if (theirs.arch, theirs.runtime) == (arch, runtime):
        return
    raise DeviceError(
        f"device '{device.name}' is a {device.target} ({theirs.arch}, {theirs.runtime}) but {what} for {target} "
        f"({arch}, {runtime}); build for {device.target} or pick a {target} device"
    )


def _manifest_matches(device: LabDevice, manifest: dict[str, Any]) -> None:
    check_target(device, manifest["target"], manifest.get("arch"), manifest.get("runtime"))


# ------------------------------------------------------------------------------------------ labgrid
def labgrid_client() -> str:
    beside = Path(sys.executable).parent / "labgrid-client"
    found = str(beside) if beside.exists() else shutil.which("labgrid-client")
    if not found:
        raise ConfigError(
            "lock: labgrid needs labgrid-client; install it (pip install labgrid==26.0.1, or edgeft's `labgrid` extra)"
        )
    return found


def labgrid(coordinator: str, place: str, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([labgrid_client(), "-x", coordinator, "-p", place, *args], capture_output=True,
                              text=True, timeout=LABGRID_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"labgrid coordinator {coordinator} did not answer within {LABGRID_TIMEOUT_S:g} s "
                          f"(place {place}); check that it runs")


def labgrid_holder(coordinator: str, place: str) -> str | None:
    """The host/user holding `place`, or None when it is free."""
    result = labgrid(coordinator, place, "show")
    if result.returncode != 0:
        raise DeviceError(_labgrid_problem(coordinator, place, result))
    for line in result.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "acquired":
            value = value.strip()
            return None if value in ("", "None") else value
    return None


def _labgrid_problem(coordinator: str, place: str, result: subprocess.CompletedProcess) -> str:
    detail = (result.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("labgrid-client: Error: ")
    if "matches nothing" in detail:
        return (f"labgrid place '{place}' does not exist on {coordinator}; create it "
                f"(labgrid-client -x {coordinator} -p {place} create) or fix the device name")
    return f"labgrid coordinator {coordinator}, place '{place}': {detail}"


def labgrid_lock(coordinator: str, place: str) -> str | None:
    """Lock the place; None on success, else who holds it."""
    result = labgrid(coordinator, place, "lock")
    if result.returncode == 0:
        return None
    holder = labgrid_holder(coordinator, place)
    if holder is None:  # not held, yet refused: a real problem (no such place, coordinator down)
        raise DeviceError(_labgrid_problem(coordinator, place, result))
    return holder


def labgrid_unlock(coordinator: str, place: str, kick: bool = False) -> None:
    result = labgrid(coordinator, place, "unlock", *(["--kick"] if kick else []))
    if result.returncode != 0 and labgrid_holder(coordinator, place) is not None:
        raise DeviceError(_labgrid_problem(coordinator, place, result))


# -------------------------------------------------------------------------------------- transports
def local_workdir() -> Path:
    """The local device's workdir: fixed, so two runs on this machine see each other's lock."""
    return Path(os.environ.get("EDGEFT_LOCAL_WORKDIR") or cache_root() / "local-device")


def open_device(name: str, device: LabDevice | None, lab: Lab | None, trust_new_host_key: bool) -> Transport:
    """A connected transport to `device` (None: this machine, in local_workdir())."""
    if device is None:
        from .local import LocalTransport

        transport: Transport = LocalTransport(workdir=local_workdir(), name=name)
    else:
        from .ssh import SshTransport

        transport = SshTransport(device, trust_new_host_key=trust_new_host_key, lab_file=lab.source if lab else None)
    transport.connect()
    return transport


# ------------------------------------------------------------------------------------------ reserve
@dataclass
class _Busy:
    name: str
    why: str  # "held by ...", "unreachable: ..."


def _candidates(name: str | None, tags: Sequence[str], lab: Lab, manifest: dict[str, Any] | None) -> list[LabDevice]:
    """The devices this reservation may take, healthy and of the bundle's target; errors name why none."""
    where = lab.source
    if name is not None:
        device = lab.device(name)
        if manifest is not None:
            _manifest_matches(device, manifest)
        devices = [device]
    else:
        devices = [d for d in lab.devices if set(tags) <= set(d.tags)]
        if not devices:
            raise ConfigError(f"{where}: no device carries all tags {', '.join(tags)}; check the tags or the lab file")
        if manifest is not None:
            mismatched = []
            for d in list(devices):
                try:
                    _manifest_matches(d, manifest)
                except DeviceError as exc:
                    mismatched.append(str(exc))
                    devices.remove(d)
            if not devices:
                raise DeviceError(f"no device with tags {', '.join(tags)} can run this bundle: {'; '.join(mismatched)}")
    health = read_health(lab)
    healthy = [d for d in devices if health.get(d.name, {}).get("healthy", True)]
    if not healthy:
        why = "; ".join(f"{d.name}: {health[d.name].get('reason')} (since {health[d.name].get('since')})" for d in devices)
        raise DeviceError(
            f"{'device ' + repr(name) if name else 'every device with tags ' + ', '.join(tags)} is marked unhealthy "
            f"({why}); fix it and run `edgeft lab check --lab {where}`"
        )
    return healthy


@contextmanager
def reserve(name: str | None = None, *, tags: Sequence[str] = (), lab_path: Path | None = None,
            wait_s: float = 0.0, trust_new_host_key: bool = False, bundle_manifest: dict | None = None,
            log: Callable[[str], None] = print) -> Iterator[Reservation]:
    """Reserve a device by name or by tags (any healthy free device carrying all of them); wait up to
    wait_s for one; yield a Reservation. Released on exit, error, Ctrl-C and SIGTERM (as SystemExit)."""
    if (name is None) == (not tags):
        raise ConfigError("reserve a device by name or by tags (not both, not neither)")
    if name == LOCAL_DEVICE and not tags:
        lab, devices = None, [None]
    else:
        lab = load_lab(lab_path)
        devices = _candidates(name, tags, lab, bundle_manifest)
    deadline = time.monotonic() + max(0.0, wait_s)
    waited = False
    while True:
        busy: list[_Busy] = []
        for device in devices:
            dev_name = device.name if device is not None else LOCAL_DEVICE
            try:
                taken = _try_take(dev_name, device, lab, trust_new_host_key, log)
            except DeviceError as exc:
                if name is not None:  # the one device asked for: its problem is the answer
                    raise
                busy.append(_Busy(dev_name, f"unreachable: {exc}"))
                continue
            if isinstance(taken, _Busy):
                busy.append(taken)
                continue
            with _held(taken, lab, log):
                yield taken
            return
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(b.name for b in busy)
            detail = "; ".join(f"{b.name} {b.why}" for b in busy)
            after = f" after waiting {wait_s:g} s" if waited else ""
            raise DeviceError(f"no device free{after} ({names}): {detail}; retry later or pass --wait SECONDS")
        if not waited:
            log(f"waiting up to {left:.0f} s for {name or 'a device with tags ' + ', '.join(tags)}: "
                + "; ".join(f"{b.name} {b.why}" for b in busy))
            waited = True
        time.sleep(min(POLL_S, left))


def _try_take(name: str, device: LabDevice | None, lab: Lab | None, trust_new_host_key: bool,
              log: Callable[[str], None]) -> Reservation | _Busy:
    """One attempt: connect, take the device's lock (and the labgrid place); a Reservation, or who has it."""
    transport = open_device(name, device, lab, trust_new_host_key)
    acquired = False
    try:
        run_id = secrets.token_hex(8)
        use_labgrid = device is not None and lab is not None and lab.lock == "labgrid"
        record = {**me(), "token": run_id, "run": run_id, "lease_s": lab.lease_s if lab else DEFAULT_LEASE_S}
        if use_labgrid:
            record["labgrid"] = labgrid_identity()
        answer = lock_op(transport, "acquire", {"lock": record})
        if not answer.get("acquired"):
            transport.close()
            return _Busy(name, "held by " + describe_holder(answer.get("lock"), answer.get("now")))
        acquired = True
        lock = answer["lock"]
        if "took_over" in answer:
            log(f"device {name}: took over the expired lease of {describe_holder(answer['took_over'], answer['now'])}")
        if answer.get("removed_runs"):
            log(f"device {name}: removed {len(answer['removed_runs'])} run dir(s) left by a killed run: "
                + ", ".join(answer["removed_runs"]))
        if use_labgrid:
            assert device is not None and lab is not None and lab.coordinator
            holder = labgrid_lock(lab.coordinator, device.name)
            stale = (answer.get("took_over") or {}).get("labgrid")
            if holder is not None and holder == stale:  # the dead holder's place: its lease is gone
                log(f"device {name}: unlocking labgrid place {device.name}, left locked by {holder} whose lease expired")
                labgrid_unlock(lab.coordinator, device.name, kick=holder != labgrid_identity())
                holder = labgrid_lock(lab.coordinator, device.name)
            if holder is not None:  # someone using labgrid holds the place: give the device lock back
                lock_op(transport, "release", {"token": run_id, "run": run_id})
                transport.close()
                return _Busy(name, f"held by {holder} (labgrid place on {lab.coordinator})")
        return Reservation(name=name, device=device, transport=transport, run_dir=f"{RUNS_DIR}/{run_id}",
                           lock=lock, emulated=bool(device and device.emulated))
    except BaseException:
        if acquired:  # interrupted between taking the lock and handing it out: give it back now, not at expiry
            try:
                lock_op(transport, "release", {"token": run_id, "run": run_id})
            except Exception:
                pass
        transport.close()
        raise


@contextmanager
def _held(r: Reservation, lab: Lab | None, log: Callable[[str], None]) -> Iterator[None]:
    """Renew the lease in the background while the body runs; release everything after it, whatever happens."""
    stop = threading.Event()
    lease_s = float(r.lock["lease_s"])

    def renew() -> None:
        failing = False
        while not stop.wait(lease_s / 4):
            try:
                answer = lock_op(r.transport, "renew", {"token": r.lock["token"]})
            except DeviceError as exc:
                if not failing:
                    log(f"device {r.name}: could not renew the lease ({exc}); retrying")
                failing = True
                continue
            failing = False
            if not answer.get("renewed"):
                r.lost.set()
                log(f"device {r.name}: lease lost: the lock is now {describe_holder(answer.get('lock'), answer.get('now'))}")
                return
            r.lock = answer["lock"]

    renewer = threading.Thread(target=renew, name=f"edgeft-lease-{r.name}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(timeout=SCRIPT_TIMEOUT_S)
        try:
            if not r.lost.is_set():
                if lab is not None and lab.lock == "labgrid" and r.device is not None and lab.coordinator:
                    labgrid_unlock(lab.coordinator, r.device.name)
            lock_op(r.transport, "release", {"token": r.lock["token"], "run": r.lock["run"]})
        except (DeviceError, ConfigError) as exc:
            log(f"device {r.name}: could not release the lock ({exc}); it expires {lease_s:g} s after the last renewal")
        finally:
            r.transport.close()


# ----------------------------------------------------------------------------------- lab inspection
def lock_status(transport: Transport) -> dict[str, Any]:
    """The device's lock as it stands: {"lock": record or None, "locked", "now", "runs"}."""
    return lock_op(transport, "status")


def unlock(name: str, lab_path: Path | None, *, force: bool = False, trust_new_host_key: bool = False,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """`edgeft lab unlock`: remove an expired lease (force: a live one too), its run dirs, and (lock: labgrid)
    the place lock its holder left."""
    lab = None if name == LOCAL_DEVICE else load_lab(lab_path)
    device = lab.device(name) if lab else None
    transport = open_device(name, device, lab, trust_new_host_key)
    try:
        answer = lock_op(transport, "unlock", {"force": force})
    finally:
        transport.close()
    held = answer.get("lock")
    if answer.get("locked") and not answer.get("unlocked"):
        raise DeviceError(f"device '{name}' is held by {describe_holder(held, answer['now'])}, a live lease; "
                          "wait for it, or pass --force if that run is hung")
    if lab is not None and lab.lock == "labgrid" and device is not None and lab.coordinator:
        holder = labgrid_holder(lab.coordinator, device.name)
        if holder is not None and (held or {}).get("labgrid") == holder:
            labgrid_unlock(lab.coordinator, device.name, kick=holder != labgrid_identity())
            answer["labgrid_unlocked"] = holder
    return answer
