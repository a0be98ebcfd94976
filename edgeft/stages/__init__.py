"""The stages a profile may list, by name. This dict is the whole registry."""

from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError
from . import distill, export, finetune, merge, prune, quantize

STAGES: dict[str, ModuleType] = {
    "finetune": finetune,
    "merge": merge,
    "export": export,
    "quantize": quantize,
    "prune": prune,
    "distill": distill,
}


def stage_module(name: str, where: str) -> ModuleType:
    if name not in STAGES:
        raise ConfigError(f"{where}: unknown stage {name!r} (known: {', '.join(STAGES)})")
    return STAGES[name]
