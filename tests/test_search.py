"""Budget search: each candidate measured on the device, the most accurate within budget chosen."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edgeft.config import load_profile

CANDIDATES = {
    "fp32": [{"export": {}}],
    "int8-dynamic": [{"export": {}}, {"quantize": {"mode": "int8-dynamic"}}],
    "int8-static": [{"export": {}}, {"quantize": {"mode": "int8-static", "calibration_samples": 16}}],
    "int4": [{"export": {}}, {"quantize": {"mode": "int4-weight"}}],
}


def _profile(tmp_path, name, budgets):
    base = yaml.safe_load(load_profile("arm-int8").source.read_text())  # same prefix: cached stages
    base.update(budgets=budgets, search={"candidates": CANDIDATES})
    base["measure"].update(min_s=0.2, min_iters=10)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _search(run_edgeft, tmp_path, name, budgets, *extra):
    out = tmp_path / name
    result = run_edgeft("build", "-t", "rpi5", "-p", _profile(tmp_path, name, budgets), "--search", "--out", out, "--json", *extra)
    return result, (json.loads(result.stdout) if result.stdout.strip() else None), out


def test_search_picks_known_answer_and_caches_measurements(demo_build, run_edgeft, tmp_path):
    result, loose, out = _search(run_edgeft, tmp_path, "loose", {"min_accuracy": 0.5})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["candidate"]: r for r in loose["candidates"]}
    assert set(rows) == set(CANDIDATES) and all(r["verdict"] == "PASS" for r in rows.values())
    best = max(r["accuracy"] for r in rows.values())
    assert rows[loose["chosen"]]["accuracy"] == best
    assert json.loads((out / "report.json").read_text())["search"]["chosen"] == loose["chosen"]
    assert json.loads((tmp_path / "loose.search.json").read_text())["chosen"] == loose["chosen"]
    page = (tmp_path / "loose.search.html").read_text()
    assert f"Chosen: <b>{loose['chosen']}</b>" in page and page.count('<tr class="candidate">') == len(CANDIDATES)
    assert '<section id="summary">' in (out / "report.html").read_text()  # the chosen bundle has its report page
    if shutil.which("chromium"):  # the search page, drawn by a real browser: the table and the trade-off plot
        from test_report_html import _chromium

        dom = _chromium(tmp_path / "profile", "--dump-dom", (tmp_path / "loose.search.html").as_uri())
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert '<section id="search">' in dom.stdout and dom.stdout.count("<svg") == 1
        assert dom.stdout.count('<tr class="candidate">') == len(CANDIDATES)
    assert rows["int4"]["size_bytes"] < rows["int8-dynamic"]["size_bytes"] < rows["fp32"]["size_bytes"]
    assert rows["int4"]["size_bytes"] < rows["int8-static"]["size_bytes"] < rows["fp32"]["size_bytes"]
    # Every quantized candidate stayed within its tolerance (else its stage would have failed) and accurate.
    assert all(r["accuracy"] >= 0.8 for r in rows.values()), rows

    # A size budget only int4 meets: the answer is known whatever the accuracies.
    limit_mb = (rows["int4"]["size_bytes"] + min(rows["int8-dynamic"]["size_bytes"], rows["int8-static"]["size_bytes"])) / 2 / 1e6
    result, tight, _ = _search(run_edgeft, tmp_path, "tight", {"min_accuracy": 0.5, "max_model_mb": limit_mb},
                               "--prometheus", tmp_path / "search.prom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert tight["chosen"] == "int4"
    assert {r["candidate"]: r["verdict"] for r in tight["candidates"]} == {"fp32": "FAIL", "int8-dynamic": "FAIL", "int8-static": "FAIL", "int4": "PASS"}
    # --prometheus with --search: one sample set per candidate, its gate as measured against these budgets
    gate = {s.labels["bundle"]: s.value for f in text_string_to_metric_families((tmp_path / "search.prom").read_text())
            for s in f.samples if s.name == "edgeft_gate_passed"}
    assert gate == {"search:fp32": 0, "search:int8-dynamic": 0, "search:int8-static": 0, "search:int4": 1}
    # Same models, same device, same measure settings: nothing measured twice.
    assert all(r["measurement_cached"] for r in tight["candidates"])
    assert "search: rpi5 on local" in result.stderr and "chosen:" in result.stderr


def test_search_with_impossible_budgets_exits_1_naming_the_closest(demo_build, run_edgeft, tmp_path):
    result, data, out = _search(run_edgeft, tmp_path, "impossible", {"latency_ms_p99": 0.0001, "min_accuracy": 0.5})
    assert result.returncode == 1, result.stderr[-2000:]
    assert data["chosen"] is None and data["closest"]["budget"] == "latency_ms_p99"
    fastest = min((r for r in data["candidates"] if r["latency_ms_p99"] is not None), key=lambda r: r["latency_ms_p99"])
    assert data["closest"]["candidate"] == fastest["candidate"]
    assert "closest:" in result.stderr and "missed latency_ms_p99" in result.stderr
    assert not out.exists()  # no bundle when nothing qualifies
    # The search page beside the JSON: every candidate in the table and in the plot, nothing chosen.
    page = (tmp_path / "impossible.search.html").read_text()
    assert page.count('<tr class="candidate">') == len(CANDIDATES) and "nothing chosen" in page
    assert page.count("<svg") == 1 and all(name in page for name in CANDIDATES)


def test_default_candidates_are_those_the_target_runs():
    """No search section: every default candidate after the profile's shared stages, less what the target's runtime
    cannot run, each left out with its reason; a target none of them fits is told to declare its own."""
    from edgeft.config import load_target
    from edgeft.errors import ConfigError
    from edgeft.search import DEFAULT_CANDIDATES, default_candidates, shared_prefix

    profile = load_profile("arm-int8")
    prefix = shared_prefix(profile)
    assert [c.name for c in default_candidates(profile, prefix, load_target("rpi5"), print)] == list(DEFAULT_CANDIDATES)
    logged = []
    jetson = default_candidates(profile, prefix, load_target("jetson-orin"), logged.append)
    assert [c.name for c in jetson] == ["fp32", "fp16", "int8-static"]
    assert [s.name for s in jetson[1].stages] == ["finetune", "merge", "export", "quantize"]
    assert len(logged) == len(DEFAULT_CANDIDATES) - 3
    assert "candidate int4-b128: left out: on jetson-orin: TensorRT cannot run quantize mode int4-weight" in "\n".join(logged)
    with pytest.raises(ConfigError, match="none of the default search candidates runs on target android-arm64 .tflite.; declare search.candidates"):
        default_candidates(profile, prefix, load_target("android-arm64"), logged.append)
