"""Runs the stages a profile lists, in order, each cached by a hash of everything it depends on.

A stage's cache key covers its input artifact, the dataset, its config and what the config's `auto`
settings resolved to on this machine (CPU or which GPU, compute dtype), the source of every edgeft
module it can run (all of edgeft and the runner code it evaluates with: hashing the whole package is
simple and cannot miss a helper), and the versions of the libraries that compute its result. So a
stage whose inputs are unchanged is not run again, and a change anywhere upstream, in edgeft's code or
in a library re-runs it and everything after it.

Each cache entry has a lock (filelock; the OS drops it when its holder dies): of two builds that need
the same entry at once, one builds it and the other waits, then reuses it. An entry is written into a
temp dir and renamed complete, so a killed builder leaves no half entry; its temp dir is removed by the
next build of that entry (or `edgeft cache prune`).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence, get_type_hints

import edgeft_runner
from filelock import FileLock
from pydantic import BaseModel, ValidationError

from . import __version__, memory
from .artifact import META_FILE, Artifact, atomic_dir, cache_root, digest_of, hash_dir, held_lock, sha256_file
from .config import Profile
from .context import BuildContext
from .errors import ConfigError
from .stages import stage_module

# The code a stage can run: edgeft itself and the runner package whose backends evaluate exported models.
SOURCE_DIRS = (Path(__file__).resolve().parent, Path(edgeft_runner.__file__).resolve().parent)
# Distributions whose version can change a stage's result (those not installed key as None).
KEYED_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "safetensors", "numpy",
                   "onnx", "onnxscript", "onnxruntime", "torch-pruning", "litert-torch", "ai-edge-litert", "ai-edge-quantizer")


@dataclass
class PlannedStage:
    name: str
    module: ModuleType
    config: BaseModel


@dataclass
class StageOutcome:
    name: str
    key: str
    sha256: str  # the output artifact's content hash
    cached: bool
    seconds: float
    metrics: dict[str, Any]
    info: dict[str, Any]


def plan(profile: Profile, stages: list[dict[str, dict[str, Any]]] | None = None, where: str = "stages") -> list[PlannedStage]:
    """Validate every stage's config before anything runs, so a typo fails in a second, not an hour in."""
    planned = []
    for index, item in enumerate(profile.stages if stages is None else stages):
        ((name, raw),) = item.items()
        where_item = f"{profile.source}: {where}[{index}]"
        module = stage_module(name, where_item)
        config_type = get_type_hints(module.run)["config"]  # each stage's run(model, config: XConfig, ctx)
        try:
            config = config_type.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{where_item} ({name}): field '{field}': {err['msg']}") from exc
        planned.append(PlannedStage(name, module, config))
    return planned


def base_artifact(model_dir: Path) -> Artifact:
    files = hash_dir(model_dir)
    return Artifact(path=model_dir, kind="hf-model", stage="base", key=digest_of(files), files=files)


# ------------------------------------------------------------------------------------ the key
def source_sha256(roots: Sequence[Path] = SOURCE_DIRS) -> str:
    """One sha256 over every .py file under `roots` (by package-relative path): any edit to any module,
    a comment included, gives a new value."""
    files = {}
    for root in map(Path, roots):
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[f"{root.name}/{path.relative_to(root).as_posix()}"] = sha256_file(path)
    return digest_of(files)


@lru_cache(maxsize=1)
def _installed_source_sha256() -> str:
    return source_sha256()  # once per process: the code that runs does not change under it


@lru_cache(maxsize=1)
def library_versions(names: tuple[str, ...] = KEYED_LIBRARIES) -> dict[str, str | None]:
    """{distribution: installed version or None}, read from package metadata (nothing is imported)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@lru_cache(maxsize=1)
def compute_device() -> str:
    """Where `auto` puts the stages' work on this machine: "cuda:<GPU name>" when torch sees a GPU, else
    "cpu". Results differ between the two (kernels, dtypes), so the key holds it."""
    import torch

    return f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"


def resolved_settings(config: BaseModel, runtime: str | None) -> dict[str, Any]:
    """What the config's `auto` settings resolved to here, for a target of `runtime`: a stage config defines
    `resolved(runtime)` for them."""
    resolved = getattr(config, "resolved", None)
    return resolved(runtime) if callable(resolved) else {}


def stage_key(stage: PlannedStage, source: Artifact, data_sha256: str, evaluation: dict[str, Any] | None = None, *,
              runtime: str | None = None, code: str | None = None, libraries: dict[str, str | None] | None = None,
              device: str | None = None) -> str:
    """`evaluation`: what the stage's reported metrics depend on (edgeft.evaluate.eval_identity); `runtime`:
    the target's (export's `graph: auto` depends on it). `code` (source_sha256), `libraries`
    (library_versions) and `device` (compute_device) default to this installation's; pass them to ask
    what the key would be elsewhere."""
    return digest_of(
        {
            "stage": stage.name,
            "config": stage.config.model_dump(mode="json"),
            "resolved": {"device": device or compute_device(), **resolved_settings(stage.config, runtime)},
            "input": source.sha256,
            "data": data_sha256,
            "stage_code": sha256_file(Path(stage.module.__file__)),  # the stage's own file, also when it lives outside edgeft
            "code": code or _installed_source_sha256(),
            "libraries": library_versions() if libraries is None else libraries,
            "edgeft": __version__,
            **({"eval": evaluation} if evaluation is not None else {}),
        }
    )


# ------------------------------------------------------------------------------------ the entries
def artifacts_dir() -> Path:
    return cache_root() / "artifacts"


def entry_path(stage_name: str, key: str) -> Path:
    return artifacts_dir() / f"{stage_name}-{key[:24]}"


def is_complete(entry: Path) -> bool:
    """An entry is complete once its metadata is there: it is renamed into place with it, never written in place."""
    return (entry / META_FILE).is_file()


def entry_lock(entry: Path) -> FileLock:
    """The entry's lock file, under <cache>/locks (kept after release, so every waiter locks the same file)."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{entry.name}.lock"))


def leftovers(entry: Path) -> list[Path]:
    """Temp dirs of builders of `entry` that died before renaming theirs into place (atomic_dir's names)."""
    return sorted(p for pattern in (f".{entry.name}.tmp-*", f".{entry.name}.old-*") for p in entry.parent.glob(pattern))


@contextmanager
def hold_entry(entry: Path, what: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold `entry`'s lock for building it: another build of the same entry waits here, saying so. A dead
    builder's lock is gone with its process; its temp dir is removed here, as nobody else can be writing it."""
    with held_lock(entry_lock(entry), f"waiting for another build of {what} ({entry.name}); its result is reused when it is done", log):
        for path in leftovers(entry):
            shutil.rmtree(path, ignore_errors=True)
        yield


def mark_used(path: Path) -> None:
    """`edgeft cache list` shows an entry's mtime as its last use (its metadata file keeps the build time)."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache still serves its entries


def run(stages: list[PlannedStage], ctx: BuildContext, force: bool = False, start: Artifact | None = None) -> tuple[Artifact, list[StageOutcome]]:
    """Run `stages` from `start` (default ctx.base); returns the last artifact and what each stage did."""
    from .evaluate import eval_identity

    current = start or ctx.base
    outcomes = []
    evaluation = eval_identity(ctx.profile.eval)
    for stage in stages:
        key = stage_key(stage, current, ctx.splits.sha256, evaluation, runtime=ctx.target.runtime if ctx.target else None)
        final = entry_path(stage.name, key)
        started = time.perf_counter()
        if not force and is_complete(final):
            current = Artifact.load(final)
            ctx.log(f"{stage.name}: cached, inputs and config unchanged, same code and libraries ({final})")
        else:
            with hold_entry(final, stage.name, ctx.log):
                if not force and is_complete(final):  # another build made it while this one waited
                    current = Artifact.load(final)
                    ctx.log(f"{stage.name}: built by the other build, reused ({final})")
                else:
                    current = _build(stage, current, ctx, key, final, force)
        mark_used(final)
        outcomes.append(StageOutcome(stage.name, key, current.sha256, current.cached, round(time.perf_counter() - started, 2), current.metrics, current.info))
    return current, outcomes


def _build(stage: PlannedStage, source: Artifact, ctx: BuildContext, key: str, final: Path, force: bool) -> Artifact:
    ctx.log(f"{stage.name}: running")
    with atomic_dir(final) as tmp:
        ctx.out, ctx.stage_key, ctx.force = tmp, key, force
        memory.reset_peak()
        result = stage.module.run(source, stage.config, ctx)
        result.metrics.update(memory.peak())  # peak_rss_bytes (and peak_gpu_bytes on CUDA) of this stage alone
        result.path, result.key, result.stage = tmp, key, stage.name
        result.files = hash_dir(tmp)
        result.save_meta()
    result.path = final
    return result
