"""The runner's own overhead: its forward p50 vs a bare onnxruntime loop, same model, input and threads.

Goal: within ±3%. Measured interleaved in one process so machine load hits both alike: each round
times the runner's measurement path (its backend's forward, in its timed loop, with its telemetry sampler
running) and a bare `session.run(None, feed)` loop on a plain session with the same options (in
alternating order), and the figure is the median of the per-round p50 ratios.

Two bare sessions are made, one before and one after the runner's, and each round compares with the mean
of their p50s: of two identical sessions in one process, the later-created one measured ~1.5-2% faster
here (whichever kind it was), which alone would tilt a one-session comparison.

Two models: the demo bundle's model (0.8M parameters, per-op overhead dominates, so the runner's Python
shows most) and a ~20M random Llama (hidden 512, 4 layers) exported by edgeft's own ONNX exporter.

Usage: .venv/bin/python bench/bench_runner_overhead.py [--bundle /tmp/dev-bundle-rpi5] [--rounds 15]
(the bundle: any `edgeft build` output dir, e.g. `edgeft build -t rpi5 --out /tmp/dev-bundle-rpi5`)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "runner"))

import onnxruntime as ort  # noqa: E402

from edgeft import quiet_libraries  # noqa: E402
from edgeft_runner.backends import create_backend  # noqa: E402
from edgeft_runner.measure import prompt_ids, time_repeated  # noqa: E402
from edgeft_runner.telemetry import TelemetrySampler  # noqa: E402
from edgeft_runner.telemetry.thermal import default_sysfs_root  # noqa: E402


def bare_session(model: Path, threads: int) -> ort.InferenceSession:
    """A plain session with the runner's options (threads, one inter-op thread, no spinning)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def bare_p50(session: ort.InferenceSession, feed: dict, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000.0


def compare(label: str, model: Path, vocab_size: int, prompt_tokens: int, threads: int, rounds: int, iters: int,
            num_kv_heads: int | None = None, head_dim: int | None = None) -> float:
    bare_before = bare_session(model, threads)
    backend = create_backend("onnxruntime")
    backend.load(model, threads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    bare_after = bare_session(model, threads)
    prompt = prompt_ids(prompt_tokens, vocab_size)
    empty_past = backend.empty_past()
    feed = {"input_ids": prompt, **dict(zip(backend.past_names, empty_past))}
    if backend.takes_attention_mask:
        feed["attention_mask"] = np.ones((1, prompt_tokens), dtype=np.int64)

    def runner_round() -> float:
        with TelemetrySampler(default_sysfs_root()):  # the runner samples telemetry all through its loop
            loop = time_repeated(lambda: backend.forward(prompt, empty_past), warmup_s=0.05, min_s=0.0, min_iters=iters)
        return float(np.median(loop.samples_ms))

    def bare_round() -> float:
        p50s = []
        for session in (bare_before, bare_after):
            for _ in range(5):
                session.run(None, feed)
            p50s.append(bare_p50(session, feed, iters))
        return float(np.mean(p50s))

    runner_round(), bare_round()  # first-call allocations out of the way
    runner_ms, bare_ms, ratios = [], [], []
    for index in range(rounds):
        if index % 2:  # alternate the order, so a slow drift of the machine favours neither side
            b = bare_round()
            r = runner_round()
        else:
            r = runner_round()
            b = bare_round()
        runner_ms.append(r)
        bare_ms.append(b)
        ratios.append(r / b)
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    verdict = "ok" if abs(median - 1) <= 0.03 else "OVER the ±3% goal"
    print(f"{label}: runner p50 {np.median(runner_ms):.3f} ms vs bare onnxruntime {np.median(bare_ms):.3f} ms "
          f"({prompt_tokens} tokens, {threads} thread(s), {rounds} rounds x {iters} calls): "
          f"ratio {median:.3f} (IQR {q1:.3f}-{q3:.3f}) {verdict}")
    return float(median)


def twenty_m_model(tmp: Path) -> tuple[Path, int, int]:
    """A random Llama of ~20M parameters (hidden 512, 4 layers), exported like every edgeft bundle."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeft.stages.export import export_onnx

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    path = tmp / "llama-20m.onnx"
    export_onnx(model, path, opset=18)
    return path, config.vocab_size, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/dev-bundle-rpi5"), help="a demo bundle dir (edgeft build --out)")
    parser.add_argument("--threads", type=int, help="default: the bundle's threads, capped at this machine's cores (as the runner does)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=300, help="timed calls per round and side (demo model; a tenth of it, at least 30, for the 20M one)")
    parser.add_argument("--skip-20m", action="store_true", help="only the demo model (no torch export)")
    args = parser.parse_args()
    manifest_path = args.bundle / "manifest.json"
    if not manifest_path.is_file():
        sys.exit(f"error: {args.bundle}: no manifest.json; build the demo bundle first: edgeft build -t rpi5 --out {args.bundle}")
    manifest = json.loads(manifest_path.read_text())
    model = manifest["model"]
    threads = args.threads or min(int(manifest.get("threads") or 1), os.cpu_count() or 1)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (figures are only meaningful on an idle machine)")
    compare(f"demo model ({args.bundle / model['file']})", args.bundle / model["file"], model["vocab_size"],
            int(manifest["measure"]["prompt_tokens"]), threads, args.rounds, args.iters, model.get("num_kv_heads"), model.get("head_dim"))
    if not args.skip_20m:
        quiet_libraries()
        with tempfile.TemporaryDirectory(prefix="edgeft-bench-") as tmp:
            path, vocab_size, params = twenty_m_model(Path(tmp))
            compare(f"random Llama {params / 1e6:.1f}M", path, vocab_size, 64, threads, args.rounds, max(30, args.iters // 10))


if __name__ == "__main__":
    main()
