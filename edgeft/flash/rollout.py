"""Roll a signed bundle out to lab devices: canary first, bounded parallelism, a stop rule.

    result = rollout(Path("build/rpi5"), tags=["store-42"], pubkeys=[Path("keys/edgeft.pub")],
                     canary=1, max_failures=1, parallel=4)
    sys.exit(rollout_exit_code(result))

Devices are taken in lab-file order. The first `canary` devices are flashed first and must all end
installed (or already current) before any other starts; then the rest run `parallel` at a time. When
`max_failures` devices have failed, or a canary failed, the rollout halts: devices not yet started are
reported "skipped" with the reason, devices in flight finish. Every device is reserved like any other
device command (edgeft.device.reserve) and installed by edgeft.flash.flash.flash_device, which skips a
device already running the bundle after one status call, so re-running a rollout is idempotent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import LabDevice, load_lab
from ..device import LOCAL_DEVICE
from ..device.reserve import check_target, reserve
from ..errors import ConfigError, DeviceError, EdgeftError
from .flash import OK_RESULTS, FlashOptions, PreparedBundle, device_result, flash_device, prepared_bundle

RESULT_FORMAT = "edgeft-rollout/1"
DEFAULT_PARALLEL = 4
# Exit status: 0 every device installed or current, 1 a device failed its smoke test or health check (it
# runs its previous version) or the rollout halted, 2 a device refused the bundle or could not be reached.
EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
HALTED = "skipped: rollout halted"


def plan_devices(lab_path: Path | None, devices: Sequence[str], tags: Sequence[str],
                 manifest: dict[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """(device names to flash in order, (name, reason) of devices skipped up front). Named devices of another
    target are refused here, before any is contacted; tag-selected ones are skipped with the reason."""
    if bool(devices) == bool(tags):
        raise ConfigError("name the devices to flash: --device NAME (repeatable) or --devices TAG, not both")
    if list(devices) == [LOCAL_DEVICE]:
        return [LOCAL_DEVICE], []
    lab = load_lab(lab_path)
    if devices:
        dupes = sorted({d for d in devices if list(devices).count(d) > 1})
        if dupes:
            raise ConfigError(f"device {', '.join(dupes)} named twice; name each device once")
        chosen = [lab.device(name) for name in devices]
        for device in chosen:
            _check(device, manifest)
        return [d.name for d in chosen], []
    chosen = [d for d in lab.devices if set(tags) <= set(d.tags)]
    if not chosen:
        raise ConfigError(f"{lab.source}: no device carries all tags {', '.join(tags)}; check the tags or the lab file")
    names, skipped = [], []
    for device in chosen:
        try:
            _check(device, manifest)
        except DeviceError as exc:
            skipped.append((device.name, str(exc)))
            continue
        names.append(device.name)
    if not names:
        raise DeviceError(f"no device with tags {', '.join(tags)} can run this bundle: "
                          + "; ".join(reason for _, reason in skipped))
    return names, skipped


def _check(device: LabDevice, manifest: dict[str, Any]) -> None:
    check_target(device, manifest["target"], manifest.get("arch"), manifest.get("runtime"))


def rollout(bundle_dir: Path, *, devices: Sequence[str] = (), tags: Sequence[str] = (), lab_path: Path | None = None,
            pubkeys: Sequence[Path] = (), options: FlashOptions = FlashOptions(), canary: int = 0,
            max_failures: int | None = 1, parallel: int = DEFAULT_PARALLEL, wait_s: float = 0.0,
            trust_new_host_key: bool = False, progress: Any = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Flash `bundle_dir` to the named devices, or to every lab device carrying all `tags`.
    The signature is checked with `pubkeys` (and options.install_pubkey) before any device is contacted.
    Returns {"format", "bundle", "version", "channel", "target", "path", "started", "finished", "wall_s",
    "canary", "max_failures", "parallel", "halted" (why devices were skipped, or None), "counts",
    "devices": [one result each, in lab-file order]}."""
    if parallel < 1 or canary < 0 or (max_failures is not None and max_failures < 1):
        raise ConfigError("--parallel and --max-failures must be >= 1, --canary >= 0")
    keys = [*pubkeys, *([options.install_pubkey] if options.install_pubkey else [])]
    started, wall = time.time(), time.monotonic()
    with prepared_bundle(Path(bundle_dir), keys) as prepared:
        names, mismatched = plan_devices(lab_path, devices, tags, prepared.manifest)
        skipped = [device_result(name, prepared, "skipped", reason=reason) for name, reason in mismatched]
        for name, reason in mismatched:
            log(f"device {name}: skipped: {reason}")
        run = _Rollout(prepared, options, lab_path, max_failures, wait_s, trust_new_host_key, progress, log)
        results = run.stage(names[:canary], parallel, canary=True)
        results += run.stage(names[canary:], parallel)
    halted = run.halted if any((r["reason"] or "").startswith(HALTED) for r in results) else None  # it stopped something
    by_name = {r["device"]: r for r in [*results, *skipped]}
    ordered = [by_name[n] for n in [*names, *(s["device"] for s in skipped)]]
    counts: dict[str, int] = {}
    for r in ordered:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
    return {
        "format": RESULT_FORMAT, "bundle": prepared.bundle, "version": prepared.version, "channel": prepared.channel,
        "target": prepared.manifest["target"], "path": str(prepared.path),
        "started": _iso(started), "finished": _iso(time.time()), "wall_s": round(time.monotonic() - wall, 3),
        "canary": min(canary, len(names)), "max_failures": max_failures, "parallel": parallel,
        "halted": halted, "counts": counts, "devices": ordered,
    }


class _Rollout:
    """The shared state of one rollout: failures so far and whether it halted (threads read and write it)."""

    def __init__(self, prepared: PreparedBundle, options: FlashOptions, lab_path: Path | None, max_failures: int | None,
                 wait_s: float, trust_new_host_key: bool, progress: Any, log: Callable[[str], None]):
        self.prepared, self.options, self.lab_path = prepared, options, lab_path
        self.max_failures, self.wait_s, self.trust_new_host_key = max_failures, wait_s, trust_new_host_key
        self.progress, self.log = progress, log
        self.failures = 0
        self.halted: str | None = None
        self._lock = threading.Lock()

    def halt(self, reason: str) -> None:
        with self._lock:
            if self.halted is None:
                self.halted = reason

    def stage(self, names: list[str], parallel: int, canary: bool = False) -> list[dict[str, Any]]:
        if not names:
            return []
        with ThreadPoolExecutor(max_workers=min(parallel, len(names)), thread_name_prefix="edgeft-flash") as pool:
            return list(pool.map(lambda name: self.one(name, canary), names))

    def one(self, name: str, canary: bool = False) -> dict[str, Any]:
        if self.halted:
            self.log(f"device {name}: {HALTED} ({self.halted})")
            return device_result(name, self.prepared, "skipped", reason=f"{HALTED} ({self.halted})")
        started = time.monotonic()
        say = lambda message: self.log(message if message.startswith(f"device {name}") else f"device {name}: {message}")  # noqa: E731
        try:
            with reserve(name, lab_path=self.lab_path, wait_s=self.wait_s, trust_new_host_key=self.trust_new_host_key,
                         bundle_manifest=self.prepared.manifest, log=say) as reservation:
                result = flash_device(reservation, self.prepared, self.options, progress=self.progress, log=say)
        except EdgeftError as exc:  # unreachable, lost mid-way, disk full: one line, the others go on
            result = device_result(name, self.prepared, "error", started, reason=str(exc))
        if result["result"] not in OK_RESULTS:
            with self._lock:
                self.failures += 1
                over = self.max_failures is not None and self.failures >= self.max_failures
            say(f"{result['result']}: {result.get('reason')}")
            if canary:  # every canary must pass before the others start
                self.halt(f"canary {name} {result['result']}: {result.get('reason')}")
            elif over:
                self.halt(f"{self.failures} device(s) failed, --max-failures {self.max_failures}")
        return result


def rollout_exit_code(result: dict[str, Any]) -> int:
    """0 all installed or current; 2 a device refused the bundle or could not be reached; else 1 (a device
    rolled back after a failed smoke test or health check, or the rollout halted)."""
    outcomes = {r["result"] for r in result["devices"]}
    if outcomes & {"refused", "error"}:
        return EXIT_REFUSED
    if result["halted"] or outcomes - {*OK_RESULTS, "skipped"}:
        return EXIT_FAILED
    return EXIT_OK


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")
