"""The bundle: what ships to a device. Model files, tokenizer, golden smoke-test data, the task set,
and manifest.json (sha256 of every file, provenance, versions, profile). Written whole or not at all."""

from __future__ import annotations

import json
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, lm, onnx_io
from .artifact import Artifact, hash_dir
from .config import Profile, Target
from .data import Splits, encode
from .evaluate import max_new_tokens_for

FORMAT = "edgeft-bundle/1"
# Written after the manifest (by the measurement, or `edgeft sign`): not part of what the manifest vouches for.
MEASUREMENT_FILES = ("manifest.json", "manifest.sig", "report.json", "report.html", "telemetry.jsonl")
TOOLS = ("torch", "transformers", "peft", "bitsandbytes", "onnx", "onnxruntime", "tokenizers", "litert-torch",
         "ai-edge-quantizer", "ai-edge-litert")
GOLDEN_ATOL = 1e-3  # the same model on another CPU: float reorderings stay far below this
# TensorRT picks its own kernels (TF32, fp16 accumulation, fused Q/DQ) and the golden logits come from
# ONNX Runtime on the host, so its smoke test allows more. Not yet checked on a Jetson: tune there.
TENSORRT_GOLDEN_ATOL = {"fp32": 0.05, "fp16": 0.25, "int8-static": 1.0}
TENSORRT_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8-static": "int8"}


def runtime_options(target: Target, final: Artifact) -> dict[str, Any]:
    """What the runner's backend needs beyond the model file (read by its load(options=...))."""
    if target.runtime == "tensorrt":
        shapes = target.tensorrt.model_dump()
        shapes["max_context"] = min(shapes["max_context"], final.info["max_positions"])  # no cache past the model's positions
        return {"precision": TENSORRT_PRECISION[final.info["precision"]], **shapes}
    if target.runtime == "tflite":
        return {"pad_token_id": final.info.get("pad_token_id")}
    return {}


def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"edgeft": __version__, "python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def assemble(
    out: Path,
    final: Artifact,
    splits: Splits,
    target: Target,
    profile: Profile,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """Fill `out` (an empty temp dir) with the bundle; returns the manifest."""
    from transformers import AutoTokenizer

    model_file = f"model.{final.kind}"
    onnx_io.copy(final.path / model_file, out / model_file)  # model.onnx and its external data, if any
    shutil.copytree(final.path / "tokenizer", out / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    options = runtime_options(target, final)

    # Golden: what this exact model file gives on the host, for the device's smoke test (for TensorRT,
    # which the host cannot run: ONNX Runtime on the same ONNX file).
    backend = lm.load(out / model_file, options=options)
    golden_ids = np.asarray([encode(tokenizer, splits.test[0])[0]], dtype=np.int64)
    golden_logits, _ = backend.forward(golden_ids, backend.empty_past())
    np.savez(out / "golden.npz", input_ids=golden_ids, logits=np.asarray(golden_logits, dtype=np.float32))

    task = {
        "max_new_tokens": max_new_tokens_for(tokenizer, splits.test),
        "examples": [dict(zip(("prompt_ids", "completion_ids"), encode(tokenizer, e))) for e in splits.test],
    }
    (out / "task.json").write_text(json.dumps(task))

    manifest = {
        "format": FORMAT,
        "target": target.name,
        "arch": target.arch,
        "runtime": target.runtime,
        "threads": target.threads,
        "runtime_options": options,
        "model": {
            "file": model_file,
            "precision": final.info.get("precision"),
            **{k: final.info[k] for k in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_positions", "eos_token_id")},
        },
        "measure": profile.measure.model_dump(),
        "golden": {"file": "golden.npz", "atol": TENSORRT_GOLDEN_ATOL[final.info["precision"]] if target.runtime == "tensorrt" else GOLDEN_ATOL},
        "task": {"file": "task.json", "source": str(splits.source), "split": "test", "n": len(splits.test)},
        "files": hash_dir(out, skip=MEASUREMENT_FILES),
        "provenance": provenance,
        "profile": profile.model_dump(mode="json"),
        "tools": tool_versions(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
