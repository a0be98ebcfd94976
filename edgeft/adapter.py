"""Adapters outside a build: `edgeft finetune` trains one into a directory of its own, and
`edgeft build --adapter-dir` starts a build from such a directory instead of fine-tuning.

`edgeft finetune` runs unchanged under `accelerate launch` or torchrun: every process loads the data
and the model and trains (the transformers Trainer reads the distributed environment), and only rank 0
evaluates and writes the directory, atomically (complete or absent). The directory holds what the
finetune stage writes (`adapter/` with the peft files, the tokenizer and `edgeft_adapter.json`;
`train_log.jsonl`) plus `artifact.json` (metrics, content hashes), which a build checks it against.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import pipeline
from .artifact import META_FILE, Artifact, atomic_dir, cache_root, digest_of, hash_dir
from .errors import ConfigError, ModelError

ADAPTER_MARKER = Path("adapter") / "edgeft_adapter.json"


def process_rank() -> int:
    """This process's global rank under accelerate/torchrun (RANK), 0 when run alone."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class FinetuneOptions:
    out: Path
    model: Path | None = None
    data: Path | None = None
    profile: str = "arm-int8"
    adapter: str | None = None  # overrides the profile's finetune.adapter
    threads: int = 2
    force: bool = False  # start from scratch: no resuming from this run's checkpoints


def finetune_stage(profile, adapter: str | None = None) -> pipeline.PlannedStage:
    """The profile's (first) finetune stage, validated, with `adapter` as its name when given."""
    stages = [s for s in pipeline.plan(profile) if s.name == "finetune"]
    if not stages:
        raise ConfigError(f"{profile.source}: profile {profile.name!r} has no finetune stage; pick a profile that lists one")
    stage = stages[0]
    if adapter is not None:
        raw = {**stage.config.model_dump(), "adapter": adapter}
        (stage,) = pipeline.plan(profile, [{"finetune": raw}], where="--adapter")
    return stage


def _check_out(out: Path) -> None:
    """--out is replaced whole: refuse anything but a new or empty dir or an earlier adapter dir."""
    if not out.exists():
        return
    if not out.is_dir() or (any(out.iterdir()) and not (out / ADAPTER_MARKER).is_file()):
        raise ConfigError(f"{out}: exists and is not an adapter dir written by `edgeft finetune`; "
                          "pass a new or empty --out (it is replaced whole)")


@contextmanager
def _demo_lock():
    """Processes of one multi-process run that all need the demo base: one builds it, the others wait."""
    import fcntl

    path = cache_root() / "demo" / ".build.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def finetune(options: FinetuneOptions, progress=None, log: Callable[[str], None] = print) -> Artifact | None:
    """Train the profile's finetune stage on (model, data) into options.out. Returns the artifact on
    rank 0 (or when run alone) and None on the other processes of a multi-process run."""
    import torch

    from . import quiet_libraries
    from .build import check_model_dir, check_model_fits, check_threads, check_writable_dir, resolve_model
    from .config import load_profile
    from .context import BuildContext
    from .data import check_data, load_splits
    from .evaluate import eval_identity

    check_threads(options.threads)
    quiet_libraries()
    torch.set_num_threads(options.threads)
    rank = process_rank()
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # Before any model loads: bitsandbytes puts a 4-bit model on the current CUDA device and the
        # Trainer never moves it, so each process must select its own GPU first (else all land on GPU 0).
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    profile = load_profile(options.profile)
    stage = finetune_stage(profile, options.adapter)
    out = Path(options.out)
    _check_out(out)
    check_writable_dir(out.absolute().parent, f"--out {out}")
    if options.model is not None:
        check_model_fits([stage], Path(options.model), check_model_dir(options.model), str(profile.source))
    splits = load_splits(options.data, profile.data)
    data_report = check_data(splits, profile.data)
    log(data_report.summary())
    for warning in data_report.warnings:
        log(f"data warning: {warning}")
    if options.model is None:
        with _demo_lock():
            model_dir = resolve_model(None, progress, log)
    else:
        model_dir = resolve_model(options.model, progress, log)
    base = pipeline.base_artifact(model_dir)
    ctx = BuildContext(base=base, splits=splits, target=None, profile=profile, out=out, progress=progress, log=log,
                       threads=options.threads, force=options.force)
    # Checkpoints (resumable after a kill) are this run's own: keyed like the build's stage, plus the
    # number of processes (another world size is another effective batch, not a resumable run).
    key = pipeline.stage_key(stage, base, splits.sha256, eval_identity(profile.eval))
    ctx.stage_key = digest_of({"stage": key, "command": "edgeft finetune", "world_size": world_size()})
    if rank != 0:
        with tempfile.TemporaryDirectory(prefix="edgeft-finetune-rank-") as scratch:
            ctx.out = Path(scratch)  # never written: the stage returns None before writing on other ranks
            stage.module.run(base, stage.config, ctx)
        return None
    log(f"finetune: training {stage.config.method} adapter {stage.config.adapter!r} on {model_dir}"
        + (f" ({world_size()} processes)" if world_size() > 1 else ""))
    with atomic_dir(out) as tmp:
        ctx.out = tmp
        result = stage.module.run(base, stage.config, ctx)
        result.path, result.key, result.stage = tmp, ctx.stage_key, "finetune"
        result.files = hash_dir(tmp)
        result.info = {**result.info, "base_path": str(model_dir), "data_path": str(splits.source),
                       "data_sha256": splits.sha256, "profile": profile.name, "world_size": world_size()}
        result.save_meta()
    result.path = out
    return result


def load_adapter_dir(path: Path, base: Artifact) -> Artifact:
    """An adapter dir written by `edgeft finetune`, checked against its recorded hashes and the base."""
    path = Path(path)
    meta = path / META_FILE
    if not path.is_dir() or not meta.is_file() or not (path / ADAPTER_MARKER).is_file():
        raise ModelError(f"{path}: not an adapter dir written by `edgeft finetune` (no {META_FILE} or {ADAPTER_MARKER}); "
                         "train one with `edgeft finetune --out DIR`")
    try:
        adapter = Artifact.load(path)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{path / META_FILE}: unreadable ({exc}); re-run `edgeft finetune`") from exc
    if adapter.kind != "adapter":
        raise ModelError(f"{path}: holds a {adapter.kind!r} artifact, not an adapter; pass a dir written by `edgeft finetune`")
    if adapter.info.get("base_sha256") != base.sha256:
        raise ModelError(f"{path}: this adapter was trained on another base (sha256 {str(adapter.info.get('base_sha256'))[:12]}…, "
                         f"given {base.sha256[:12]}…); pass the --model it was trained on ({adapter.info.get('base_path', 'see artifact.json')})")
    actual = hash_dir(path)
    changed = sorted(name for name in set(actual) | set(adapter.files) if actual.get(name) != adapter.files.get(name))
    if changed:
        raise ModelError(f"{path}: {len(changed)} file(s) differ from those recorded when it was trained "
                         f"({', '.join(changed[:3])}): modified or corrupted; re-run `edgeft finetune`")
    return adapter


def after_finetune(stages: list[pipeline.PlannedStage], where: str) -> list[pipeline.PlannedStage]:
    """The stages that follow the (first) finetune stage: what a build from an adapter dir runs."""
    names = [s.name for s in stages]
    if "finetune" not in names:
        raise ConfigError(f"{where}: --adapter-dir replaces the finetune stage, and these stages have none")
    return stages[names.index("finetune") + 1:]


def adapter_outcome(adapter: Artifact) -> pipeline.StageOutcome:
    """The finetune stage's line in a build's provenance, for an adapter that came from --adapter-dir."""
    return pipeline.StageOutcome("finetune", adapter.key, adapter.sha256, True, 0.0, adapter.metrics,
                                 {**adapter.info, "adapter_dir": str(adapter.path)})
