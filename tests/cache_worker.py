"""One tiny stage built through the real pipeline (cache key, entry lock, atomic entry): the cache tests
run it as separate processes, or in-process via `build`.

    python tests/cache_worker.py BASE_DIR DATA_FILE [WORDS]

prints the pipeline's log lines, then one JSON line: the outcome (cached, key, sha256, path, builder_pid).
TOY_MARKER_DIR: where the stage notes that it started (started-<pid>, holding its temp dir);
TOY_SLEEP_S: how long it pauses halfway through writing its output (a window to SIGKILL it in).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from edgeft import pipeline
from edgeft.artifact import Artifact, cache_root
from edgeft.config import load_profile, load_target
from edgeft.context import BuildContext
from edgeft.data import load_splits


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    words: int = 1000  # bytes per output file


def run(model: Artifact, config: ToyConfig, ctx: BuildContext) -> Artifact:
    markers = os.environ.get("TOY_MARKER_DIR")
    if markers:
        (Path(markers) / f"started-{os.getpid()}").write_text(str(ctx.out))
    (ctx.out / "part1.txt").write_text("x" * config.words)
    time.sleep(float(os.environ.get("TOY_SLEEP_S", "0")))  # half written: a kill here leaves a half temp dir
    (ctx.out / "part2.txt").write_text("y" * config.words)
    return Artifact(path=ctx.out, kind="toy", stage="toy", key="", metrics={"builder_pid": os.getpid()})


def build(base_dir: Path, data: Path, words: int = 1000, log=print) -> tuple[Artifact, pipeline.StageOutcome]:
    stage = pipeline.PlannedStage("toy", sys.modules[__name__], ToyConfig(words=words))
    ctx = BuildContext(base=pipeline.base_artifact(Path(base_dir)), splits=load_splits(Path(data)), target=load_target("rpi5"),
                       profile=load_profile("arm-int8"), out=cache_root(), log=log)
    final, (outcome,) = pipeline.run([stage], ctx)
    return final, outcome


if __name__ == "__main__":
    sys.modules.setdefault("cache_worker", sys.modules["__main__"])
    final, outcome = build(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1000,
                           log=lambda line: print(line, flush=True))
    print(json.dumps({"cached": outcome.cached, "key": outcome.key, "sha256": outcome.sha256, "path": str(final.path),
                      "builder_pid": final.metrics["builder_pid"]}), flush=True)
