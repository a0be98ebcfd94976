"""The fused ONNX graph (export graph: fused/auto): onnxruntime-genai's builder output for a real tiny Llama,
Mistral, Qwen2, Qwen3 and Phi3, driven by the runner's in-place KV cache, checked against PyTorch (and Llama's
against the generic export token by token); every quantize mode keeps it fused; the choice is refused early
where it cannot apply."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "runner", Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import tiny_models  # noqa: E402
from edgeft_runner import RunnerError  # noqa: E402
from edgeft_runner.backends import HeldPast, create_backend  # noqa: E402

ROW = [1, 5, 9, 33, 70, 12, 200, 4, 17, 88, 140, 3, 61]


def _backend(path: Path, **options):
    backend = create_backend("onnxruntime")
    backend.load(path, 1, options=options)
    return backend


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (GQA: 4 heads, 2 KV heads), its fused export and its generic export."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.stages.export import export_fused, export_onnx, model_shape

    root = tmp_path_factory.mktemp("fused")
    hf = tiny_models.build("llama", root / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ROW])).logits[0].numpy()
    (root / "fused").mkdir()
    export_fused(hf, root / "fused" / "model.onnx", model_shape(model.config), threads=1)
    (root / "generic").mkdir()
    export_onnx(model, root / "generic" / "model.onnx", opset=18)
    return {"root": root, "hf": hf, "reference": reference, "fused": root / "fused" / "model.onnx",
            "generic": root / "generic" / "model.onnx"}


def test_fused_graph_is_fused_and_matches_pytorch(llama):
    import onnx

    graph = onnx.load(str(llama["fused"]), load_external_data=False)
    ops = [node.op_type for node in graph.graph.node]
    generic_ops = [node.op_type for node in onnx.load(str(llama["generic"]), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("SkipSimplifiedLayerNormalization") >= 3
    assert "Softmax" not in ops and "Concat" not in ops  # attention and the cache's growth are inside GQA
    assert len(ops) < len(generic_ops) / 3, (len(ops), len(generic_ops))
    assert {p.key: p.value for p in graph.metadata_props}["edgeft.kv_cache"] == "in-place"
    assert sorted(p.name for p in llama["fused"].parent.iterdir()) == ["model.onnx"]  # small: one file, edgeft's rule

    backend = _backend(llama["fused"])
    assert backend.in_place_cache and backend.past_names[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    prefill, past = backend.forward(np.asarray([ROW[:5]]), backend.empty_past())
    steps = [prefill[0]]
    for token in ROW[5:]:
        logits, past = backend.forward(np.asarray([[token]]), past)
        steps.append(logits[0])
    assert isinstance(past, HeldPast) and past.length == len(ROW)
    assert float(np.abs(np.concatenate(steps) - llama["reference"]).max()) < 1e-4


def test_in_place_cache_grows_and_equals_the_generic_graph(llama):
    """From a 4-token cache (grown by doubling) through prefill chunks and decode steps, the fused graph's
    logits equal the generic export's at every position; the buffers are written in place, not replaced."""
    fused, generic = _backend(llama["fused"], cache_tokens=4), _backend(llama["generic"])
    assert not generic.in_place_cache
    chunks = [ROW[:3], ROW[3:6], *[[t] for t in ROW[6:]]]
    fused_past, generic_past = fused.empty_past(), generic.empty_past()
    capacities, buffers = [], []
    for chunk in chunks:
        got, fused_past = fused.forward(np.asarray([chunk]), fused_past)
        want, generic_past = generic.forward(np.asarray([chunk]), generic_past)
        assert got.shape == want.shape == (1, len(chunk), 327)
        assert float(np.abs(got - want).max()) < 1e-4
        capacities.append(fused._cache[0].shape[2])
        buffers.append(fused._cache[0].ctypes.data)
    assert capacities == [4, 8, 8, 8, 16, 16, 16, 16, 16]  # 3 tokens fit 4; 6, 7, 8 fit 8; 9..13 fit 16
    assert len(set(buffers[4:])) == 1  # once big enough, every decode step writes the same buffers
    arrays = fused.past_arrays(fused_past)
    generic_arrays = generic.past_arrays(generic_past)
    assert [a.shape for a in arrays] == [(1, 2, len(ROW), 16)] * 4
    assert max(float(np.abs(a - b).max()) for a, b in zip(arrays, generic_arrays)) < 1e-5


def test_only_the_latest_past_continues(llama):
    fused = _backend(llama["fused"])
    _, first = fused.forward(np.asarray([ROW[:4]]), fused.empty_past())
    saved = fused.past_arrays(first)
    _, second = fused.forward(np.asarray([[ROW[4]]]), first)
    with pytest.raises(RunnerError, match="overwritten by a later step"):
        fused.forward(np.asarray([[ROW[4]]]), first)
    # numpy arrays restart from any point: the step from `saved` repeats the step from `first`
    again, _ = fused.forward(np.asarray([[ROW[4]]]), saved)
    want, _ = _backend(llama["generic"]).forward(np.asarray([ROW[:5]]), [np.zeros((1, 2, 0, 16), np.float32)] * 4)
    assert float(np.abs(again[0, -1] - want[0, -1]).max()) < 1e-4
    assert second.length == 5


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "phi3"])
def test_every_fused_architecture_matches_pytorch(arch, tmp_path):
    """Each architecture `auto` exports fused besides Llama (tiny, random, GQA): the builder's graph is fused, and
    through the runner's in-place cache (a prefill, then one-token steps) its logits are PyTorch's, so greedy
    decoding picks the same tokens. Qwen3 adds per-head q/k norms; Phi3 packs q, k and v (and gate and up)
    into one weight."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.stages.export import FUSED_ARCHITECTURES, ExportConfig, choose_graph, export_fused, model_shape

    hf = tiny_models.build(arch, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    architecture = model.config.architectures[0]
    assert architecture in FUSED_ARCHITECTURES and choose_graph(ExportConfig(), "onnxruntime", architecture)[0] == "fused"
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ROW])).logits[0].numpy()
    export_fused(hf, tmp_path / "model.onnx", model_shape(model.config), threads=1)
    ops = [node.op_type for node in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops, ops
    backend = _backend(tmp_path / "model.onnx", cache_tokens=4)
    assert backend.in_place_cache
    prefill, past = backend.forward(np.asarray([ROW[:5]]), backend.empty_past())
    steps = [prefill[0]]
    for token in ROW[5:]:
        logits, past = backend.forward(np.asarray([[token]]), past)
        steps.append(logits[0])
    got = np.concatenate(steps)
    assert float(np.abs(got - reference).max()) < 1e-4
    assert got.argmax(-1).tolist() == reference.argmax(-1).tolist()


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-static", "int8-weight", "int4-weight", "fp16"])
def test_every_quantize_mode_keeps_the_fused_graph(mode, llama, tmp_path):
    import onnx

    from edgeft.stages.quantize import QuantizeConfig, quantize

    rng = np.random.default_rng(0)
    rows = [list(rng.integers(3, 300, size=12)) for _ in range(4)]
    quantize(llama["fused"], tmp_path / "model.onnx", QuantizeConfig(mode=mode), rows)
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert {p.key: p.value for p in graph.metadata_props}.get("edgeft.kv_cache") == "in-place"
    assert "GroupQueryAttention" in {node.op_type for node in graph.graph.node}
    if mode.endswith("-weight"):  # MatMulNBits at 8 or 4 bits, the packed QKV matmul included
        bits = {onnx.helper.get_attribute_value(a) for n in graph.graph.node if n.op_type == "MatMulNBits"
                for a in n.attribute if a.name == "bits"}
        assert bits == {8 if mode == "int8-weight" else 4}
    backend = _backend(tmp_path / "model.onnx")
    logits, past = backend.forward(np.asarray([ROW[:-1]]), backend.empty_past())
    last, _ = backend.forward(np.asarray([ROW[-1:]]), past)
    got = np.concatenate([logits[0], last[0]])
    error = float(np.abs(got - llama["reference"]).max())
    assert 0 < error < {"fp16": 0.01, "int8-dynamic": 0.1, "int8-static": 0.2, "int8-weight": 0.05, "int4-weight": 0.2}[mode], error


@pytest.mark.parametrize("graph", ["fused", "generic"])
def test_output_projection_takes_its_own_precision(graph, llama, tmp_path):
    """quantize lm_head: the MatMul that computes the logits gets its own bit width (or stays fp32), every other
    MatMul the mode's (MatMulNBits, or int8-dynamic's MatMulInteger); each model's size follows, and its logits
    stay near PyTorch's."""
    import onnx

    from edgeft.stages.quantize import QuantizeConfig, output_projection, quantize

    head = output_projection(onnx.load(str(llama[graph]), load_external_data=False))
    sizes = {}
    for mode, lm_head, head_bits, block_bits in [("int4-weight", "same", 4, 4), ("int4-weight", "int8", 8, 4),
                                                  ("int4-weight", "fp32", None, 4), ("int8-weight", "int4", 4, 8),
                                                  ("int8-dynamic", "int4", 4, None)]:
        out = tmp_path / f"{mode}-{lm_head}" / "model.onnx"
        out.parent.mkdir()
        quantize(llama[graph], out, QuantizeConfig(mode=mode, lm_head=lm_head))
        model = onnx.load(str(out))
        bits = {node.name: next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "bits"), None)
                for node in model.graph.node if node.op_type in ("MatMul", "MatMulNBits")}
        head_node = output_projection(model)
        assert head_node == head + (f"_Q{head_bits}" if head_bits else "")
        assert bits.pop(head_node) == head_bits
        assert {b for b in bits.values() if b} == ({block_bits} if block_bits else set())  # attention's own MatMuls (generic) stay
        integer = sum(node.op_type == "MatMulInteger" for node in model.graph.node)
        # 2 layers of qkv (packed when fused; q, k, v apart when generic), o, gate, up and down
        assert integer == (0 if block_bits else 2 * (5 if graph == "fused" else 7))
        sizes[mode, lm_head] = out.stat().st_size
        backend = _backend(out)
        logits, _ = backend.forward(np.asarray([ROW]), backend.empty_past())
        assert float(np.abs(logits[0] - llama["reference"]).max()) < 0.3
    # the head is 64 x 327 weights: 4 bits < 8 bits < 32 bits, everything else equal; fp32 costs ~3.4 bytes a weight more
    assert sizes["int4-weight", "same"] < sizes["int4-weight", "int8"] < sizes["int4-weight", "fp32"]
    assert 3.0 < (sizes["int4-weight", "fp32"] - sizes["int4-weight", "same"]) / (64 * 327) < 3.6
    assert sizes["int8-weight", "int4"] > sizes["int4-weight", "int8"]  # the blocks outweigh the head


def test_fused_is_refused_where_it_cannot_apply(tmp_path):
    from edgeft import pipeline
    from edgeft.build import check_fused_architecture, check_plan
    from edgeft.config import Profile, load_target
    from edgeft.errors import ConfigError
    from edgeft.stages.export import ExportConfig, choose_graph

    planned = pipeline.plan(Profile(name="p", stages=[{"export": {"graph": "fused"}}, {"quantize": {"mode": "fp16"}}]))
    with pytest.raises(ConfigError, match="graph: fused runs on onnxruntime.*target jetson-orin runs tensorrt"):
        check_plan(planned, load_target("jetson-orin"), "p.yaml")
    check_plan(planned, load_target("rpi5"), "p.yaml")
    tflite = pipeline.plan(Profile(name="p", stages=[{"export": {"format": "tflite"}}, {"quantize": {"mode": "int4-weight"}}]))
    with pytest.raises(ConfigError, match="quantize mode int4-weight does not apply to tflite models; use one of fp32, fp16"):
        check_plan(tflite, load_target("android-arm64"), "p.yaml")
    with pytest.raises(ConfigError, match="lm_head: int8 applies to modes int8-dynamic, int4-weight and int8-weight, not int8-static"):
        pipeline.plan(Profile(name="p", stages=[{"export": {}}, {"quantize": {"mode": "int8-static", "lm_head": "int8"}}]))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel; set export graph: auto"):
        check_fused_architecture(planned, {"architectures": ["GPT2LMHeadModel"]}, "m", "p.yaml")
    # auto: fused only for a covered architecture on ONNX Runtime, and the key says which runtime it was for
    auto = ExportConfig()
    assert choose_graph(auto, "onnxruntime", "Qwen2ForCausalLM")[0] == "fused"
    assert choose_graph(auto, "tensorrt", "LlamaForCausalLM") == ("generic", "runtime tensorrt has no GroupQueryAttention (fused graphs run on onnxruntime)")
    assert choose_graph(ExportConfig(format="tflite"), "tflite", "LlamaForCausalLM")[0] == "generic"
    assert auto.resolved("tensorrt") == {"graph": "generic"} and auto.resolved("onnxruntime") == {"graph": "auto"}
