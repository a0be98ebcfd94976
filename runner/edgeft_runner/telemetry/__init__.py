"""Background sampling of temperatures and memory while the model runs."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from .system import rss_mb
from .thermal import ThermalTracker

SAMPLE_INTERVAL_S = 0.2


class TelemetrySampler:
    """Context manager: samples every ~0.2 s on a daemon thread; optionally writes JSON lines.

    The samples file is written to a temp name and renamed on exit, so a reader never sees a half run.
    """

    def __init__(self, sysfs_root: str | Path, samples_path: str | Path | None = None,
                 interval_s: float = SAMPLE_INTERVAL_S):
        self.thermal = ThermalTracker(sysfs_root)
        self.samples_path = Path(samples_path) if samples_path else None
        self.interval_s = interval_s
        self.num_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeft-telemetry", daemon=True)
        self._file = None

    def sample(self) -> dict:
        rss = rss_mb()
        record = {"t": round(time.time(), 3), "rss_mb": round(rss, 1) if rss is not None else None,
                  "temps_c": self.thermal.sample()}
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
