"""Evaluation of a PyTorch model: task metrics from greedy generations, perplexity from teacher-forced
forwards, and the perplexity of a general held-out text (the forgetting check). See edgeft.metrics.

Exact match is counted on tokens, as it always was here and as the device runner counts it: the greedy
continuation, including its EOS, must equal the completion's tokens (see edgeft.data). The text metrics
(token_f1, rouge_l) score the same generations, decoded with special tokens skipped, against the
decoded completion tokens.

`stage_eval` is what a stage calls: it reads the profile's `eval:` section and the build's splits
(test split: generation metrics; validation split: perplexity; the general text: general_perplexity).
Exported models (ONNX, TFLite) are evaluated the same way through the runner's backends: edgeft.lm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import metrics as M
from .data import Example, encode_many, fit_length

GENERAL_TEXT = Path(__file__).resolve().parent / "demo" / "general.txt"
CONTEXT_TOKENS = 128  # default eval.context_tokens: general text is scored in chunks of at most this many tokens
MAX_BATCH_TOKENS = 4096  # rows x padded length per teacher-forced forward (bounds the logits' memory)
# ... and fewer with a large vocabulary: the fp32 logits and their log-softmax of one forward stay near this
# (4096 tokens x a 128K vocab would be 2 GB each, on top of the model).
LOGITS_BYTES_PER_BATCH = 256 << 20


def max_new_tokens_for(tokenizer, examples: list[Example]) -> int:
    """Room for the longest reference completion plus a little, so a wrong answer can't run forever."""
    return max(len(c) for _, c in encode_many(tokenizer, examples)) + 4


# ------------------------------------------------------------------------------------ shared inputs
def load_general_text(path: Path | None = None) -> list[str]:
    """The general held-out text as documents: its non-blank lines (newline kept, it is text too).
    None: the shipped demo text (edgeft/demo/general.txt, a fresh sample of the demo pretraining
    distribution that the demo base never trained on)."""
    from .errors import ConfigError

    path = Path(path) if path is not None else GENERAL_TEXT
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the general text (eval.general_text): {exc}") from exc
    lines = [line for line in text.splitlines(keepends=True) if line.strip()]
    if not lines:
        raise ConfigError(f"{path}: the general text (eval.general_text) has no non-blank lines")
    return lines


def text_rows(tokenizer, texts: Sequence[str], max_tokens: int) -> list[tuple[list[int], list[bool]]]:
    """Rows (ids, scored) for the perplexity of plain texts. Each text is a document: BOS (when the
    tokenizer has one, as every edgeft prompt starts) + its tokens. Documents are packed in order into
    chunks of at most max_tokens; one longer than that is split (its next piece starts with the previous
    piece's last token). scored[t]: whether ids[t] counts, i.e. every text token except a chunk's first;
    BOS is context, never scored."""
    if max_tokens < 2:
        raise ValueError("max_tokens must be at least 2")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    scored: list[bool] = []
    for tokens in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        doc, doc_scored = bos + list(tokens), [False] * len(bos) + [True] * len(tokens)
        if ids and len(ids) + len(doc) > max_tokens:
            rows.append((ids, scored))
            ids, scored = [], []
        while len(ids) + len(doc) > max_tokens:  # a document longer than a chunk
            take = max_tokens - len(ids)
            ids, scored = ids + doc[:take], scored + doc_scored[:take]
            rows.append((ids, [False] + scored[1:]))
            doc, doc_scored = doc[take - 1 :], [False] + doc_scored[take:]
            ids, scored = [], []
        ids, scored = ids + doc, scored + doc_scored
    if ids:
        rows.append((ids, scored))
    return [(ids, [False] + scored[1:]) for ids, scored in rows if any(scored[1:])]


@dataclass
class EvalPlan:
    """What a stage evaluates, from the profile and the splits."""

    metrics: tuple[str, ...]  # always includes exact_match: the accuracy chain and its budgets read it
    test: list[Example]  # generation metrics
    val: list[Example]  # perplexity (the test split when there is no validation split)
    general: list[str]  # the general held-out text's documents
    context_tokens: int  # general-text chunk length, the same for every stage so their numbers compare


def eval_plan(ctx) -> EvalPlan:
    """From ctx.profile.eval (the defaults when the context has no profile, as in direct stage calls)."""
    from .config import EvalConfig

    config = ctx.profile.eval if getattr(ctx, "profile", None) is not None else EvalConfig()
    wanted = set(config.metrics) | {"exact_match"}
    return EvalPlan(
        metrics=tuple(m for m in M.METRICS if m in wanted),
        test=ctx.splits.test,
        val=ctx.splits.val or ctx.splits.test,
        general=load_general_text(config.general_text),
        context_tokens=config.context_tokens,
    )


def eval_identity(config) -> dict[str, Any]:
    """What a stage's evaluation depends on besides its model and data: part of every stage cache key,
    so a changed metric list or general text re-evaluates instead of reporting stale numbers."""
    from .artifact import sha256_file

    path = Path(config.general_text) if config.general_text is not None else GENERAL_TEXT
    return {**config.model_dump(mode="json"), "metrics": sorted(set(config.metrics) | {"exact_match"}),
            "general_text": sha256_file(path) if path.is_file() else str(path)}


def finish(values: dict[str, float | None]) -> dict[str, float | None]:
    """Rounded for the report (4 decimals), exact match excepted: it stays equal to `accuracy`."""
    return {k: (v if k == "exact_match" or v is None else round(float(v), 4)) for k, v in values.items()}


# ------------------------------------------------------------------------------------ PyTorch
def _device(model):
    return getattr(model, "device", None) or "cpu"


def on_compute_device(model):
    """The model where evaluation is fastest: on CUDA in bfloat16 (the training compute dtype) when a GPU
    is there, else unchanged (fp32 on the CPU). Moves `model` itself: call it once the model is saved."""
    import torch

    if torch.cuda.is_available() and str(_device(model)) == "cpu":
        return model.to("cuda", dtype=torch.bfloat16)
    return model


def generate(model, tokenizer, examples: list[Example], batch_size: int = 64, progress=None, task=None) -> list[list[int]]:
    """Greedy continuations by batched generation (left padding), each cut after its first EOS (kept)."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_new = max_new_tokens_for(tokenizer, examples)
    device = _device(model)
    out_rows: list[list[int]] = []
    encoded = encode_many(tokenizer, examples)
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(p) for p, _ in batch)
            # Left padding, so every row's next token comes right after its prompt.
            input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in out[:, width:].tolist():
                out_rows.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
            if progress is not None:
                progress.update(task, advance=len(batch))
    return out_rows


def _batches(rows: list[tuple[list[int], int]], max_tokens: int):
    """Consecutive rows, grouped so that rows x longest row stays within max_tokens (one row at least)."""
    batch, width = [], 0
    for row in rows:
        new_width = max(width, len(row[0]))
        if batch and new_width * (len(batch) + 1) > max_tokens:
            yield batch
            batch, new_width = [], len(row[0])
        batch.append(row)
        width = new_width
    if batch:
        yield batch


def batch_tokens_for(vocab_size: int | None) -> int:
    """Tokens per teacher-forced forward: MAX_BATCH_TOKENS, fewer when the vocabulary is large."""
    if not vocab_size:
        return MAX_BATCH_TOKENS
    return max(128, min(MAX_BATCH_TOKENS, LOGITS_BYTES_PER_BATCH // (4 * vocab_size)))


def teacher_forced_nll(model, rows: list[tuple[list[int], list[bool]]], pad_id: int, max_tokens: int | None = None,
                       progress=None, task=None) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) over rows (ids, scored): ids[t] with scored[t] is scored,
    predicted from ids[:t] (scored[0] must be False). Right padding; one forward per batch of at most
    `max_tokens` (default: batch_tokens_for the model's vocabulary)."""
    import torch
    import torch.nn.functional as F

    if max_tokens is None:
        max_tokens = batch_tokens_for(getattr(getattr(model, "config", None), "vocab_size", None))
    device = _device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(rows, max_tokens):
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch], device=device)
            attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
            # logits at position t predict token t + 1
            targets = torch.tensor([list(scored[1:]) + [False] * (width - len(ids)) for ids, scored in batch], device=device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            nll = F.cross_entropy(logits[targets].float(), input_ids[:, 1:][targets], reduction="sum")
            total += float(nll)
            count += int(targets.sum())
            if progress is not None:
                progress.update(task, advance=len(batch))
    return total, count


def evaluate_model(model, tokenizer, examples: list[Example], metrics: Sequence[str] = ("exact_match",),
                   general_texts: Sequence[str] | None = None, progress=None, label: str = "evaluate",
                   perplexity_examples: list[Example] | None = None, batch_size: int = 64,
                   context_tokens: int = CONTEXT_TOKENS) -> dict[str, float | None]:
    """Every metric named in `metrics` (edgeft.metrics.METRICS) for a PyTorch causal LM.

    exact_match, token_f1, rouge_l: from one batched greedy generation over `examples`. perplexity:
    exp(mean NLL) of the completion tokens of `perplexity_examples` (default: `examples`), prompt as
    context, one teacher-forced forward per batch. With `general_texts`, also `general_perplexity`: the
    perplexity of those plain texts in chunks of context_tokens (capped at the model's positions; see
    text_rows). Returns {name: value} in METRICS order."""
    unknown = sorted(set(metrics) - set(M.METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(M.METRICS)}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generating = any(m in metrics for m in ("exact_match", *M.TEXT_METRICS))
    ppl_examples = (perplexity_examples if perplexity_examples is not None else examples) if "perplexity" in metrics else []
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    # an example longer than the model's positions loses its prompt's oldest tokens (fit_length)
    encoded = [fit_length(p, c, max_positions, tokenizer.bos_token_id) if max_positions else (p, c) for p, c in encode_many(tokenizer, ppl_examples)]
    ppl_rows = [(p + c, [False] * len(p) + [True] * len(c)) for p, c in encoded]
    general_rows = text_rows(tokenizer, general_texts, min(max_positions or context_tokens, context_tokens)) if general_texts else []
    total = (len(examples) if generating else 0) + len(ppl_rows) + len(general_rows)
    task = progress.add_task(label, total=total) if progress else None

    was_training = getattr(model, "training", False)
    model.eval()
    results: dict[str, float | None] = {}
    try:
        if generating:
            generated = generate(model, tokenizer, examples, batch_size, progress, task)
            references = [c for _, c in encode_many(tokenizer, examples)]
            results.update(M.generation_metrics(metrics, generated, references, tokenizer))
        if "perplexity" in metrics:
            results["perplexity"] = M.perplexity_from_nll(*teacher_forced_nll(model, ppl_rows, pad_id, progress=progress, task=task)) if ppl_rows else None
        if general_rows:
            results["general_perplexity"] = M.perplexity_from_nll(*teacher_forced_nll(model, general_rows, pad_id, progress=progress, task=task))
    finally:
        if progress:
            progress.remove_task(task)
        if was_training:
            model.train()
    order = [*M.METRICS, "general_perplexity"]
    return {name: results[name] for name in order if name in results and (name in metrics or name == "general_perplexity")}


def exact_match(model, tokenizer, examples: list[Example], batch_size: int = 64, progress=None, label: str = "evaluate") -> float:
    """Token exact match of greedy completions (generated tokens incl. EOS == completion tokens)."""
    return evaluate_model(model, tokenizer, examples, ("exact_match",), progress=progress, label=label, batch_size=batch_size)["exact_match"]


def stage_eval(model, tokenizer, ctx, label: str = "evaluate") -> dict[str, float | None]:
    """The profile's `eval.metrics` for a PyTorch model of this build, plus `general_perplexity`:
    generation metrics on the test split, `perplexity` on the validation split (completion tokens),
    `general_perplexity` on the profile's general text (`eval.general_text`, default the shipped one).
    exact_match is always included (the `accuracy` numbers and their budgets are this value).
    Returns e.g. {"exact_match": 0.99, "perplexity": 1.07, "general_perplexity": 3.2}."""
    plan = eval_plan(ctx)
    values = evaluate_model(model, tokenizer, plan.test, plan.metrics, plan.general, progress=ctx.progress, label=label,
                            perplexity_examples=plan.val, context_tokens=plan.context_tokens)
    return finish(values)
