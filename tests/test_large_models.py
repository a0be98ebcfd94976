"""Models past protobuf's 2 GiB limit: every stage that writes ONNX puts the weights in external data,
the bundle ships and hashes it, the runner loads it; every stage reports its own peak RSS; `--dry-run`
plans a build before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import task_rows, tokenizer as tiny_tokenizer, write_data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EDGEFT = [sys.executable, "-m", "edgeft.cli"]
GIB = 1 << 30


def _edgeft(*args, cache: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEFT, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "EDGEFT_CACHE": str(cache), "COLUMNS": "300"})


# ------------------------------------------------------------------------------------ every quantize mode
@pytest.fixture(scope="module")
def exported_external(tmp_path_factory):
    """A tiny Llama exported with its weights forced into external data (the rule's threshold at 0)."""
    import torch

    from edgeft import onnx_io
    from edgeft.stages.export import export_onnx
    from onnx_kv_export import tiny_llama

    root = tmp_path_factory.mktemp("external")
    saved = onnx_io.EXTERNAL_DATA_ABOVE_BYTES
    onnx_io.EXTERNAL_DATA_ABOVE_BYTES = 0
    model = tiny_llama(vocab_size=96, hidden_size=64)
    try:
        with torch.no_grad():
            export_onnx(model, root / "model.onnx", opset=18)
    finally:
        onnx_io.EXTERNAL_DATA_ABOVE_BYTES = saved
    (root.parent / f"{root.name}.weight_bytes").write_text(str(sum(p.numel() * 4 for p in model.parameters())))
    return root / "model.onnx"


def test_export_writes_the_weights_beside_the_graph(exported_external):
    from edgeft import lm

    files = sorted(p.name for p in exported_external.parent.iterdir())
    assert files == ["model.onnx", "model.onnx.data"]
    graph_bytes, data_bytes = ((exported_external.parent / f).stat().st_size for f in files)
    weight_bytes = int((exported_external.parent.parent / f"{exported_external.parent.name}.weight_bytes").read_text())
    assert data_bytes > 0.99 * weight_bytes  # the weights are in the data file (tensors under 1 KiB, the norms, stay inline)
    backend = lm.load(exported_external)
    logits, _ = backend.forward(np.asarray([[5, 6, 7]], dtype=np.int64), backend.empty_past())
    assert logits.shape == (1, 3, 96) and np.isfinite(logits).all()


@pytest.mark.parametrize("mode", ["fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight", "int4-embeddings"])
def test_every_quantize_mode_reads_and_writes_external_data(mode, exported_external, tmp_path, monkeypatch):
    import onnx

    from edgeft import lm, onnx_io
    from edgeft.stages.quantize import QuantizeConfig, quantize

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_ABOVE_BYTES", 0)
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(3, 96, size=12)) for _ in range(4)]
    config = QuantizeConfig(mode="int4-weight", embeddings=True) if mode == "int4-embeddings" else QuantizeConfig(mode=mode)
    quantize(exported_external, tmp_path / "model.onnx", config, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert len(external) >= 5 and all(len(t.raw_data) <= 1024 for t in inline)  # every weight matrix is in the data file
    assert {entry.value for t in external for entry in t.external_data if entry.key == "location"} == {"model.onnx.data"}
    ops = {node.op_type for node in graph.node}
    if mode.startswith("int4"):  # the embedding: 4-bit only when asked
        assert "MatMulNBits" in ops and ("GatherBlockQuantized" in ops) == (mode == "int4-embeddings")

    prompt = np.asarray([rows[0]], dtype=np.int64)
    reference, quantized = lm.load(exported_external), lm.load(tmp_path / "model.onnx")
    expected, _ = reference.forward(prompt, reference.empty_past())
    got, _ = quantized.forward(prompt, quantized.empty_past())
    if mode == "fp32":
        assert np.array_equal(got, expected)
    else:  # a quantized model, not a broken one: close to the fp32 logits, which spread over ~1
        tolerance = {"fp16": 0.01, "int8-dynamic": 0.1, "int8-static": 0.2, "int4-weight": 0.2, "int4-embeddings": 0.3}[mode]
        assert 0 < float(np.abs(got - expected).max()) < tolerance


def test_int8_dynamic_writes_the_graph_ort_writes(exported_external, tmp_path):
    """Shape inference on a weightless copy (infer_value_types) in place of ONNX Runtime's deep copy and
    reload: the quantized graph is the same, node for node and byte for byte."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeft.stages import quantize as quantize_stage

    quantize_dynamic(str(exported_external), str(tmp_path / "ort.onnx"), weight_type=QuantType.QInt8)
    with quantize_stage._lean_dynamic_quantizer():
        quantize_dynamic(str(exported_external), str(tmp_path / "lean.onnx"), weight_type=QuantType.QInt8)
    ort, lean = (onnx.load(str(tmp_path / name)).graph for name in ("ort.onnx", "lean.onnx"))
    assert len(lean.node) == len(ort.node) > 50
    assert [n.SerializeToString() for n in lean.node] == [n.SerializeToString() for n in ort.node]
    assert sorted(t.SerializeToString() for t in lean.initializer) == sorted(t.SerializeToString() for t in ort.initializer)
    assert {v.name for v in lean.value_info} == {v.name for v in ort.value_info}


# Quantizes argv[1] int8-dynamic in a fresh process and prints how much its peak RSS grew while doing it.
INT8_PEAK = r"""
import sys
from pathlib import Path
from edgeft.stages.quantize import QuantizeConfig, quantize
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
source = Path(sys.argv[1])
(source.parent / "out").mkdir()
before = hwm()
quantize(source, source.parent / "out" / "model.onnx", QuantizeConfig(mode="int8-dynamic"))
print(hwm() - before)
"""


def test_int8_dynamic_quantize_holds_the_weights_once(tmp_path):
    """ONNX Runtime's own path holds three copies at its peak (3.2x the fp32 weights, measured here and on a
    1.1B model); edgeft's holds the weights, their int8 form and one tensor's temporaries."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dim, count = 4096, 8  # eight 4096x4096 fp32 MatMuls: 512 MiB
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((dim, dim), dtype=np.float32), f"w{i}") for i in range(count)]
    nodes = [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(count)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["n", dim])],
                              [helper.make_tensor_value_info(f"h{count}", TensorProto.FLOAT, ["n", dim])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "src.onnx"),
              save_as_external_data=True, location="src.onnx.data")
    del weights, graph
    weight_bytes = count * dim * dim * 4
    result = subprocess.run([sys.executable, "-c", INT8_PEAK, str(tmp_path / "src.onnx")], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    grew = int(result.stdout.split()[-1])
    assert weight_bytes < grew < 2.4 * weight_bytes, grew / weight_bytes  # measured: 1.9x (ORT's path: 3.3x)
    written = sum(f.stat().st_size for f in (tmp_path / "out").iterdir())
    assert count * dim * dim < written < 1.01 * count * dim * dim  # the int8 weights, written out


def test_small_models_stay_one_file(tmp_path):
    from edgeft import onnx_io
    from edgeft.stages.export import export_onnx
    from onnx_kv_export import tiny_llama

    export_onnx(tiny_llama(), tmp_path / "model.onnx", opset=18)
    assert [p.name for p in onnx_io.model_files(tmp_path / "model.onnx")] == ["model.onnx"]
    assert not onnx_io.needs_external_data(onnx_io.EXTERNAL_DATA_ABOVE_BYTES) and onnx_io.needs_external_data(2 * GIB)


# ------------------------------------------------------------------------------------ a model past 2 GiB
def _big_llama(out: Path) -> Path:
    """The smallest Llama whose fp32 weights cross 2 GiB in one file: two 268M-parameter matrices (embedding
    and lm_head, untied) and one thin layer; 2.18 GB, yet cheap per token (the embedding is only gathered).
    Random weights give flat logits, so the profile turns quantize's top-1 agreement check off."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=262144, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02) if param.dim() > 1 else param.fill_(1.0)
    model.save_pretrained(out, max_shard_size="1GB")
    tok.save_pretrained(out)
    return out


def test_a_model_past_2gib_builds_ships_and_runs(tmp_path):
    model = _big_llama(tmp_path / "big")
    data, _ = write_data("prompt_completion", tmp_path / "data", task_rows(24))
    profile = tmp_path / "big.yaml"
    profile.write_text(
        "stages:\n  - export: {graph: generic, validation_examples: 2}\n  - quantize: {mode: fp16, validation_examples: 2, min_top1_agreement: 0}\n"
        "eval: {metrics: [exact_match]}\n"
        "measure: {warmup_s: 0, min_s: 0, min_iters: 2, prompt_tokens: 8, decode_tokens: 4, first_token_runs: 1}\n"
        "budgets: {}\n")
    cache, out = tmp_path / "cache", tmp_path / "bundle"
    result = _edgeft("build", "--target", "rpi5", "--model", model, "--data", data, "-p", profile, "--device", "local",
                     "--out", out, "--json", "-q", cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stderr and "INFO" not in result.stderr  # ORT's quantizers' logging stays out
    report = json.loads(result.stdout)

    export_dir = next((cache / "artifacts").glob("export-*"))
    sizes = {p.name: p.stat().st_size for p in export_dir.iterdir() if p.name.startswith("model.onnx")}
    assert set(sizes) == {"model.onnx", "model.onnx.data"} and sizes["model.onnx.data"] > 2 * GIB > sizes["model.onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    shipped = {name for name in manifest["files"] if name.startswith("model.onnx")}
    assert shipped == {"model.onnx", "model.onnx.data"}  # fp16: 1.09 GB of weights, still past the 1 GiB rule
    assert (out / "model.onnx.data").stat().st_size > 1.07e9

    peaks = {s["name"]: s["peak_rss_bytes"] for s in report["stages"]}
    # Each stage's own peak (the kernel's high-water mark, reset per stage). Export holds one copy of the fp32
    # weights at a time (PyTorch's, then ONNX Runtime's): 1.27x measured. fp16 holds the fp32 graph plus the
    # converter's per-tensor copies, which are 1 GB each here: 3.1x measured (1.9x on the 1.1B, README).
    assert 2.1e9 < peaks["export"] < 1.6 * 2.18e9, peaks
    assert 2.1e9 < peaks["quantize"] < 4 * 2.18e9 and peaks["quantize"] != peaks["export"], peaks
    assert report["decode_tokens_per_s"] > 0 and report["smoke"]["passed"]


# ------------------------------------------------------------------------------------ build --dry-run
@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from tiny_models import build as build_tiny_model

    root = tmp_path_factory.mktemp("dry")
    data, _ = write_data("prompt_completion", root / "data", task_rows(24))
    return {"model": build_tiny_model("llama", root / "llama"), "data": data, "root": root}


def test_dry_run_plans_without_running_and_sees_the_cache(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model, data = tiny_llama_dir["model"], tiny_llama_dir["data"]
    profile = tmp_path / "p.yaml"
    profile.write_text("stages:\n  - export: {}\n  - quantize: {mode: int8-dynamic}\nbudgets: {}\n")
    cache = tmp_path / "cache"
    args = ("build", "-t", "rpi5", "--model", model, "--data", data, "-p", profile, "--out", tmp_path / "b")
    result = _edgeft(*args, "--dry-run", "--json", cache=cache)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).parameters())
    assert plan["parameters"] == parameters and plan["fp32_weight_bytes"] == 4 * parameters
    assert [(s["name"], s["cached"]) for s in plan["stages"]] == [("export", False), ("quantize", False)]
    assert plan["stages"][1]["config"] == {"mode": "int8-dynamic"}
    for stage in plan["stages"]:
        assert stage["peak_memory_bytes"] > stage["disk_bytes"] > 0
    assert plan["stages"][1]["disk_bytes"] < 0.5 * plan["stages"][0]["disk_bytes"]  # int8 output vs the fp32 export
    assert not (cache / "artifacts").exists() and not (tmp_path / "b").exists()  # nothing built, nothing written
    assert plan["warning"] is None and plan["available_memory_bytes"] > 0

    export_only = tmp_path / "export-only.yaml"  # builds the export stage the plan's first stage keys to
    export_only.write_text("stages:\n  - export: {}\nbudgets: {}\n")
    built = _edgeft("build", "-t", "rpi5", "--model", model, "--data", data, "-p", export_only, "--out", tmp_path / "b", "--no-measure", "-q",
                    cache=cache)
    assert built.returncode == 0, built.stderr
    again = json.loads(_edgeft(*args, "--dry-run", "--json", cache=cache).stdout)
    assert [(s["name"], s["cached"]) for s in again["stages"]] == [("export", True), ("quantize", False)]
    human = _edgeft(*args, "--dry-run", cache=cache)
    assert human.returncode == 0 and "peak memory (est.)" in human.stderr  # the human view goes to stderr, like every status line
    assert [line.split()[:2] for line in human.stderr.splitlines() if line.startswith(("export ", "quantize "))] == [["export", "yes"], ["quantize", "no"]]


def test_dry_run_warns_when_the_model_outgrows_free_memory(tiny_llama_dir, tmp_path):
    """A model dir whose safetensors header declares 12.5B parameters (a sparse file: no disk used):
    the plan reads headers only, and warns in one line naming the stage and the setting to change."""
    import shutil
    import struct

    model = tmp_path / "huge"
    shutil.copytree(tiny_llama_dir["model"], model)
    for old in model.glob("*.safetensors"):
        old.unlink()
    rows, cols = 100_000, 125_000
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}}).encode()
    with open(model / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + rows * cols * 4)
    profile = tmp_path / "p.yaml"
    profile.write_text("stages:\n  - finetune: {method: lora}\n  - merge: {}\n  - export: {}\nbudgets: {}\n")
    result = _edgeft("build", "-t", "rpi5", "--model", model, "--data", tiny_llama_dir["data"], "-p", profile, "--dry-run",
                     cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    warning = [line for line in (result.stdout + result.stderr).splitlines() if "memory warning" in line]
    assert len(warning) == 1 and "12.50B parameters" in warning[0] and "GB free now" in warning[0]
    stage = warning[0].split("memory warning: ")[1].split()[0]
    assert stage in ("finetune", "merge", "export")
    assert ("finetune.method: qlora" if stage == "finetune" else "build on a larger machine") in warning[0]
