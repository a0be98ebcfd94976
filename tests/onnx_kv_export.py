"""Export a tiny transformers causal LM to ONNX with the edgeft KV-cache I/O contract (test helper).

Contract (batch 1): inputs `input_ids` [1, seq], `attention_mask` [1, past+seq],
`past_key_values.{i}.key|value` [1, kv_heads, past, head_dim]; outputs `logits` [1, seq, vocab],
`present.{i}.key|value` [1, kv_heads, past+seq, head_dim]. An empty cache is past=0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgeft.stages.export import export_onnx


def tiny_llama(seed: int = 0, vocab_size: int = 64, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 2) -> LlamaForCausalLM:
    """A random-init Llama small enough to export and run in a second."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def export_kv_onnx(model: torch.nn.Module, out_path: Path) -> Path:
    """The production exporter (edgeft.stages.export), so the runner is tested on what edgeft ships."""
    export_onnx(model, out_path, opset=18)
    return Path(out_path)
