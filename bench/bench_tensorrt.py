"""TensorRT on a GPU machine or a Jetson: engine build time, cached-engine reuse, fp16 vs int8 latency.

Builds the demo's Jetson bundles (profiles jetson-fp16 and jetson-int8) on the host, then measures each
twice with the runner on this machine: the first run builds the engine (timed), the second must find
it in the engine cache. Prints host wall p50 and GPU compute p50 (CUDA events, like trtexec), and the
int8/fp16 ratios from the same run. Needs `tensorrt` and a CUDA GPU here; fails in one line otherwise.

Usage: .venv/bin/python bench/bench_tensorrt.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeft.cli", *args], capture_output=True, text=True, cwd=ROOT, env=os.environ)


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for profile in ("jetson-fp16", "jetson-int8"):
            out = Path(tmp) / profile
            built = run("build", "-t", "jetson-orin", "-p", profile, "--out", str(out), "--no-measure", "-q")
            if built.returncode != 0:
                sys.exit(f"{profile}: build failed: {built.stderr.strip().splitlines()[-1:]}")
            runs = []
            for _ in range(2):  # first: engine built on this GPU; second: from the engine cache
                measured = run("measure", str(out), "--json", "-q")
                if measured.returncode not in (0, 1):
                    sys.exit(f"{profile}: measure failed: {(measured.stderr.strip().splitlines() or ['?'])[-1]}")
                runs.append(json.loads(measured.stdout))
            results[profile] = runs
    print("TensorRT, demo model, runner on this machine")
    print(f"  {'profile':12} {'engine build s':>14} {'2nd run cached':>14} {'p50 ms':>8} {'GPU p50 ms':>10} {'tok/s':>8} {'exact':>6}")
    for profile, (first, second) in results.items():
        engine = first["runtime"]["engine"]
        gpu = second["latency_ms"].get("device_compute", {}).get("p50")
        print(f"  {profile:12} {engine['build_s'] or 0:14.1f} {str(second['runtime']['engine']['cached']):>14} "
              f"{second['latency_ms']['p50']:8.3f} {gpu if gpu is not None else float('nan'):10.3f} "
              f"{second['decode_tokens_per_s']:8.0f} {second['accuracy']['device']:6.3f}")
    fp16, int8 = results["jetson-fp16"][1], results["jetson-int8"][1]
    print(f"  int8/fp16: p50 {int8['latency_ms']['p50'] / fp16['latency_ms']['p50']:.2f}x, "
          f"decode {int8['decode_tokens_per_s'] / fp16['decode_tokens_per_s']:.2f}x, "
          f"size {int8['model']['size_bytes'] / fp16['model']['size_bytes']:.2f}x")
    print(f"  device: {fp16['runtime']['providers']}")


if __name__ == "__main__":
    main()
