"""Architectures: tiny Llama-style and GPT-2-style models (built here from configs, with a trained BPE
tokenizer) fine-tune on every dataset format, merge, and export to ONNX with a KV cache that matches
PyTorch; LoRA's default target modules are every linear layer but the LM head, for each architecture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tiny_models
from edgeft import pipeline
from edgeft.artifact import cache_root
from edgeft.config import Profile, load_target
from edgeft.context import BuildContext
from edgeft.data import DataConfig, encode, load_splits, training_rows

# A handful of steps: 32 train rows, batch 8, 2 epochs = 8 optimizer steps.
FINETUNE = {"r": 8, "alpha": 16, "epochs": 2, "batch_size": 8, "lr": 0.01, "max_length": 96, "eval_task_examples": 2, "warmup_ratio": 0.0}
FORMATS = ("prompt_completion", "alpaca", "chat", "csv")
# What peft's "all-linear" (finetune.target_modules' default) wraps in each block, per architecture:
# every linear layer (nn.Linear, or GPT-2's transformers Conv1D) except the LM head.
LLAMA_LIKE = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
DEFAULT_TARGETS = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "phi": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"},
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},  # q/k/v and gate/up packed
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
}


def _in_block(name: str) -> str:
    """model.layers.0.self_attn.q_proj -> self_attn.q_proj"""
    return ".".join(name.split(".")[-2:])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As `--threads 1` would: on a busy 2-core host, two torch threads per tiny op mostly wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("arch")
    tok = tiny_models.tokenizer()
    return {arch: tiny_models.build(arch, root / arch, tok) for arch in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch-data")
    return {fmt: tiny_models.write_data(fmt, root / fmt, tiny_models.task_rows(40)) for fmt in FORMATS}


def _context(model_dir: Path, data: Path, data_section: dict, stages: list[dict]):
    profile = Profile(name="tiny", stages=stages, data=DataConfig(**data_section))
    splits = load_splits(data, profile.data)
    ctx = BuildContext(base=pipeline.base_artifact(model_dir), splits=splits, target=load_target("rpi5"), profile=profile,
                       out=cache_root(), log=lambda message: None, threads=1)
    return pipeline.plan(profile), ctx


def _completion_loss(model, tokenizer, examples, config: DataConfig) -> float:
    import torch

    from edgeft.stages.finetune import _Collator

    batch = _Collator(tokenizer.pad_token_id)(training_rows(tokenizer, examples, config).rows)
    with torch.no_grad():
        return float(model(**batch).loss)


def _targets(adapter_dir: Path) -> set[str]:
    return {_in_block(name) for name in json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"]}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_finetune_lowers_the_loss_on_every_format(arch, fmt, models, datasets):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgeft.stages.finetune import load_tokenizer

    data, section = datasets[fmt]
    stages, ctx = _context(models[arch], data, section, [{"finetune": FINETUNE}])
    adapter, (outcome,) = pipeline.run(stages, ctx)
    assert ctx.splits.format == ("prompt_completion" if fmt == "csv" else fmt)
    assert outcome.metrics["train_steps"] == 8 and outcome.metrics["truncated_examples"] == 0
    assert _targets(adapter.path / "adapter") == DEFAULT_TARGETS[arch]
    log = [json.loads(line) for line in (adapter.path / "train_log.jsonl").read_text().splitlines()]
    assert [e["eval_loss"] for e in log if "eval_loss" in e], log  # validation loss at each epoch

    tokenizer = load_tokenizer(models[arch])
    base = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
    before = _completion_loss(base, tokenizer, ctx.splits.train, ctx.splits.config)
    tuned = PeftModel.from_pretrained(base, adapter.path / "adapter").eval()
    after = _completion_loss(tuned, tokenizer, ctx.splits.train, ctx.splits.config)
    assert after < before - 0.5, (before, after)


def _onnx_vs_torch(onnx_path: Path, torch_dir: Path, row: list[int]) -> float:
    """Prefill row[:-1] from an empty cache, then decode row[-1] through the returned cache: max |logit
    diff| vs PyTorch over every position (onnxruntime directly, no edgeft code)."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(torch_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([row])).logits[0].numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    feed = {"input_ids": np.array([row[:-1]], dtype=np.int64), "attention_mask": np.ones((1, len(row) - 1), dtype=np.int64)}
    feed.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in pasts})
    names = [o.name for o in session.get_outputs()]
    prefill = dict(zip(names, session.run(None, feed)))
    feed = {"input_ids": np.array([row[-1:]], dtype=np.int64), "attention_mask": np.ones((1, len(row)), dtype=np.int64)}
    feed.update({i.name: prefill[i.name.replace("past_key_values", "present")] for i in pasts})
    decode = dict(zip(names, session.run(None, feed)))
    got = np.concatenate([prefill["logits"][0], decode["logits"][0]])
    return float(np.abs(got - reference).max())


def test_gpt2_lora_on_conv1d_merges(models, datasets):
    """Full-precision LoRA on GPT-2 wraps its Conv1D layers (fan_in_fan_out); the merge folds them back."""
    data, section = datasets["prompt_completion"]
    stages, ctx = _context(models["gpt2"], data, section, [{"finetune": {**FINETUNE, "method": "lora"}}, {"merge": {}}])
    merged, (finetuned, merge) = pipeline.run(stages, ctx)
    config = json.loads((cache_root() / "artifacts" / f"finetune-{finetuned.key[:24]}" / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and {_in_block(n) for n in config["target_modules"]} == DEFAULT_TARGETS["gpt2"]
    assert finetuned.metrics["train_loss"] > 0 and merge.metrics["merge_max_abs_diff"] <= 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_onnx_export_match_pytorch(arch, models, datasets):
    """QLoRA adapter (on GPT-2: trained on 4-bit Linear4bit layers, merged into the fp32 Conv1D ones),
    then ONNX with KV cache; checked again here with onnxruntime alone, prefill then a decode step."""
    from edgeft.stages.finetune import load_tokenizer

    data, section = datasets["prompt_completion"]
    stages, ctx = _context(models[arch], data, section, [{"finetune": FINETUNE}, {"merge": {}}, {"export": {"validation_examples": 2}}])
    final, outcomes = pipeline.run(stages, ctx)
    metrics = {o.name: o.metrics for o in outcomes}
    assert metrics["merge"]["merge_max_abs_diff"] <= 1e-3
    assert metrics["export"]["export_max_abs_diff"] <= 1e-3
    merged_dir = cache_root() / "artifacts" / f"merge-{outcomes[1].key[:24]}"
    assert final.kind == "onnx" and final.info["num_layers"] == 2 and final.info["max_positions"] == 128
    # Llama on an ONNX Runtime target gets the fused graph (export graph: auto); GPT-2 has no fused builder
    import onnx

    ops = {node.op_type for node in onnx.load(str(final.path / "model.onnx"), load_external_data=False).graph.node}
    if arch == "llama":
        assert final.info["graph"] == "fused" and {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    else:
        assert final.info["graph"] == "generic" and "GroupQueryAttention" not in ops
        assert "GPT2LMHeadModel has no fused builder" in final.info["graph_reason"]
    tokenizer = load_tokenizer(merged_dir)
    prompt_ids, completion_ids = encode(tokenizer, ctx.splits.test[0])
    assert _onnx_vs_torch(final.path / "model.onnx", merged_dir, prompt_ids + completion_ids) <= 1e-3


@pytest.mark.parametrize("arch", sorted(DEFAULT_TARGETS))
def test_default_target_modules_per_architecture(arch, tmp_path):
    """No target_modules named: LoRA goes on every linear layer but the LM head. Under QLoRA those layers
    are bitsandbytes 4-bit, GPT-2's Conv1D included (transformers transposes its weight into a Linear4bit),
    and each 4-bit layer computes what its fp32 original does, up to NF4 rounding (a wrongly transposed
    weight would be off by ~140%, not ~10%)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from edgeft.stages.finetune import FinetuneConfig, load_base

    model_dir = tiny_models.build(arch, tmp_path / arch)
    default = FinetuneConfig()
    wrapped_layers = {}
    for method in ("lora", "qlora"):
        base = load_base(model_dir, default.model_copy(update={"method": method}))
        wrapped = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=default.target_modules, task_type="CAUSAL_LM"))
        layers = {name: module for name, module in wrapped.named_modules() if hasattr(module, "lora_A") and hasattr(module, "base_layer")}
        assert {_in_block(name) for name in layers} == DEFAULT_TARGETS[arch]
        assert len(layers) == 2 * len(DEFAULT_TARGETS[arch])  # in each of the 2 blocks
        kinds = {type(module.base_layer).__name__ for module in layers.values()}
        assert kinds == ({"Linear4bit"} if method == "qlora" else {"Conv1D"} if arch == "gpt2" else {"Linear"}), kinds
        wrapped_layers[method] = {name: module.base_layer for name, module in layers.items()}
    torch.manual_seed(0)
    for name, full in wrapped_layers["lora"].items():
        x = torch.randn(3, full.nx if arch == "gpt2" else full.in_features)
        with torch.no_grad():
            reference, quantized = full(x), wrapped_layers["qlora"][name](x)
        assert float((quantized - reference).norm() / reference.norm()) < 0.2, name
