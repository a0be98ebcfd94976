"""Benchmarks for the spine, printed as ratios measured in one run (they hold on a noisy machine).

1. The demo build: cold (empty cache, includes pretraining the demo base) vs warm (everything cached).
2. Each precision (int8 dynamic, int8 static, int4) vs fp32 on the demo model: size, p50 latency,
   decode tokens/s and on-device accuracy, from real builds.
3. The runner's p50 vs a bare onnxruntime loop on the same model file, same input, same threads.
4. int8 / int8-static / int4 vs fp32 on a ~20M-parameter random Llama (hidden 512), where quantization has room
   to show: size, prefill p50 and decode tokens/s.

Usage: .venv/bin/python bench/bench_build.py [--skip-cold]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def edgeft(cache: Path, *args) -> tuple[float, dict]:
    env = {**os.environ, "EDGEFT_CACHE": str(cache)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "edgeft.cli", "build", "--json", "-q", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - started
    if result.returncode not in (0, 1):
        sys.exit(f"build failed: {result.stderr[-2000:]}")
    return elapsed, json.loads(result.stdout)


def bare_ort_p50(model: Path, prompt_tokens: int, threads: int, iters: int) -> float:
    """The baseline: a plain onnxruntime session and loop, nothing of edgeft in between."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feed = {"input_ids": (3 + np.arange(prompt_tokens, dtype=np.int64) % 300).reshape(1, -1), "attention_mask": np.ones((1, prompt_tokens), dtype=np.int64)}
    for item in session.get_inputs():
        if item.name.startswith("past_key_values."):
            feed[item.name] = np.zeros((1, item.shape[1], 0, item.shape[3]), dtype=np.float32)
    for _ in range(20):
        session.run(None, feed)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def runner_p50(bundle: Path, threads: int) -> float:
    from edgeft.runner_app import build_runner_zipapp

    with tempfile.TemporaryDirectory() as tmp:
        runner = Path(tmp) / "r.pyz"
        build_runner_zipapp(runner)
        subprocess.run([sys.executable, str(runner), "run", "--bundle", str(bundle), "--report", f"{tmp}/r.json", "--threads", str(threads)], check=True, capture_output=True)
        return json.loads(Path(f"{tmp}/r.json").read_text())["latency_ms"]["p50"]


def measure_precisions(paths: dict, prompt, threads: int, min_iters: int, options: dict | None = None) -> dict:
    """Each model file through the runner's backend: size, prompt p50 (ms), decode tokens/s (32 steps)."""
    from edgeft import lm
    from edgeft_runner.measure import first_token_and_decode, summarize_ms, time_repeated

    results = {}
    for name, path in paths.items():
        backend = lm.load(path, threads=threads, options=options)
        samples = time_repeated(lambda: backend.forward(prompt, backend.empty_past()), 0.5, 2.0, min_iters).samples_ms
        decode = first_token_and_decode(backend, prompt, 32, 5)
        results[name] = {"size": path.stat().st_size, "p50": summarize_ms(samples)["p50"], "tok_s": decode["decode_tokens_per_s"]}
    return results


def print_precision_table(results: dict, indent: str) -> None:
    """Absolute figures and ratios vs results["fp32"] of the same run."""
    base = results["fp32"]
    print(f"{indent}{'precision':13} {'size MB':>8} {'size x':>7} {'p50 ms':>8} {'p50 x':>6} {'tok/s':>8} {'tok/s x':>8}")
    for name, r in results.items():
        print(f"{indent}{name:13} {r['size'] / 1e6:8.1f} {r['size'] / base['size']:7.2f} {r['p50']:8.2f} {r['p50'] / base['p50']:6.2f} "
              f"{r['tok_s']:8.0f} {r['tok_s'] / base['tok_s']:8.2f}")


def big_model_quantization(threads: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeft.stages.export import export_onnx
    from edgeft.stages.quantize import QuantizeConfig, quantize
    from edgeft_runner.measure import prompt_ids

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(model, fp32, opset=18)
        paths = {"fp32": fp32}
        calibration_rows = [list(3 + (np.arange(48) * (i + 7)) % (config.vocab_size - 3)) for i in range(16)]
        for mode, name in (("int8-dynamic", "int8"), ("int8-static", "int8-static"), ("int4-weight", "int4")):
            paths[name] = Path(tmp) / f"{name}.onnx"
            quantize(fp32, paths[name], QuantizeConfig(mode=mode), calibration_rows)
        results = measure_precisions(paths, prompt_ids(64, config.vocab_size), threads, min_iters=30)
    print(f"\n[4] random Llama, {params / 1e6:.1f}M params, prefill 64 tokens, decode 32, {threads} thread(s)")
    print_precision_table(results, indent="    ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-cold", action="store_true", help="reuse ~/.cache/edgeft instead of timing a cold build")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(os.environ.get("EDGEFT_CACHE", Path.home() / ".cache" / "edgeft")) if args.skip_cold else Path(tmp) / "cache"
        out = Path(tmp)
        cold_s, int8 = edgeft(cache, "--target", "rpi5", "--out", out / "int8")
        warm_s, _ = edgeft(cache, "--target", "rpi5", "--out", out / "int8-again")
        print(f"[1] demo build: {'cold' if not args.skip_cold else 'first'} {cold_s:.1f} s, warm {warm_s:.1f} s (warm/cold {warm_s / cold_s:.2f})")
        reports = {"fp32": edgeft(cache, "-t", "rpi5", "-p", "arm-fp32", "--out", out / "fp32")[1], "int8": int8}
        for precision in ("int8-static", "int4"):
            reports[precision] = edgeft(cache, "-t", "rpi5", "-p", f"arm-{precision}", "--out", out / precision)[1]
        fp32 = reports["fp32"]
        print("[2] demo model (0.8M params, 32-token prefill) per precision vs fp32, measured by the runner on this machine:")
        print(f"    {'precision':12} {'size x':>7} {'p50 x':>6} {'tok/s x':>8} {'exact match':>12} {'delta':>7}")
        for precision, r in reports.items():
            print(f"    {precision:12} {r['model']['size_bytes'] / fp32['model']['size_bytes']:7.2f} {r['latency_ms']['p50'] / fp32['latency_ms']['p50']:6.2f} "
                  f"{r['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:8.2f} {r['accuracy']['device']:12.3f} {r['accuracy']['device'] - fp32['accuracy']['device']:+7.3f}")
        bundle = out / "int8"
        prompt_tokens = int8["latency_ms"]["prompt_tokens"]
        pairs = [(runner_p50(bundle, args.threads), bare_ort_p50(bundle / "model.onnx", prompt_tokens, args.threads, 300)) for _ in range(3)]
        runner_ms, bare_ms = (float(np.median([p[i] for p in pairs])) for i in (0, 1))
        print(f"[3] runner p50 {runner_ms:.3f} ms vs bare onnxruntime loop {bare_ms:.3f} ms: {runner_ms / bare_ms:.2f}x")
    big_model_quantization(args.threads)


if __name__ == "__main__":
    main()
