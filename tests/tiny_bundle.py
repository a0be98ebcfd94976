"""A tiny real bundle (KV-cache ONNX model, golden logits, task) for runner, install and flash tests.

Built once per pytest session (exporting imports torch: run such tests under `flock /tmp/edgeft-heavy.lock`):
    template = bundle_template(tmp_path_factory)      # unsigned, every sha256 filled in
    v1 = make_release(template, tmp / "v1", note="v1") # a copy whose task.json (so its hash) differs
    sign(v1, key_path, version=1)                      # edgeft.flash.signing: release block + manifest.sig
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

MAX_NEW_TOKENS = 6
TASK_PROMPTS = [[5, 9, 13, 17], [40, 41, 42], [7, 7, 7, 7, 7, 30], [60, 3, 12]]
CHANNEL = "test-cpu"  # the template's target, so the default signing channel

_BUILT: dict[tuple[str, str], Any] = {}  # (session basetemp, what) -> built once per session


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rehash(bundle: Path) -> None:
    """Refill the manifest's sha256 of every file after a test edits a payload on purpose (unsigned again)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = {rel: sha256(bundle / rel) for rel in manifest["files"]}
    manifest.pop("release", None)
    (bundle / "manifest.sig").unlink(missing_ok=True)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def torch_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """Reference: greedy decoding in torch, re-running the whole sequence each step (no cache)."""
    import torch

    ids, out = list(prompt), []
    with torch.no_grad():
        while len(out) < max_new_tokens:
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token == eos:
                break
    return out


def _once(tmp_path_factory, what: str, build: Callable[[], Any]) -> Any:
    key = (str(tmp_path_factory.getbasetemp()), what)
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


def tiny_model(tmp_path_factory):
    """(torch model, its ONNX export with the edgeft KV-cache contract), once per session."""
    def build():
        from onnx_kv_export import export_kv_onnx, tiny_llama

        model = tiny_llama(seed=0)
        return model, export_kv_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return _once(tmp_path_factory, "model", build)


def bundle_template(tmp_path_factory) -> Path:
    """An unsigned bundle of the tiny model (model.onnx, golden.npz, task.json, manifest.json), once per session.
    Its task completions are the model's own greedy outputs, so it scores exact match 1.0."""
    def build() -> Path:
        import torch

        model, onnx_path = tiny_model(tmp_path_factory)
        bundle = tmp_path_factory.mktemp("bundle_template")
        shutil.copy(onnx_path, bundle / "model.onnx")
        input_ids = np.array([[3, 14, 15, 9, 26, 53, 58, 9]], dtype=np.int64)
        with torch.no_grad():
            logits = model(torch.from_numpy(input_ids)).logits.numpy().astype(np.float32)
        np.savez(bundle / "golden.npz", input_ids=input_ids, logits=logits)
        # The model's own 3rd greedy token of the first prompt is the EOS, so that example really stops on EOS.
        eos = torch_greedy(model, TASK_PROMPTS[0], MAX_NEW_TOKENS, None)[2]
        examples = [{"prompt_ids": p, "completion_ids": torch_greedy(model, p, MAX_NEW_TOKENS, eos)} for p in TASK_PROMPTS]
        assert examples[0]["completion_ids"][-1] == eos and len(examples[0]["completion_ids"]) <= 3
        (bundle / "task.json").write_text(json.dumps({"max_new_tokens": MAX_NEW_TOKENS, "examples": examples}))
        manifest = {
            "format": "edgeft-bundle/1", "target": CHANNEL, "arch": platform.machine(), "runtime": "onnxruntime",
            "threads": 2,
            "model": {"file": "model.onnx", "precision": "fp32", "num_layers": 2, "num_kv_heads": 2, "head_dim": 32,
                      "vocab_size": 64, "eos_token_id": eos, "max_positions": 256},
            "measure": {"warmup_s": 0.05, "min_s": 0.2, "min_iters": 5, "prompt_tokens": 8, "decode_tokens": 4,
                        "first_token_runs": 3},
            "golden": {"file": "golden.npz", "atol": 1e-3},
            "task": {"file": "task.json"},
            "files": {"model.onnx": "", "golden.npz": "", "task.json": ""},  # filled by rehash()
            "quantization": {"host_only": "the runner must ignore this"},
        }
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        rehash(bundle)
        return bundle
    return _once(tmp_path_factory, "bundle", build)


def make_release(template: Path, out: Path, note: str, *, latency_ms_p99: float | None = 10_000.0,
                 recorded_accuracy: float | None = 1.0, edit: Callable[[Path, dict], None] | None = None) -> Path:
    """A copy of the template as its own release: `note` goes into task.json (so the bundle hash differs
    while the model file is shared), budgets and a recorded accuracy go into the manifest; `edit(bundle,
    manifest)` may change files or the manifest before the hashes are refilled. Unsigned: sign() it."""
    out = Path(shutil.copytree(template, out))
    task = json.loads((out / "task.json").read_text())
    task["note"] = note
    (out / "task.json").write_text(json.dumps(task))
    manifest = json.loads((out / "manifest.json").read_text())
    budgets = {"max_accuracy_drop": 0.01}
    if latency_ms_p99 is not None:
        budgets["latency_ms_p99"] = {"warm": latency_ms_p99, "sustained": None}
    manifest["profile"] = {"name": "tiny", "budgets": budgets}
    if recorded_accuracy is not None:
        manifest["provenance"] = {"stages": [{"name": "export", "metrics": {"accuracy": recorded_accuracy}}]}
    if edit is not None:
        edit(out, manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    rehash(out)
    return out


def new_key(directory: Path) -> tuple[Path, Path]:
    """(private key, public key file) made by `edgeft keys new`'s library call."""
    from edgeft.flash.signing import new_keypair

    return new_keypair(directory)


def sign(bundle: Path, key_path: Path, version: int, channel: str | None = None) -> str:
    """Sign with edgeft's signer (release block + manifest.sig); returns the bundle hash (sha256 of manifest.json)."""
    from edgeft.flash.signing import sign_bundle

    sign_bundle(bundle, key_path, version=version, channel=channel)
    return sha256(bundle / "manifest.json")


def corrupt_golden(bundle: Path, manifest: dict) -> None:
    """An `edit` for make_release: golden logits that the model does not produce (hashes stay valid)."""
    with np.load(bundle / "golden.npz") as golden:
        input_ids, logits = golden["input_ids"], golden["logits"].copy()
    logits[0, 0, 0] += 1.0
    np.savez(bundle / "golden.npz", input_ids=input_ids, logits=logits)
