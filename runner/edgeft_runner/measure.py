"""What `run` measures: smoke test, forward latency, first token + decode speed, task accuracy."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from . import RunnerError
from .backends import Backend
from .bundle import bundle_path


# A percentile from fewer samples than this is mostly the max (p99 of 43 samples is the 43rd): reported
# as null with the reason, and a budget on it gates INVALID, never PASS.
MIN_SAMPLES = {"p50": 1, "p90": 20, "p99": 100}


def summarize_ms(samples_ms: list[float], keep_samples: bool = False) -> dict:
    """n, mean, percentiles (linear interpolation) and extremes, rounded to microseconds.

    A percentile with fewer than MIN_SAMPLES samples is None and `reasons` says why; keep_samples adds
    the raw samples (what a bootstrap against a baseline needs)."""
    data = np.asarray(samples_ms, dtype=np.float64)
    n = int(data.size)
    summary: dict = {"n": n, "mean": round(float(data.mean()), 3) if n else None}
    reasons = {}
    for name, quantile in (("p50", 50), ("p90", 90), ("p99", 99)):
        if n >= MIN_SAMPLES[name]:
            summary[name] = round(float(np.percentile(data, quantile)), 3)
        else:
            summary[name] = None
            reasons[name] = f"n={n} < {MIN_SAMPLES[name]} samples"
    summary["min"] = round(float(data.min()), 3) if n else None
    summary["max"] = round(float(data.max()), 3) if n else None
    summary["reasons"] = reasons
    if keep_samples:
        summary["samples"] = [round(v, 3) for v in data.tolist()]
    return summary


class TimedLoop(NamedTuple):
    warmup: int  # warm-up calls
    samples_ms: list[float]
    warmup_s: float  # how long the warm-up took
    duration_s: float  # how long the timed calls took, start of the first to end of the last


def time_repeated(fn: Callable[[], object], warmup_s: float, min_s: float, min_iters: int,
                  clock: Callable[[], float] = time.perf_counter) -> TimedLoop:
    """Warm up for warmup_s (at least one call), then time calls until n >= min_iters AND elapsed >= min_s.

    Time-based warm-up adapts to the device: a slow board gets fewer, a fast one more.
    """
    warmup = 0
    start = clock()
    while True:
        fn()
        warmup += 1
        if clock() - start >= warmup_s:
            break
    warmup_elapsed = clock() - start
    samples_ms = []
    start = clock()
    while len(samples_ms) < max(1, min_iters) or clock() - start < min_s:
        t0 = clock()
        fn()
        samples_ms.append((clock() - t0) * 1000.0)
    return TimedLoop(warmup, samples_ms, warmup_elapsed, clock() - start)


def soak_window_s(duration_s: float) -> float:
    """Per-minute windows; a short soak (e.g. in a test) still gets four."""
    return min(60.0, duration_s / 4.0)


def sustained(fn: Callable[[], object], duration_s: float,
              clock: Callable[[], float] = time.perf_counter) -> dict:
    """Call fn back to back for duration_s; summarize the whole soak and each window so drift shows
    (a board that heats up and clocks down has a slower last window than its first)."""
    window_s = soak_window_s(duration_s)
    windows: list[list[float]] = []
    samples_ms: list[float] = []
    start = clock()
    while True:
        t0 = clock()
        if t0 - start >= duration_s:
            break
        fn()
        elapsed_ms = (clock() - t0) * 1000.0
        index = int((t0 - start) // window_s)
        while len(windows) <= index:
            windows.append([])
        windows[index].append(elapsed_ms)
        samples_ms.append(elapsed_ms)
    window_rows = []
    for index, window in enumerate(windows):
        summary = summarize_ms(window)
        window_rows.append({"t_start_s": round(index * window_s, 3), "n": summary["n"], "p50": summary["p50"],
                            "p99": summary["p99"], "reasons": summary["reasons"]})
    first, last = (window_rows[0]["p50"], window_rows[-1]["p50"]) if window_rows else (None, None)
    return {
        "duration_s": round(clock() - start, 3),
        "window_s": round(window_s, 3),
        "windows": window_rows,
        "drift_p50": round(last / first - 1.0, 4) if first and last is not None else None,  # last window vs first
        "latency_ms": summarize_ms(samples_ms),
    }


def prompt_ids(num_tokens: int, vocab_size: int) -> np.ndarray:
    """Deterministic ids in [3, vocab): skips the usual pad/bos/eos ids 0..2."""
    if vocab_size <= 3:
        raise RunnerError(f"model.vocab_size must be > 3, got {vocab_size}")
    return (3 + (np.arange(num_tokens, dtype=np.int64) * 7919 + 11) % (vocab_size - 3)).reshape(1, -1)


def _next_token(logits: np.ndarray) -> int:
    return int(np.argmax(logits[0, -1]))


def greedy_generate(backend: Backend, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Greedy decoding through the KV cache; stops after EOS (kept in the output) or max_new_tokens."""
    logits, past = backend.forward(np.asarray([prompt], dtype=np.int64), backend.empty_past())
    generated = []
    while True:
        token = _next_token(logits)
        generated.append(token)
        if token == eos_token_id or len(generated) >= max_new_tokens:
            return generated
        logits, past = backend.forward(np.asarray([[token]], dtype=np.int64), past)


def load_model(backend: Backend, bundle_dir: Path, manifest: dict, threads: int) -> None:
    """Load the bundle's model into `backend` with what the manifest says about it (run and install share this)."""
    model = manifest["model"]
    backend.load(bundle_path(bundle_dir, model["file"]), threads,
                 num_kv_heads=model.get("num_kv_heads"), head_dim=model.get("head_dim"),
                 options={**(manifest.get("runtime_options") or {}), "model_sha256": manifest["files"][model["file"]],
                          # the model file and its external data, as verified against the manifest (TensorRT's engine key)
                          "model_files": {name: sha for name, sha in manifest["files"].items() if name.startswith(model["file"])}})


def smoke_test(backend: Backend, golden_path: Path, atol: float) -> dict:
    """Run the golden input with an empty cache; logits must match the host's within atol."""
    try:
        with np.load(golden_path) as golden:
            input_ids = np.asarray(golden["input_ids"], dtype=np.int64)
            expected = np.asarray(golden["logits"], dtype=np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise RunnerError(f"cannot read golden file {golden_path.name}: {exc}") from exc
    logits, _ = backend.forward(input_ids, backend.empty_past())
    logits = np.asarray(logits, dtype=np.float32)
    if logits.shape != expected.shape:
        raise RunnerError(f"smoke test failed: logits shape {list(logits.shape)} != golden {list(expected.shape)}")
    max_abs_diff = float(np.max(np.abs(logits - expected)))
    if not max_abs_diff <= atol:  # also catches NaN
        raise RunnerError(f"smoke test failed: max |logits - golden| = {max_abs_diff:.6g} > atol {atol:g} "
                          "(the model computes differently on this device)")
    return {"passed": True, "max_abs_diff": float(f"{max_abs_diff:.6g}"), "atol": atol}


def load_task(task_path: Path) -> dict:
    try:
        task = json.loads(Path(task_path).read_text(encoding="utf-8"))
        max_new_tokens = task["max_new_tokens"]
        examples = task["examples"]
        ok = isinstance(max_new_tokens, int) and max_new_tokens > 0 and isinstance(examples, list) and all(
            isinstance(e.get("prompt_ids"), list) and e["prompt_ids"] and isinstance(e.get("completion_ids"), list)
            for e in examples)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RunnerError(f"cannot read task file {Path(task_path).name}: {exc}") from exc
    if not ok:
        raise RunnerError(f"task file {Path(task_path).name}: needs max_new_tokens > 0 and examples "
                          "with non-empty prompt_ids and completion_ids lists")
    return task


def task_accuracy(backend: Backend, task: dict, eos_token_id: int) -> dict:
    """Exact match: the greedy continuation (including its EOS) equals completion_ids."""
    correct = sum(
        greedy_generate(backend, ex["prompt_ids"], task["max_new_tokens"], eos_token_id) == list(ex["completion_ids"])
        for ex in task["examples"])
    n = len(task["examples"])
    return {"exact_match": round(correct / n, 4) if n else None, "n": n, "correct": correct}


def first_token_and_decode(backend: Backend, prompt: np.ndarray, decode_tokens: int, runs: int,
                           clock: Callable[[], float] = time.perf_counter) -> dict:
    """Per run: prefill + argmax (first-token latency), then decode_tokens greedy steps (EOS ignored)."""
    first_ms, tokens_per_s, ms_per_token = [], [], []
    for _ in range(max(1, runs)):
        t0 = clock()
        logits, past = backend.forward(prompt, backend.empty_past())
        token = _next_token(logits)
        t1 = clock()
        for _ in range(decode_tokens):
            logits, past = backend.forward(np.asarray([[token]], dtype=np.int64), past)
            token = _next_token(logits)
        t2 = clock()
        first_ms.append((t1 - t0) * 1000.0)
        if decode_tokens:
            tokens_per_s.append(decode_tokens / max(t2 - t1, 1e-9))
            ms_per_token.append((t2 - t1) * 1000.0 / decode_tokens)
    return {
        "first_token_ms": round(float(np.median(first_ms)), 3),
        "first_token_ms_runs": [round(v, 3) for v in first_ms],
        "decode_tokens_per_s": round(float(np.median(tokens_per_s)), 3) if tokens_per_s else None,
        "decode_ms_per_token": round(float(np.median(ms_per_token)), 3) if ms_per_token else None,
    }
