"""Install a signed bundle on one reserved device: the device path every `edgeft flash` takes.

    with prepared_bundle(bundle_dir, pubkeys=[Path("keys/edgeft.pub")]) as prepared:  # verified on the host
        with reserve("rpi5-lab-1", lab_path=lab, bundle_manifest=prepared.manifest) as reservation:
            result = flash_device(reservation, prepared, FlashOptions())
    # {"device", "result", "bundle", "version", "previous", "bytes_sent", "seconds", "reason", ...}

The signature and every hash are checked on the host before any device is contacted; the device checks
them again (it trusts only the keys installed on it). Every file travels into `<root>/store/<sha256>` on
the device, the runner (runner.pyz) included, so a file already there is never sent again; the runner's
`install` then builds the inactive slot, smoke-tests it, switches `<root>/current` and rolls back on a
failed health check (edgeft_runner.install). `device_status` and `rollback_device` are the same path
for `edgeft status` and `edgeft rollback`. Fleets: edgeft.flash.rollout.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft_runner.signature import SIGNATURE_FILE, public_key_line

from ..artifact import sha256_file
from ..config import InstallConfig
from ..device import RunResult, Transport
from ..device.reserve import Reservation, reserve
from ..errors import BundleError, ConnectionLost, DeviceError
from ..lab import RUNTIME_MODULES
from ..runner_app import build_runner_zipapp
from .signing import load_public_key, verify_bundle
from .transfer import resolve_root, send_to_store

# Per-device outcomes. The runner's: installed, already-current, rolled-back, refused, pending; ours:
# failed (the installer ended without a result), error (unreachable, connection lost), skipped.
OK_RESULTS = ("installed", "already-current")
INSTALL_TIMEOUT_S = 900.0  # smoke test + post_install on a slow board; grace_s is added
STATUS_TIMEOUT_S = 120.0
MARGIN_BYTES = 1 << 20  # state.json, install.log, temp files beside the payload
RECONNECTS = 5  # a command cut by a lost connection is re-run after reconnecting, this many times at most
RUNNER_NAME = "edgeft-runner.pyz"

# Runs on the device with the lab file's python (stdlib only, Python 3.6+). argv: ROOT JSON; prints one
# JSON object: free bytes where the root is (or will be), bytes of the payload not yet in the store (a
# partial counts for what arrived), whether hard links work there (else a slot is a full copy), the
# bundle's runtime (found without importing it: the smoke test imports it for real), whether the runner
# is in the store and whether the key to install is trusted already (each saves a round trip).
PREFLIGHT_SCRIPT = r"""
import importlib.util, json, os, sys
root, want = sys.argv[1], json.loads(sys.argv[2])
store = os.path.join(root, "store")
key = want.get("key")
try:
    with open(os.path.join(root, "keys", key["file"])) as f:
        key_trusted = f.read() == key["line"]
except (OSError, TypeError, ValueError):
    key_trusted = False
missing = 0
for sha, size in want["files"].items():
    if os.path.exists(os.path.join(store, sha)):
        continue
    try:
        arrived = os.stat(os.path.join(store, ".partial", sha)).st_size
    except OSError:
        arrived = 0
    missing += max(0, size - arrived)
probe = root
while not os.path.isdir(probe):
    probe = os.path.dirname(probe)
st = os.statvfs(probe)
out = {"free": st.f_bavail * st.f_frsize, "missing": missing, "probe": probe, "links": None, "writable": True,
       "runtime": None, "runtime_version": None, "key_trusted": key_trusted,
       "runner": os.path.exists(os.path.join(store, want["runner"]))}
test = os.path.join(probe, ".edgeft-linktest-%d" % os.getpid())
try:
    open(test, "w").close()
    try:
        os.link(test, test + ".l")
        os.unlink(test + ".l")
        out["links"] = True
    except OSError:
        out["links"] = False
    os.unlink(test)
except OSError as exc:
    out["writable"] = exc.strerror or str(exc)
for name in want["modules"]:
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        out["runtime"] = name
        try:
            from importlib import metadata
            out["runtime_version"] = metadata.version(name.replace("_", "-"))
        except Exception:
            pass
        break
print(json.dumps(out))
"""


@dataclass(frozen=True)
class FlashOptions:
    """What `edgeft flash` passes down to every device (the lab's `install:` block gives the rest)."""

    allow_downgrade: bool = False
    no_latency_check: bool = False  # emulated devices never check latency: their timings mean nothing
    install_pubkey: Path | None = None  # trust this key on the device first (runner trust-key)
    root: str | None = None  # overrides every device's install.root


@dataclass(frozen=True)
class PreparedBundle:
    """A bundle verified on the host, with what the device needs: every file by its sha256, and the runner."""

    path: Path
    manifest: dict[str, Any]
    bundle: str  # sha256 of manifest.json: the bundle's identity everywhere
    signature: str  # sha256 of manifest.sig
    files: list[tuple[str, Path]]  # (sha256, local path): payload, manifest.json, manifest.sig; no duplicates
    sizes: dict[str, int]  # sha256 -> bytes
    runner: Path
    runner_sha: str

    @property
    def version(self) -> int | None:
        return (self.manifest.get("release") or {}).get("version")

    @property
    def channel(self) -> str | None:
        return (self.manifest.get("release") or {}).get("channel")

    @property
    def payload_bytes(self) -> int:
        return sum(self.sizes.values())


@contextmanager
def prepared_bundle(bundle_dir: Path, pubkeys: Sequence[Path]) -> Iterator[PreparedBundle]:
    """Verify the bundle's signature (with `pubkeys`) and every hash, on the host, before any device is
    contacted; build the runner beside it. Raises BundleError (one line naming the file) when refused."""
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "manifest.json").is_file():
        raise BundleError(f"{bundle_dir}: not a bundle (no manifest.json there); pass the directory `edgeft build` "
                          "wrote (build/<target> by default), signed with `edgeft sign`")
    if not pubkeys:
        raise BundleError(f"{bundle_dir}: no public key to verify it with; pass --pubkey edgeft.pub (the key "
                          "`edgeft sign` used), or --install-pubkey to also trust that key on the device")
    verified = verify_bundle(bundle_dir, list(pubkeys))
    manifest = verified["manifest"]
    files: dict[str, Path] = {}
    for rel, sha in sorted(manifest["files"].items()):
        files.setdefault(sha, bundle_dir / rel)
    bundle, signature = verified["bundle_sha256"], sha256_file(bundle_dir / SIGNATURE_FILE)
    files.setdefault(bundle, bundle_dir / "manifest.json")
    files.setdefault(signature, bundle_dir / SIGNATURE_FILE)
    with tempfile.TemporaryDirectory(prefix="edgeft-flash-") as tmp:
        runner = Path(tmp) / RUNNER_NAME
        runner_sha = build_runner_zipapp(runner)
        yield PreparedBundle(path=bundle_dir, manifest=manifest, bundle=bundle, signature=signature,
                             files=sorted(files.items()), sizes={sha: path.stat().st_size for sha, path in files.items()},
                             runner=runner, runner_sha=runner_sha)


# ----------------------------------------------------------------------------------------- runner
def install_config(reservation: Reservation) -> InstallConfig:
    return reservation.device.install if reservation.device is not None else InstallConfig()


def device_root(reservation: Reservation, root: str | None = None) -> str:
    """The absolute install root on the reserved device: `root`, else the lab's install.root."""
    return resolve_root(reservation.transport, root or install_config(reservation).root)


def runner_argv(transport: Transport, root: str, runner_sha: str) -> list[str]:
    """The argv that runs the runner stored in the device's store (python runs a zipapp by its content)."""
    return [transport.python, f"{root}/store/{runner_sha}"]


def ensure_runner(transport: Transport, root: str, runner: Path, runner_sha: str) -> list[str]:
    """Put runner.pyz into the device's store (by content: sent once per runner version); the argv that runs it."""
    send_to_store(transport, root, [(runner_sha, runner)])
    return runner_argv(transport, root, runner_sha)


def run_reconnecting(transport: Transport, argv: list[str], timeout: float) -> RunResult:
    """transport.run, reconnecting and running `argv` again when the connection drops (a flaky link). Only
    for commands that are safe to repeat: the runner's install is (it waits for the install lock, finishes
    or undoes what a cut run left, and answers already-current when that run had finished)."""
    for attempt in range(RECONNECTS + 1):
        try:
            if attempt:
                transport.reconnect()
            return transport.run(argv, timeout=timeout)
        except ConnectionLost:
            if attempt == RECONNECTS:
                raise
            time.sleep(min(0.5 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def runner_json(transport: Transport, argv: list[str], timeout: float, *,
                repeatable: bool = True) -> tuple[int, dict[str, Any] | None, str]:
    """Run a runner command (again after a lost connection if `repeatable`); (exit status, its JSON answer
    (the last stdout line) or None, last stderr line)."""
    result = run_reconnecting(transport, argv, timeout) if repeatable else transport.run(argv, timeout=timeout)
    answer = None
    for line in reversed(result.stdout.strip().splitlines()):
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        break
    detail = (result.stderr.strip().splitlines() or [""])[-1].removeprefix("edgeft-runner: ")
    return result.returncode, answer if isinstance(answer, dict) else None, detail


@contextmanager
def _runner_on_device(reservation: Reservation, root: str | None) -> Iterator[tuple[str, list[str]]]:
    with tempfile.TemporaryDirectory(prefix="edgeft-runner-") as tmp:
        runner = Path(tmp) / RUNNER_NAME
        runner_sha = build_runner_zipapp(runner)
        absolute = device_root(reservation, root)
        yield absolute, ensure_runner(reservation.transport, absolute, runner, runner_sha)


def device_status(reservation: Reservation, root: str | None = None) -> dict[str, Any]:
    """`runner status --json` on the reserved device: state.json (both slots, active, pending) and the
    last install log lines, plus {"device", "root"}."""
    with _runner_on_device(reservation, root) as (absolute, runner):
        code, answer, detail = runner_json(reservation.transport, [*runner, "status", "--root", absolute, "--json"],
                                           STATUS_TIMEOUT_S)
    if answer is None:
        raise DeviceError(f"device '{reservation.name}': the runner's status failed (exit {code}: {detail or 'no output'}); "
                          f"check the install root {absolute}")
    return {"device": reservation.name, "root": absolute, **answer}


def rollback_device(reservation: Reservation, root: str | None = None) -> tuple[int, dict[str, Any]]:
    """`runner rollback` on the reserved device: back to the other slot if it holds a good bundle (or cancel a
    pending install). (exit status, {"device", "root", runner's answer...})."""
    post_install = install_config(reservation).post_install  # so the app reloads the model it goes back to
    with _runner_on_device(reservation, root) as (absolute, runner):
        argv = [*runner, "rollback", "--root", absolute, *(["--post-install", post_install] if post_install else [])]
        # Not repeated after a lost connection: a second rollback would switch back again.
        code, answer, detail = runner_json(reservation.transport, argv, STATUS_TIMEOUT_S, repeatable=False)
    if answer is None:
        raise DeviceError(f"device '{reservation.name}': rollback failed (exit {code}: {detail or 'no output'})")
    return code, {"device": reservation.name, "root": absolute, **answer}


def active_slot(status: dict[str, Any]) -> dict[str, Any] | None:
    """The slot `current` points at, from a runner status answer (or state.json itself); None if none."""
    state = status.get("state", status)
    active = state.get("active")
    return (state.get("slots") or {}).get(active) if active else None


def is_current(status: dict[str, Any], bundle: str) -> bool:
    """True when `bundle` is active, good, and no install is pending: nothing to do."""
    state = status.get("state", status)
    slot = active_slot(status)
    return bool(slot) and slot.get("bundle") == bundle and slot.get("status") == "good" and not state.get("pending")


# ------------------------------------------------------------------------------------------ flash
def device_result(device: str, prepared: PreparedBundle, result: str, started: float | None = None,
                  **fields: Any) -> dict[str, Any]:
    """One device's record in a rollout: every key present, whatever happened; seconds since `started`."""
    out = {"device": device, "result": result, "bundle": prepared.bundle, "version": prepared.version,
           "channel": prepared.channel, "previous": None, "bytes_sent": 0, "files_sent": 0, "bytes_resumed": 0,
           "reconnects": 0, "seconds": 0.0, "reason": None, "slot": None, "root": None}
    out.update(fields)
    out["seconds"] = round(time.monotonic() - started, 3) if started is not None else 0.0
    return out


def preflight(transport: Transport, root: str, prepared: PreparedBundle, install_pubkey: Path | None = None) -> dict[str, Any]:
    """One look at the device before anything is written: free disk for what is not yet there plus a
    slot, the bundle's runtime, whether the runner is stored and the key trusted. The facts, with
    "refused": the reason to refuse the install (None when it may go ahead)."""
    runtime = prepared.manifest.get("runtime", "onnxruntime")
    want: dict[str, Any] = {"files": prepared.sizes, "modules": RUNTIME_MODULES.get(runtime, [runtime]),
                            "runner": prepared.runner_sha}
    if install_pubkey is not None:
        key_id, raw = load_public_key(install_pubkey)
        want["key"] = {"file": f"{key_id}.pub", "line": public_key_line(raw)}
    result = run_reconnecting(transport, [transport.python, "-c", PREFLIGHT_SCRIPT, root, json.dumps(want)], STATUS_TIMEOUT_S)
    try:
        facts = json.loads(result.stdout.strip().splitlines()[-1]) if result.ok else None
    except (ValueError, IndexError):
        facts = None
    if not isinstance(facts, dict):
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"device '{transport.name}': the preflight check failed with {transport.python!r} "
                          f"(exit {result.returncode}: {detail}); check 'python' for this device in the lab file")
    slot = 0 if facts["links"] else prepared.payload_bytes  # no hard links: the slot is a copy
    facts["need"] = facts["missing"] + slot + MARGIN_BYTES
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    if facts["writable"] is not True:
        facts["refused"] = (f"cannot write in {facts['probe']} ({facts['writable']}); give the login write access "
                            f"or set install.root for this device in the lab file (now {root})")
    elif facts["free"] < facts["need"]:
        facts["refused"] = (f"not enough free disk under {root}: need {mb(facts['need'])} ({mb(facts['missing'])} not yet "
                            f"on the device{', a slot copy ' + mb(slot) if slot else ''}), {mb(facts['free'])} free; "
                            "free space there or set install.root in the lab file")
    elif facts["runtime"] is None:
        facts["refused"] = (f"{runtime} is not installed for {transport.python} (looked for "
                            f"{', '.join(want['modules'])}); install it or set 'python' for this device in the lab file")
    else:
        facts["refused"] = None
    return facts


def install_argv(runner: list[str], root: str, prepared: PreparedBundle, install: InstallConfig,
                 options: FlashOptions, emulated: bool) -> list[str]:
    argv = [*runner, "install", "--root", root, "--manifest", prepared.bundle, "--signature", prepared.signature]
    if options.allow_downgrade:
        argv.append("--allow-downgrade")
    if install.post_install:
        argv += ["--post-install", install.post_install]
    if install.health_check:
        argv += ["--health-check", install.health_check]
    argv += ["--grace-s", f"{install.grace_s:g}"]
    if options.no_latency_check or emulated:
        argv.append("--no-latency-check")
    return argv


def flash_device(reservation: Reservation, prepared: PreparedBundle, options: FlashOptions = FlashOptions(), *,
                 progress: Any = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Install `prepared` on the reserved device; one result dict:
    {device, result, bundle, version, channel, previous, bytes_sent, files_sent, bytes_resumed, reconnects,
    seconds, reason, slot, root}.
    result: installed | already-current | rolled-back (smoke test or health check failed: the previous
    version runs) | refused (device-side refusal, disk, runtime) | pending | failed (no answer from the
    installer). Raises DeviceError when the device is lost mid-way. `progress`: a rich Progress for the
    transfer bar, or None."""
    started = time.monotonic()
    transport, name = reservation.transport, reservation.name
    install = install_config(reservation)
    root = device_root(reservation, options.root)
    facts = preflight(transport, root, prepared, options.install_pubkey)
    if facts["writable"] is not True:  # nothing, not even the runner, can go there
        return device_result(name, prepared, "refused", started, root=root, reason=facts["refused"])
    runner = runner_argv(transport, root, prepared.runner_sha)
    if not facts["runner"]:
        ensure_runner(transport, root, prepared.runner, prepared.runner_sha)
    built_with = (prepared.manifest.get("tools") or {}).get((facts["runtime"] or "").replace("_", "-"))
    if built_with and facts["runtime_version"] and built_with != facts["runtime_version"]:
        log(f"device {name}: {facts['runtime']} {facts['runtime_version']} here, the bundle was built with "
            f"{built_with}; the smoke test on the device decides")

    if options.install_pubkey is not None and not facts["key_trusted"]:
        remote_key = f"{reservation.run_dir}/{Path(options.install_pubkey).name}"
        transport.put_file(Path(options.install_pubkey), remote_key)
        code, _, detail = runner_json(transport, [*runner, "trust-key", "--root", root, remote_key], STATUS_TIMEOUT_S)
        if code != 0:
            return device_result(name, prepared, "refused", started, root=root,
                                 reason=f"could not install the public key {options.install_pubkey}: {detail or f'exit {code}'}")
        log(f"device {name}: trusts {options.install_pubkey}")

    code, status, detail = runner_json(transport, [*runner, "status", "--root", root, "--json"], STATUS_TIMEOUT_S)
    if status is None:
        raise DeviceError(f"device '{name}': the runner's status failed (exit {code}: {detail or 'no output'})")
    if is_current(status, prepared.bundle):
        log(f"device {name}: already runs this bundle (version {prepared.version}); nothing sent")
        return device_result(name, prepared, "already-current", started, root=root,
                             slot=status.get("state", status).get("active"))
    if facts["refused"]:
        return device_result(name, prepared, "refused", started, root=root, reason=facts["refused"])
    task = None
    if progress is not None:
        task = progress.add_task(name, total=facts["missing"] or None, visible=facts["missing"] > 0)
    try:
        stats = send_to_store(transport, root, prepared.files,
                              progress=(lambda done, total: progress.update(task, completed=done, total=total))
                              if task is not None else None)
    finally:
        if task is not None:
            progress.remove_task(task)
    log(f"device {name}: sent {stats.files_sent} file(s), {stats.bytes_sent / 1e6:.1f} MB in {stats.seconds:.1f} s "
        f"({stats.files_present} already there); installing version {prepared.version}")
    reservation.check_lease()  # another run may have used the device: do not install on its heels

    argv = install_argv(runner, root, prepared, install, options, reservation.emulated)
    code, answer, detail = runner_json(transport, argv, INSTALL_TIMEOUT_S + install.grace_s)
    sent = {"bytes_sent": stats.bytes_sent, "files_sent": stats.files_sent, "bytes_resumed": stats.bytes_resumed_from,
            "reconnects": stats.reconnects, "root": root}
    if answer is None or "result" not in answer:
        return device_result(name, prepared, "failed", started, **sent,
                             reason=f"the installer ended without a result (exit {code}: {detail or 'no output'}); "
                                    "the device keeps a verified version: see `edgeft status`, then flash again")
    reason = answer.get("reason") or (detail if code != 0 else None)
    return device_result(name, prepared, answer["result"], started, **sent, reason=reason,
                         previous=answer.get("previous"), slot=answer.get("slot"),
                         version=answer.get("version", prepared.version))


# ------------------------------------------------------------------------------- status, rollback
def status(name: str, *, lab_path: Path | None = None, root: str | None = None, wait_s: float = 0.0,
           trust_new_host_key: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`edgeft status`: reserve the device, then device_status."""
    with reserve(name, lab_path=lab_path, wait_s=wait_s, trust_new_host_key=trust_new_host_key, log=log) as reservation:
        return device_status(reservation, root)


def rollback(name: str, *, lab_path: Path | None = None, root: str | None = None, wait_s: float = 0.0,
             trust_new_host_key: bool = False, log: Callable[[str], None] = print) -> tuple[int, dict[str, Any]]:
    """`edgeft rollback`: reserve the device, then rollback_device; (the runner's exit status, its answer)."""
    with reserve(name, lab_path=lab_path, wait_s=wait_s, trust_new_host_key=trust_new_host_key, log=log) as reservation:
        return rollback_device(reservation, root)
