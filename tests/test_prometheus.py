"""--prometheus: the latest results in the Prometheus text format, parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edgeft.errors import ConfigError
from edgeft.prometheus import write_prometheus

LABEL_NAMES = {"target", "device", "profile", "bundle"}
# A sample line of the text format: name, optional {labels}, value, and nothing after it (no timestamp).
SAMPLE_LINE = re.compile(r'^[a-z_]+(\{[^}]*\})? \S+$')


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}; every sample without a timestamp."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.timestamp is None, s
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _assert_matches(text: str, report: dict, bundle: str) -> None:
    labels = {"target": report["target"], "device": report["device"]["name"], "profile": report["profile"], "bundle": bundle}
    key = lambda **extra: tuple(sorted({**labels, **extra}.items()))  # noqa: E731
    samples = _samples(text)
    lat = report["latency_ms"]
    for quantile, field in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99")):
        assert samples[("edgeft_latency_seconds", key(quantile=quantile))] == pytest.approx(lat[field] / 1000)
    assert samples[("edgeft_latency_seconds_count", key())] == lat["n"]
    assert samples[("edgeft_latency_seconds_sum", key())] == pytest.approx(lat["mean"] * lat["n"] / 1000)
    assert samples[("edgeft_first_token_seconds", key())] == pytest.approx(report["first_token_ms"] / 1000)
    assert samples[("edgeft_decode_tokens_per_second", key())] == pytest.approx(report["decode_tokens_per_s"])
    assert samples[("edgeft_peak_rss_bytes", key())] == pytest.approx(report["peak_rss_mb"] * 2**20)
    assert samples[("edgeft_gate_passed", key())] == (1.0 if report["gate"]["passed"] else 0.0)
    assert samples[("edgeft_accuracy_ratio", key())] == pytest.approx(report["accuracy"]["device"])
    temp = report["thermal"]["max_c"]
    assert samples.get(("edgeft_temperature_celsius", key())) == (None if temp is None else pytest.approx(temp))
    for name, sample_labels in samples:
        assert set(dict(sample_labels)) - {"quantile"} == LABEL_NAMES, name
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["edgeft_latency_seconds"] == "summary" and types["edgeft_gate_passed"] == "gauge"
    for line in text.splitlines():
        assert line.startswith("#") or SAMPLE_LINE.match(line), f"not a timestamp-free sample line: {line!r}"


def test_directory_gets_edgeft_prom_with_every_metric(demo_build, tmp_path):
    out = Path(demo_build["out"])
    report = json.loads((out / "report.json").read_text())
    path = write_prometheus(tmp_path, [(out.name, report), ("other", {**report, "target": "jetson-orin", "thermal": {"max_c": 61.5}})])
    assert path == tmp_path / "edgeft.prom"
    text = path.read_text()
    _assert_matches(text, report, out.name)
    samples = _samples(text)  # the second report is its own sample set, told apart by its labels
    other = tuple(sorted({"target": "jetson-orin", "device": report["device"]["name"], "profile": report["profile"], "bundle": "other"}.items()))
    assert samples[("edgeft_temperature_celsius", other)] == 61.5
    assert [p.name for p in tmp_path.iterdir()] == ["edgeft.prom"]  # the temp file of the rename is gone


def test_measure_writes_prometheus_end_to_end(demo_build, run_edgeft, tmp_path):
    out = Path(demo_build["out"])
    prom = tmp_path / "metrics" / "local.prom"  # its directory does not exist yet: created
    # --wait: another test or run may hold "local" (one measurement at a time per device)
    result = run_edgeft("measure", out, "-d", "local", "--wait", "300", "--prometheus", prom, "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    _assert_matches(prom.read_text(), report, out.name)


def test_build_writes_prometheus(demo_build, run_edgeft, tmp_path):
    """Same inputs as the demo build: its stages come from the cache, the bundle is measured again."""
    out = tmp_path / "bundle"
    result = run_edgeft("build", "--target", "rpi5", "--out", out, "--wait", "300", "--prometheus", tmp_path, "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    _assert_matches((tmp_path / "edgeft.prom").read_text(), json.loads(result.stdout), "bundle")


@pytest.mark.parametrize("where, message", [
    ("file.txt/metrics.prom", "file.txt is a file, not a directory"),
    ("metrics.txt", "name a *.prom file or an existing directory"),
])
def test_bad_prometheus_path_fails_before_measuring(run_edgeft, tmp_path, where, message):
    (tmp_path / "file.txt").write_text("a file, not a directory")
    # The bundle does not exist either: the --prometheus error must come first, before any work.
    result = run_edgeft("measure", tmp_path / "no-bundle", "--prometheus", tmp_path / where)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "--prometheus" in errors[0], result.stderr


def test_prometheus_path_error_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"\*\.prom"):
        write_prometheus(tmp_path / "x.json", [])


def test_hil_run_writes_one_sample_set_per_job(demo_build, lab3, tmp_path):
    """Two bundles (one meets its budget, one cannot) on a real sshd device: one sample set each."""
    off = {"latency_ms_p99": None, "first_token_ms": None, "peak_rss_mb": None, "max_accuracy_drop": None,
           "min_accuracy": None, "max_temp_c": None, "max_general_ppl_increase": None, "min_decode_tokens_per_s": None}
    out = str(demo_build["out"])
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"bundles": [{"name": "demo-pass", "path": out, "budgets": {**off, "max_model_mb": 1000}},
                                                 {"name": "demo-fail", "path": out, "budgets": {**off, "max_model_mb": 0.001}}],
                                     "devices": ["dev-0"]}, sort_keys=False))
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    result = subprocess.run([sys.executable, "-m", "edgeft.cli", "hil", "run", str(suite), "--lab", str(lab3.lab_path), "--wait", "300",
                             "--json", str(tmp_path / "hil.json"), "--prometheus", str(textfile_dir), "--quiet"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 1, result.stderr  # one budget failed
    jobs = {job["bundle"]: job for job in json.loads((tmp_path / "hil.json").read_text())["jobs"]}
    text = (textfile_dir / "edgeft.prom").read_text()
    for name, passed in (("demo-pass", 1.0), ("demo-fail", 0.0)):
        report = jobs[name]["report"]
        assert report["device"]["name"] == "dev-0"
        _assert_matches(text, report, name)
        labels = tuple(sorted({"target": report["target"], "device": "dev-0", "profile": report["profile"], "bundle": name}.items()))
        assert _samples(text)[("edgeft_gate_passed", labels)] == passed
