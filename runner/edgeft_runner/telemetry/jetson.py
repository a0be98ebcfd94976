"""Jetson power mode, clock locking and throttling, from `nvpmodel -q` and sysfs.

Every sysfs path is under a root that defaults to /sys (see thermal.default_sysfs_root), so tests
can point these readers at a fixture tree. Nothing here needs root; what cannot be read is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from .thermal import read_zones, zone_dirs

# nvpmodel lives in /usr/sbin, which a non-login SSH session's PATH may leave out.
_EXTRA_TOOL_DIRS = ("/usr/sbin", "/usr/bin", "/sbin")
# Names the Jetson GPU's devfreq device has had: Nano "57000000.gpu", TX2 "17000000.gp10b",
# Xavier "17000000.gv11b", Orin "17000000.ga10b" (JetPack 5) or "17000000.gpu" (JetPack 6).
_GPU_DEVFREQ = re.compile(r"(gpu|\.g[pvma]\d+b)$")
# Clock rounding can leave cur_freq a little off the requested rate; only a real drop counts.
_FREQ_TOLERANCE = 0.01


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    extra = os.pathsep.join(d for d in _EXTRA_TOOL_DIRS if d not in os.environ.get("PATH", "").split(os.pathsep))
    return shutil.which(name, path=extra) if extra else None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _mhz(hz_or_khz: int, per_mhz: int) -> str:
    return f"{hz_or_khz / per_mhz:g} MHz"


# --- nvpmodel -------------------------------------------------------------------------------------

def parse_nvpmodel_query(text: str) -> tuple[str | None, int | None]:
    """`nvpmodel -q` prints "NV Power Mode: MAXN" then the mode id on its own line
    (Xavier/JetPack 4 may add "NV Fan Mode:quiet" before it)."""
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        match = re.match(r"NV Power Mode\s*:\s*(\S.*)$", line)
        if match:
            mode_id = next((int(later) for later in lines[i + 1:] if later.isdigit()), None)
            return match.group(1).strip(), mode_id
    return None, None


def nvpmodel_mode(run: Callable = subprocess.run, executable: str | None = None) -> dict:
    """{"name": "MAXN", "id": 0, "reason": None}; name and id None with the reason when unknown."""
    executable = executable or find_tool("nvpmodel")
    if executable is None:
        return {"name": None, "id": None, "reason": "nvpmodel not installed (not a Jetson)"}
    try:
        result = run([executable, "-q"], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return {"name": None, "id": None, "reason": f"nvpmodel not installed ({executable} not found)"}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"name": None, "id": None, "reason": f"nvpmodel -q failed: {exc}"}
    name, mode_id = parse_nvpmodel_query(result.stdout or "")
    if name is None:
        said = ((result.stderr or "").strip() or (result.stdout or "").strip() or "no output").splitlines()[-1]
        return {"name": None, "id": None, "reason": f"nvpmodel -q exited {result.returncode}: {said}"}
    return {"name": name, "id": mode_id, "reason": None}


# --- clocks ---------------------------------------------------------------------------------------

def cpufreq_policies(sysfs_root: str | Path) -> list[Path]:
    base = Path(sysfs_root) / "devices" / "system" / "cpu" / "cpufreq"
    policies = [p for p in base.glob("policy*") if re.fullmatch(r"policy\d+", p.name)]
    return sorted(policies, key=lambda p: int(p.name[len("policy"):]))


def devfreq_devices(sysfs_root: str | Path) -> list[Path]:
    return sorted((Path(sysfs_root) / "class" / "devfreq").glob("*"))


def gpu_devfreq_devices(sysfs_root: str | Path) -> list[Path]:
    return [d for d in devfreq_devices(sysfs_root) if _GPU_DEVFREQ.search(d.name)]


def _cpu_policy_lock(policy: Path) -> tuple[bool | None, str]:
    """(locked, why) for one cpufreq policy; locked None when its files cannot be read."""
    min_khz = _read_int(policy / "scaling_min_freq")
    max_khz = _read_int(policy / "scaling_max_freq")
    hw_max_khz = _read_int(policy / "cpuinfo_max_freq")
    if min_khz is None or max_khz is None:
        return None, f"{policy.name}: scaling_min_freq/scaling_max_freq unreadable"
    if min_khz != max_khz:
        return False, f"{policy.name}: scaling_min_freq {_mhz(min_khz, 1000)} < scaling_max_freq {_mhz(max_khz, 1000)}"
    # jetson_clocks locks to the maximum of the active nvpmodel mode, which below MAXN is under the
    # hardware maximum: still locked, but worth saying.
    if hw_max_khz is not None and max_khz < hw_max_khz:
        return True, f"{policy.name}: locked at {_mhz(max_khz, 1000)}, below cpuinfo_max_freq {_mhz(hw_max_khz, 1000)}"
    return True, f"{policy.name}: locked at {_mhz(max_khz, 1000)}"


def _devfreq_lock(device: Path) -> tuple[bool | None, str]:
    min_hz, max_hz = _read_int(device / "min_freq"), _read_int(device / "max_freq")
    if min_hz is None or max_hz is None:
        return None, f"{device.name}: min_freq/max_freq unreadable"
    if min_hz != max_hz:
        return False, f"{device.name}: min_freq {_mhz(min_hz, 1_000_000)} < max_freq {_mhz(max_hz, 1_000_000)}"
    return True, f"{device.name}: locked at {_mhz(max_hz, 1_000_000)}"


def jetson_clocks_applied(sysfs_root: str | Path) -> dict:
    """Whether CPU and GPU clocks are pinned (what `jetson_clocks` does): min == max for every cpufreq
    policy and the GPU devfreq device. applied is None when neither could be read."""
    checks = [_cpu_policy_lock(p) for p in cpufreq_policies(sysfs_root)]
    checks += [_devfreq_lock(d) for d in gpu_devfreq_devices(sysfs_root)]
    known = [(locked, why) for locked, why in checks if locked is not None]
    if not known:
        unread = "; ".join(why for _, why in checks)
        return {"applied": None, "reason": f"no readable cpufreq policy or GPU devfreq under {sysfs_root}"
                + (f" ({unread})" if unread else "")}
    unlocked = [why for locked, why in known if not locked]
    if unlocked:
        return {"applied": False, "reason": "; ".join(unlocked)}
    return {"applied": True, "reason": "; ".join(why for _, why in known)}


# --- throttling -----------------------------------------------------------------------------------

def passive_trips_c(zone: Path) -> list[float]:
    """The zone's passive trip temperatures: where the kernel starts slowing clocks down."""
    trips = []
    for type_file in zone.glob("trip_point_*_type"):
        if _read_text(type_file) != "passive":
            continue
        temp_mc = _read_int(type_file.with_name(type_file.name[:-len("type")] + "temp"))
        # Non-positive trips are unset/disabled placeholders on some boards, not real limits.
        if temp_mc is not None and temp_mc > 0:
            trips.append(temp_mc / 1000.0)
    return sorted(trips)


def _hot_zones(sysfs_root: str | Path, zone_max_c: dict[str, float] | None) -> list[str]:
    temps, types, _ = read_zones(sysfs_root)
    reasons = []
    for zone in zone_dirs(sysfs_root):
        # The hottest reading of the run when the caller has one: a check at the end, after the load
        # stopped, would miss a zone that cooled down.
        temp_c = max((t for t in (temps.get(zone.name), (zone_max_c or {}).get(zone.name)) if t is not None),
                     default=None)
        trips = passive_trips_c(zone)
        if temp_c is not None and trips and temp_c >= trips[0]:
            reasons.append(f"{zone.name} ({types.get(zone.name, 'unknown')}) at {temp_c:g} C, "
                           f"passive trip {trips[0]:g} C")
    return reasons


def _locked_hz(device: Path) -> int | None:
    """The rate a devfreq device is held at, or None when its governor is free to lower it."""
    min_hz, max_hz = _read_int(device / "min_freq"), _read_int(device / "max_freq")
    if not max_hz:
        return None
    governor = _read_text(device / "governor")
    if governor == "userspace":
        # userspace holds set_freq, which reads "undefined" until someone writes it: then the device
        # just stays wherever it was, and a low cur_freq says nothing.
        set_hz = _read_int(device / "userspace" / "set_freq")
        return min(set_hz, max_hz) if set_hz else None
    if governor == "performance" or min_hz == max_hz:  # min == max is how jetson_clocks pins the GPU
        return max_hz
    return None


def _slow_locked_clocks(sysfs_root: str | Path) -> list[str]:
    reasons = []
    for device in devfreq_devices(sysfs_root):
        locked_hz, cur_hz = _locked_hz(device), _read_int(device / "cur_freq")
        if locked_hz and cur_hz is not None and cur_hz < locked_hz * (1 - _FREQ_TOLERANCE):
            reasons.append(f"{device.name} at {_mhz(cur_hz, 1_000_000)}, locked at {_mhz(locked_hz, 1_000_000)}")
    return reasons


def snapshot_counters(sysfs_root: str | Path) -> dict[str, int]:
    """Over-current event counters, {"hwmon3/oc1_event_cnt": n}: take one before the run, compare after.

    On Orin these are the soctherm_oc hwmon's oc1 (under-voltage), oc2 (average over-current) and
    oc3 (instantaneous over-current); each event throttles CPU and GPU for a moment."""
    counters = {}
    for path in sorted((Path(sysfs_root) / "class" / "hwmon").glob("hwmon*/oc*_event_cnt")):
        count = _read_int(path)  # read through the BPMP firmware; it can fail, then it is left out
        if count is not None:
            counters[f"{path.parent.name}/{path.name}"] = count
    return counters


def throttle_state(sysfs_root: str | Path, before: dict[str, int] | None,
                   zone_max_c: dict[str, float] | None = None) -> dict:
    """Whether this run was throttled: a zone at or over its passive trip, a locked devfreq clock
    running below its lock, or over-current events since `before` (from snapshot_counters).

    zone_max_c ({"thermal_zone0": 61.5}, e.g. from ThermalTracker) adds the hottest reading of the run.
    throttled False means no sign was seen, including when nothing could be read (not a Jetson)."""
    reasons = _hot_zones(sysfs_root, zone_max_c) + _slow_locked_clocks(sysfs_root)
    deltas = {}
    if before is not None:
        for name, count in snapshot_counters(sysfs_root).items():
            # A counter missing from `before` has no baseline; a smaller one wrapped or was reset.
            if name in before and count > before[name]:
                deltas[name] = count - before[name]
    reasons += [f"{name} +{delta} over-current events" for name, delta in deltas.items()]
    return {"throttled": bool(reasons), "reasons": reasons, "oc_event_deltas": deltas}
