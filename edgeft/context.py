"""What every stage receives besides its input artifact and its config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifact import Artifact
from .config import Profile, Target
from .data import Splits


@dataclass
class BuildContext:
    base: Artifact  # the base model, always at hand (merge reloads it; accuracy is reported against it)
    splits: Splits
    target: Target
    profile: Profile
    out: Path  # where the running stage writes its files (a temp dir the pipeline commits atomically)
    progress: Any = None  # a rich Progress, or None when quiet
    log: Any = print  # one-line status messages
    threads: int = 2  # host threads for torch
    stage_key: str = ""  # the running stage's cache key (finetune keeps its resumable checkpoints under it)
    force: bool = False  # --force: re-run from scratch (no resuming from checkpoints either)
