"""What a build will need before it runs: the model's parameter count (from its safetensors headers,
nothing loaded) and, per stage, an estimate of peak memory and of the disk its cache entry takes.

The estimates are linear in the model's fp32 weight bytes W, with factors measured on CPU with a random
1.1B Llama (TinyLlama's shape; bench/bench_big_models.py prints the same per-stage peaks) plus a fixed
overhead for the libraries. They are estimates: activations grow with batch_size x max_length, and a
GPU build holds the weights in GPU memory instead.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

GB = 1e9
LIBRARY_OVERHEAD = 0.7 * GB  # torch, transformers, onnxruntime and the interpreter, resident before any weights

# Peak RSS per stage over W (fp32 weight bytes), after LIBRARY_OVERHEAD. Measured on a 2-core CPU with the
# 1.1B model (W = 4.4 GB; bench/bench_big_models.py): finetune 6.33 GB, merge 6.50, export 5.29 (generic graph;
# the fused graph's builder child 6.17), quantize
# int4 7.77, fp16 8.44, int8-dynamic 7.49. The others are estimates from how those stages hold their copies.
PEAK_FACTOR = {
    "finetune": {"qlora": 1.28, "lora": 1.35},  # both evaluate the fp32 base first; qlora then trains on 4 bits
    "merge": 1.32,
    "export": 1.24,  # the fused graph's builder (generic: 1.04, PyTorch's weights, then ONNX Runtime's)
    "prune": 2.2,
    "distill": 2.6,  # teacher + student + the student's optimizer state
    "quantize": {"fp32": 1.1, "fp16": 1.76, "int8-dynamic": 1.54, "int8-static": 3.2, "int4-weight": 1.61, "int8-weight": 1.6},
}
# The quantized model's size over W (int4: blocks of 32 with a scale; the embedding stays fp32).
OUTPUT_FACTOR = {"fp32": 1.0, "fp16": 0.5, "int8-dynamic": 0.25, "int8-static": 0.27, "int8-weight": 0.27, "int4-weight": 0.21}


def safetensors_params(model_dir: Path) -> int | None:
    """The parameter count from the model's *.safetensors headers; None when it has none."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    params = 0
    for path in files:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                params += count
    return params


def config_params(config: dict[str, Any]) -> int | None:
    """A Llama-family parameter count from config.json alone (for models saved as .bin)."""
    try:
        hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        intermediate = config.get("intermediate_size") or 4 * hidden
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
    except KeyError:
        return None
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp + 2 * hidden) + embeddings + hidden


def stage_estimate(name: str, config: Any, weight_bytes: float) -> dict[str, float]:
    """{"peak_memory_bytes", "disk_bytes"} for one planned stage on a model of `weight_bytes` fp32 weights."""
    factor = PEAK_FACTOR[name]
    if name == "finetune":
        peak = factor[config.method] * weight_bytes
        disk = 0.02 * weight_bytes  # the adapter and its checkpoints (r=16 LoRA on every linear layer: ~1%)
    elif name == "quantize":
        peak = factor.get(config.mode, 1.8) * weight_bytes
        disk = OUTPUT_FACTOR.get(config.mode, 1.0) * weight_bytes
    else:
        peak = factor * weight_bytes
        disk = weight_bytes  # merge, export, prune, distill write an fp32 model (prune/distill: an upper bound)
    return {"peak_memory_bytes": peak + LIBRARY_OVERHEAD, "disk_bytes": disk}
