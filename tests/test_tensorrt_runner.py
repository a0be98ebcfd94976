"""TensorRT backend, runner side: the pure parts (shape profile, engine cache key, ONNX input reader) and
what a device without TensorRT / CUDA is told. No GPU here, so nothing pretends to run an engine."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "runner") not in sys.path:
    sys.path.insert(0, str(REPO / "runner"))

from edgeft_runner import BUNDLE_FORMAT, RunnerError  # noqa: E402
from edgeft_runner.backends import create_backend, installed_runtimes  # noqa: E402
from edgeft_runner.backends import cuda  # noqa: E402
from edgeft_runner.backends.tensorrt import (INSTALL_HINT, STATIC_REFUSED, engine_cache_dir,  # noqa: E402
                                             engine_cache_key, installed_version, network_plan, next_slot,
                                             numpy_dtype, onnx_graph_inputs, optimization_shapes)

TRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None
VOCAB, KV_HEADS, HEAD_DIM, LAYERS = 16, 2, 4, 2
OPTIONS = {"precision": "fp16", "min_tokens": 1, "opt_tokens": 64, "max_tokens": 256, "max_context": 512}


def kv_model(path: Path, heads=KV_HEADS, head_dim=HEAD_DIM, external_data=False) -> Path:
    """A tiny model with the edgeft KV-cache contract, built with the onnx helper API (no torch):
    logits = one-hot-ish table lookup of input_ids, present = concat(past, per-token k/v) on axis 2."""
    rng = np.random.default_rng(0)
    nodes, inits = [], [
        numpy_helper.from_array(rng.standard_normal((VOCAB, VOCAB)).astype(np.float32), "logit_table"),
        numpy_helper.from_array(np.array([1, -1, KV_HEADS, HEAD_DIM], dtype=np.int64), "kv_shape"),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq_len"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "total_len"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq_len", VOCAB])]
    nodes.append(helper.make_node("Gather", ["logit_table", "input_ids"], ["logits"]))
    for i in range(LAYERS):
        for kind in ("key", "value"):
            table = f"{kind}_table_{i}"
            inits.append(numpy_helper.from_array(
                rng.standard_normal((VOCAB, KV_HEADS * HEAD_DIM)).astype(np.float32), table))
            nodes += [helper.make_node("Gather", [table, "input_ids"], [f"{table}_rows"]),
                      helper.make_node("Reshape", [f"{table}_rows", "kv_shape"], [f"{table}_4d"]),
                      helper.make_node("Transpose", [f"{table}_4d"], [f"{table}_new"], perm=[0, 2, 1, 3]),
                      helper.make_node("Concat", [f"past_key_values.{i}.{kind}", f"{table}_new"],
                                       [f"present.{i}.{kind}"], axis=2)]
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        [1, heads, "past_len", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         [1, heads, "total_len", head_dim]))
    model = helper.make_model(helper.make_graph(nodes, "kv", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    if external_data:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def contract_inputs(heads=KV_HEADS, head_dim=HEAD_DIM, layers=LAYERS):
    inputs = [("input_ids", [1, "seq_len"]), ("attention_mask", [1, "total_len"])]
    for i in range(layers):
        inputs += [(f"past_key_values.{i}.{kind}", [1, heads, "past_len", head_dim]) for kind in ("key", "value")]
    return inputs


# --- ONNX graph inputs without onnx on the device ----------------------------------------------------------

@pytest.mark.parametrize("external_data", [False, True])
def test_onnx_graph_inputs_match_onnx_itself(tmp_path, external_data):
    path = kv_model(tmp_path / "model.onnx", external_data=external_data)
    expected = [(i.name, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim])
                for i in onnx.load(str(path), load_external_data=False).graph.input]
    assert onnx_graph_inputs(path) == expected == contract_inputs()


def test_onnx_graph_inputs_rejects_non_onnx(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    for name in ("empty.onnx", "junk.onnx", "missing.onnx"):
        with pytest.raises(RunnerError, match="cannot read the ONNX graph inputs"):
            onnx_graph_inputs(tmp_path / name)


# --- the optimization profile ------------------------------------------------------------------------------

def test_optimization_shapes_dynamic():
    shapes = optimization_shapes(contract_inputs(), OPTIONS)
    assert shapes["input_ids"] == ((1, 1), (1, 64), (1, 256))
    # opt is one consistent call: mask length = past (64) + new tokens (64)
    assert shapes["attention_mask"] == ((1, 1), (1, 128), (1, 512))
    for i in range(LAYERS):
        for kind in ("key", "value"):
            assert shapes[f"past_key_values.{i}.{kind}"] == ((1, 2, 0, 4), (1, 2, 64, 4), (1, 2, 511, 4))
    assert len(shapes) == 2 + 2 * LAYERS


def test_optimization_shapes_opt_fits_a_short_context():
    shapes = optimization_shapes(contract_inputs(), {"opt_tokens": 48, "max_tokens": 64, "max_context": 64})
    assert shapes["input_ids"] == ((1, 1), (1, 48), (1, 64))
    assert shapes["past_key_values.0.key"] == ((1, 2, 0, 4), (1, 2, 16, 4), (1, 2, 63, 4))
    assert shapes["attention_mask"] == ((1, 1), (1, 64), (1, 64))


def test_optimization_shapes_kv_heads_from_arguments_when_symbolic():
    inputs = contract_inputs(heads="num_kv_heads", head_dim="head_dim")
    shapes = optimization_shapes(inputs, OPTIONS, num_kv_heads=8, head_dim=64)
    assert shapes["past_key_values.1.value"] == ((1, 8, 0, 64), (1, 8, 64, 64), (1, 8, 511, 64))
    with pytest.raises(RunnerError, match="past_key_values.0.key: kv heads is symbolic"):
        optimization_shapes(inputs, OPTIONS)
    # Fixed dims in the graph win over the manifest's (possibly stale) numbers.
    assert optimization_shapes(contract_inputs(), OPTIONS, num_kv_heads=8, head_dim=64)[
        "past_key_values.0.key"][2] == (1, 2, 511, 4)


def test_static_is_refused_at_load_in_one_line(tmp_path):
    """A static profile fixes the past at one length: the prefill's empty cache could never run. Refused
    before any TensorRT or CUDA work (so also here, without them), and by the target's config on the host."""
    with pytest.raises(RunnerError) as info:
        optimization_shapes(contract_inputs(), {**OPTIONS, "static": True})
    assert str(info.value) == STATIC_REFUSED and "\n" not in STATIC_REFUSED and "tensorrt.static" in STATIC_REFUSED
    assert optimization_shapes(contract_inputs(), {**OPTIONS, "static": False}) == optimization_shapes(contract_inputs(), OPTIONS)
    with pytest.raises(RunnerError, match="static: true cannot run"):
        create_backend("tensorrt").load(kv_model(tmp_path / "model.onnx"), 1, options={**OPTIONS, "static": True})

    from edgeft.config import load_target
    from edgeft.errors import ConfigError

    target = tmp_path / "orin-static.yaml"
    target.write_text("name: orin-static\narch: aarch64\nruntime: tensorrt\ndefault_profile: jetson-fp16\n"
                      "tensorrt:\n  max_context: 256\n  static: true\n")
    with pytest.raises(ConfigError) as config_info:
        load_target(str(target))
    assert str(config_info.value).startswith(f"{target}:7: field 'tensorrt.static'")
    assert "\n" not in str(config_info.value)


def test_kv_cache_slots_alternate():
    """Each step writes the slot its past is not in; from the empty cache, the one not written last."""
    assert next_slot(None, 1) == 0 and next_slot(0, 0) == 1 and next_slot(1, 1) == 0
    assert next_slot(None, 0) == 1 and next_slot(0, 1) == 1


@pytest.mark.parametrize("precision, version, has_flag, expected", [
    ("int8", "10.3.0", True, (True, ())),  # explicit Q/DQ: the model's types rule, no deprecated flags
    ("fp16", "10.7.0", True, (True, ())),
    ("fp32", "10.3.0", True, (False, ())),
    ("int8", "8.6.2", False, (False, ("INT8", "FP16"))),  # JetPack 5 / 6.0
    ("fp16", "8.6.2", False, (False, ("FP16",))),
    ("fp16", "11.0.0", True, (True, ())),  # every network is strongly typed in 11
    ("int8", "10.0.1", False, (False, ("INT8", "FP16"))),
])
def test_network_plan(precision, version, has_flag, expected):
    assert network_plan(precision, version, has_flag) == expected


def test_optimization_shapes_graph_fixed_dims_and_other_inputs():
    inputs = [("input_ids", [1, 32]), ("attention_mask", [1, "total"]), ("past_key_values.0.key", [1, 2, "p", 4]),
              ("rope_scale", [4])]
    shapes = optimization_shapes(inputs, OPTIONS)
    assert shapes["input_ids"] == ((1, 32),) * 3  # a static sequence length stays static
    assert shapes["rope_scale"] == ((4,),) * 3
    with pytest.raises(RunnerError, match=r"model input position_ids \[1, 'seq'\] is dynamic"):
        optimization_shapes([*inputs, ("position_ids", [1, "seq"])], OPTIONS)
    with pytest.raises(RunnerError, match="has rank 3, expected 2"):
        optimization_shapes([("input_ids", [1, "seq", 1])], OPTIONS)


@pytest.mark.parametrize("bad", [{"opt_tokens": 300}, {"min_tokens": 80}, {"max_tokens": 600},
                                 {"opt_past": 500}, {"opt_past": -1}])
def test_optimization_shapes_rejects_inconsistent_options(bad):
    with pytest.raises(RunnerError, match="tensorrt options"):
        optimization_shapes(contract_inputs(), {**OPTIONS, **bad})


def test_optimization_shapes_from_a_real_model(tmp_path):
    shapes = optimization_shapes(onnx_graph_inputs(kv_model(tmp_path / "m.onnx")), OPTIONS)
    assert shapes == optimization_shapes(contract_inputs(), OPTIONS)


# --- the engine cache --------------------------------------------------------------------------------------

def test_engine_cache_key_changes_with_every_component():
    shapes = optimization_shapes(contract_inputs(), OPTIONS)
    base = dict(onnx_sha256="a" * 64, trt_version="10.3.0", gpu_name="Orin", compute_capability=(8, 7),
                precision="fp16", shapes=shapes, workspace_mb=1024)
    key = engine_cache_key(**base)
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    # Stable: same inputs (even a dict in another order, a list for the capability) give the same key.
    assert engine_cache_key(**{**base, "shapes": dict(reversed(list(shapes.items()))),
                               "compute_capability": [8, 7]}) == key
    variants = {
        "onnx_sha256": "b" * 64, "trt_version": "8.6.2", "gpu_name": "Xavier", "compute_capability": (7, 2),
        "precision": "int8", "workspace_mb": 2048,
        "shapes": optimization_shapes(contract_inputs(), {**OPTIONS, "max_context": 1024}),
    }
    keys = {name: engine_cache_key(**{**base, name: value}) for name, value in variants.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(variants)
    # Strongly typed engines get their own key; weakly typed ones keep the key they had before the field.
    assert engine_cache_key(**base, strongly_typed=True) not in {key, *keys.values()}
    assert key == "4f1d7ee48ebc2ac5ddab91a5046e6eb3e105676119ec01e1bba970bc33fa9b10"


def test_engine_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEFT_ENGINE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert engine_cache_dir({}) == tmp_path / "home" / ".cache" / "edgeft-runner" / "engines"
    monkeypatch.setenv("EDGEFT_ENGINE_CACHE", str(tmp_path / "env"))
    assert engine_cache_dir(None) == tmp_path / "env"
    assert engine_cache_dir({"cache_dir": str(tmp_path / "opt")}) == tmp_path / "opt"


def test_numpy_dtype_names():
    assert numpy_dtype("DataType.HALF") is np.float16 and numpy_dtype("DataType.INT64") is np.int64
    assert numpy_dtype("DataType.FLOAT") is np.float32 and numpy_dtype("DataType.BOOL") is np.bool_
    with pytest.raises(RunnerError, match="FP8 is not supported"):
        numpy_dtype("DataType.FP8")


# --- a device without TensorRT / CUDA ----------------------------------------------------------------------

@pytest.mark.skipif(TRT_INSTALLED, reason="tensorrt is installed here")
def test_load_without_tensorrt_says_how_to_install(tmp_path):
    assert installed_version() is None
    assert installed_runtimes()["tensorrt"] is None
    backend = create_backend("tensorrt")
    assert backend.name == "tensorrt" and backend.engine_cached is False and backend.device_compute_ms == []
    with pytest.raises(RunnerError) as info:
        backend.load(kv_model(tmp_path / "model.onnx"), 1, options=OPTIONS)
    message = str(info.value)
    assert message == INSTALL_HINT and "\n" not in message
    assert "tensorrt Python module not found" in message
    assert "python3-libnvinfer" in message and "pip install tensorrt" in message


def test_cuda_wrapper_without_libcudart():
    with pytest.raises(RunnerError) as info:
        cuda.CudaRuntime(candidates=("libcudart-missing.so.99", "/nonexistent/lib64/libcudart.so"))
    assert str(info.value) == ("CUDA runtime (libcudart) not found on this device: "
                               "install JetPack / the CUDA toolkit")


def test_libcudart_lookup_finds_versioned_files(tmp_path):
    """Runtime-only JetPack images have libcudart.so.12 (.so.11.0 on JetPack 5) and no unversioned name:
    after the loader's own search, CUDA's directories are searched, unversioned first, newest first."""
    lib12 = tmp_path / "cuda-12.2" / "targets" / "aarch64-linux" / "lib"
    lib11 = tmp_path / "cuda-11.4" / "lib64"
    for directory, names in ((lib12, ["libcudart.so.12", "libcudart.so.12.2.140", "libcudart_static.a",
                                      "libcudart.so.12.2.140.bak"]),
                             (lib11, ["libcudart.so.11.0", "libcudart.so"])):
        directory.mkdir(parents=True)
        for name in names:
            (directory / name).write_text("not a library")
    dirs = (str(tmp_path / "cuda-*" / "lib64"), str(tmp_path / "cuda-*" / "targets" / "*" / "lib"))
    candidates = cuda.libcudart_candidates(dirs)
    assert candidates == [*cuda.LIBCUDART_SONAMES, str(lib11 / "libcudart.so"), str(lib11 / "libcudart.so.11.0"),
                          str(lib12 / "libcudart.so.12"), str(lib12 / "libcudart.so.12.2.140")]
    assert candidates[:5] == ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so.11"]

    # Files that do not load are skipped: a real shared library under a versioned name is taken.
    libm = next(Path(d) / "libm.so.6" for d in ("/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib64", "/lib64")
                if (Path(d) / "libm.so.6").is_file())
    (lib12 / "libcudart.so.12").write_bytes(libm.read_bytes())
    files_only = cuda.libcudart_candidates(dirs)[len(cuda.LIBCUDART_SONAMES):]
    assert cuda.load_libcudart(files_only)._name == str(lib12 / "libcudart.so.12")
    with pytest.raises(RunnerError, match="CUDA runtime \\(libcudart\\) not found"):
        cuda.load_libcudart([str(lib11 / "libcudart.so"), str(lib11 / "libcudart.so.11.0")])


def test_cuda_wrapper_reports_cuda_errors_in_one_line():
    """This machine may have libcudart but no GPU/driver: the first call must fail with CUDA's own words."""
    try:
        runtime = cuda.CudaRuntime()
    except RunnerError as exc:
        message = str(exc)
        assert "\n" not in message
        if message != cuda.NOT_FOUND:
            assert message.startswith("CUDA error in cudaGetDeviceCount: ") and message.endswith(")")
            assert "(cudaError " in message and "unknown error" not in message
        return
    # A real GPU: the device facts must be sensible, and a bad call must still raise a RunnerError.
    assert runtime.device_name() and runtime.compute_capability()[0] >= 5
    with pytest.raises(RunnerError, match="CUDA error in cudaMalloc"):
        runtime.malloc(1 << 62)


# --- the runner CLI on a tensorrt bundle --------------------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_bundle(root: Path, runtime: str) -> Path:
    """A complete bundle of the tiny model: golden logits computed here, so it passes the smoke test."""
    root.mkdir()
    model_path = kv_model(root / "model.onnx")
    table = numpy_helper.to_array(next(t for t in onnx.load(str(model_path)).graph.initializer
                                       if t.name == "logit_table"))
    golden_ids = np.array([[3, 5, 7]], dtype=np.int64)
    np.savez(root / "golden.npz", input_ids=golden_ids, logits=table[golden_ids])
    (root / "task.json").write_text(json.dumps(
        {"max_new_tokens": 2, "examples": [{"prompt_ids": [3, 4], "completion_ids": [5, 6]}]}))
    files = {name: sha256(root / name) for name in ("model.onnx", "golden.npz", "task.json")}
    manifest = {
        "format": BUNDLE_FORMAT, "target": "jetson-test", "runtime": runtime, "threads": 1,
        "model": {"file": "model.onnx", "precision": "fp16", "num_layers": LAYERS, "num_kv_heads": KV_HEADS,
                  "head_dim": HEAD_DIM, "vocab_size": VOCAB, "max_positions": 64, "eos_token_id": 2},
        "runtime_options": OPTIONS,
        "measure": {"warmup_s": 0, "min_s": 0, "min_iters": 1, "prompt_tokens": 4, "decode_tokens": 2,
                    "first_token_runs": 1},
        "golden": {"file": "golden.npz", "atol": 1e-5},
        "task": {"file": "task.json"},
        "files": files,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def run_cli(bundle: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "runner"), "EDGEFT_SYSFS_ROOT": str(tmp_path / "sys"),
           "EDGEFT_ENGINE_CACHE": str(tmp_path / "engines")}
    return subprocess.run([sys.executable, "-m", "edgeft_runner", "run", "--bundle", str(bundle),
                           "--report", str(tmp_path / f"{bundle.name}.json")],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)


@pytest.mark.skipif(TRT_INSTALLED, reason="tensorrt is installed here")
def test_cli_on_tensorrt_bundle_exits_2_naming_tensorrt(tmp_path):
    # The same bundle under onnxruntime runs to the end: the fixture is right, only the runtime is missing.
    ort = run_cli(make_bundle(tmp_path / "ort", "onnxruntime"), tmp_path)
    assert ort.returncode == 0, ort.stderr
    assert json.loads((tmp_path / "ort.json").read_text())["smoke"]["passed"] is True

    proc = run_cli(make_bundle(tmp_path / "trt", "tensorrt"), tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"edgeft-runner: {INSTALL_HINT}"]
    assert not (tmp_path / "trt.json").exists() and not (tmp_path / "engines").exists()

    # `python -m` puts the working directory on sys.path: a folder there named tensorrt imports as an
    # empty namespace package, which must read as "not installed", not crash with a traceback.
    (tmp_path / "tensorrt").mkdir()
    proc = run_cli(tmp_path / "trt", tmp_path)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"edgeft-runner: {INSTALL_HINT} (the 'tensorrt' found at ") and "is not TensorRT" in line
