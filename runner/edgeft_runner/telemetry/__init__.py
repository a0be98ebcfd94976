"""Background sampling while the model runs, and the one telemetry schema every runtime reports.

Each sample (also written as a JSON line with --samples, for plotting) has the same keys on every
device: t (unix s), rss_mb, ram_used_mb, temps_c {zone: C}, hot_zones [zones at or over their
first passive trip: the kernel is slowing clocks down], cpu_freq_mhz {policy: MHz}, gpu_freq_mhz,
emc_freq_mhz, power_mw {rail: mW}. What a device cannot read is null or {}; the summary says why.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from .jetson import _read_int, cpufreq_policies, gpu_devfreq_devices, passive_trips_c
from .system import ram_used_mb, rss_mb
from .thermal import ThermalTracker, zone_dirs

SAMPLE_INTERVAL_S = 0.2
SCHEMA = "edgeft-telemetry/1"


def clock_sample(sysfs_root: str | Path) -> dict:
    """CPU policy clocks (cpufreq, kHz) and the GPU clock (devfreq, Hz), in MHz."""
    cpu = {}
    for policy in cpufreq_policies(sysfs_root):
        khz = _read_int(policy / "scaling_cur_freq")
        if khz is not None:
            cpu[policy.name] = round(khz / 1000.0, 1)
    gpu_hz = [hz for d in gpu_devfreq_devices(sysfs_root) if (hz := _read_int(d / "cur_freq")) is not None]
    return {"cpu_freq_mhz": cpu, "gpu_freq_mhz": round(gpu_hz[0] / 1e6, 1) if gpu_hz else None}


def cpu_governors(sysfs_root: str | Path) -> tuple[dict[str, str] | None, str | None]:
    """({policy: scaling_governor}, None), or (None, why): a "powersave" or "ondemand" board measures
    a slower or noisier device than a "performance" one."""
    governors = {}
    for policy in cpufreq_policies(sysfs_root):
        try:
            governors[policy.name] = (policy / "scaling_governor").read_text().strip()
        except OSError:
            continue
    if governors:
        return governors, None
    return None, f"no readable cpufreq scaling_governor under {Path(sysfs_root) / 'devices/system/cpu/cpufreq'}"


class TelemetrySampler:
    """Context manager: samples every ~0.2 s on a daemon thread; optionally writes JSON lines.

    The samples file is written to a temp name and renamed on exit, so a reader never sees a half run.
    """

    def __init__(self, sysfs_root: str | Path, samples_path: str | Path | None = None,
                 interval_s: float = SAMPLE_INTERVAL_S, tegrastats=None):
        self.sysfs_root = sysfs_root
        self.tegrastats = tegrastats  # a TegrastatsSampler: its latest line adds power, EMC and GR3D
        self.records: list[dict] = []
        self.thermal = ThermalTracker(sysfs_root)
        # Trip points are fixed while a run lasts: read them once, compare every sample against them.
        self.passive_trip_c = {zone.name: trips[0] for zone in zone_dirs(sysfs_root) if (trips := passive_trips_c(zone))}
        self.samples_path = Path(samples_path) if samples_path else None
        self.interval_s = interval_s
        self.num_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeft-telemetry", daemon=True)
        self._file = None

    def sample(self) -> dict:
        rss = rss_mb()
        temps = self.thermal.sample()
        hot = sorted(zone for zone, temp_c in temps.items() if zone in self.passive_trip_c and temp_c >= self.passive_trip_c[zone])
        record = {"t": round(time.time(), 3), "rss_mb": round(rss, 1) if rss is not None else None,
                  "ram_used_mb": ram_used_mb(), "temps_c": temps, "hot_zones": hot, **clock_sample(self.sysfs_root),
                  "emc_freq_mhz": None, "power_mw": {}}
        latest = self.tegrastats.latest() if self.tegrastats is not None else None
        if latest:
            record["power_mw"] = {rail: r["current_mw"] for rail, r in latest["power_mw"].items()}
            record["emc_freq_mhz"] = (latest.get("emc") or {}).get("freq_mhz")
            if record["gpu_freq_mhz"] is None:
                record["gpu_freq_mhz"] = (latest.get("gr3d") or {}).get("freq_mhz")
            if latest.get("ram_used_mb") is not None:
                record["ram_used_mb"] = latest["ram_used_mb"]
        self.records.append(record)
        self.num_samples += 1
        if self._file:
            self._file.write(json.dumps(record) + "\n")
        return record

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "TelemetrySampler":
        if self.samples_path:
            self._tmp_path = self.samples_path.with_name(self.samples_path.name + ".tmp")
            self._file = open(self._tmp_path, "w", encoding="utf-8")
        self.sample()  # a reading before any load gives each zone its start temperature
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self.sample()  # and one at the end, so short runs still have >= 2 samples
        if self._file:
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp_path, self.samples_path)
            else:
                os.unlink(self._tmp_path)

    def thermal_summary(self) -> dict:
        return self.thermal.summary()


def _extreme(values, pick):
    values = [v for v in values if v is not None]
    return pick(values) if values else None


def telemetry_summary(sampler: TelemetrySampler, thermal: dict, throttle: dict, peak_rss: float | None,
                      tegrastats_reason: str | None) -> dict:
    """The same fields for every runtime and device; an absent reading is null and `reasons` says why."""
    records = sampler.records
    cpu_mhz = [v for r in records for v in r["cpu_freq_mhz"].values()]
    power_total = [sum(r["power_mw"].values()) for r in records if r["power_mw"]]
    rails = {rail for r in records for rail in r["power_mw"]}
    summary = {
        "schema": SCHEMA,
        "samples": len(records),
        "temp_c_max": thermal.get("max_c"),
        "cpu_freq_mhz_min": _extreme(cpu_mhz, min),
        "cpu_freq_mhz_max": _extreme(cpu_mhz, max),
        "gpu_freq_mhz_min": _extreme([r["gpu_freq_mhz"] for r in records], min),
        "emc_freq_mhz_min": _extreme([r["emc_freq_mhz"] for r in records], min),
        "power_mw_avg": round(sum(power_total) / len(power_total), 1) if power_total else None,
        "power_rails": sorted(rails),
        "ram_used_mb_max": _extreme([r["ram_used_mb"] for r in records], max),
        "peak_rss_mb": peak_rss,
        "throttled": throttle.get("throttled"),
    }
    reasons = {}
    if summary["temp_c_max"] is None:
        reasons["temp_c_max"] = thermal.get("reason") or "no thermal zones"
    if summary["cpu_freq_mhz_min"] is None:
        reasons["cpu_freq_mhz_min"] = f"no readable cpufreq policy under {sampler.sysfs_root}"
    if summary["gpu_freq_mhz_min"] is None:
        reasons["gpu_freq_mhz_min"] = "no GPU devfreq device and no GR3D clock from tegrastats"
    for key in ("emc_freq_mhz_min", "power_mw_avg"):
        if summary[key] is None:
            reasons[key] = tegrastats_reason or "tegrastats reported none"
    if summary["ram_used_mb_max"] is None:
        reasons["ram_used_mb_max"] = "/proc/meminfo unreadable"
    if summary["throttled"] is None:
        reasons["throttled"] = throttle.get("reason") or "no throttle source readable"
    summary["reasons"] = reasons
    return summary
