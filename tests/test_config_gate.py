"""Targets, profiles and lab files load and validate; the gate judges reports by their values."""

from __future__ import annotations

import pytest

from edgeft.config import Budgets, list_names, load_lab, load_profile, load_target
from edgeft.errors import ConfigError
from edgeft.gate import describe, evaluate
from edgeft.pipeline import plan


def test_every_shipped_target_and_profile_loads_and_plans():
    assert {"rpi5", "jetson-orin", "android-arm64"} <= set(list_names("targets"))
    for name in list_names("targets"):
        target = load_target(name)
        assert target.default_profile in list_names("profiles"), name
    for name in list_names("profiles"):
        stages = plan(load_profile(name))
        assert [s.name for s in stages][:2] == ["finetune", "merge"], name


def test_rpi5_target_values():
    target = load_target("rpi5")
    assert (target.arch, target.runtime, target.threads, target.default_profile) == ("aarch64", "onnxruntime", 4, "arm-int8")


def test_unknown_field_is_refused_with_line(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("arch: aarch64\nruntime: onnxruntime\ndefault_profile: arm-int8\nthreds: 4\n")
    with pytest.raises(ConfigError, match=r"t\.yaml:4: field 'threds': Extra inputs are not permitted"):
        load_target(str(path))


def test_nested_field_error_points_at_its_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - merge: {}\nbudgets:\n  latency_ms_p99: 10\n  peak_rss_mb: -5\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:5: field 'budgets\.peak_rss_mb'"):
        load_profile(str(path))


def test_lab_paths_are_relative_to_the_lab_file(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_text("devices:\n  - {name: a, host: h, user: u, key_file: k/id, known_hosts: kh, target: rpi5}\n")
    device = load_lab(path).device("a")
    assert device.key_file == tmp_path / "k" / "id" and device.known_hosts == tmp_path / "kh" and device.port == 22
    with pytest.raises(ConfigError, match="no device named 'b' .*known: a"):
        load_lab(path).device("b")


REPORT = {
    "latency_ms": {"p99": 12.5},
    "first_token_ms": 30.0,
    "decode_tokens_per_s": 150.0,
    "peak_rss_mb": 300.0,
    "accuracy": {"drop": 0.02, "device": 0.9},
    "thermal": {"max_c": None},
}


def test_gate_passes_fails_and_skips_by_value():
    gate = evaluate(REPORT, Budgets(latency_ms_p99=12.5, first_token_ms=25, min_decode_tokens_per_s=100, max_temp_c=80))
    status = {c["budget"]: c["status"] for c in gate["checks"]}
    assert status == {"latency_ms_p99": "pass", "first_token_ms": "fail", "min_decode_tokens_per_s": "pass", "max_temp_c": "skipped"}
    assert gate["passed"] is False and gate["verdict"] == "FAIL"
    (failed,) = [c for c in gate["checks"] if c["status"] == "fail"]
    assert describe(failed) == "FAIL first_token_ms: measured 30 ms, budget <= 25 ms"


def test_gate_min_budgets_and_unset_budgets():
    assert evaluate(REPORT, Budgets())["checks"] == []
    gate = evaluate(REPORT, Budgets(min_accuracy=0.95, max_accuracy_drop=0.02, peak_rss_mb=299.9))
    assert {c["budget"]: c["status"] for c in gate["checks"]} == {"peak_rss_mb": "fail", "max_accuracy_drop": "pass", "min_accuracy": "fail"}


def test_throttled_run_is_invalid_not_pass_or_fail():
    throttled = {**REPORT, "throttle": {"throttled": True, "reasons": ["thermal_zone1 at 97.0 C >= passive trip 95.0 C"]}}
    gate = evaluate(throttled, Budgets(latency_ms_p99=100))
    assert (gate["verdict"], gate["passed"]) == ("INVALID", False)
    assert gate["invalid_reasons"] == ["thermal_zone1 at 97.0 C >= passive trip 95.0 C"]
    assert gate["checks"][0]["status"] == "pass"  # the checks are still shown, but not trusted
    assert evaluate({**REPORT, "throttle": {"throttled": False, "reasons": []}}, Budgets(latency_ms_p99=100))["verdict"] == "PASS"
