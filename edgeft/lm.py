"""Host-side access to an exported model (ONNX or TFLite), through the runner's own backend code.

Validation, golden outputs and accuracy on the host run the very code the device runs, so the host and
the device cannot disagree on how the model is driven.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import Example, encode, encode_many


def load(model_path: Path, threads: int = 1, options: dict | None = None):
    """The runner backend for this file (`.onnx`: ONNX Runtime, `.tflite`: LiteRT), loaded."""
    from edgeft_runner import RunnerError
    from edgeft_runner.backends import create_backend

    from .errors import ModelError

    import contextlib

    is_tflite = Path(model_path).suffix == ".tflite"
    backend = create_backend("tflite" if is_tflite else "onnxruntime")
    if is_tflite:
        from .tflite import captured_output  # LiteRT prints an INFO line per interpreter
    try:
        with captured_output() if is_tflite else contextlib.nullcontext():
            backend.load(model_path, threads, options=options)
    except RunnerError as exc:
        raise ModelError(str(exc)) from exc
    return backend


def completion_logits(backend, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
    """Logits [len(completion), vocab] at the positions that predict each completion token: the
    prompt as one prefill, then the completion teacher-forced one decode step at a time. Works for
    backends that return only the last position's logits (TFLite)."""
    logits, past = backend.forward(np.asarray([prompt_ids], dtype=np.int64), backend.empty_past())
    out = [logits[0, -1]]
    for token in completion_ids[:-1]:
        logits, past = backend.forward(np.asarray([[token]], dtype=np.int64), past)
        out.append(logits[0, -1])
    return np.stack(out).astype(np.float32)


def teacher_forced_logits(backend, rows: list[list[int]]) -> list[np.ndarray]:
    """Logits [seq, vocab] for each full row, run as a prefill of all but the last token plus one
    decode step, so both the empty-cache and the with-cache paths of the graph are exercised."""
    out = []
    for row in rows:
        logits, past = backend.forward(np.asarray([row[:-1]], dtype=np.int64), backend.empty_past())
        last, _ = backend.forward(np.asarray([row[-1:]], dtype=np.int64), past)
        out.append(np.concatenate([logits[0], last[0]]).astype(np.float32))
    return out


def completion_logprobs(backend, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
    """Natural-log probability [len(completion)] the model gives each completion token, teacher-forced
    after the prompt: one forward of prompt + completion[:-1] where the backend returns every position's
    logits (ONNX), else a prefill and one decode step per token (completion_logits; TFLite)."""
    if getattr(backend, "last_logits_only", False):
        logits = completion_logits(backend, prompt_ids, completion_ids).astype(np.float64)
    else:
        ids = np.asarray([list(prompt_ids) + list(completion_ids[:-1])], dtype=np.int64)
        full, _ = backend.forward(ids, backend.empty_past())
        logits = np.asarray(full[0, len(prompt_ids) - 1 :], dtype=np.float64)
    peak = logits.max(-1, keepdims=True)
    log_z = (peak + np.log(np.exp(logits - peak).sum(-1, keepdims=True)))[:, 0]
    return logits[np.arange(len(completion_ids)), completion_ids] - log_z


def generate(backend, tokenizer, examples: list[Example], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (stopping after EOS, kept) with the runner's own decoding loop."""
    from edgeft_runner.measure import greedy_generate

    return [greedy_generate(backend, p, max_new_tokens, tokenizer.eos_token_id) for p, _ in encode_many(tokenizer, examples)]


def evaluate_backend(backend, tokenizer, examples: list[Example], metrics=("exact_match",), general_texts=None,
                     perplexity_examples: list[Example] | None = None, max_new_tokens: int | None = None,
                     max_positions: int | None = None, context_tokens: int | None = None) -> dict[str, float | None]:
    """edgeft.evaluate.evaluate_model for an exported model: the same metrics, the same definitions, run
    through the runner backend (greedy_generate for generations, completion_logprobs for perplexity).
    General text is scored in chunks of context_tokens, capped at max_positions and (TFLite) the KV cache."""
    from . import metrics as M
    from .evaluate import CONTEXT_TOKENS, max_new_tokens_for, text_rows

    unknown = sorted(set(metrics) - set(M.METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(M.METRICS)}")
    results: dict[str, float | None] = {}
    if any(m in metrics for m in ("exact_match", *M.TEXT_METRICS)):
        generated = generate(backend, tokenizer, examples, max_new_tokens or max_new_tokens_for(tokenizer, examples))
        references = [c for _, c in encode_many(tokenizer, examples)]
        results.update(M.generation_metrics(metrics, generated, references, tokenizer))
    if "perplexity" in metrics:
        ppl_examples = perplexity_examples if perplexity_examples is not None else examples
        logprobs = [completion_logprobs(backend, p, c) for p, c in encode_many(tokenizer, ppl_examples)]
        results["perplexity"] = M.perplexity(np.concatenate(logprobs)) if logprobs else None
    if general_texts:
        context_tokens = context_tokens or CONTEXT_TOKENS
        limit = min(max_positions or context_tokens, context_tokens, getattr(backend, "cache_len", context_tokens))
        logprobs = [completion_logprobs(backend, ids[:1], ids[1:])[np.asarray(scored[1:])] for ids, scored in text_rows(tokenizer, general_texts, limit)]
        results["general_perplexity"] = M.perplexity(np.concatenate(logprobs))
    order = [*M.METRICS, "general_perplexity"]
    return {name: results[name] for name in order if name in results}


def stage_eval(backend, tokenizer, ctx, max_positions: int | None = None) -> dict[str, float | None]:
    """edgeft.evaluate.stage_eval for an exported model (same splits, metrics and general text)."""
    from .evaluate import eval_plan, finish

    plan = eval_plan(ctx)
    return finish(evaluate_backend(backend, tokenizer, plan.test, plan.metrics, plan.general, perplexity_examples=plan.val,
                                   max_positions=max_positions, context_tokens=plan.context_tokens))


def exact_match(backend, tokenizer, examples: list[Example], max_new_tokens: int) -> float:
    """Token exact match: the runner's greedy continuation (incl. EOS) == the completion's tokens."""
    return evaluate_backend(backend, tokenizer, examples, ("exact_match",), max_new_tokens=max_new_tokens)["exact_match"]
