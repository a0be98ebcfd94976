"""Task datasets: JSONL of {"prompt", "completion"} pairs, split with a fixed seed.

The task metric is exact match of the completion, counted on tokens: greedy decoding from the prompt's
tokens must produce exactly the completion's tokens and then EOS. The same definition runs on the host
(PyTorch) and on the device (runner), so the two numbers are comparable.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

DEMO_DATA = Path(__file__).resolve().parent / "demo" / "alerts.jsonl"


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    source: Path
    sha256: str


def load_jsonl(path: Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: dataset not found; pass --data with a JSONL file of {{\"prompt\", \"completion\"}} lines")
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{line_no}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{line_no}: expected a JSON object with \"prompt\" and \"completion\"")
            missing = [key for key in ("prompt", "completion") if not isinstance(record.get(key), str)]
            if missing:
                raise ConfigError(f"{path}:{line_no}: missing string field(s) {', '.join(missing)}; each line needs \"prompt\" and \"completion\"")
            if not record["completion"].strip():
                raise ConfigError(f"{path}:{line_no}: empty \"completion\"")
            examples.append(Example(record["prompt"], record["completion"]))
    if not examples:
        raise ConfigError(f"{path}: dataset is empty")
    return examples


def load_splits(path: Path | None, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Splits:
    """Shuffle with a fixed seed and carve validation and test splits (at least one example each)."""
    path = Path(path) if path else DEMO_DATA
    examples = load_jsonl(path)
    if len(examples) < 10:
        raise ConfigError(f"{path}: only {len(examples)} examples; need at least 10 to carve train/validation/test splits")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    n_val = max(1, int(len(examples) * val_fraction))
    n_test = max(1, int(len(examples) * test_fraction))
    return Splits(
        train=shuffled[n_val + n_test :],
        val=shuffled[:n_val],
        test=shuffled[n_val : n_val + n_test],
        source=path,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def encode(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids ending in EOS). Prompt and completion are tokenized apart, always."""
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids
