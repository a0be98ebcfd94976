"""The mobile TFLite and Jetson TensorRT targets, end to end on the demo; one telemetry schema."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_KEYS = {"schema", "samples", "temp_c_max", "cpu_freq_mhz_min", "cpu_freq_mhz_max", "gpu_freq_mhz_min",
               "emc_freq_mhz_min", "power_mw_avg", "power_rails", "ram_used_mb_max", "peak_rss_mb", "throttled", "reasons"}
SAMPLE_KEYS = {"t", "rss_mb", "ram_used_mb", "temps_c", "hot_zones", "cpu_freq_mhz", "gpu_freq_mhz", "emc_freq_mhz", "power_mw"}


@pytest.fixture(scope="module")
def tflite_build(demo_build, run_edgeft, sshd, tmp_path_factory):
    """`edgeft build --target android-arm64`, measured through the real sshd (shares finetune+merge with demo_build)."""
    out = tmp_path_factory.mktemp("android") / "bundle"
    # The loopback device is an rpi5 in its lab file; a bundle for another target is refused, so this
    # lab declares the same sshd an android-arm64 device.
    lab = yaml.safe_load(sshd.lab_path.read_text())
    lab["devices"][0]["target"] = "android-arm64"
    lab_path = out.parent / "lab.yaml"
    lab_path.write_text(yaml.safe_dump(lab))
    result = run_edgeft("build", "--target", "android-arm64", "--device", sshd.device_name, "--lab", lab_path,
                        "--out", out, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "report": json.loads(result.stdout)}


def test_tflite_build_over_ssh_runs_on_litert_and_keeps_accuracy(tflite_build, demo_build, sshd):
    report, out = tflite_build["report"], tflite_build["out"]
    assert report["device"]["name"] == sshd.device_name
    assert report["runtime"]["name"] == "tflite" and report["runtime"]["version"].startswith("ai-edge-litert ")
    assert report["model"]["file"] == "model.tflite" and report["model"]["precision"] == "int8"
    assert report["gate"]["verdict"] == "PASS"
    acc = report["accuracy"]
    # the same fine-tuned model as the ONNX build; dynamic-range int8 keeps task accuracy within 3 points
    assert acc["merged"] == demo_build["report"]["accuracy"]["merged"]
    assert acc["device"] >= acc["merged"] - 0.03 and acc["device"] >= 0.9
    assert acc["device"] == pytest.approx(acc["quantized"], abs=1e-4)  # the device ran what the host validated (report rounds to 4 places)
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] and lat["n"] >= 30 and report["decode_tokens_per_s"] > 0
    assert report["smoke"]["passed"] and report["smoke"]["max_abs_diff"] <= 1e-3
    export_metrics = next(s["metrics"] for s in json.loads((out / "manifest.json").read_text())["provenance"]["stages"]
                          if s["name"] == "export")
    assert export_metrics["export_max_abs_diff"] <= 1e-3  # fp32 .tflite vs PyTorch
    assert 0 < (out / "model.tflite").stat().st_size < 0.5 * 4 * 800_000  # int8: well under the fp32 weights


def test_every_runtime_reports_one_telemetry_schema(tflite_build, demo_build):
    for report in (tflite_build["report"], demo_build["report"]):
        telemetry = report["telemetry"]
        assert set(telemetry) == SCHEMA_KEYS and telemetry["schema"] == "edgeft-telemetry/1"
        assert telemetry["samples"] >= 2 and telemetry["peak_rss_mb"] == report["peak_rss_mb"]
        # no power rails here: null with a reason, never a made-up number
        assert telemetry["power_mw_avg"] is None and "tegrastats" in telemetry["reasons"]["power_mw_avg"]
        assert telemetry["ram_used_mb_max"] > 0
    lines = (tflite_build["out"] / "telemetry.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert len(samples) == tflite_build["report"]["telemetry"]["samples"]
    assert all(set(s) == SAMPLE_KEYS for s in samples)
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)


def test_jetson_bundle_builds_on_the_host_and_the_runner_names_what_is_missing(demo_build, run_edgeft, tmp_path):
    out = tmp_path / "jetson"
    result = run_edgeft("build", "--target", "jetson-orin", "--out", out, "--no-measure", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["measured"] is False and report["model"]["precision"] == "fp16"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime"] == "tensorrt"
    assert manifest["runtime_options"] == {"precision": "fp16", "min_tokens": 1, "opt_tokens": 64, "max_tokens": 256,
                                           "max_context": 256, "static": False, "workspace_mb": 1024}
    quantize = next(s for s in manifest["provenance"]["stages"] if s["name"] == "quantize")
    assert quantize["metrics"]["top1_agreement"] >= 0.98  # fp16 weights vs fp32 on the host
    import onnx

    model = onnx.load(str(out / "model.onnx"))
    fp16_inits = sum(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    assert fp16_inits >= 4 * 7  # every projection of the 4 layers
    assert {i.type.tensor_type.elem_type for i in model.graph.input if i.name.startswith("past")} == {onnx.TensorProto.FLOAT}

    # This machine has no TensorRT: measuring fails in one line that says what to install.
    result = run_edgeft("measure", out)
    assert result.returncode == 2
    assert "tensorrt Python module not found" in result.stderr and "Traceback" not in result.stderr


def test_jetson_int8_bundle_carries_symmetric_qdq(demo_build, run_edgeft, tmp_path):
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "jetson-int8"
    result = run_edgeft("build", "--target", "jetson-orin", "--profile", "jetson-int8", "--out", out, "--no-measure")
    assert result.returncode == 0, result.stderr[-3000:]
    graph = onnx.load(str(out / "model.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    qdq = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert qdq, "no Q/DQ nodes"
    # TensorRT's explicit quantization takes symmetric int8 only: every zero point is 0
    zero_points = [numpy_helper.to_array(inits[n.input[2]]) for n in qdq if len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(np.all(z == 0) and z.dtype == np.int8 for z in zero_points)
    assert json.loads((out / "manifest.json").read_text())["runtime_options"]["precision"] == "int8"


def test_profile_for_the_wrong_runtime_fails_before_training(run_edgeft):
    result = run_edgeft("build", "--target", "android-arm64", "--profile", "arm-int8")
    assert result.returncode == 2
    assert "needs a tflite model" in result.stderr and "format: tflite" in result.stderr
    result = run_edgeft("build", "--target", "jetson-orin", "--profile", "arm-int4")
    assert result.returncode == 2 and "TensorRT cannot run quantize mode int4-weight" in result.stderr


def test_tflite_backend_refuses_more_tokens_than_its_cache(tflite_build):
    sys.path.insert(0, str(ROOT / "runner"))
    from edgeft import lm
    from edgeft.errors import ModelError  # noqa: F401
    from edgeft_runner import RunnerError

    backend = lm.load(tflite_build["out"] / "model.tflite", options={"pad_token_id": 0})
    assert backend.cache_len == 128
    with pytest.raises(RunnerError, match="129 tokens exceed the model's cache of 128"):
        backend.forward(np.arange(3, 132).reshape(1, -1), backend.empty_past())
    # a prompt longer than the 64-token prefill signature runs in chunks and matches one-by-one decoding
    ids = (3 + np.arange(100) % 300).reshape(1, -1)
    chunked, _ = backend.forward(ids, backend.empty_past())
    past = backend.empty_past()
    for token in ids[0]:
        stepped, past = backend.forward(np.array([[token]]), past)
    assert np.abs(chunked - stepped).max() < 1e-2
