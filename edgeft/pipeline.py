"""Runs the stages a profile lists, in order, each cached by a hash of what it depends on.

A stage's cache key covers its input artifact, the dataset, its config and its own source code, so
a stage whose inputs and config are unchanged is not run again, and a change anywhere upstream
re-runs everything after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, get_type_hints

from pydantic import BaseModel, ValidationError

from . import __version__
from .artifact import Artifact, atomic_dir, cache_root, digest_of, hash_dir, sha256_file
from .config import Profile
from .context import BuildContext
from .errors import ConfigError
from .stages import stage_module


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
            raise ConfigError(f"{where_item} ({name}): field '{field}': {err['msg']}") from None
        planned.append(PlannedStage(name, module, config))
    return planned


def base_artifact(model_dir: Path) -> Artifact:
    files = hash_dir(model_dir)
    return Artifact(path=model_dir, kind="hf-model", stage="base", key=digest_of(files), files=files)


def stage_key(stage: PlannedStage, source: Artifact, data_sha256: str, evaluation: dict[str, Any] | None = None) -> str:
    """`evaluation`: what the stage's reported metrics depend on (edgeft.evaluate.eval_identity)."""
    return digest_of(
        {
            "stage": stage.name,
            "config": stage.config.model_dump(mode="json"),
            "input": source.sha256,
            "data": data_sha256,
            "code": sha256_file(Path(stage.module.__file__)),
            "edgeft": __version__,
            **({"eval": evaluation} if evaluation is not None else {}),
        }
    )


def run(stages: list[PlannedStage], ctx: BuildContext, force: bool = False, start: Artifact | None = None) -> tuple[Artifact, list[StageOutcome]]:
    """Run `stages` from `start` (default ctx.base); returns the last artifact and what each stage did."""
    from .evaluate import eval_identity

    current = start or ctx.base
    outcomes = []
    evaluation = eval_identity(ctx.profile.eval)
    for stage in stages:
        key = stage_key(stage, current, ctx.splits.sha256, evaluation)
        final = cache_root() / "artifacts" / f"{stage.name}-{key[:24]}"
        started = time.perf_counter()
        if not force and (final / "artifact.json").exists():
            current = Artifact.load(final)
            ctx.log(f"{stage.name}: cached, inputs and config unchanged ({final})")
        else:
            ctx.log(f"{stage.name}: running")
            with atomic_dir(final) as tmp:
                ctx.out, ctx.stage_key, ctx.force = tmp, key, force
                result = stage.module.run(current, stage.config, ctx)
                result.path, result.key, result.stage = tmp, key, stage.name
                result.files = hash_dir(tmp)
                result.save_meta()
            result.path = final
            current = result
        outcomes.append(StageOutcome(stage.name, key, current.sha256, current.cached, round(time.perf_counter() - started, 2), current.metrics, current.info))
    return current, outcomes
