"""The latest results in the Prometheus text format, for dashboards (`--prometheus FILE_OR_DIR`).

One sample set per report (a build, a measure, or each job of a HIL suite), told apart by the labels
target, device, profile and bundle. Written whole through a rename and without timestamps: node_exporter's
textfile collector reads only `*.prom` files, rejects samples that carry a timestamp and may read while
we write. The JSON report and the telemetry JSON lines stay the raw record; this is a view of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from .artifact import write_atomic
from .errors import ConfigError

LABELS = ("target", "device", "profile", "bundle")
TEXTFILE_NAME = "edgeft.prom"  # the file written into a textfile-collector directory
QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"))
MIB = 2**20  # the runner's peak_rss_mb is VmHWM in MiB


def prometheus_path(dest: Path) -> Path:
    """The file `--prometheus dest` writes: dest itself, or edgeft.prom in it when it is a directory.
    Checked before any long work, so a path that cannot be written fails at once."""
    dest = Path(dest)
    path = dest / TEXTFILE_NAME if dest.is_dir() else dest
    if path.suffix != ".prom":
        raise ConfigError(f"--prometheus {dest}: name a *.prom file or an existing directory (node_exporter's textfile collector reads only *.prom)")
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"--prometheus {dest}: {path.parent} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--prometheus {dest}: cannot create its directory {path.parent} ({exc.strerror})") from exc
    return path


def write_prometheus(dest: Path, results: Sequence[tuple[str, dict[str, Any]]]) -> Path:
    """Write (bundle label, report) pairs to `dest` (a *.prom file or a directory); returns the file."""
    path = prometheus_path(dest)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_ReportCollector(results))
    write_atomic(path, generate_latest(registry).decode())
    return path


def bundle_label(bundle: Path | str) -> str:
    """The `bundle` label of a bundle directory: its name (build/rpi5 -> rpi5), short and stable across hosts."""
    return Path(bundle).name or str(bundle)


class _ReportCollector:
    """A custom collector: prometheus_client's Summary keeps no quantiles, ours come from the report."""

    def __init__(self, results: Sequence[tuple[str, dict[str, Any]]]):
        self.results = list(results)

    def collect(self) -> Iterator[Metric]:
        latency = Metric("edgeft_latency_seconds", "Warm inference latency of the prompt (runner, warm phase).", "summary")
        gauges = {
            "first_token": GaugeMetricFamily("edgeft_first_token_seconds", "Time to the first generated token.", labels=LABELS),
            "decode": GaugeMetricFamily("edgeft_decode_tokens_per_second", "Decode throughput.", labels=LABELS),
            "rss": GaugeMetricFamily("edgeft_peak_rss_bytes", "Peak resident memory of the runner (VmHWM).", labels=LABELS),
            "temp": GaugeMetricFamily("edgeft_temperature_celsius", "Hottest thermal zone during the run (only when measured).", labels=LABELS),
            "gate": GaugeMetricFamily("edgeft_gate_passed", "1 when every budget of the gate passed, else 0.", labels=LABELS),
            "accuracy": GaugeMetricFamily("edgeft_accuracy_ratio", "On-device exact match (0..1).", labels=LABELS),
        }
        for bundle, report in self.results:
            device = report.get("device") or {}
            values = [str(report.get("target") or ""), str(device.get("name") or ""), str(report.get("profile") or ""), bundle]
            labels = dict(zip(LABELS, values))
            lat = report.get("latency_ms") or {}
            for quantile, key in QUANTILES:
                if lat.get(key) is not None:
                    latency.add_sample("edgeft_latency_seconds", {**labels, "quantile": quantile}, lat[key] / 1000)
            if lat.get("n") and lat.get("mean") is not None:
                latency.add_sample("edgeft_latency_seconds_sum", labels, lat["mean"] * lat["n"] / 1000)
                latency.add_sample("edgeft_latency_seconds_count", labels, lat["n"])
            measured = {
                "first_token": _scaled(report.get("first_token_ms"), 1 / 1000),
                "decode": report.get("decode_tokens_per_s"),
                "rss": _scaled(report.get("peak_rss_mb"), MIB),
                "temp": (report.get("thermal") or {}).get("max_c"),
                "gate": None if "gate" not in report else float(bool(report["gate"].get("passed"))),
                "accuracy": (report.get("accuracy") or {}).get("device"),
            }
            for key, value in measured.items():
                if value is not None:  # not measured here: no sample, rather than a made-up 0
                    gauges[key].add_metric(values, value)
        yield latency
        yield from gauges.values()


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor
