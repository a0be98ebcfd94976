"""Host-side access to an exported ONNX LM, through the runner's own backend code.

Validation, golden outputs and accuracy on the host run the very code the device runs, so the host and
the device cannot disagree on how the model is driven.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import Example, encode


def load(model_path: Path, threads: int = 1):
    from edgeft_runner import RunnerError
    from edgeft_runner.backends.onnxruntime import OnnxRuntimeBackend

    from .errors import ModelError

    backend = OnnxRuntimeBackend()
    try:
        backend.load(model_path, threads)
    except RunnerError as exc:
        raise ModelError(str(exc)) from None
    return backend


def teacher_forced_logits(backend, rows: list[list[int]]) -> list[np.ndarray]:
    """Logits [seq, vocab] for each full row, run as a prefill of all but the last token plus one
    decode step, so both the empty-cache and the with-cache paths of the graph are exercised."""
    out = []
    for row in rows:
        logits, past = backend.forward(np.asarray([row[:-1]], dtype=np.int64), backend.empty_past())
        last, _ = backend.forward(np.asarray([row[-1:]], dtype=np.int64), past)
        out.append(np.concatenate([logits[0], last[0]]).astype(np.float32))
    return out


def exact_match(backend, tokenizer, examples: list[Example], max_new_tokens: int) -> float:
    from edgeft_runner.measure import greedy_generate

    correct = 0
    for example in examples:
        prompt_ids, completion_ids = encode(tokenizer, example)
        correct += greedy_generate(backend, prompt_ids, max_new_tokens, tokenizer.eos_token_id) == completion_ids
    return correct / len(examples)
