"""Runtime backends, chosen by the manifest's `runtime` field.

A backend runs one KV-cache step of the bundled model. A runtime is a module with `create_backend()`
and `installed_version()`, listed in BACKEND_MODULES.
"""

from __future__ import annotations

import importlib

import numpy as np

from .. import RunnerError

# Runtime name -> module; imported only when asked for, so a device needs only its own runtime.
BACKEND_MODULES = {
    "onnxruntime": "edgeft_runner.backends.onnxruntime",
    "tflite": "edgeft_runner.backends.tflite",
    "tensorrt": "edgeft_runner.backends.tensorrt",
}


class Backend:
    """One loaded model. `past` is a flat list [k0, v0, k1, v1, ...] of [1, kv_heads, past_len, head_dim]."""

    name = "base"
    version: str | None = None
    providers: list[str] = []

    last_logits_only = False  # True: forward returns logits [1, 1, vocab] for the last input token only

    def load(self, model_path, threads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
             options: dict | None = None) -> None:
        """options: the manifest's runtime_options (e.g. TensorRT precision and shapes)."""
        raise NotImplementedError

    def empty_past(self) -> list[np.ndarray]:
        raise NotImplementedError

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids int64 [1, seq] -> (logits float32 [1, seq, vocab], presents to feed back as past)."""
        raise NotImplementedError


class HeldPast:
    """A KV cache held in a backend's own buffers (the GPU, or a preallocated cache updated in place): the
    buffer set ("slot") holding it (None: the empty cache), its length in tokens, and the slot's write count
    when it was made (a later write to the slot makes it stale: only the latest past continues)."""

    __slots__ = ("slot", "length", "version")

    def __init__(self, slot: int | None, length: int, version: int = 0):
        self.slot, self.length, self.version = slot, length, version

    def __repr__(self) -> str:
        return f"HeldPast(slot={self.slot}, length={self.length}, version={self.version})"


def _module(runtime: str):
    if runtime not in BACKEND_MODULES:
        raise RunnerError(f"unknown runtime {runtime!r} in the bundle (this runner knows {', '.join(BACKEND_MODULES)}); "
                          "rebuild the bundle with this edgeft version")
    return importlib.import_module(BACKEND_MODULES[runtime])


def create_backend(runtime: str) -> Backend:
    return _module(runtime).create_backend()


def runtime_version(runtime: str) -> str | None:
    """The version of one runtime if it imports on this device, else None (imports only that runtime)."""
    return _module(runtime).installed_version()


def installed_runtimes() -> dict[str, str | None]:
    """Runtime name -> version if it imports on this device, else None."""
    return {name: runtime_version(name) for name in BACKEND_MODULES}
