"""Task accuracy of a PyTorch model: exact match of greedy completions (see edgeft.data)."""

from __future__ import annotations

from .data import Example, encode


def max_new_tokens_for(tokenizer, examples: list[Example]) -> int:
    """Room for the longest reference completion plus a little, so a wrong answer can't run forever."""
    return max(len(encode(tokenizer, e)[1]) for e in examples) + 4


def exact_match(model, tokenizer, examples: list[Example], batch_size: int = 64, progress=None, label: str = "evaluate") -> float:
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_new = max_new_tokens_for(tokenizer, examples)
    task = progress.add_task(label, total=len(examples)) if progress else None
    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = [encode(tokenizer, e) for e in examples[start : start + batch_size]]
            width = max(len(p) for p, _ in batch)
            # Left padding, so every row's next token comes right after its prompt.
            input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch])
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row, (_, reference) in zip(out[:, width:].tolist(), batch):
                generated = row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
                correct += generated == reference
            if progress:
                progress.update(task, advance=len(batch))
    if progress:
        progress.remove_task(task)
    return correct / len(examples)
