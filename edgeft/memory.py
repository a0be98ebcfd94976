"""Memory a stage used, and memory this machine has: per-stage peak RSS (and peak GPU memory on CUDA)
for the stage metrics, MemAvailable for the dry run's warning.

The kernel keeps a process's peak RSS (VmHWM) and resets it on a write of "5" to /proc/self/clear_refs,
so each stage's peak is its own, not the build's so far, at no cost while it runs. A stage that does its
heavy work in a child process (the fused export's model builder) runs it through run_child, and its peak
is the larger of its own and that child's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edgeft_runner.telemetry.system import proc_kib  # the runner's /proc reader (its own peak RSS reads VmHWM too)


_child_peak_bytes = 0  # the largest peak RSS of a child run by run_child since the last reset_peak()


def run_child(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """subprocess.run(args) with text output captured, noting the child's own peak RSS for peak()."""
    global _child_peak_bytes
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True, env=env, cwd=cwd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss: KiB on Linux)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        _child_peak_bytes = max(_child_peak_bytes, usage.ru_maxrss * 1024)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read())


def reset_peak() -> bool:
    """Start a new peak (RSS, and CUDA when torch is loaded with a GPU); False where the kernel refuses
    (the peak then counts from the process start: still an upper bound)."""
    global _child_peak_bytes
    _child_peak_bytes = 0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak() -> dict[str, int]:
    """{"peak_rss_bytes": ..., "peak_gpu_bytes": ... (CUDA only)} since the last reset_peak(): this process's
    or a run_child child's, whichever is larger."""
    out = {}
    kib = proc_kib("/proc/self/status", "VmHWM")
    if kib is not None:
        out["peak_rss_bytes"] = max(kib * 1024, _child_peak_bytes)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def available_bytes() -> int | None:
    """What the kernel says can be allocated now without swapping (MemAvailable)."""
    kib = proc_kib("/proc/meminfo", "MemAvailable")
    return None if kib is None else kib * 1024
