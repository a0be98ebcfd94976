"""Memory a stage used, and memory this machine has: per-stage peak RSS (and peak GPU memory on CUDA)
for the stage metrics, MemAvailable for the dry run's warning.

The kernel keeps a process's peak RSS (VmHWM) and resets it on a write of "5" to /proc/self/clear_refs,
so each stage's peak is its own, not the build's so far, at no cost while it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgeft_runner.telemetry.system import proc_kib  # the runner's /proc reader (its own peak RSS reads VmHWM too)


def reset_peak() -> bool:
    """Start a new peak (RSS, and CUDA when torch is loaded with a GPU); False where the kernel refuses
    (the peak then counts from the process start: still an upper bound)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak() -> dict[str, int]:
    """{"peak_rss_bytes": ..., "peak_gpu_bytes": ... (CUDA only)} since the last reset_peak()."""
    out = {}
    kib = proc_kib("/proc/self/status", "VmHWM")
    if kib is not None:
        out["peak_rss_bytes"] = kib * 1024
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def available_bytes() -> int | None:
    """What the kernel says can be allocated now without swapping (MemAvailable)."""
    kib = proc_kib("/proc/meminfo", "MemAvailable")
    return None if kib is None else kib * 1024
