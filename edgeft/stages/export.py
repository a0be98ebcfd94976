"""export: the merged PyTorch model -> ONNX with a KV cache (one graph for prefill and decode), or
`.tflite` (format: tflite) with a static KV cache and prefill/decode signatures (see edgeft.tflite).

I/O contract (batch 1), read by the runner: inputs `input_ids` [1, seq], `attention_mask` [1, past+seq],
`past_key_values.{i}.key|value` [1, kv_heads, past, head_dim]; outputs `logits` [1, seq, vocab] and
`present.{i}.key|value`. Validated against PyTorch on test-split rows (max |logit diff| <= atol).

Two ONNX graphs (`graph`):
- fused: onnxruntime-genai's model builder (run as a child process, offline) writes the form ONNX Runtime
  runs fastest: SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization, one packed QKV MatMul
  per layer, GroupQueryAttention with the rotary embedding inside, which writes the new keys and values
  into the cache it reads. The graph's metadata says `edgeft.kv_cache: in-place`, and the runner then
  keeps one preallocated cache bound in and out (edgeft_runner.backends.onnxruntime). Llama-family
  architectures (FUSED_ARCHITECTURES) on ONNX Runtime targets; TensorRT has none of these ops.
- generic: torch.onnx (dynamo) of the model with eager attention, for every architecture and TensorRT.
`auto` (the default) picks fused where it applies, generic elsewhere, and the artifact says which and why.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..artifact import Artifact
from ..context import BuildContext
from ..data import encode
from ..errors import ConfigError, ModelError, QualityCheckFailed
from .. import lm, onnx_io


# What onnxruntime-genai's builder turns into the fused graph (its Llama-family builders) and edgeft validates.
FUSED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM")
FUSED_RUNTIMES = ("onnxruntime",)  # TensorRT parses standard ONNX ops only: no GroupQueryAttention


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["onnx", "tflite"] = "onnx"  # onnx: ONNX Runtime and TensorRT targets; tflite: LiteRT
    graph: Literal["auto", "fused", "generic"] = "auto"  # onnx: see the module docstring

    def resolved(self, runtime: str | None = None) -> dict[str, str]:
        """Part of the stage's cache key: `auto` exports another graph for a runtime without the fused ops
        (the architecture, the other half of the choice, is in the input's key)."""
        return {"graph": "generic" if self.graph == "auto" and runtime not in FUSED_RUNTIMES else self.graph}
    opset: int = Field(18, ge=18)  # onnx; the dynamo exporter fails an assertion at opset 17
    prefill_tokens: list[int] = Field([64], min_length=1)  # tflite: one prefill signature per length
    cache_tokens: int = Field(256, ge=2)  # tflite: the static KV cache (prompt + generated tokens)
    atol: float = Field(1e-3, gt=0)  # fp32 ONNX vs PyTorch differ by ~1e-6 here
    validation_examples: int = Field(8, ge=1)


def _wrapper(model):
    import torch
    from transformers import DynamicCache

    class KVCacheLM(torch.nn.Module):
        """ONNX graphs take no Cache objects: the past arrives flat (k0, v0, k1, v1, ...) and goes back flat."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.num_layers = model.config.num_hidden_layers

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
            presents = []
            for layer in out.cache.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return KVCacheLM().eval()


def model_shape(config) -> dict:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "max_positions": config.max_position_embeddings,
    }


def weight_bytes(model) -> int:
    """The bytes of a PyTorch model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export_onnx(model, path, opset: int) -> None:
    import torch

    # Eager attention traces to plain ops for every opset; sdpa's masking paths can fail or specialise.
    model.set_attn_implementation("eager")
    shape = model_shape(model.config)
    seq, past_len = 3, 5  # example sizes >= 2, so torch.export doesn't specialise them to 0 or 1
    dtype = next(model.parameters()).dtype  # an fp16 model takes an fp16 cache
    past = tuple(torch.zeros(1, shape["num_kv_heads"], past_len, shape["head_dim"], dtype=dtype) for _ in range(2 * shape["num_layers"]))
    args = (torch.full((1, seq), 3, dtype=torch.long), torch.ones(1, past_len + seq, dtype=torch.long), *past)
    # Dims can't be added (past + seq), so the mask length is a Dim of its own; *past is one tuple.
    dim = torch.export.Dim
    dynamic_shapes = (
        {1: dim("seq_len", min=1, max=4096)},
        {1: dim("total_len", min=1, max=8192)},
        tuple({2: dim("past_len", min=0, max=4096)} for _ in past),
    )
    names_in, names_out = ["input_ids", "attention_mask"], ["logits"]
    for i in range(shape["num_layers"]):
        names_in += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        names_out += [f"present.{i}.key", f"present.{i}.value"]
    with torch.no_grad():
        program = torch.onnx.export(
            _wrapper(model), args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
            input_names=names_in, output_names=names_out, report=False, verbose=False,
        )
    program.save(str(path), external_data=onnx_io.needs_external_data(weight_bytes(model)))
    # The program's initializers wrap the model's own tensors, and its graph outlives this call (something in
    # the exporter keeps it): unlink the tensors, so freeing the model frees its weights (a 1B model's 4 GB)
    # before ONNX Runtime loads its own copy.
    for value in program.model.graph.initializers.values():
        value.const_value = None


def choose_graph(config: ExportConfig, runtime: str, architecture: str | None) -> tuple[str, str]:
    """("fused" | "generic", why) for an ONNX export; ConfigError when `graph: fused` cannot apply."""
    if config.format != "onnx":
        return "generic", f"format {config.format}"
    if config.graph == "generic":
        return "generic", "export graph: generic"
    why_not = None
    if runtime not in FUSED_RUNTIMES:
        why_not = f"runtime {runtime} has no GroupQueryAttention (fused graphs run on {', '.join(FUSED_RUNTIMES)})"
    elif architecture not in FUSED_ARCHITECTURES:
        why_not = f"architecture {architecture} has no fused builder (those that do: {', '.join(FUSED_ARCHITECTURES)})"
    if why_not is None:
        return "fused", f"{architecture} on {runtime}"
    if config.graph == "fused":
        raise ConfigError(f"export graph: fused cannot apply: {why_not}; set export graph: auto or generic")
    return "generic", why_not


def export_fused(model_dir: Path, path: Path, shape: dict, threads: int) -> None:
    """onnxruntime-genai's model builder, fp32 for CPU, offline, in a child process (its peak counts as the
    stage's) -> `path` with the runner's metadata, saved by edgeft's one rule for external data."""
    import onnx

    from .. import memory

    work = path.parent / ".builder"
    shutil.rmtree(work, ignore_errors=True)
    # Air-gapped labs: the builder reads the local model dir and must never try a hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    try:
        result = memory.run_child([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir),
                                   "-o", str(work / "out"), "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")], env=env)
        if result.returncode != 0:
            lines = [line for line in (result.stderr + result.stdout).strip().splitlines() if line.strip()]
            raise ModelError(f"{model_dir}: onnxruntime-genai's model builder failed: {(lines or ['no output'])[-1][:300]}; "
                             "set export graph: generic to export with torch.onnx instead")
        model = onnx.load(str(work / "out" / "model.onnx"))
        # The builder leaves head_dim symbolic (kv_cache_dim): the runner sizes its cache from the graph.
        for value in [*model.graph.input, *model.graph.output]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param == "kv_cache_dim":
                    dim.dim_value = shape["head_dim"]
        onnx.helper.set_model_props(model, {"edgeft.graph": "fused", "edgeft.kv_cache": "in-place"})
        onnx_io.save(model, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _validate_tflite(path, torch_model, tokenizer, examples, atol: float, threads: int) -> float:
    """Max |logit diff| vs PyTorch at the completion positions (prefill, then teacher-forced decode)."""
    import numpy as np
    import torch

    backend = lm.load(path, threads=threads, options={"pad_token_id": tokenizer.pad_token_id})
    worst = 0.0
    for example in examples:
        prompt_ids, completion_ids = encode(tokenizer, example)
        with torch.no_grad():
            reference = torch_model(input_ids=torch.tensor([prompt_ids + completion_ids])).logits[0].numpy()
        got = lm.completion_logits(backend, prompt_ids, completion_ids)
        worst = max(worst, float(np.abs(got - reference[len(prompt_ids) - 1: -1]).max()))
    if not worst <= atol:
        raise QualityCheckFailed(f"export check max_abs_diff failed: the TFLite model's logits differ from PyTorch's by {worst:.3g}, "
                                 f"above export.atol {atol:g}; the converter mis-traced this model: try another export.cache_tokens, "
                                 "or raise export.atol if the task accuracy still holds",
                                 check="export.max_abs_diff", value=worst, limit=atol, setting="export.atol")
    return worst


def run(model: Artifact, config: ExportConfig, ctx: BuildContext) -> Artifact:
    import gc

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from .finetune import load_tokenizer

    if model.kind != "hf-model":
        raise ModelError(f"export needs a PyTorch model (after merge), got a {model.kind!r} artifact; list merge before export")
    tokenizer = load_tokenizer(model.path)
    torch_model = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    shape = model_shape(torch_model.config)
    architecture = (torch_model.config.architectures or [type(torch_model).__name__])[0]
    graph, graph_reason = choose_graph(config, ctx.target.runtime if ctx.target else None, architecture)
    if config.format == "tflite":
        from .. import tflite

        if weight_bytes(torch_model) >= 2 << 30:
            raise ModelError(f"{model.path}: {weight_bytes(torch_model) / 2**30:.1f} GiB of fp32 weights do not fit a TFLite flatbuffer (2 GiB at most); "
                             "export this model for an ONNX target (jetson-orin, rpi5) or distill it to a smaller one first")
        if config.cache_tokens > shape["max_positions"]:
            raise ModelError(f"export cache_tokens {config.cache_tokens} exceeds the model's max_position_embeddings {shape['max_positions']}")
        target_file, label = ctx.out / "model.tflite", "export TFLite (litert-torch)"
    else:
        target_file, label = ctx.out / "model.onnx", f"export ONNX ({graph} graph)"
        ctx.log(f"export: {graph} graph ({graph_reason})")
    examples = ctx.splits.test[: config.validation_examples]
    rows = [sum(encode(tokenizer, e), []) for e in examples]
    if config.format == "onnx":  # PyTorch's logits to check the graph against, taken before the export
        with torch.no_grad():
            reference = [torch_model(input_ids=torch.tensor([r])).logits[0].numpy() for r in rows]
    if graph == "fused":  # PyTorch's weights go before the builder loads its own copy
        del torch_model
        gc.collect()
    task = ctx.progress.add_task(label, total=None) if ctx.progress else None
    try:
        if config.format == "tflite":
            tflite.convert(model.path, target_file, config.prefill_tokens, config.cache_tokens)
        elif graph == "fused":
            export_fused(Path(model.path), target_file, shape, ctx.threads)
        else:
            export_onnx(torch_model, target_file, config.opset)
    except (ModelError, ConfigError):
        raise
    except Exception as exc:  # the exporters raise many types; the user needs the first line and the model
        raise ModelError(f"{model.path}: {config.format} export failed: {str(exc).strip().splitlines()[0][:300]}") from exc
    finally:
        if ctx.progress:
            ctx.progress.remove_task(task)

    if config.format == "tflite":
        max_abs_diff = _validate_tflite(target_file, torch_model, tokenizer, examples, config.atol, ctx.threads)
        info = {"format": "tflite", "cache_tokens": config.cache_tokens, "prefill_tokens": config.prefill_tokens}
        del torch_model
    else:
        if graph == "generic":
            # One copy of the weights at a time: PyTorch's goes before ONNX Runtime loads its own (a 1B model is
            # 4 GB each). Emptied in place: the exporter's leftovers still reference the model's tensors.
            with torch.no_grad():
                for tensor in [*torch_model.parameters(), *torch_model.buffers()]:
                    tensor.data = torch.empty(0, dtype=tensor.dtype)
            del torch_model
            gc.collect()
        backend = lm.load(target_file, threads=ctx.threads, options={"pad_token_id": tokenizer.pad_token_id})
        max_abs_diff = max(float(np.abs(o - r).max()) for o, r in zip(lm.teacher_forced_logits(backend, rows), reference))
        if not max_abs_diff <= config.atol:
            raise QualityCheckFailed(f"export check max_abs_diff failed: the ONNX model's logits differ from PyTorch's by {max_abs_diff:.3g}, "
                                     f"above export.atol {config.atol:g}; the exporter mis-traced this model: try another export.opset, "
                                     "or raise export.atol if the task accuracy still holds",
                                     check="export.max_abs_diff", value=max_abs_diff, limit=config.atol, setting="export.atol")
        info = {"format": "onnx", "graph": graph, "graph_reason": graph_reason,
                "external_data": len(onnx_io.model_files(target_file)) > 1}
        if graph == "generic":
            info["opset"] = config.opset
    # The exported fp32 model through the runner's backend: the profile's eval metrics (edgeft.lm.stage_eval)
    if config.format == "tflite":
        backend = lm.load(target_file, threads=ctx.threads, options={"pad_token_id": tokenizer.pad_token_id})
    evaluation = lm.stage_eval(backend, tokenizer, ctx, max_positions=shape["max_positions"])
    tokenizer.save_pretrained(ctx.out / "tokenizer")
    return Artifact(
        path=ctx.out,
        kind=config.format,
        stage="export",
        key="",
        metrics={"accuracy": evaluation["exact_match"], "eval": evaluation, "export_max_abs_diff": max_abs_diff, "export_atol": config.atol},
        info={"precision": "fp32", **info, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, **shape},
    )
