"""edgeft's artifacts against onnxruntime-genai on the same saved model: decode tok/s, first token, peak RSS.

Per model (a ~20M and a ~220M random Llama, saved once as a Hugging Face dir), per precision (fp32, int8,
int4), three artifacts of the same weights:
- edgeft fused: `export graph: fused` (onnxruntime-genai's builder, fp32) + edgeft's quantize stage, run by
  the runner's onnxruntime backend (in-place KV cache, IO binding);
- edgeft generic: `export graph: generic` (torch.onnx) + the same quantize, the same backend;
- genai: onnxruntime-genai's builder at that precision (`-p fp32|int8|int4 -e cpu`; its int8 is 8-bit
  weight-only MatMulNBits, which edgeft calls int8-weight: precision int8w compares those two, int8
  compares edgeft's int8-dynamic with it), run by its own Generator (greedy).
Each round times every artifact in a rotating order, --reps generations each (a prefill of --prompt-tokens,
then --decode-tokens one-token greedy steps, 1 thread), keeping the fastest (on a shared machine, the one
least disturbed); printed are medians over rounds and the per-round ratio edgeft/genai as median
(min..max), so a noisy machine moves both sides of a ratio together. Every artifact must generate the
same tokens as genai's of its precision (fp32 always; quantized ones where the quantizers agree). Peak RSS: each artifact
once more in a fresh process (VmHWM after load + one generation). Also the one-core streaming bandwidth
(numpy int64 sum over 1 GB) and the share of it the best decode reaches (weight bytes read per token x tok/s).

Slow and torch-heavy (builds ~18 artifacts; the 220M model ~10 min on 2 cores): run it alone.

Usage: .venv/bin/python bench/bench_peers.py [--models 20m 220m] [--precisions fp32 int8 int8w int4] [--rounds 5]
       [--work /tmp/edgeft-peers] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "runner"), str(ROOT / "tests")]

MODELS = {  # random weights; GQA like the real small Llamas
    "20m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 2, "vocab_size": 8000},
    "220m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 14, "num_attention_heads": 16,
             "num_key_value_heads": 4, "vocab_size": 32000},
}
# precision -> edgeft's quantize mode, and genai's builder precision of the same kind: int8 is edgeft's dynamic
# int8 (int8 compute) against genai's int8 (8-bit MatMulNBits, weight-only); int8w is the same kind on both.
QUANTIZE_MODE = {"fp32": "fp32", "int8": "int8-dynamic", "int8w": "int8-weight", "int4": "int4-weight"}
GENAI_PRECISION = {"fp32": "fp32", "int8": "int8", "int8w": "int8", "int4": "int4"}
KINDS = ("fused", "generic", "genai")


def make_model(name: str, out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODELS[name], max_position_embeddings=1024, tie_word_embeddings=False,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    model.save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out


def build_artifacts(hf: Path, work: Path, precisions: list[str]) -> dict[tuple[str, str], Path]:
    """(kind, precision) -> the artifact (an .onnx for edgeft, a folder for genai); built once, reused."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.stages.export import export_fused, export_onnx, model_shape
    from edgeft.stages.quantize import QuantizeConfig, quantize

    artifacts = {}
    model = None
    for kind in ("fused", "generic"):
        fp32 = work / f"{kind}-fp32" / "model.onnx"
        if not fp32.is_file():
            model = model or AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
            tmp = fp32.parent.with_name(fp32.parent.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if kind == "fused":
                export_fused(hf, tmp / "model.onnx", model_shape(model.config), threads=os.cpu_count() or 1)
            else:
                export_onnx(model, tmp / "model.onnx", opset=18)
            tmp.rename(fp32.parent)
        for precision in precisions:
            out = work / f"{kind}-{precision}" / "model.onnx"
            if not out.is_file():
                tmp = out.parent.with_name(out.parent.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                quantize(fp32, tmp / "model.onnx", QuantizeConfig(mode=QUANTIZE_MODE[precision]))
                tmp.rename(out.parent)
            artifacts[(kind, precision)] = out
    for precision in precisions:
        out = work / f"genai-{GENAI_PRECISION[precision]}"
        if not (out / "genai_config.json").is_file():
            tmp = out.with_name(out.name + ".tmp")
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
                            "-p", GENAI_PRECISION[precision], "-e", "cpu", "-c", str(work / "genai-cache")], check=True,
                           capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            config = json.loads((tmp / "genai_config.json").read_text())
            options = config["model"]["decoder"].setdefault("session_options", {})
            options.update({"intra_op_num_threads": 1, "inter_op_num_threads": 1})
            (tmp / "genai_config.json").write_text(json.dumps(config, indent=2))
            tmp.rename(out)
        artifacts[("genai", precision)] = out
    return artifacts


class EdgeftRun:
    def __init__(self, path: Path):
        from edgeft_runner.backends import create_backend

        self.backend = create_backend("onnxruntime")
        self.backend.load(path, 1)

    def generate(self, prompt: np.ndarray, steps: int) -> tuple[float, float, list[int]]:
        """(first token ms, decode tok/s, tokens): the runner's greedy loop, argmax of the last position."""
        backend = self.backend
        started = time.perf_counter()
        logits, past = backend.forward(prompt, backend.empty_past())
        token = np.asarray([[int(logits[0, -1].argmax())]], dtype=np.int64)
        first = time.perf_counter()
        tokens = [int(token[0, 0])]
        for _ in range(steps):
            logits, past = backend.forward(token, past)
            token[0, 0] = int(logits[0, -1].argmax())
            tokens.append(int(token[0, 0]))
        done = time.perf_counter()
        return (first - started) * 1e3, steps / (done - first), tokens


class GenaiRun:
    def __init__(self, path: Path):
        import onnxruntime_genai as og

        og.disable_telemetry_events()
        self.og, self.model = og, og.Model(str(path))

    def generate(self, prompt: np.ndarray, steps: int) -> tuple[float, float, list[int]]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=prompt.shape[1] + steps + 1, do_sample=False)
        generator = og.Generator(self.model, params)
        started = time.perf_counter()
        generator.append_tokens(prompt)  # the prefill, and the first token's logits
        generator.generate_next_token()
        first = time.perf_counter()
        for _ in range(steps):
            generator.generate_next_token()
        done = time.perf_counter()
        sequence = generator.get_sequence(0)
        return (first - started) * 1e3, steps / (done - first), [int(t) for t in sequence[prompt.shape[1]:]]


PEAK = r"""
import sys, json
sys.path[:0] = sys.argv[4:]
import numpy as np
from bench_peers import EdgeftRun, GenaiRun
kind, path, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
run = GenaiRun(path) if kind == "genai" else EdgeftRun(path)
run.generate(np.asarray([tokens["prompt"]], dtype=np.int64), tokens["steps"])
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def peak_rss(kind: str, path: Path, prompt: np.ndarray, steps: int) -> int:
    result = subprocess.run([sys.executable, "-c", PEAK, kind, str(path), json.dumps({"prompt": prompt[0].tolist(), "steps": steps}),
                             str(ROOT / "bench"), str(ROOT), str(ROOT / "runner")], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def stream_gb_per_s() -> float:
    """One core reading memory: numpy's int64 sum over 1 GB (the cheapest reduction numpy vectorises, so
    the read is what limits it), best of 5."""
    data = np.ones(1 << 27, dtype=np.int64)
    best = min(_timed(data.sum) for _ in range(5))
    return data.nbytes / best / 1e9


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def weight_bytes(path: Path) -> int:
    """Bytes of the artifact's model files: an upper bound of the weights read per decoded token (the
    embedding is read one row a token)."""
    folder = path if path.is_dir() else path.parent
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def spread(values: list[float]) -> str:
    return f"{np.median(values):.2f}x ({min(values):.2f}..{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["20m", "220m"])
    parser.add_argument("--precisions", nargs="+", choices=sorted(QUANTIZE_MODE), default=["fp32", "int8", "int8w", "int4"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3, help="generations per artifact and round (the fastest counts)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeft-peers"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    bandwidth = stream_gb_per_s()
    print(f"one-core streaming read: {bandwidth:.1f} GB/s")
    results = {"stream_gb_per_s": bandwidth, "models": {}}
    for name in args.models:
        work = args.work / name
        hf = make_model(name, work / "hf")
        artifacts = build_artifacts(hf, work, args.precisions)
        prompt = (np.arange(args.prompt_tokens, dtype=np.int64)[None] * 7 + 3) % 300
        runs = {key: (GenaiRun(path) if key[0] == "genai" else EdgeftRun(path)) for key, path in artifacts.items()}
        for run in runs.values():
            run.generate(prompt, 4)  # warm: first-run allocations and thread pools
        samples = {key: [] for key in runs}
        tokens = {}
        order = list(runs)
        for round_index in range(args.rounds):
            rotated = order[round_index % len(order):] + order[:round_index % len(order)]
            for key in rotated:
                generations = [runs[key].generate(prompt, args.decode_tokens) for _ in range(args.reps)]
                samples[key].append((min(g[0] for g in generations), max(g[1] for g in generations)))
                tokens[key] = generations[0][2]
        del runs
        for kind in ("fused", "generic"):
            if "fp32" in args.precisions and tokens[(kind, "fp32")] != tokens[("genai", "fp32")]:
                sys.exit(f"error: {name}: edgeft {kind} fp32 generates other tokens than genai's fp32: the artifacts differ")
        print(f"\n{name} ({args.prompt_tokens}-token prompt, {args.decode_tokens} decode steps, 1 thread, {args.rounds} rounds)")
        print(f"{'precision':9s} {'artifact':8s} {'first ms':>9s} {'tok/s':>8s} {'peak RSS':>9s} {'weights':>9s} {'% stream':>8s}")
        model_results = {}
        for precision in args.precisions:
            for kind in KINDS:
                key = (kind, precision)
                first = float(np.median([s[0] for s in samples[key]]))
                rate = float(np.median([s[1] for s in samples[key]]))
                rss = peak_rss(kind, artifacts[key], prompt, 8)
                weights = weight_bytes(artifacts[key])
                share = weights * rate / (bandwidth * 1e9) * 100
                model_results[f"{kind}-{precision}"] = {"first_token_ms": first, "decode_tokens_per_s": rate,
                                                        "peak_rss_bytes": rss, "weight_bytes": weights, "stream_percent": share}
                print(f"{precision:9s} {kind:8s} {first:9.2f} {rate:8.1f} {rss / 1e6:7.0f}MB {weights / 1e6:7.1f}MB {share:7.0f}%")
            for kind in ("fused", "generic"):
                decode = [e[1] / g[1] for e, g in zip(samples[(kind, precision)], samples[("genai", precision)])]
                first = [e[0] / g[0] for e, g in zip(samples[(kind, precision)], samples[("genai", precision)])]
                model_results[f"{kind}-{precision}"]["vs_genai"] = {"decode": decode, "first_token": first}
                same = "same tokens" if tokens[(kind, precision)] == tokens[("genai", precision)] else "other tokens"
                print(f"  edgeft {kind} / genai, {precision}: decode tok/s {spread(decode)}, first-token time {spread(first)} ({same})")
        results["models"][name] = model_results
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
