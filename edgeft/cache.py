"""`edgeft cache list|prune`: what the build cache holds and freeing it.

Entries ($EDGEFT_CACHE, else ~/.cache/edgeft):
  artifacts/<stage>-<key>      a stage's result (edgeft.pipeline); its metadata file's mtime is when it was
                               built, the directory's mtime when a build last used it
  measurements/<key>.json      a device report, reused by `--search` (edgeft.build.measure_cached)
  checkpoints/finetune-<key>   an interrupted finetune's resumable checkpoints
  demo/base-<key>              the built-in demo's pretrained base model
  artifacts/.<entry>.tmp-*     what a killed builder left (never used as an entry)
Other contents (the emulated board's rootfs, the local device's workdir) are not listed here.

Pruning never removes an entry a build holds (its lock, edgeft.pipeline.entry_lock), and removes an
entry by first renaming it out of the way, so a prune killed midway leaves no half entry either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import Timeout

from .artifact import META_FILE, cache_root
from .errors import ConfigError
from .pipeline import entry_lock, is_complete

UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class Entry:
    kind: str  # artifact, measurement, checkpoint, demo-base, incomplete
    stage: str  # the stage (finetune, merge, ...), "measure" or "demo"
    key: str
    path: str
    size_bytes: int
    created_unix: float
    last_used_unix: float

    def row(self, now: float) -> dict[str, Any]:
        return {**asdict(self), "age_s": round(now - self.created_unix, 1), "idle_s": round(now - self.last_used_unix, 1)}


def parse_duration(text: str) -> float:
    """Seconds in "90s", "30m", "12h", "7d", "2w" (a bare number is seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise ConfigError(f"duration {text!r}: write a number with a unit s, m, h, d or w (e.g. 7d, 12h)")
    return float(match[1]) * UNITS_S[match[2] or "s"]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while walking
    return total


def _meta(entry: Path) -> dict[str, Any]:
    try:
        return json.loads((entry / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def entries(root: Path | None = None) -> list[Entry]:
    """Every entry of the cache, most recently used first."""
    root = root or cache_root()
    found: list[Entry] = []

    def add(kind: str, stage: str, key: str, path: Path, created_from: Path) -> None:
        try:
            found.append(Entry(kind, stage, key, str(path), _size(path), created_from.stat().st_mtime, path.stat().st_mtime))
        except OSError:
            pass  # removed meanwhile (another prune, or a forced rebuild replacing it)

    artifacts = root / "artifacts"
    for path in sorted(artifacts.glob("*")) if artifacts.is_dir() else []:
        if not path.is_dir():
            continue
        if path.name.startswith("."):  # .<entry>.tmp-* / .<entry>.old-*: a builder died before its rename
            name = re.sub(r"\.(tmp|old)-.*$", "", path.name[1:])
            stage, _, key = name.rpartition("-")
            add("incomplete", stage, key, path, path)
        elif is_complete(path):
            meta = _meta(path)
            stage, _, key = path.name.rpartition("-")
            add("artifact", meta.get("stage", stage), meta.get("key", key), path, path / META_FILE)
    measurements = root / "measurements"
    for path in sorted(measurements.glob("*.json")) if measurements.is_dir() else []:
        add("measurement", "measure", path.stem, path, path)
    checkpoints = root / "checkpoints"
    for path in sorted(checkpoints.glob("*-*")) if checkpoints.is_dir() else []:
        stage, _, key = path.name.rpartition("-")
        add("checkpoint", stage, key, path, path)
    demo = root / "demo"
    for path in sorted(demo.glob("base-*")) if demo.is_dir() else []:
        if path.is_dir() and (path / "config.json").is_file():
            add("demo-base", "demo", path.name.removeprefix("base-"), path, path / "config.json")
    return sorted(found, key=lambda e: -e.last_used_unix)


def list_rows(root: Path | None = None) -> list[dict[str, Any]]:
    now = time.time()
    return [entry.row(now) for entry in entries(root)]


def _lock_name(entry: Entry) -> Path | None:
    """The artifact entry whose lock guards `entry` (a checkpoint dir belongs to its finetune entry's build)."""
    path = Path(entry.path)
    if entry.kind in ("artifact", "checkpoint"):
        return path.parent.parent / "artifacts" / path.name
    if entry.kind == "incomplete":
        return path.parent / re.sub(r"\.(tmp|old)-.*$", "", path.name[1:])
    return None


def _remove(entry: Entry) -> bool:
    """Remove `entry` unless a build holds it; False when it is in use. Renamed aside first (into a name
    only leftovers have), then deleted."""
    path = Path(entry.path)
    guarded = _lock_name(entry)
    lock = entry_lock(guarded) if guarded is not None else None
    if lock is not None:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
    try:
        if path.is_dir():
            aside = path.with_name(f".{path.name}.tmp-prune-{os.getpid()}") if entry.kind != "incomplete" else path
            if aside != path:
                os.replace(path, aside)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    finally:
        if lock is not None:
            lock.release()
    return True


def prune(older_than_s: float | None = None, keep_last: int | None = None, dry_run: bool = False,
          root: Path | None = None) -> dict[str, Any]:
    """Remove entries not used for more than `older_than_s` seconds, keeping the `keep_last` most recently
    used of each stage whatever their age (with only keep_last: everything else of that stage goes).
    Leftovers of killed builders go whenever no build holds their entry. Entries a build holds are
    skipped. Returns {"removed": [rows], "in_use": [rows], "kept": n, "freed_bytes": n, "dry_run": bool}."""
    if older_than_s is None and keep_last is None:
        raise ConfigError("say what to prune: --older-than DURATION and/or --keep-last N")
    now = time.time()
    removed, in_use, kept = [], [], 0
    seen_per_stage: dict[tuple[str, str], int] = {}
    for entry in entries(root):  # most recently used first
        group = (entry.kind, entry.stage)
        seen_per_stage[group] = seen_per_stage.get(group, 0) + 1
        if entry.kind != "incomplete":
            protected = keep_last is not None and seen_per_stage[group] <= keep_last
            old_enough = older_than_s is None or now - entry.last_used_unix > older_than_s
            if protected or not old_enough:
                kept += 1
                continue
        if dry_run or _remove(entry):
            removed.append(entry.row(now))
        else:
            in_use.append(entry.row(now))
    return {"removed": removed, "in_use": in_use, "kept": kept, "freed_bytes": sum(r["size_bytes"] for r in removed),
            "dry_run": dry_run}
