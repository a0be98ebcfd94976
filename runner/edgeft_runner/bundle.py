"""Bundle manifest loading and sha256 verification."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from . import BUNDLE_FORMAT, RunnerError

MEASURE_DEFAULTS = {
    "warmup_s": 1.0, "min_s": 5.0, "min_iters": 100, "sustained_s": 0,
    "prompt_tokens": 32, "decode_tokens": 16, "first_token_runs": 5,
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_path(bundle_dir: Path, rel: str) -> Path:
    """Resolve a manifest path inside the bundle; refuse anything that could point outside it."""
    if not isinstance(rel, str) or not rel:
        raise RunnerError(f"manifest file path must be a non-empty string, got {rel!r}")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise RunnerError(f"manifest path escapes the bundle (absolute): {rel}")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise RunnerError(f"manifest path escapes the bundle (..): {rel}")
    root = Path(bundle_dir).resolve()
    path = (root / rel).resolve()
    # A symlink inside the bundle could still point elsewhere.
    if path != root and root not in path.parents:
        raise RunnerError(f"manifest path escapes the bundle (symlink): {rel}")
    return path


def load_manifest(bundle_dir: Path) -> dict:
    """Read manifest.json and check the keys the runner relies on; other keys are ignored."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise RunnerError(f"bundle directory not found: {bundle_dir}")
    manifest_path = bundle_dir / "manifest.json"
    if not manifest_path.is_file():
        raise RunnerError(f"bundle has no manifest.json: {bundle_dir}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunnerError(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise RunnerError(f"{manifest_path} is not a JSON object")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise RunnerError(f"{manifest_path}: format is {manifest.get('format')!r}, this runner reads {BUNDLE_FORMAT!r}")

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise RunnerError(f"{manifest_path}: 'files' must be a non-empty object of path -> sha256")
    for rel, digest in files.items():
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise RunnerError(f"{manifest_path}: files[{rel!r}] is not a lowercase sha256 hex digest")
        if rel == "manifest.json":
            raise RunnerError(f"{manifest_path}: 'files' must not list manifest.json itself")

    model = manifest.get("model")
    if not isinstance(model, dict):
        raise RunnerError(f"{manifest_path}: missing 'model' object")
    for key in ("vocab_size", "eos_token_id"):
        if not isinstance(model.get(key), int) or isinstance(model.get(key), bool):
            raise RunnerError(f"{manifest_path}: model.{key} must be an integer")
    # Every file the runner opens must be hash-covered, or verification would prove nothing about it.
    for section in ("model", "golden", "task"):
        entry = manifest.get(section)
        rel = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(rel, str):
            raise RunnerError(f"{manifest_path}: missing {section}.file")
        if rel not in files:
            raise RunnerError(f"{manifest_path}: {section}.file {rel!r} is not listed in 'files'")

    atol = manifest["golden"].get("atol", 1e-3)
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or atol < 0:
        raise RunnerError(f"{manifest_path}: golden.atol must be a non-negative number")

    measure = dict(MEASURE_DEFAULTS)
    measure.update(manifest.get("measure") or {})
    for key, value in measure.items():
        if key in MEASURE_DEFAULTS and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise RunnerError(f"{manifest_path}: measure.{key} must be a non-negative number")
    if measure["prompt_tokens"] < 1:
        raise RunnerError(f"{manifest_path}: measure.prompt_tokens must be at least 1")
    manifest["measure"] = measure
    return manifest


def verify_bundle(bundle_dir: Path) -> dict:
    """Load the manifest and check every listed file exists with its sha256. Returns the manifest."""
    manifest = load_manifest(bundle_dir)
    for rel, expected in manifest["files"].items():
        path = bundle_path(bundle_dir, rel)
        if not path.is_file():
            raise RunnerError(f"bundle file missing: {rel} (in {bundle_dir})")
        actual = sha256_file(path)
        if actual != expected:
            raise RunnerError(f"sha256 mismatch for {rel}: manifest {expected[:12]}..., file {actual[:12]}... "
                              "(bundle damaged or edited; re-push it)")
    return manifest
