"""Artifacts: a directory of files plus metadata, content-addressed in the build cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

META_FILE = "artifact.json"


def cache_root() -> Path:
    """The build cache: $EDGEFT_CACHE, else ~/.cache/edgeft."""
    return Path(os.environ.get("EDGEFT_CACHE") or Path.home() / ".cache" / "edgeft")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_dir(path: Path, skip: tuple[str, ...] = (META_FILE,)) -> dict[str, str]:
    """sha256 of every file under `path`, by relative POSIX path, sorted."""
    path = Path(path)
    return {
        p.relative_to(path).as_posix(): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.relative_to(path).as_posix() not in skip
    }


def digest_of(obj: Any) -> str:
    """A stable sha256 of any JSON-able value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Artifact:
    """What a stage returns: a directory, what made it, and what was measured on it."""

    path: Path
    kind: str  # "hf-model", "adapter", "onnx"
    stage: str
    key: str  # cache key: hash of inputs, config and stage code
    files: dict[str, str] = field(default_factory=dict)  # relpath -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # stage-specific facts (precision, adapter hash, ...)
    cached: bool = False

    @property
    def sha256(self) -> str:
        """The artifact's content hash: over its files' hashes."""
        return digest_of(self.files)

    def save_meta(self) -> None:
        meta = {k: v for k, v in self.__dict__.items() if k not in ("path", "cached")}
        (self.path / META_FILE).write_text(json.dumps(meta, indent=2, default=str))

    @classmethod
    def load(cls, path: Path) -> "Artifact":
        meta = json.loads((path / META_FILE).read_text())
        return cls(path=path, cached=True, **meta)


@contextmanager
def held_lock(lock: FileLock, waiting: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an OS file lock (gone with its process, so a killed holder never leaves it stuck), saying
    `waiting` once when another holder makes this one wait."""
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file beside it and a rename: readers see all of it or the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # unique per writer, usual permissions
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them (power loss)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` whole, on error it vanishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
