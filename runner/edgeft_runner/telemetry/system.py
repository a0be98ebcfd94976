"""Device description and process memory, from /proc and the stdlib (Linux first, degrades elsewhere)."""

from __future__ import annotations

import os
import platform
import resource
import socket
import sys
from pathlib import Path


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _proc_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def proc_kib(path: str, field: str) -> int | None:
    """One "Field: N kB" value of a /proc file (status, meminfo) in KiB; None when absent or unreadable."""
    value = _proc_fields(_read(path)).get(field)
    try:
        return int(value.split()[0]) if value else None
    except (ValueError, IndexError):
        return None


def _kb_to_mb(value: str | None) -> float | None:
    # /proc reports "123456 kB"
    if not value:
        return None
    try:
        return int(value.split()[0]) / 1024.0
    except (ValueError, IndexError):
        return None


def os_name() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.platform()


def cpu_model() -> str | None:
    fields = _proc_fields(_read("/proc/cpuinfo"))
    # x86 has 'model name'; many ARM boards only 'Hardware' or 'Model' (e.g. "Raspberry Pi 5 Model B").
    for key in ("model name", "Model", "Hardware"):
        if fields.get(key):
            return fields[key]
    return platform.processor() or None


def mem_total_mb() -> float | None:
    total = _kb_to_mb(_proc_fields(_read("/proc/meminfo")).get("MemTotal"))
    return round(total, 1) if total is not None else None


def device_info() -> dict:
    return {
        "arch": platform.machine(),
        "os": os_name(),
        "kernel": platform.release(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "cpu": {"model": cpu_model(), "cores": os.cpu_count()},
        "mem_total_mb": mem_total_mb(),
    }


def ram_used_mb() -> float | None:
    """System RAM in use (MemTotal - MemAvailable), what tegrastats calls RAM used."""
    fields = _proc_fields(_read("/proc/meminfo"))
    total, available = _kb_to_mb(fields.get("MemTotal")), _kb_to_mb(fields.get("MemAvailable"))
    return round(total - available, 1) if total is not None and available is not None else None


def rss_mb() -> float | None:
    """Current resident set size of this process."""
    return _kb_to_mb(_proc_fields(_read("/proc/self/status")).get("VmRSS"))


def peak_rss_mb() -> float | None:
    """Peak RSS of this process: VmHWM, else ru_maxrss.

    VmHWM first: Linux carries ru_maxrss across fork+exec, so a runner started by a big parent (a torch
    process) would report the parent's peak (seen: 520 MB instead of 74 MB). VmHWM restarts at exec."""
    hwm = _kb_to_mb(_proc_fields(_read("/proc/self/status")).get("VmHWM"))
    if hwm:
        return round(hwm, 1)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KB on Linux but bytes on macOS.
    maxrss_mb = maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0
    candidates = [v for v in (hwm, maxrss_mb) if v]
    return round(max(candidates), 1) if candidates else None


def process_age_s() -> float | None:
    """Seconds since this process started (exec), from /proc: the start of a cold start.

    /proc/self/stat field 22 is the start time in clock ticks since boot (10 ms resolution at the usual
    100 Hz); /proc/uptime is now, in seconds since boot. None where /proc is not Linux's."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        # The command name (field 2) is in parentheses and may hold spaces: split after its last ')'.
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        ticks_per_s = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime_s - start_ticks / ticks_per_s)
