"""How robust is the demo? Fine-tunes the demo task with the rpi5 default profile's recipe for several
seeds and thread counts and prints the spread of test exact match (the number the demo's gate reads).

    .venv/bin/python bench/bench_demo_spread.py                      # seeds 0-4 x threads 1,2 (~10 runs)
    .venv/bin/python bench/bench_demo_spread.py --base ../shared/repro/demo-0.696/base
    .venv/bin/python bench/bench_demo_spread.py --seeds 0 1 --threads 1 --set epochs=6 --set lr=0.003
    .venv/bin/python bench/bench_demo_spread.py --pretrain-seeds 0 1 2  # also vary the base's pretraining

Each run is the real finetune stage (QLoRA, the profile's config, its evaluation on the test split), in
this process, one after another (never two torch jobs at once on a small machine). The goal it checks:
exact match >= 0.9 for every seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL = 0.9


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="arm-int8", help="profile whose finetune stage is run (default arm-int8, rpi5's)")
    parser.add_argument("--base", type=Path, help="base model dir (default: the demo base, pretrained once and cached)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pretrain-seeds", type=int, nargs="*", default=[],
                        help="also pretrain the demo base with these seeds (each ~1-2 min) and fine-tune each (seed 0, first thread count)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a finetune config field")
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    args = parser.parse_args()

    import torch
    from rich.progress import Progress

    from edgeft import pipeline, quiet_libraries
    from edgeft.config import load_profile, load_target
    from edgeft.context import BuildContext
    from edgeft.data import load_splits
    from edgeft.demo import base as demo_base
    from edgeft.stages import finetune

    quiet_libraries()
    profile = load_profile(args.profile)
    stage_config = next(item["finetune"] for item in profile.stages if "finetune" in item)
    overrides = {key: _value(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = finetune.FinetuneConfig.model_validate({**stage_config, **overrides})
    splits = load_splits(None, profile.data)
    target = load_target("rpi5")

    bases: list[tuple[str, Path, list[tuple[int, int]]]] = []
    grid = [(seed, threads) for threads in args.threads for seed in args.seeds]
    bases.append(("given" if args.base else "demo", args.base or demo_base.demo_base_dir(), grid))
    scratch = Path(tempfile.mkdtemp(prefix="edgeft-spread-"))
    for pretrain_seed in args.pretrain_seeds:
        out = scratch / f"base-seed{pretrain_seed}"
        torch.set_num_threads(args.threads[0])
        t0 = time.perf_counter()
        demo_base.build(out, seed=pretrain_seed)
        print(f"pretrained base seed {pretrain_seed} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        bases.append((f"pretrain-seed{pretrain_seed}", out, [(0, args.threads[0])]))

    print(f"finetune config: {config.model_dump_json()}", file=sys.stderr)
    rows = []
    for base_name, base_dir, runs in bases:
        base = pipeline.base_artifact(base_dir)
        for seed, threads in runs:
            torch.set_num_threads(threads)
            out = Path(tempfile.mkdtemp(dir=scratch))
            ctx = BuildContext(base=base, splits=splits, target=target, profile=profile, out=out,
                               progress=Progress(disable=True), log=lambda _: None, threads=threads)
            t0 = time.perf_counter()
            artifact = finetune.run(base, config.model_copy(update={"seed": seed}), ctx)
            row = {"base": base_name, "seed": seed, "threads": threads, "exact_match": round(artifact.metrics["accuracy"], 4),
                   "val_loss": artifact.metrics["val_loss"], "steps": artifact.metrics["train_steps"], "s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"{base_name:>16}  seed {seed}  threads {threads}  exact match {row['exact_match']:.4f}  "
                  f"val loss {row['val_loss']}  {row['steps']} steps  {row['s']} s", flush=True)

    scores = [r["exact_match"] for r in rows]
    below = [r for r in rows if r["exact_match"] < GOAL]
    print(f"\nexact match over {len(scores)} runs: min {min(scores):.4f} / median {statistics.median(scores):.4f} / "
          f"max {max(scores):.4f}; spread {max(scores) - min(scores):.4f}; {len(below)} below {GOAL}")
    if args.json:
        args.json.write_text(json.dumps({"config": config.model_dump(), "runs": rows}, indent=2))
    return 0 if not below else 1


if __name__ == "__main__":
    sys.exit(main())
