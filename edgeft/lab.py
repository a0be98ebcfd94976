"""`edgeft lab list` and `edgeft lab check`: who holds which device, and which devices are healthy.

Both contact every device in parallel. `check` probes each one (SSH reachable with a known host key,
the configured python with numpy and the target's runtime, free disk in the workdir, arch, thermal
sensors) and records the unhealthy ones, with the reason and since when, in the lab's state file
(edgeft.device.reserve.state_path); reservations skip them until a later check passes.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .config import Lab, LabDevice, load_lab, load_target
from .device.reserve import lock_status, open_device, read_health, record_health
from .errors import ConfigError, DeviceError, EdgeftError

MIN_FREE_MB = 512  # below this in the workdir a bundle may not fit: unhealthy
MAX_PARALLEL = 16
# Module names to try per runtime, as the runner imports them (edgeft_runner.backends).
RUNTIME_MODULES = {
    "onnxruntime": ["onnxruntime"],
    "tflite": ["ai_edge_litert", "tflite_runtime"],
    "tensorrt": ["tensorrt"],
}
ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "armv8l": "armv7l"}

# Runs on the device with the lab file's python (stdlib only, Python 3.6+); prints one JSON object.
PROBE_SCRIPT = r"""
import glob, importlib, json, platform, shutil, sys
out = {"python": platform.python_version(), "machine": platform.machine(), "free_bytes": shutil.disk_usage(".").free}
def version(names):
    errors = []
    for name in names:
        try:
            module = importlib.import_module(name)
            return {"module": name, "version": str(getattr(module, "__version__", "unknown"))}
        except Exception as exc:
            errors.append("%s: %s" % (name, (str(exc).strip().splitlines() or [type(exc).__name__])[0]))
    return {"error": "; ".join(errors)}
out["numpy"] = version(["numpy"])
out["runtime"] = version(json.loads(sys.argv[1]))
readable = 0
zones = sorted(glob.glob("/sys/class/thermal/thermal_zone*/temp"))
for path in zones:
    try:
        with open(path) as f:
            int(f.read().strip())
        readable += 1
    except (OSError, ValueError):
        pass
out["thermal"] = {"zones": len(zones), "readable": readable}
print(json.dumps(out))
"""


def _devices(lab: Lab, names: tuple[str, ...], tags: tuple[str, ...]) -> list[LabDevice]:
    devices = [lab.device(n) for n in names] if names else list(lab.devices)
    if tags:
        devices = [d for d in devices if set(tags) <= set(d.tags)]
        if not devices:
            raise ConfigError(f"{lab.source}: no device carries all tags {', '.join(tags)}")
    return devices


def _parallel(fn, devices: list[LabDevice]) -> list[dict[str, Any]]:
    if not devices:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(devices))) as pool:
        return list(pool.map(fn, devices))


# --------------------------------------------------------------------------------------------- list
def lab_list(lab_path: Path | None = None) -> list[dict[str, Any]]:
    """Every device with target, tags and state: free, held (by whom, since, lease expiry), unhealthy
    (why, since when) or unreachable (why)."""
    lab = load_lab(lab_path)
    health = read_health(lab)

    def one(device: LabDevice) -> dict[str, Any]:
        row: dict[str, Any] = {"name": device.name, "target": device.target, "tags": device.tags,
                               "emulated": device.emulated, "holder": None, "unhealthy": None, "error": None}
        state = health.get(device.name, {})
        if state and not state.get("healthy", True):
            row["unhealthy"] = {"reason": state.get("reason"), "since": state.get("since"), "checked": state.get("checked")}
        try:
            transport = open_device(device.name, device, lab, trust_new_host_key=False)
            try:
                status = lock_status(transport)
            finally:
                transport.close()
        except EdgeftError as exc:
            row["state"], row["error"] = "unreachable", str(exc)
            if row["unhealthy"]:
                row["state"] = "unhealthy"
            return row
        lock = status.get("lock")
        if status.get("locked"):
            lock = lock or {}
            expires_in = round(lock["expires"] - status["now"], 1) if "expires" in lock else None
            row["holder"] = {key: lock.get(key) for key in ("owner", "host", "pid", "since", "expires")}
            row["holder"].update(expires_in_s=expires_in, stale=expires_in is None or expires_in <= 0,
                                 labgrid=lock.get("labgrid"))
        row["state"] = "unhealthy" if row["unhealthy"] else "held" if row["holder"] and not row["holder"]["stale"] else "free"
        return row

    return _parallel(one, list(lab.devices))


# -------------------------------------------------------------------------------------------- check
def probe_facts(transport, runtime: str | None) -> dict[str, Any]:
    """PROBE_SCRIPT's facts from the device's python (runtime: the target's, whose module and version it
    reports); raises DeviceError when that python does not run it."""
    modules = RUNTIME_MODULES.get(runtime, []) if runtime else []
    run = transport.run([transport.python, "-c", PROBE_SCRIPT, json.dumps(modules)], timeout=60)
    try:
        found = json.loads(run.stdout.strip().splitlines()[-1]) if run.ok else None
    except (ValueError, IndexError):
        found = None
    if not isinstance(found, dict):
        detail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"python {transport.python!r} does not run the probe (exit {run.returncode}: {detail}); "
                          "set 'python' to a python3 with numpy and the runtime")
    return found


def probe(device: LabDevice, lab: Lab, trust_new_host_key: bool = False) -> dict[str, Any]:
    """Probe one device; {"name", "healthy", "problems": [...], "warnings": [...], "facts": {...}}."""
    result: dict[str, Any] = {"name": device.name, "target": device.target, "problems": [], "warnings": [], "facts": {}}
    problems, warnings, facts = result["problems"], result["warnings"], result["facts"]
    try:
        target = load_target(device.target)
    except ConfigError as exc:
        problems.append(f"target {device.target!r}: {exc}")
        target = None
    try:
        transport = open_device(device.name, device, lab, trust_new_host_key)  # reachable, host key known, auth
    except EdgeftError as exc:
        problems.append(str(exc))
    else:
        try:
            found = probe_facts(transport, target.runtime if target else None)
            facts.update(python=found["python"], arch=found["machine"], free_mb=round(found["free_bytes"] / 2**20),
                         numpy=found["numpy"].get("version"), thermal=found["thermal"])
            if "error" in found["numpy"]:
                problems.append(f"numpy does not import with {transport.python}: {found['numpy']['error']}")
            if target is not None:
                facts["runtime"] = {"name": target.runtime, **found["runtime"]}
                if "error" in found["runtime"]:
                    problems.append(f"runtime {target.runtime} does not import with {transport.python}: {found['runtime']['error']}")
                arch = ARCH_ALIASES.get(found["machine"], found["machine"])
                if arch != target.arch:
                    problems.append(f"arch {found['machine']} is not target {target.name}'s {target.arch}")
            if facts["free_mb"] < MIN_FREE_MB:
                problems.append(f"only {facts['free_mb']} MB free in the workdir (need {MIN_FREE_MB})")
            if found["thermal"]["readable"] == 0:
                warnings.append("no readable thermal sensors: temperatures and throttling will not be reported")
        except EdgeftError as exc:
            problems.append(str(exc))
        finally:
            transport.close()
    result["healthy"] = not problems
    return result


def lab_check(lab_path: Path | None = None, names: tuple[str, ...] = (), tags: tuple[str, ...] = (),
              trust_new_host_key: bool = False) -> list[dict[str, Any]]:
    """Probe the chosen devices in parallel and record their health; one result per device."""
    lab = load_lab(lab_path)
    devices = _devices(lab, names, tags)
    results = _parallel(lambda d: probe(d, lab, trust_new_host_key), devices)
    states = record_health(lab, {r["name"]: None if r["healthy"] else "; ".join(r["problems"]) for r in results})
    for r in results:
        r["since"] = states[r["name"]]["since"]
    return results
