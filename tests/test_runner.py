"""Device runner tests against a real tiny KV-cache ONNX model (exported once per session)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "runner", Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from edgeft.runner_app import build_runner_zipapp  # noqa: E402
from edgeft_runner.__main__ import main  # noqa: E402
from edgeft_runner import RunnerError  # noqa: E402
from edgeft_runner.backends import create_backend  # noqa: E402
from edgeft_runner.measure import greedy_generate, smoke_test, summarize_ms, task_accuracy, time_repeated  # noqa: E402
from edgeft_runner.telemetry.thermal import ThermalTracker  # noqa: E402
from tiny_bundle import rehash, sha256, tiny_model, torch_greedy  # noqa: E402
from tiny_bundle import bundle_template as build_bundle_template  # noqa: E402

REPORT_KEYS = {"format", "throttle", "jetson", "bundle", "device", "runtime", "load_s", "smoke", "latency_ms", "first_token_ms",
               "first_token_ms_runs", "decode_tokens_per_s", "decode_ms_per_token", "accuracy", "peak_rss_mb",
               "thermal", "wall_s", "cold_ms", "sustained", "conditions", "started_unix", "finished_unix"}


def write_sysfs(root: Path, zones: dict[str, tuple[str, str | None]]) -> Path:
    """zones: dir name -> (type, temp file content or None for a zone without a readable temp)."""
    thermal = root / "class" / "thermal"
    thermal.mkdir(parents=True, exist_ok=True)
    for name, (zone_type, temp) in zones.items():
        (thermal / name).mkdir(exist_ok=True)
        (thermal / name / "type").write_text(zone_type + "\n")
        if temp is not None:
            (thermal / name / "temp").write_text(temp + "\n")
    return root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="session")
def bundle_template(tmp_path_factory) -> Path:
    return build_bundle_template(tmp_path_factory)


@pytest.fixture
def bundle(bundle_template, tmp_path) -> Path:
    return Path(shutil.copytree(bundle_template, tmp_path / "bundle"))


@pytest.fixture
def backend(bundle):
    b = create_backend("onnxruntime")
    b.load(bundle / "model.onnx", threads=2)
    return b


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeft-runner: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


# --- bundle verification ---------------------------------------------------------------------------------

def test_verify_ok(bundle, capsys):
    rc, out, err = run_cli(capsys, "verify", "--bundle", bundle)
    assert (rc, out, err) == (0, "ok 3 files\n", "")


def test_verify_tampered_and_missing_files(bundle, capsys):
    with open(bundle / "model.onnx", "ab") as f:
        f.write(b"\0")
    rc, _, err = run_cli(capsys, "verify", "--bundle", bundle)
    assert rc == 2
    assert_one_error_line(err, "sha256 mismatch for model.onnx")

    rehash(bundle)
    (bundle / "task.json").unlink()
    rc, _, err = run_cli(capsys, "verify", "--bundle", bundle)
    assert rc == 2
    assert_one_error_line(err, "bundle file missing: task.json")


@pytest.mark.parametrize("escape", ["../outside.bin", "/ABS", "sub/../../outside.bin", "link.bin"])
def test_path_escape_refused(bundle, capsys, escape):
    outside = bundle.parent / "outside.bin"
    outside.write_bytes(b"secret")
    (bundle / "link.bin").symlink_to(outside)
    rel = str(outside) if escape == "/ABS" else escape
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][rel] = sha256(outside)  # the hash is right: only the location may refuse it
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = run_cli(capsys, "verify", "--bundle", bundle)
    assert rc == 2
    assert_one_error_line(err, "escapes the bundle")


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: "{not json", "cannot read"),
    (lambda m: {**m, "format": "edgeft-bundle/9"}, "format"),
    (lambda m: {**m, "files": {**m["files"], "golden.npz": "abc"}}, "sha256 hex"),
    (lambda m: {**m, "task": {"file": "other.json"}}, "not listed in 'files'"),
    (lambda m: {**m, "runtime": "coreml"}, "unknown runtime 'coreml'"),
])
def test_bad_manifest_is_one_line(bundle, tmp_path, capsys, edit, fragment):
    manifest = json.loads((bundle / "manifest.json").read_text())
    edited = edit(manifest)
    (bundle / "manifest.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    rc, _, err = run_cli(capsys, "run", "--bundle", bundle, "--report", tmp_path / "r.json")
    assert rc == 2
    assert_one_error_line(err, fragment)
    assert not (tmp_path / "r.json").exists()


def test_missing_onnxruntime_is_one_line(bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    rc, _, err = run_cli(capsys, "run", "--bundle", bundle, "--report", tmp_path / "r.json")
    assert rc == 2
    assert err == ("edgeft-runner: onnxruntime is not installed on this device "
                   "(python3 -m pip install onnxruntime)\n")


# --- model execution -------------------------------------------------------------------------------------

def test_smoke_passes_and_tampered_golden_fails(bundle, backend, tmp_path, capsys):
    smoke = smoke_test(backend, bundle / "golden.npz", atol=1e-3)
    assert smoke["passed"] is True and 0.0 <= smoke["max_abs_diff"] < 1e-4

    with np.load(bundle / "golden.npz") as g:
        input_ids, logits = g["input_ids"], g["logits"].copy()
    logits[0, 3, 7] += 0.01
    np.savez(bundle / "golden.npz", input_ids=input_ids, logits=logits)
    rehash(bundle)
    rc, _, err = run_cli(capsys, "run", "--bundle", bundle, "--report", tmp_path / "r.json")
    assert rc == 2
    assert_one_error_line(err, "smoke test failed", "> atol 0.001")
    assert not (tmp_path / "r.json").exists()


def test_cached_greedy_equals_uncached(tiny, backend):
    model, _ = tiny
    prompt = [5, 9, 13, 17, 21]
    cached = greedy_generate(backend, prompt, 12, eos_token_id=None)

    uncached, ids = [], list(prompt)
    for _ in range(12):  # full sequence every step, empty cache
        logits, presents = backend.forward(np.array([ids], dtype=np.int64), backend.empty_past())
        assert backend.past_arrays(presents)[0].shape == (1, 2, len(ids), 32)
        ids.append(int(np.argmax(logits[0, -1])))
        uncached.append(ids[-1])

    assert cached == uncached
    assert cached == torch_greedy(model, prompt, 12, None)


def plain_session_greedy(onnx_path, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Reference: a plain InferenceSession.run loop with numpy feeds; greedy tokens and each step's last logits."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    feed = {"input_ids": np.array([prompt], dtype=np.int64), **{n: np.zeros((1, 2, 0, 32), np.float32) for n in past_names}}
    tokens, last_logits = [], []
    for _ in range(steps):
        feed["attention_mask"] = np.ones((1, feed[past_names[0]].shape[2] + feed["input_ids"].shape[1]), dtype=np.int64)
        logits, *presents = session.run(None, feed)
        last_logits.append(logits[0, -1].copy())
        tokens.append(int(np.argmax(logits[0, -1])))
        feed = {"input_ids": np.array([[tokens[-1]]], dtype=np.int64), **dict(zip(past_names, presents))}
    return tokens, last_logits


@pytest.mark.parametrize("public_api_only", [False, True])
def test_decode_loop_keeps_the_cache_in_ortvalues(tiny, public_api_only):
    """The cache goes from step to step as ONNX Runtime's OrtValues, and the tokens and logits are a plain
    session.run loop's; the logits each step returned stay valid after later steps (callers keep them)."""
    from edgeft_runner.backends.onnxruntime import OnnxRuntimeBackend

    _, onnx_path = tiny
    prompt = [5, 9, 13, 17, 21]
    expected_tokens, expected_logits = plain_session_greedy(onnx_path, prompt, 16)
    backend = OnnxRuntimeBackend(public_api_only=public_api_only)
    backend.load(onnx_path, threads=1)
    assert backend.ortvalue_api == ("public" if public_api_only else "pybind")
    assert greedy_generate(backend, prompt, 16, eos_token_id=None) == expected_tokens

    logits, past = backend.forward(np.array([prompt], dtype=np.int64), backend.empty_past())
    kept = [logits[0, -1]]
    for token in expected_tokens[:-1]:
        logits, past = backend.forward(np.array([[token]], dtype=np.int64), past)
        kept.append(logits[0, -1])
    assert len(past) == 4 and not isinstance(past[0], np.ndarray)
    assert max(float(np.abs(a - b).max()) for a, b in zip(kept, expected_logits)) <= 1e-5
    arrays = backend.past_arrays(past)
    assert arrays[0].shape == (1, 2, len(prompt) + 15, 32) and arrays[0].dtype == np.float32

    # numpy arrays as the past (what a caller may hold) give the same step
    step, _ = backend.forward(np.array([[expected_tokens[-1]]], dtype=np.int64), arrays)
    again, _ = backend.forward(np.array([[expected_tokens[-1]]], dtype=np.int64), past)
    assert np.array_equal(step, again)
    with pytest.raises(RunnerError, match="past has 3 tensors, the model takes 4"):
        backend.forward(np.array([[3]], dtype=np.int64), past[:3])


def test_accuracy_counts_exact_matches(bundle, backend):
    manifest = json.loads((bundle / "manifest.json").read_text())
    eos = manifest["model"]["eos_token_id"]
    task = json.loads((bundle / "task.json").read_text())
    assert task_accuracy(backend, task, eos) == {"exact_match": 1.0, "n": 4, "correct": 4}

    task["examples"][1]["completion_ids"][-1] = (task["examples"][1]["completion_ids"][-1] + 1) % 64
    assert task_accuracy(backend, task, eos) == {"exact_match": 0.75, "n": 4, "correct": 3}
    # Tokens after EOS are never generated, so a completion that continues past it cannot match.
    task["examples"][0]["completion_ids"].append(5)
    assert task_accuracy(backend, task, eos) == {"exact_match": 0.5, "n": 4, "correct": 2}


# --- measurement and telemetry ---------------------------------------------------------------------------

def test_percentiles_on_known_data():
    assert summarize_ms(list(range(1, 101))) == {
        "n": 100, "mean": 50.5, "p50": 50.5, "p90": 90.1, "p99": 99.01, "min": 1.0, "max": 100.0, "reasons": {}}
    assert summarize_ms([2.0, 4.0])["p50"] == 3.0


class FakeClock:
    """Each timed call advances time by exactly 1/8 s (binary-exact, so loop bounds are deterministic)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        self.now += 0.125


@pytest.mark.parametrize("min_iters, expected_n", [(3, 8), (20, 20)])
def test_time_repeated_stops_when_both_bounds_met(min_iters, expected_n):
    clock = FakeClock()
    warmup, samples, warmup_s, duration_s = time_repeated(clock.step, warmup_s=0.5, min_s=1.0, min_iters=min_iters, clock=clock)
    assert warmup == 4 and warmup_s == 0.5
    assert samples == [125.0] * expected_n and duration_s == expected_n * 0.125


def test_thermal_zones_from_sysfs_tree(tmp_path):
    root = write_sysfs(tmp_path / "sys", {"thermal_zone0": ("cpu-thermal", "45000"),
                                         "thermal_zone1": ("gpu-thermal", "51500"),
                                         "thermal_zone2": ("broken", None)})
    (root / "class" / "thermal" / "cooling_device0").mkdir()  # not a zone: ignored
    tracker = ThermalTracker(root)
    assert tracker.sample() == {"thermal_zone0": 45.0, "thermal_zone1": 51.5}
    (root / "class" / "thermal" / "thermal_zone0" / "temp").write_text("47250\n")
    tracker.sample()
    summary = tracker.summary()
    assert summary["max_c"] == 51.5
    assert summary["zones"] == [
        {"name": "thermal_zone0", "type": "cpu-thermal", "start_c": 45.0, "max_c": 47.25},
        {"name": "thermal_zone1", "type": "gpu-thermal", "start_c": 51.5, "max_c": 51.5},
    ]
    assert "thermal_zone2" in summary["reason"]


def test_no_thermal_zones(tmp_path):
    summary = ThermalTracker(tmp_path / "sys").summary()
    assert summary["max_c"] is None and summary["zones"] == []
    assert summary["reason"] == f"no thermal zones under {tmp_path / 'sys' / 'class' / 'thermal'}"


# --- zipapp ----------------------------------------------------------------------------------------------

def test_zipapp_build_is_deterministic(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = build_runner_zipapp(tmp_path / "a" / "runner.pyz")
    second = build_runner_zipapp(tmp_path / "b" / "runner.pyz")
    assert first == second == sha256(tmp_path / "a" / "runner.pyz")
    assert (tmp_path / "a" / "runner.pyz").read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert sorted(os.listdir(tmp_path / "a")) == ["runner.pyz"]  # no temp file left behind


def test_zipapp_run_writes_full_report(bundle, tmp_path):
    pyz = tmp_path / "runner.pyz"
    build_runner_zipapp(pyz)
    sysfs = write_sysfs(tmp_path / "sys", {"thermal_zone0": ("cpu-thermal", "45000"),
                                          "thermal_zone1": ("soc-thermal", "51500")})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "EDGEFT_SYSFS_ROOT": str(sysfs)}
    proc = subprocess.run(
        [sys.executable, str(pyz), "run", "--bundle", str(bundle), "--report", str(out_dir / "report.json"),
         "--samples", str(out_dir / "samples.jsonl")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok ")
    report = json.loads((out_dir / "report.json").read_text())
    assert REPORT_KEYS <= report.keys()
    assert sorted(os.listdir(out_dir)) == ["report.json", "samples.jsonl"]

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert report["format"] == "edgeft-device-report/1"
    assert report["bundle"] == {"target": "test-cpu", "precision": "fp32",
                                "model_sha256": manifest["files"]["model.onnx"]}
    assert report["runtime"]["name"] == "onnxruntime" and report["runtime"]["threads"] == 2
    assert "CPUExecutionProvider" in report["runtime"]["providers"]
    assert report["smoke"]["passed"] is True and report["smoke"]["atol"] == 0.001
    assert report["accuracy"] == {"exact_match": 1.0, "n": 4, "correct": 4}

    latency = report["latency_ms"]
    assert latency["prompt_tokens"] == 8 and latency["warmup"] >= 1 and latency["n"] >= 5
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"] < 5000
    assert len(report["first_token_ms_runs"]) == 3 and 0 < report["first_token_ms"] < 5000
    # With 3 runs both medians come from the same run, so tokens/s x ms/token ~= 1000 (ms rounded to 3 decimals).
    assert report["decode_tokens_per_s"] > 0
    assert report["decode_tokens_per_s"] * report["decode_ms_per_token"] == pytest.approx(1000, rel=0.01)
    assert 10 < report["peak_rss_mb"] < 4000
    assert report["thermal"]["max_c"] == 51.5 and len(report["thermal"]["zones"]) == 2
    assert report["device"]["cpu"]["cores"] == os.cpu_count() and report["device"]["mem_total_mb"] > 0
    assert 0 < report["load_s"] < report["wall_s"] < 120

    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) >= 2
    assert samples[0]["temps_c"] == {"thermal_zone0": 45.0, "thermal_zone1": 51.5} and samples[0]["rss_mb"] > 0


def test_zipapp_imports_no_host_packages(bundle, tmp_path):
    pyz = tmp_path / "runner.pyz"
    build_runner_zipapp(pyz)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from edgeft_runner.__main__ import main; "
            "rc = main(['run', '--bundle', sys.argv[2], '--report', sys.argv[3]]); "
            "import edgeft_runner; assert edgeft_runner.__file__.startswith(sys.argv[1]), edgeft_runner.__file__; "
            "print([m for m in ('torch', 'edgeft', 'yaml', 'pydantic', 'transformers') if m in sys.modules]); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(pyz), str(bundle), str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_zipapp_verify_and_info(bundle, tmp_path):
    pyz = tmp_path / "runner.pyz"
    build_runner_zipapp(pyz)
    proc = subprocess.run([sys.executable, str(pyz), "verify", "--bundle", str(bundle)],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "ok 3 files\n")
    proc = subprocess.run([sys.executable, str(pyz), "info"], capture_output=True, text=True, timeout=60)
    info = json.loads(proc.stdout)
    from importlib.metadata import version

    assert info["runtimes"] == {"onnxruntime": __import__("onnxruntime").__version__,
                                "tflite": f"ai-edge-litert {version('ai-edge-litert')}", "tensorrt": None}
    assert info["device"]["python"] == ".".join(map(str, sys.version_info[:3]))
