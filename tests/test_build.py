"""The spine end to end on the built-in demo: real training, export, ONNX Runtime, runner, SSH."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgeft.artifact import hash_dir, sha256_file


def test_fresh_demo_build_passes_its_own_gate(demo_build_result):
    # The quick start on a fresh cache must pass its own budgets on every machine (it once missed
    # min_accuracy on CPUs where the fine-tune landed in a 3-of-4-classes minimum).
    assert demo_build_result["problem"] is None, demo_build_result["problem"]
    assert demo_build_result["report"]["accuracy"]["device"] >= 0.9, demo_build_result["report"]["accuracy"]


def test_demo_build_passes_its_gate(demo_build):
    report = demo_build["report"]
    assert report["gate"]["passed"] is True
    assert {c["budget"] for c in report["gate"]["checks"]} >= {"latency_ms_p99", "min_accuracy", "max_accuracy_drop"}
    assert report["target"] == "rpi5" and report["runtime"]["name"] == "onnxruntime"
    assert report["model"]["precision"] == "int8"
    lat = report["latency_ms"]
    assert lat["n"] >= 30 and lat["warmup"] >= 1
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert report["first_token_ms"] > 0 and report["decode_tokens_per_s"] > 0
    assert 10 < report["peak_rss_mb"] < 1024
    # This container has no thermal zones: the report says so instead of inventing a number.
    assert report["thermal"]["max_c"] is None and report["thermal"]["reason"]
    assert report["arch_matches_target"] is False  # x86_64 host, aarch64 target: said plainly


def test_finetune_raises_accuracy_and_compression_keeps_it(demo_build):
    acc = demo_build["report"]["accuracy"]
    assert acc["base"] <= 0.05, acc  # the base never saw the task mapping
    assert acc["finetuned"] >= acc["base"] + 0.7, acc
    assert abs(acc["merged"] - acc["finetuned"]) <= 0.05, acc  # NF4-trained adapter into the fp32 base
    assert acc["merged"] - acc["quantized"] <= 0.05, acc
    assert acc["device"] == pytest.approx(acc["quantized"], abs=1e-4)  # same model, decoding, data (the runner rounds to 4 places)


def test_bundle_is_complete_and_verified(demo_build):
    out = demo_build["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == hash_dir(out, skip=("manifest.json", "report.json", "report.html", "telemetry.jsonl"))
    assert (out / "telemetry.jsonl").stat().st_size > 0  # the measurement's samples, kept beside the report
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [e for e in log if "eval_loss" in e]
    assert len(evals) == 8 and all(0 <= e["eval_exact_match"] <= 1 for e in evals)  # one eval per epoch (arm-int8: 8)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["eval_exact_match"] > 0.8
    assert set(manifest["files"]) >= {"model.onnx", "golden.npz", "task.json", "tokenizer/tokenizer.json"}
    for tool in ("torch", "transformers", "peft", "onnxruntime", "edgeft"):
        assert manifest["tools"][tool], tool
    prov = manifest["provenance"]
    assert prov["dataset"]["sha256"] == sha256_file(Path(prov["dataset"]["path"]))
    assert len(prov["base_model"]["sha256"]) == 64 and len(prov["adapter_sha256"]) == 64
    assert manifest["profile"]["name"] == "arm-int8"
    saved = json.loads((out / "report.json").read_text())
    assert saved["gate"] == demo_build["report"]["gate"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def _stage_dir(cache: Path, name: str, build) -> Path:
    """The cache dir of the demo build's stage `name`, found by the key its manifest recorded."""
    stages = json.loads((build["out"] / "manifest.json").read_text())["provenance"]["stages"]
    (key,) = [s["key"] for s in stages if s["name"] == name]
    return cache / "artifacts" / f"{name}-{key[:24]}"


def test_merged_model_matches_base_plus_adapter(demo_build, cache_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_meta = json.loads((_stage_dir(cache_dir, "merge", demo_build) / "artifact.json").read_text())
    assert merged_meta["metrics"]["merge_max_abs_diff"] <= 1e-3
    base_dir = Path(json.loads((demo_build["out"] / "manifest.json").read_text())["provenance"]["base_model"]["path"])
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), _stage_dir(cache_dir, "finetune", demo_build) / "adapter")
        expected = with_adapter(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(_stage_dir(cache_dir, "merge", demo_build))(input_ids=ids).logits
    assert float((merged - expected).abs().max()) < 1e-3
    assert float((merged - expected).abs().max()) < 0.01 * float(expected.abs().max())


def test_onnx_export_matches_pytorch(demo_build, cache_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft import lm

    rows = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 60, 3, 9, 12]]
    torch_model = AutoModelForCausalLM.from_pretrained(_stage_dir(cache_dir, "merge", demo_build))
    backend = lm.load(_stage_dir(cache_dir, "export", demo_build) / "model.onnx")
    for row, got in zip(rows, lm.teacher_forced_logits(backend, rows)):
        with torch.no_grad():
            expected = torch_model(input_ids=torch.tensor([row])).logits[0].numpy()
        assert np.abs(got - expected).max() < 1e-3
    assert (_stage_dir(cache_dir, "quantize", demo_build) / "model.onnx").stat().st_size < 0.4 * (_stage_dir(cache_dir, "export", demo_build) / "model.onnx").stat().st_size


def test_second_build_skips_every_stage(demo_build, run_edgeft, tmp_path):
    result = run_edgeft("build", "--target", "rpi5", "--out", tmp_path / "again", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert [s["cached"] for s in report["stages"]] == [True, True, True, True]
    assert result.stderr.count("cached, inputs and config unchanged") == 4
    first = json.loads((demo_build["out"] / "manifest.json").read_text())
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["files"] == first["files"]  # same model bytes, same golden data
    assert report["accuracy"] == pytest.approx(demo_build["report"]["accuracy"])


def _shape(value):
    """The structure of a JSON value: keys and types, not numbers."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items() if k not in ("first_token_ms_runs",)}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def test_ssh_build_through_real_sshd(demo_build, run_edgeft, sshd, tmp_path):
    out = tmp_path / "ssh-bundle"
    result = run_edgeft("build", "--target", "rpi5", "--device", sshd.device_name, "--lab", sshd.lab_path, "--out", out, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    remote = json.loads(result.stdout)
    local = demo_build["report"]
    assert remote["device"]["name"] == sshd.device_name
    assert _shape(remote) == _shape(local)
    assert remote["accuracy"]["device"] == pytest.approx(local["accuracy"]["device"])
    assert remote["smoke"]["passed"] is True
    # The run dir on the device was cleaned up; nothing but the workdir's own files remain.
    assert not list((sshd.workdir / "runs").glob("*")) if (sshd.workdir / "runs").exists() else True


def test_thermal_zones_reach_the_report_and_the_gate(demo_build, run_edgeft, tmp_path):
    zones = tmp_path / "sys" / "class" / "thermal"
    for index, (kind, milli_c) in enumerate([("cpu-thermal", 61250), ("gpu-thermal", 90500)]):
        (zones / f"thermal_zone{index}").mkdir(parents=True)
        (zones / f"thermal_zone{index}" / "type").write_text(kind + "\n")
        (zones / f"thermal_zone{index}" / "temp").write_text(f"{milli_c}\n")
    result = run_edgeft("build", "--target", "rpi5", "--out", tmp_path / "hot", "--sysfs-root", tmp_path / "sys", "--json")
    assert result.returncode == 1, result.stderr[-2000:]  # 90.5 °C breaks the 85 °C budget
    report = json.loads(result.stdout)
    assert report["thermal"]["max_c"] == pytest.approx(90.5)
    (check,) = [c for c in report["gate"]["checks"] if c["budget"] == "max_temp_c"]
    assert check["status"] == "fail" and check["measured"] == pytest.approx(90.5)
    assert "FAIL max_temp_c: measured 90.5 °C, budget <= 85 °C" in result.stderr
    assert (tmp_path / "hot" / "report.json").exists()  # a failed gate still leaves a complete bundle


def test_throttled_device_makes_the_run_invalid(demo_build, run_edgeft, tmp_path):
    zone = tmp_path / "sys" / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    for name, value in {"type": "cpu-thermal", "temp": "97000", "trip_point_0_type": "passive", "trip_point_0_temp": "95000"}.items():
        (zone / name).write_text(value + "\n")
    result = run_edgeft("build", "--target", "rpi5", "--out", tmp_path / "throttled", "--sysfs-root", tmp_path / "sys", "--json")
    assert result.returncode == 3, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["gate"]["verdict"] == "INVALID" and report["gate"]["passed"] is False
    assert report["runner"]["throttle"]["throttled"] is True
    assert any("thermal_zone0" in reason for reason in report["gate"]["invalid_reasons"])
    assert "INVALID" in result.stderr


def test_measure_an_existing_bundle_over_ssh_and_refuse_a_tampered_one(demo_build, run_edgeft, sshd, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_build["out"], bundle)
    result = run_edgeft("measure", bundle, "--device", sshd.device_name, "--lab", sshd.lab_path, "--report", tmp_path / "hil.json", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report == json.loads((tmp_path / "hil.json").read_text())
    assert report["device"]["name"] == sshd.device_name and report["gate"]["passed"] is True
    assert report["accuracy"]["device"] == pytest.approx(demo_build["report"]["accuracy"]["device"])
    assert report["accuracy"]["merged"] == demo_build["report"]["accuracy"]["merged"]  # from the manifest
    with open(bundle / "model.onnx", "ab") as f:
        f.write(b"\0")
    result = run_edgeft("measure", bundle)
    assert result.returncode == 2 and "model.onnx" in result.stderr and "modified" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_demo_that_misses_its_gate_is_reported_in_one_line():
    from conftest import _demo_problem

    report = {"gate": {"verdict": "FAIL", "checks": [
        {"budget": "latency_ms_p99", "status": "pass", "measured": 2.3, "limit": 200},
        {"budget": "min_accuracy", "status": "fail", "measured": 0.6958, "limit": 0.8},
        {"budget": "max_temp_c", "status": "skipped", "measured": None, "limit": 85}]}}
    failed = subprocess.CompletedProcess([], 1, stdout=json.dumps(report), stderr="lots\nof\nprogress\n")
    assert _demo_problem(failed, report) == "FAIL (exit 1): min_accuracy: measured 0.6958, budget 0.8"
    crashed = subprocess.CompletedProcess([], 2, stdout="", stderr="progress\nerror: rpi5: something is wrong; fix it\n\n")
    assert _demo_problem(crashed, None) == "exit 2: error: rpi5: something is wrong; fix it"
    assert _demo_problem(subprocess.CompletedProcess([], 0, stdout="{}", stderr=""), {"gate": {}}) is None
