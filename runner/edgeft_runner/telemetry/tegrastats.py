"""Jetson `tegrastats` output: parse one line, or run it in the background and keep every sample.

tegrastats differs by JetPack release and board (and by root vs not), so every field is optional:
a line yields whatever it holds, and tokens this parser does not know are ignored, never an error.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading

from .jetson import find_tool

DEFAULT_INTERVAL_MS = 500

# JetPack 5+ starts each line with a local time, "11-25-2026 10:00:01" (month first, no time zone).
_TIMESTAMP = re.compile(r"^\s*(\d{2})-(\d{2})-(\d{4}) (\d{2}):(\d{2}):(\d{2})\b")
# "RAM 2448/7620MB"; \b keeps "IRAM 0/252kB" (JetPack 4 on-chip RAM) from matching.
_RAM = re.compile(r"\bRAM (\d+)/(\d+)([kMG]B)\b")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)([kMG]B)\b")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CPU_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
# "EMC_FREQ 0%@2133", or "EMC_FREQ 3%" when the clock is not readable (e.g. not root on JetPack 5+).
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
# "GR3D_FREQ 0%@76", "GR3D_FREQ 12%@1300" or, on Orin (one clock per GPC), "GR3D_FREQ 0%@[305,305]".
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@(?:\[([\d,]*)\]|(\d+)))?")
# "cpu@45.5C", "soc2@43.968C", "PMIC@100C"; a whole token, so "0%@2133" never reads as a sensor.
_TEMP = re.compile(r"(?<!\S)([A-Za-z][\w.-]*)@(-?\d+(?:\.\d+)?)C(?!\S)")
# "VDD_IN 4830mW/4830mW" (JetPack 5+) or "POM_5V_IN 1077/1077" (JetPack 4, mW without the unit):
# rail current/average. RAM/SWAP values end in MB and so never match.
_RAIL = re.compile(r"(?<!\S)([A-Za-z][\w.-]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?!\S)")

_MB_PER_UNIT = {"kB": 1 / 1024, "MB": 1, "GB": 1024}


def _mb(value: str, unit: str) -> float | int:
    mb = int(value) * _MB_PER_UNIT[unit]
    return mb if unit == "MB" else round(mb, 1)


def _timestamp(line: str) -> str | None:
    """The line's own time as ISO 8601 local time; no zone is printed, so none is guessed."""
    match = _TIMESTAMP.match(line)
    if not match:
        return None
    month, day, year, hour, minute, second = match.groups()
    return f"{year}-{month}-{day}T{hour}:{minute}:{second}"


def _cpu_cores(line: str) -> list[dict | None]:
    match = _CPU.search(line)
    if not match:
        return []
    cores = []
    for field in match.group(1).split(","):
        core = _CPU_CORE.match(field.strip())
        # "off" is a hot-unplugged core (nvpmodel modes switch cores off); anything unreadable counts as off.
        cores.append({"load_pct": int(core.group(1)), "freq_mhz": int(core.group(2)) if core.group(2) else None}
                     if core else None)
    return cores


def _emc(line: str) -> dict | None:
    match = _EMC.search(line)
    if not match:
        return None
    return {"load_pct": int(match.group(1)), "freq_mhz": int(match.group(2)) if match.group(2) else None}


def _gr3d(line: str) -> dict | None:
    match = _GR3D.search(line)
    if not match:
        return None
    load, per_gpc, single = match.groups()
    freqs_mhz = [int(f) for f in per_gpc.split(",") if f] if per_gpc is not None else []
    if single is not None:
        freqs_mhz = [int(single)]
    # With one clock per GPC, the slowest is the one that limits the GPU and shows a throttle.
    return {"load_pct": int(load), "freq_mhz": min(freqs_mhz) if freqs_mhz else None}


def _temps_c(line: str) -> dict[str, float]:
    # Every sensor is kept as reported. Two known placeholders: PMIC@100C is a fixed value on some
    # boards (TX2, Xavier on JetPack 4), and -256C marks a sensor that is off (e.g. Orin CV0..CV2).
    return {name: float(value) for name, value in _TEMP.findall(line)}


def _power_mw(line: str) -> dict[str, dict[str, int]]:
    return {name: {"current_mw": int(current), "average_mw": int(average)}
            for name, current, average in _RAIL.findall(line)}


def parse_tegrastats_line(line: str) -> dict:
    """One tegrastats line -> dict; parts the line lacks are None (or {} / [])."""
    ram, swap = _RAM.search(line), _SWAP.search(line)
    return {
        "t": _timestamp(line),
        "ram_used_mb": _mb(ram.group(1), ram.group(3)) if ram else None,
        "ram_total_mb": _mb(ram.group(2), ram.group(3)) if ram else None,
        "swap_used_mb": _mb(swap.group(1), swap.group(3)) if swap else None,
        "swap_total_mb": _mb(swap.group(2), swap.group(3)) if swap else None,
        "cpu": _cpu_cores(line),
        "emc": _emc(line),
        "gr3d": _gr3d(line),
        "temps_c": _temps_c(line),
        "power_mw": _power_mw(line),
    }


def _is_sample(parsed: dict) -> bool:
    """A line that carried any reading (not a warning or an empty line tegrastats printed)."""
    return any(parsed[k] for k in ("ram_used_mb", "cpu", "emc", "gr3d", "temps_c", "power_mw"))


class TegrastatsSampler:
    """Runs `tegrastats --interval MS` as a child process and parses every line on a daemon thread.

    Never raises for a missing or failing tegrastats: `available` turns False and `reason` says why.
    """

    def __init__(self, interval_ms: int = DEFAULT_INTERVAL_MS, executable: str | None = None):
        self.interval_ms = int(interval_ms)
        self.samples: list[dict] = []
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._stderr = None
        if executable is not None:
            self.executable = executable if os.access(executable, os.X_OK) else None
            if self.executable is None:
                self.reason = f"tegrastats not executable at {executable}"
        else:
            self.executable = find_tool("tegrastats")
            if self.executable is None:
                self.reason = "tegrastats not installed (not a Jetson, or not on PATH)"
        self.available = self.executable is not None

    def start(self) -> "TegrastatsSampler":
        if not self.available or self._proc is not None:
            return self
        try:
            # stderr goes to a file, not a pipe nobody reads while it runs (a full pipe would block tegrastats).
            self._stderr = tempfile.TemporaryFile()
            # A new session so stop() can signal the whole group: a wrapper script's children
            # (or tegrastats' own) would otherwise keep stdout open and the reader would never see EOF.
            self._proc = subprocess.Popen([self.executable, "--interval", str(self.interval_ms)],
                                          stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
                                          text=True, errors="replace", bufsize=1, start_new_session=True)
        except OSError as exc:
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None
            self.available = False
            self.reason = f"cannot start {self.executable}: {exc.strerror or exc}"
            return self
        self._thread = threading.Thread(target=self._read_lines, name="edgeft-tegrastats", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _read_lines(self) -> None:
        try:
            for line in self._proc.stdout:
                parsed = parse_tegrastats_line(line)
                if _is_sample(parsed):
                    with self._lock:
                        self.samples.append(parsed)
        except (OSError, ValueError):
            pass  # stdout closed under us by stop() after a tegrastats that would not die: keep what was read

    def stop(self) -> None:
        """Ends tegrastats (SIGTERM, then SIGKILL after 2 s) and waits for the last line to be read.

        A child started in the foreground just needs a signal; `tegrastats --stop` is only for the
        `--start` daemon mode, which this never uses."""
        proc = self._proc
        if proc is None:
            return
        signalled = False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            try:
                signalled = True
                os.killpg(proc.pid, sig)
                proc.wait(timeout=2.0)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if proc.poll() is None:
            # Unkillable (stuck in the kernel): keep what was read rather than hang the run.
            self.reason = self.reason or f"tegrastats (pid {proc.pid}) did not exit after SIGKILL"
        else:
            proc.stdout.close()
            if not signalled:
                self._note_early_exit(proc.returncode)
        self._stderr.close()
        self._proc = None

    def _note_early_exit(self, returncode: int) -> None:
        # tegrastats ended before stop() (e.g. a board or permission it cannot handle), so the run has
        # fewer samples than it should: say so, with the last line it printed on stderr.
        self._stderr.seek(0)
        stderr_tail = self._stderr.read()[-500:].decode("utf-8", "replace").strip()
        last = stderr_tail.splitlines()[-1] if stderr_tail else "no output"
        self.reason = self.reason or f"tegrastats exited with code {returncode}: {last}"

    def __enter__(self) -> "TegrastatsSampler":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()

    def latest(self) -> dict | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def summary(self) -> dict:
        with self._lock:
            samples = list(self.samples)
        temps_c_max: dict[str, float] = {}
        power_mw: dict[str, list[int]] = {}
        for sample in samples:
            for sensor, temp_c in sample["temps_c"].items():
                temps_c_max[sensor] = max(temp_c, temps_c_max.get(sensor, temp_c))
            for rail, reading in sample["power_mw"].items():
                power_mw.setdefault(rail, []).append(reading["current_mw"])
        ram_used_mb = [s["ram_used_mb"] for s in samples if s["ram_used_mb"] is not None]
        # Lowest clock seen: a drop during the run is what throttling looks like from here.
        gr3d_mhz = [s["gr3d"]["freq_mhz"] for s in samples if s["gr3d"] and s["gr3d"]["freq_mhz"] is not None]
        emc_mhz = [s["emc"]["freq_mhz"] for s in samples if s["emc"] and s["emc"]["freq_mhz"] is not None]
        reason = self.reason
        if reason is None and not samples:
            reason = "tegrastats printed no parsable line"
        return {
            "available": self.available,
            "reason": reason,
            "samples": len(samples),
            "ram_used_mb_max": max(ram_used_mb, default=None),
            "temps_c_max": temps_c_max,
            "power_mw_avg": {rail: round(sum(v) / len(v), 1) for rail, v in power_mw.items()},
            "gr3d_freq_mhz_min": min(gr3d_mhz, default=None),
            "emc_freq_mhz_min": min(emc_mhz, default=None),
        }
