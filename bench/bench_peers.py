"""edgeft's artifacts against onnxruntime-genai on the same saved model: decode tok/s, first token, peak RSS,
agreement with fp32, and the share of one core's memory bandwidth a decode reaches.

Per model (a ~20M and a ~220M random Llama, saved once as a Hugging Face dir), per variant, artifacts of the
same weights:
- edgeft fused: `export graph: fused` (onnxruntime-genai's builder, fp32) + edgeft's quantize stage, run by
  the runner's onnxruntime backend (in-place KV cache, IO binding);
- edgeft generic: `export graph: generic` (torch.onnx) + the same quantize, the same backend (for the
  variants genai also builds: fp32, int8, int8w, int4);
- genai: onnxruntime-genai's builder at that precision (`-p fp32|int8|int4 -e cpu`: its int8 is 8-bit
  weight-only MatMulNBits, which edgeft calls int8-weight; int4 and int8 in blocks of 32 weights, accuracy
  level 4), run by its own Generator (greedy).
Variants (VARIANTS): genai's own configurations (int8w, int4), edgeft's int8-dynamic (int8), and what genai's
builder does not choose: blocks of 128 weights (-b128) and a mixed-precision output projection (-h4: an
int4 lm_head under int8 blocks, dynamic or weight-only; -h8: an int8 lm_head under int4 blocks).
Each round times every artifact in a rotating order, --reps generations each (a prefill of --prompt-tokens,
then --decode-tokens one-token greedy steps, 1 thread), keeping the fastest (on a shared machine, the one
least disturbed); printed are medians over rounds and the per-round ratio edgeft/genai as median
(min..max), so a noisy machine moves both sides of a ratio together. edgeft's fp32 must generate genai's
fp32 tokens. "top1": the share of prompt positions whose next-token argmax (teacher-forced prefill) equals
the fp32 model's: random weights make logits nearly flat, so this is a harsh, relative measure of
quantization error. Peak RSS: each artifact once more in a fresh process (VmHWM after load + one
generation). Bandwidth: one core's streaming read (glibc memchr over 1 GiB of touched memory, best of 5),
taken before the rounds and in each, the best counting (a neighbour's load lowers it: 8-11 GB/s seen);
"% stream" is the bytes a decode step must read (every weight once, an embedding table one row) x tok/s
over it.

Slow and torch-heavy (the 220M model ~15 min on 2 cores): run it alone.

Usage: .venv/bin/python bench/bench_peers.py [--models 20m 220m] [--variants fp32 int8 int4 int4-b128 ...] [--rounds 5]
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
# variant -> edgeft's quantize settings, and genai's builder precision it is compared with: int8 is edgeft's
# dynamic int8 (int8 compute) against genai's int8 (8-bit MatMulNBits, weight-only); int8w and int4 are genai's
# own configurations; -b128 and -h4/-h8 are choices genai's builder does not make.
VARIANTS = {
    "fp32": ({"mode": "fp32"}, "fp32"),
    "int8": ({"mode": "int8-dynamic"}, "int8"),
    "int8-h4": ({"mode": "int8-dynamic", "lm_head": "int4"}, "int8"),
    "int8w": ({"mode": "int8-weight"}, "int8"),
    "int8w-b128": ({"mode": "int8-weight", "block_size": 128}, "int8"),
    "int8w-b128-h4": ({"mode": "int8-weight", "block_size": 128, "lm_head": "int4"}, "int8"),
    "int4": ({"mode": "int4-weight"}, "int4"),
    "int4-b128": ({"mode": "int4-weight", "block_size": 128}, "int4"),
    "int4-b128-h8": ({"mode": "int4-weight", "block_size": 128, "lm_head": "int8"}, "int4"),
}
GENERIC_TOO = ("fp32", "int8", "int8w", "int4")  # the generic export's rows: the variants genai also builds


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


def build_artifacts(hf: Path, work: Path, variants: list[str]) -> dict[tuple[str, str], Path]:
    """(kind, variant) -> the artifact (an .onnx for edgeft, a folder for genai, keyed by genai's precision);
    built once, reused."""
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
        for variant in variants:
            if kind == "generic" and variant not in GENERIC_TOO:
                continue
            out = work / f"{kind}-{variant}" / "model.onnx"
            if not out.is_file():
                tmp = out.parent.with_name(out.parent.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                quantize(fp32, tmp / "model.onnx", QuantizeConfig(**VARIANTS[variant][0]))
                tmp.rename(out.parent)
            artifacts[(kind, variant)] = out
    for precision in sorted({VARIANTS[v][1] for v in variants} | {"fp32"}):
        out = work / f"genai-{precision}"
        if not (out / "genai_config.json").is_file():
            tmp = out.with_name(out.name + ".tmp")
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
                            "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")], check=True,
                           capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            config = json.loads((tmp / "genai_config.json").read_text())
            options = config["model"]["decoder"].setdefault("session_options", {})
            options.update({"intra_op_num_threads": 1, "inter_op_num_threads": 1})
            (tmp / "genai_config.json").write_text(json.dumps(config, indent=2))
            tmp.rename(out)
        artifacts[("genai", precision)] = out
    return artifacts


def prompt_logits(path: Path, prompt: np.ndarray, head_dim: int) -> np.ndarray:
    """The artifact's logits at every prompt position, from an empty cache: plain ONNX Runtime on its
    model.onnx (edgeft's and genai's graphs take the same inputs)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path / "model.onnx" if path.is_dir() else path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": prompt, "attention_mask": np.ones_like(prompt)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            feed[value.name] = np.zeros((1, value.shape[1], 0, head_dim), np.float32)
    return session.run(["logits"], feed)[0][0]


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
    """One core reading memory: glibc's memchr (vectorised, one compare per 32-64 bytes, so the read is what
    limits it) over 1 GiB for a byte that is not there, best of 5. The buffer is written first: untouched
    pages all map to one zero page, which reads from cache at ~70 GB/s."""
    import ctypes

    memchr = ctypes.CDLL(None).memchr
    memchr.restype, memchr.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    data = np.full(1 << 30, 7, dtype=np.uint8)
    best = min(_timed(lambda: memchr(data.ctypes.data, 1, data.nbytes)) for _ in range(5))
    return data.nbytes / best / 1e9


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the artifact's weights, bytes a decode step reads): every initializer once, but a table only
    a Gather reads (the token embedding) one row a token."""
    import onnx

    from edgeft.onnx_io import initializer_bytes

    model = onnx.load(str(path / "model.onnx" if path.is_dir() else path))
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    total = read = 0
    for tensor in model.graph.initializer:
        size = initializer_bytes(tensor)
        total += size
        read += size // tensor.dims[0] if readers.get(tensor.name) in ({"Gather"}, {"GatherBlockQuantized"}) else size
    return total, read


def spread(values: list[float]) -> str:
    return f"{np.median(values):.2f}x ({min(values):.2f}..{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["20m", "220m"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3, help="generations per artifact and round (the fastest counts)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeft-peers"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    reads = [stream_gb_per_s()]  # and once a round: the best of them is the machine's, least disturbed
    results = {"models": {}}
    for name in args.models:
        work = args.work / name
        hf = make_model(name, work / "hf")
        artifacts = build_artifacts(hf, work, args.variants)
        prompt = (np.arange(args.prompt_tokens, dtype=np.int64)[None] * 7 + 3) % 300
        head_dim = MODELS[name]["hidden_size"] // MODELS[name]["num_attention_heads"]
        reference = prompt_logits(artifacts[("genai", "fp32")], prompt, head_dim).argmax(-1)
        top1 = {key: float((prompt_logits(path, prompt, head_dim).argmax(-1) == reference).mean()) for key, path in artifacts.items()}
        timed = [key for key in artifacts if key != ("genai", "fp32") or "fp32" in args.variants]
        runs = {key: (GenaiRun(artifacts[key]) if key[0] == "genai" else EdgeftRun(artifacts[key])) for key in timed}
        for run in runs.values():
            run.generate(prompt, 4)  # warm: first-run allocations and thread pools
        samples = {key: [] for key in runs}
        tokens = {}
        for round_index in range(args.rounds):
            reads.append(stream_gb_per_s())
            rotated = timed[round_index % len(timed):] + timed[:round_index % len(timed)]
            for key in rotated:
                generations = [runs[key].generate(prompt, args.decode_tokens) for _ in range(args.reps)]
                samples[key].append((min(g[0] for g in generations), max(g[1] for g in generations)))
                tokens[key] = generations[0][2]
        del runs
        for kind in ("fused", "generic"):
            if "fp32" in args.variants and tokens[(kind, "fp32")] != tokens[("genai", "fp32")]:
                sys.exit(f"error: {name}: edgeft {kind} fp32 generates other tokens than genai's fp32: the artifacts differ")
        bandwidth = max(reads)
        print(f"\none-core streaming read: {bandwidth:.1f} GB/s (best of {len(reads)}, {min(reads):.1f} at worst)")
        print(f"{name} ({args.prompt_tokens}-token prompt, {args.decode_tokens} decode steps, 1 thread, {args.rounds} rounds)")
        print(f"{'variant':13s} {'artifact':8s} {'first ms':>9s} {'tok/s':>8s} {'top1':>5s} {'peak RSS':>9s} {'weights':>9s} "
              f"{'read/tok':>9s} {'% stream':>8s}")
        model_results = {}
        for variant in args.variants:
            genai = ("genai", VARIANTS[variant][1])
            keys = [k for k in (("fused", variant), ("generic", variant), genai) if k in samples]
            for key in keys:
                label = f"{key[0]}-{key[1]}"
                if label not in model_results:
                    first = float(np.median([s[0] for s in samples[key]]))
                    rate = float(np.median([s[1] for s in samples[key]]))
                    total, read = weight_bytes(artifacts[key])
                    model_results[label] = {"first_token_ms": first, "decode_tokens_per_s": rate, "top1_vs_fp32": top1[key],
                                            "peak_rss_bytes": peak_rss(key[0], artifacts[key], prompt, 8), "weight_bytes": total,
                                            "read_bytes_per_token": read, "stream_percent": read * rate / (bandwidth * 1e9) * 100}
                row = model_results[label]
                print(f"{variant if key[0] != 'genai' else '':13s} {key[0]:8s} {row['first_token_ms']:9.2f} {row['decode_tokens_per_s']:8.1f} "
                      f"{row['top1_vs_fp32']:5.2f} {row['peak_rss_bytes'] / 1e6:7.0f}MB {row['weight_bytes'] / 1e6:7.1f}MB "
                      f"{row['read_bytes_per_token'] / 1e6:7.1f}MB {row['stream_percent']:7.0f}%")
            for key in keys[:-1]:
                decode = [e[1] / g[1] for e, g in zip(samples[key], samples[genai])]
                first = [e[0] / g[0] for e, g in zip(samples[key], samples[genai])]
                model_results[f"{key[0]}-{variant}"]["vs_genai"] = {"decode": decode, "first_token": first}
                same = "same tokens" if tokens[key] == tokens[genai] else "other tokens"
                print(f"  edgeft {key[0]} {variant} / genai {genai[1]}: decode tok/s {spread(decode)}, "
                      f"first-token time {spread(first)} ({same})")
        results["models"][name] = model_results
        results.setdefault("stream_gb_per_s", {})[name] = bandwidth
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
