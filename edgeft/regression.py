"""Regression against a baseline report: the last good run of the same device and model lineage.

The comparison is a bootstrap 95% confidence interval on the relative change of p50 and p99 (from the raw
warm samples both runner reports keep), so the gate (budget `max_regression`) fails a slowdown only when
the whole interval lies above the budget: a regression with confidence, not noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same two reports always give the same interval
MIN_SAMPLES = {"p50": 1, "p99": 100}  # as the runner's (edgeft_runner.measure.MIN_SAMPLES)
PERCENTILES = {"p50": 50.0, "p99": 99.0}
REPORT_FORMAT = "edgeft-report/1"


def lineage(report: dict[str, Any]) -> dict[str, Any]:
    """What must match for two reports to be comparable: the device and the model's lineage."""
    own = report.get("lineage") or {}
    return {"device": (report.get("device") or {}).get("name"), "base_model_sha256": own.get("base_model_sha256"),
            "profile": report.get("profile"), "target": report.get("target")}


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("format") == REPORT_FORMAT and "gate" in report else None


def _when(report: dict[str, Any], path: Path) -> float:
    """Newest first: the report's own timestamp, else (older reports) its file's mtime."""
    measured_at = report.get("measured_at_unix")
    return float(measured_at) if isinstance(measured_at, (int, float)) else path.stat().st_mtime


def check_baseline_arg(path: Path) -> Path:
    """`--baseline` before any long work: an existing edgeft report file, or a directory to search."""
    path = Path(path)
    if path.is_file() and _read_report(path) is None:
        raise ConfigError(f"--baseline {path}: not an edgeft report ({REPORT_FORMAT} JSON with a gate); "
                          "pass a report.json written by `edgeft build` or `edgeft measure --report`, or a directory of them")
    if not path.exists():
        raise ConfigError(f"--baseline {path}: no such file or directory; pass an earlier report.json or a directory of reports")
    return path


def find_baseline(path: Path, report: dict[str, Any]) -> tuple[Path | None, dict[str, Any] | None, str]:
    """(path, baseline report, how it was chosen) for `--baseline PATH`.

    A file is used as given (it must be an edgeft report). A directory is searched (recursively, every
    *.json) for reports of the same device and lineage (lineage()) whose gate passed; the newest wins.
    None, None and the reason when the directory holds no such report (the first run of a lineage)."""
    path = check_baseline_arg(path)
    if path.is_file():
        return path, _read_report(path), "given"
    wanted = lineage(report)
    candidates = []
    for candidate in sorted(path.rglob("*.json")):
        baseline = _read_report(candidate)
        if baseline is None or lineage(baseline) != wanted or baseline["gate"].get("verdict") != "PASS":
            continue
        candidates.append((_when(baseline, candidate), candidate, baseline))
    if not candidates:
        described = ", ".join(f"{key} {value}" for key, value in wanted.items())
        return None, None, f"no PASS report under {path} for {described}"
    _, best_path, best = max(candidates, key=lambda item: item[0])
    return best_path, best, f"newest PASS of {len(candidates)} matching report(s) under {path}"


def bootstrap_relative_change(baseline_ms: np.ndarray, current_ms: np.ndarray, quantile: float,
                              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, tuple[float, float]]:
    """(current/baseline - 1 of the quantile, its 95% bootstrap percentile interval)."""
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    # Chunks keep the resample matrices near a few million values whatever the sample counts.
    chunk = max(1, 2_000_000 // max(baseline_ms.size, current_ms.size))
    for lo in range(0, resamples, chunk):
        k = min(chunk, resamples - lo)
        base = np.percentile(rng.choice(baseline_ms, size=(k, baseline_ms.size)), quantile, axis=1)
        cur = np.percentile(rng.choice(current_ms, size=(k, current_ms.size)), quantile, axis=1)
        deltas[lo:lo + k] = cur / base - 1.0
    point = float(np.percentile(current_ms, quantile) / np.percentile(baseline_ms, quantile) - 1.0)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return point, (float(low), float(high))


def compare(report: dict[str, Any], baseline: dict[str, Any], baseline_path: Path | None, chosen: str) -> dict[str, Any]:
    """The report's `regression` block: {baseline, p50: {delta, ci95}, p99: {...}}; a percentile that
    cannot be compared is null and `reasons` says why."""
    current_samples = (report.get("latency_ms") or {}).get("samples")
    baseline_samples = (baseline.get("latency_ms") or {}).get("samples")
    mismatched = {key: {"baseline": value, "this run": lineage(report)[key]}
                  for key, value in lineage(baseline).items() if value != lineage(report)[key]}
    result: dict[str, Any] = {
        "baseline": {"path": str(baseline_path) if baseline_path else None, "chosen": chosen,
                     "measured_at_unix": baseline.get("measured_at_unix"), "lineage_mismatch": mismatched or None},
        "method": f"bootstrap, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}, 95% percentile interval of current/baseline - 1",
        "reasons": {},
    }
    for name, quantile in PERCENTILES.items():
        result[name] = None
        if not baseline_samples:
            result["reasons"][name] = "the baseline report keeps no raw samples (latency_ms.samples; measured by an older runner)"
            continue
        if not current_samples:
            result["reasons"][name] = "this report keeps no raw samples (latency_ms.samples)"
            continue
        smallest = min(len(baseline_samples), len(current_samples))
        if smallest < MIN_SAMPLES[name]:
            result["reasons"][name] = f"n={smallest} < {MIN_SAMPLES[name]} samples"
            continue
        delta, (low, high) = bootstrap_relative_change(np.asarray(baseline_samples, dtype=np.float64),
                                                       np.asarray(current_samples, dtype=np.float64), quantile)
        result[name] = {"delta": round(delta, 4), "ci95": [round(low, 4), round(high, 4)],
                        "baseline_ms": (baseline.get("latency_ms") or {}).get(name), "ms": report["latency_ms"].get(name)}
    return result


def regression_block(report: dict[str, Any], baseline_arg: Path) -> dict[str, Any]:
    """`--baseline` for a finished report: find the baseline and compare, or say why there is none."""
    path, baseline, chosen = find_baseline(baseline_arg, report)
    if baseline is None:
        return {"baseline": None, "p50": None, "p99": None, "reasons": {"baseline": chosen}}
    return compare(report, baseline, path, chosen)
