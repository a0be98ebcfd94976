"""Tiny local causal LMs of several architectures (a few hundred K parameters), built from configs with a
BPE tokenizer trained here the way edgeft.demo.base trains the demo's: no downloads, seconds to build."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# Renders system/user/assistant turns; the tokenizer of every tiny model carries it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def task_rows(n: int = 48) -> list[dict[str, str]]:
    """A learnable task: a reading's value decides its level."""
    return [{"prompt": f"sensor s{i} reads {i * 7 % 50}\n", "completion": f"level {(i * 7 % 50) // 17}"} for i in range(n)]


def corpus() -> str:
    text = "".join(row["prompt"] + row["completion"] + "\n" for row in task_rows(200))
    text += "### Instruction:\nClassify the reading.\n\n### Input:\n### Response:\n<|system|><|user|><|assistant|>Be terse.\n" * 20
    return text


def tokenizer():
    from edgeft.demo.base import train_tokenizer

    tok = train_tokenizer(corpus())
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build(arch: str, out: Path, tok=None) -> Path:
    """Save a randomly initialised tiny `arch` model (llama, gpt2, mistral, qwen2, qwen3, phi, phi3) + tokenizer to `out`."""
    import torch
    from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Phi3Config, PhiConfig, Qwen2Config,
                              Qwen3Config)

    tok = tok or tokenizer()
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    common = {**ids, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 128, "tie_word_embeddings": False}
    configs = {
        "llama": lambda: LlamaConfig(**common, num_key_value_heads=2),
        "mistral": lambda: MistralConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: Qwen2Config(**common, num_key_value_heads=2),
        "qwen3": lambda: Qwen3Config(**common, num_key_value_heads=2, head_dim=16),
        "phi": lambda: PhiConfig(**common),
        "phi3": lambda: Phi3Config(**common, num_key_value_heads=2, original_max_position_embeddings=128),  # 4k-style: no LongRoPE
        "gpt2": lambda: GPT2Config(**ids, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[arch]())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_data(fmt: str, path_stem: Path, rows: list[dict[str, str]]) -> tuple[Path, dict]:
    """The task rows in dataset format `fmt`; returns (file, the profile's data: section)."""
    if fmt == "prompt_completion":
        path = path_stem.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path, {}
    if fmt == "alpaca":
        path = path_stem.with_suffix(".jsonl")
        path.write_text("".join(json.dumps({"instruction": "Classify the reading.", "input": r["prompt"].strip(), "output": r["completion"]}) + "\n"
                                for r in rows))
        return path, {}
    if fmt == "chat":
        path = path_stem.with_suffix(".jsonl")
        path.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": r["prompt"].strip()},
                                                         {"role": "assistant", "content": r["completion"]}]}) + "\n" for r in rows))
        return path, {}
    if fmt == "csv":  # own column names, mapped by the profile
        path = path_stem.with_suffix(".csv")
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["question", "answer"])
            writer.writeheader()
            writer.writerows({"question": r["prompt"], "answer": r["completion"]} for r in rows)
        return path, {"columns": {"prompt": "question", "completion": "answer"}}
    raise ValueError(fmt)
