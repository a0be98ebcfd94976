"""LiteRT (TFLite) backend for the edgeft KV-cache contract.

The `.tflite` model has fixed shapes, so it carries a static cache: signatures `prefill_<n>` (n tokens)
and `decode` (one token), each taking `tokens` int32 [1, n], `input_pos` int32 [n], an additive float
`mask` [1, 1, n, cache_len] and the caches `kv_cache_{k,v}_<layer>`, and returning `logits` and the
updated caches. Prefill signatures return logits for their final position only, so `forward`
returns [1, 1, vocab] for the last input token (`last_logits_only`). Here `past` is opaque: {"pos": tokens already cached, "cache": {name: array}}.

Prompts shorter than a prefill signature are right-padded: padded positions write cache slots past
the prompt, but those stay masked until a real token overwrites them.
"""

from __future__ import annotations

import re

import numpy as np

from .. import RunnerError
from . import Backend

INSTALL_HINT = ("no TFLite interpreter on this device: python3 -m pip install ai-edge-litert "
                "(or tflite-runtime, which needs numpy < 2)")
CACHE_PREFIX = "kv_cache_"
# Added to the logits of masked positions; finite so a fully masked pad row gives no NaN.
MASKED = np.float32(np.finfo(np.float32).min)


def _interpreter_class():
    """(Interpreter, version): ai_edge_litert is the maintained package, tflite_runtime the older one."""
    try:
        from ai_edge_litert import interpreter as litert

        from importlib import metadata
        try:
            version = metadata.version("ai-edge-litert")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return litert.Interpreter, f"ai-edge-litert {version}"
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as tflite_runtime
    except ImportError:
        raise RunnerError(INSTALL_HINT)
    except Exception as exc:  # tflite_runtime 2.14 built against numpy 1 fails to import under numpy 2
        raise RunnerError(f"tflite_runtime does not import ({str(exc).strip().splitlines()[0]}); "
                          "it needs numpy < 2, or install ai-edge-litert") from exc
    return tflite_runtime.Interpreter, f"tflite-runtime {getattr(tflite_runtime, '__version__', 'unknown')}"


def installed_version() -> str | None:
    try:
        return _interpreter_class()[1]
    except RunnerError:
        return None


def _to_tensor(value: np.ndarray, detail: dict) -> np.ndarray:
    """A float array into the input's dtype; quantized (int8) inputs use the model's scale and zero point."""
    dtype = detail["dtype"]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if np.issubdtype(dtype, np.integer) and scale and np.issubdtype(np.asarray(value).dtype, np.floating):
        info = np.iinfo(dtype)
        return np.clip(np.round(value / scale) + zero_point, info.min, info.max).astype(dtype)
    return np.asarray(value, dtype=dtype)


def _from_tensor(value: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if scale and np.issubdtype(detail["dtype"], np.integer):
        return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return value


class TFLiteBackend(Backend):
    name = "tflite"
    last_logits_only = True

    def load(self, model_path, threads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
             options: dict | None = None) -> None:
        interpreter_class, self.version = _interpreter_class()
        try:
            self.interpreter = interpreter_class(model_path=str(model_path), num_threads=int(threads))
            signatures = self.interpreter.get_signature_list()
        except Exception as exc:
            raise RunnerError(f"LiteRT cannot load {model_path}: {str(exc).strip().splitlines()[0]}") from exc
        prefill = sorted((int(m.group(1)), name) for name in signatures
                         if (m := re.fullmatch(r"prefill_(\d+)", name)))
        if "decode" not in signatures or not prefill:
            raise RunnerError(f"{model_path}: needs signatures prefill_<n> and decode, has {sorted(signatures)}; "
                              "re-export it with edgeft (export format: tflite)")
        self.signature_names = {}  # runner id -> signature name (for calibration on the host)
        self._details = {}  # runner id -> (input details, output details)
        self.prefill = [(length, self._runner(name)) for length, name in prefill]
        self.decode = self._runner("decode")
        inputs = self.decode.get_input_details()
        # The cache is kept in float32 between calls; full-integer models get it (de)quantized at the edge.
        self.cache_specs = {name: tuple(d["shape"]) for name, d in inputs.items() if name.startswith(CACHE_PREFIX)}
        self.cache_len = int(inputs["mask"]["shape"][-1])
        # The converter treats tokens equal to the pad id as padding, so pad with exactly that id.
        self.pad_token_id = int((options or {}).get("pad_token_id") or 0)
        self.providers = [f"CPU, {threads} threads, prefill {[length for length, _ in self.prefill]}, "
                          f"cache {self.cache_len}"]

    def _runner(self, name: str):
        runner = self.interpreter.get_signature_runner(name)
        self.signature_names[id(runner)] = name
        return runner

    def empty_past(self) -> dict:
        return {"pos": 0, "cache": {name: np.zeros(shape, np.float32) for name, shape in self.cache_specs.items()}}

    def signature_inputs(self, length: int, tokens: np.ndarray, pos: int, cache: dict) -> dict:
        """The inputs of a `length`-token signature for `tokens` (<= length of them) at positions pos.."""
        padded = np.full((1, length), self.pad_token_id, dtype=np.int32)
        padded[0, :tokens.size] = tokens
        positions = pos + np.arange(length, dtype=np.int32)
        mask = np.where(np.arange(self.cache_len)[None, :] <= positions[:, None], np.float32(0), MASKED)
        return {"tokens": padded, "input_pos": positions,
                "mask": mask.reshape(1, 1, length, self.cache_len).astype(np.float32), **cache}

    def _step(self, runner, length: int, tokens: np.ndarray, pos: int, cache: dict) -> tuple[np.ndarray, dict]:
        inputs, outputs = self._io_details(runner)
        try:
            out = runner(**{name: _to_tensor(value, inputs[name]) for name, value in
                            self.signature_inputs(length, tokens, pos, cache).items()})
        except Exception as exc:
            raise RunnerError(f"LiteRT failed to run the model: {str(exc).strip().splitlines()[0]}") from exc
        out = {name: _from_tensor(value, outputs[name]) for name, value in out.items()}
        return out["logits"], {name: out[name] for name in cache}

    def _io_details(self, runner) -> tuple[dict, dict]:
        key = id(runner)
        if key not in self._details:
            self._details[key] = (runner.get_input_details(), runner.get_output_details())
        return self._details[key]

    def forward(self, input_ids: np.ndarray, past: dict) -> tuple[np.ndarray, dict]:
        """Returns logits for the LAST position only ([1, 1, vocab]): the prefill signatures keep
        only their final (possibly padded) position, so the last token always goes through decode."""
        ids = np.asarray(input_ids).reshape(-1)
        pos, cache = past["pos"], past["cache"]
        if pos + ids.size > self.cache_len:
            raise RunnerError(f"{pos + ids.size} tokens exceed the model's cache of {self.cache_len}; "
                              "export with a larger cache_tokens")
        start, last = 0, ids.size - 1
        while start < last:
            left = last - start
            # The smallest prefill that takes the rest, else the largest; padding must stay inside the cache.
            fitting = [(length, runner) for length, runner in self.prefill if pos + length <= self.cache_len]
            if fitting:
                length, runner = next(((n, r) for n, r in fitting if n >= left), fitting[-1])
            else:
                length, runner = 1, self.decode
            take = min(left, length)
            _, cache = self._step(runner, length, ids[start:start + take], pos, cache)
            pos, start = pos + take, start + take
        logits, cache = self._step(self.decode, 1, ids[last:], pos, cache)
        return logits.astype(np.float32), {"pos": pos + 1, "cache": cache}


def create_backend() -> TFLiteBackend:
    return TFLiteBackend()
