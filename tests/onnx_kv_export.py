"""Export a tiny transformers causal LM to ONNX with the edgeft KV-cache I/O contract (test helper).

Contract (batch 1): inputs `input_ids` [1, seq], `attention_mask` [1, past+seq],
`past_key_values.{i}.key|value` [1, kv_heads, past, head_dim]; outputs `logits` [1, seq, vocab],
`present.{i}.key|value` [1, kv_heads, past+seq, head_dim]. An empty cache is past=0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM


class KVCacheWrapper(torch.nn.Module):
    """Flat-tensor front end for a HF causal LM: (input_ids, attention_mask, *past) -> (logits, *presents).

    ONNX graphs cannot take a Cache object, so the past arrives as flat tensors (k0, v0, k1, v1, ...)
    and is poured into a fresh DynamicCache each call; the grown cache comes back flat the same way.
    """

    def __init__(self, model: torch.nn.Module):
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
    """Export `model` through KVCacheWrapper with dynamo (opset 18) and dynamic seq/past lengths."""
    cfg = model.config
    num_layers = cfg.num_hidden_layers
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    wrapper = KVCacheWrapper(model).eval()

    seq, past_len = 3, 5  # example sizes >= 2 so torch.export does not specialise them to 0/1
    input_ids = torch.randint(3, cfg.vocab_size, (1, seq), dtype=torch.int64)
    attention_mask = torch.ones(1, past_len + seq, dtype=torch.int64)
    dtype = next(model.parameters()).dtype  # fp16 models take fp16 pasts
    past = tuple(torch.randn(1, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * num_layers))

    # Dims cannot be added (past + seq), so the mask's length is its own Dim.
    seq_dim = torch.export.Dim("seq_len", min=1, max=4096)
    past_dim = torch.export.Dim("past_len", min=0, max=4096)
    total_dim = torch.export.Dim("total_len", min=1, max=8192)
    dynamic_shapes = (
        {1: seq_dim},
        {1: total_dim},
        tuple({2: past_dim} for _ in past),  # *past must be described as one tuple
    )
    input_names = ["input_ids", "attention_mask"]
    output_names = ["logits"]
    for i in range(num_layers):
        input_names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        output_names += [f"present.{i}.key", f"present.{i}.value"]

    out_path = Path(out_path)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, (input_ids, attention_mask, *past), dynamo=True, opset_version=18,
            dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
            report=False, verbose=False,
        )
    program.save(str(out_path))
    return out_path
