"""Runtime backends, chosen by the manifest's `runtime` field.

A backend runs one KV-cache step of the bundled model. Adding TFLite or TensorRT means writing a
module with `create_backend()` and `installed_version()` and listing it in BACKEND_MODULES.
"""

from __future__ import annotations

import importlib

import numpy as np

from .. import RunnerError

# Runtime name -> module; imported only when asked for, so a device needs only its own runtime.
BACKEND_MODULES = {
    "onnxruntime": "edgeft_runner.backends.onnxruntime",
}


class Backend:
    """One loaded model. `past` is a flat list [k0, v0, k1, v1, ...] of [1, kv_heads, past_len, head_dim]."""

    name = "base"
    version: str | None = None
    providers: list[str] = []

    def load(self, model_path, threads: int, num_kv_heads: int | None = None, head_dim: int | None = None) -> None:
        raise NotImplementedError

    def empty_past(self) -> list[np.ndarray]:
        raise NotImplementedError

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids int64 [1, seq] -> (logits float32 [1, seq, vocab], presents to feed back as past)."""
        raise NotImplementedError


def _module(runtime: str):
    if runtime not in BACKEND_MODULES:
        raise RunnerError(f"runtime not implemented yet on the device: {runtime}")
    return importlib.import_module(BACKEND_MODULES[runtime])


def create_backend(runtime: str) -> Backend:
    return _module(runtime).create_backend()


def installed_runtimes() -> dict[str, str | None]:
    """Runtime name -> version if it imports on this device, else None."""
    return {name: _module(name).installed_version() for name in BACKEND_MODULES}
