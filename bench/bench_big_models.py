"""Real model sizes end to end: a random-weight Llama of TinyLlama's shape (1.1B) or Llama 3.2 3B's,
built with the profiles' stages (QLoRA for a few steps, merge, export, quantize), measured on this
machine. Prints per stage: seconds, peak RSS and peak RSS over the model's fp32 weight bytes.

Slow (the 1.1B: ~20 min for the first precision, a few minutes for each further one: finetune, merge
and export are cached between them; the 3B: about an hour). A benchmark, not a test.

Usage: .venv/bin/python bench/bench_big_models.py [--shape 1.1b|3b] [--precisions int4 int8 fp16 fp32]
       [--work DIR] [--max-steps 5] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {  # random weights, the real architectures' shapes
    "1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 4096, "tie_word_embeddings": True},
}
# precision -> (target, quantize mode, measured here): TensorRT's fp16 bundle is built, not measured (no GPU here)
PRECISIONS = {"int4": ("rpi5", "int4-weight", True), "int8": ("rpi5", "int8-dynamic", True),
              "fp16": ("jetson-orin", "fp16", False), "fp32": ("rpi5", "fp32", True)}


def make_model(shape: str, out: Path) -> Path:
    """A randomly initialised model of `shape` (fp32 safetensors, 1 GB shards) with the tests' tokenizer."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import tokenizer

    tok = tokenizer()
    config = LlamaConfig(**SHAPES[shape], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty leaves tied weights as two tensors (the 3B's embedding would be saved twice)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02) if param.dim() > 1 else param.fill_(1.0)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="1GB")
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def profile_text(mode: str, max_steps: int, general_text: Path) -> str:
    """A smoke recipe: a few QLoRA steps, small validations, and a short general text (scoring the shipped
    one, ~6K tokens, costs minutes per stage at this size on a CPU). Random weights give flat logits, so
    quantize's top-1 agreement check is off: this measures time and memory, not accuracy."""
    return (
        "stages:\n"
        f"  - finetune: {{method: qlora, r: 16, alpha: 32, epochs: 1, lr: 0.0002, batch_size: 4, max_length: 64, max_steps: {max_steps}, "
        "eval_task_examples: 2}\n"
        "  - merge: {validation_examples: 2}\n"
        "  - export: {validation_examples: 2}\n"
        f"  - quantize: {{mode: {mode}, validation_examples: 2, min_top1_agreement: 0.0}}\n"
        f"eval: {{metrics: [exact_match], general_text: {general_text}}}\n"
        "measure: {warmup_s: 0, min_s: 0, min_iters: 3, prompt_tokens: 32, decode_tokens: 16, first_token_runs: 1}\n"
        "budgets: {}\n"
    )


def run_build(args: list[str], env: dict, logs: Path) -> tuple[int, dict | None, str, float, int]:
    """(exit status, report, stderr tail, seconds, peak RSS bytes of the build process)"""
    started = time.perf_counter()
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgeft.cli", "build", "--json", "-q", *args], cwd=ROOT, env=env,
                                stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # its rusage: the process's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    try:
        report = json.loads((logs / "stdout").read_text())
    except json.JSONDecodeError:
        report = None
    return proc.returncode, report, (logs / "stderr").read_text()[-1500:], seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["int4", "int8", "fp16", "fp32"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeft-big"), help="Model, data, cache and bundles (~8x the fp32 weights on disk).")
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    from tiny_models import task_rows, write_data

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = make_model(args.shape, args.work / f"llama-{args.shape}")
    print(f"model {model}: made in {time.perf_counter() - started:.0f} s (or reused)", flush=True)
    data, _ = write_data("prompt_completion", args.work / "data", task_rows(48))
    general_text = args.work / "general.txt"  # the shipped general text's first lines
    general_text.write_text("".join((ROOT / "edgeft" / "demo" / "general.txt").read_text().splitlines(keepends=True)[:12]))
    weight_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    env = {**os.environ, "EDGEFT_CACHE": str(args.work / "cache")}
    results = []
    for precision in args.precisions:
        target, mode, measured = PRECISIONS[precision]
        profile = args.work / f"{precision}.yaml"
        profile.write_text(profile_text(mode, args.max_steps, general_text))
        logs = args.work / f"logs-{precision}"
        logs.mkdir(exist_ok=True)
        build_args = ["--target", target, "--model", str(model), "--data", str(data), "-p", str(profile),
                      "--out", str(args.work / f"bundle-{precision}"), "--threads", str(args.threads)]
        build_args += ["--device", "local"] if measured else ["--no-measure"]
        code, report, stderr, seconds, peak = run_build(build_args, env, logs)
        row = {"precision": precision, "target": target, "exit": code, "seconds": round(seconds, 1), "peak_rss_bytes": peak,
               "stages": [], "error": None if code in (0, 1) else stderr.strip().splitlines()[-1:]}
        if report:
            for stage in report.get("stages", []):
                stage_peak = stage.get("peak_rss_bytes") or (stage.get("metrics") or {}).get("peak_rss_bytes")
                row["stages"].append({"name": stage["name"], "cached": stage["cached"], "seconds": stage["seconds"], "peak_rss_bytes": stage_peak})
            row["model_mb"] = (report.get("model") or {}).get("size_mb")
            row["decode_tokens_per_s"] = report.get("decode_tokens_per_s")
            row["first_token_ms"] = report.get("first_token_ms")
        results.append(row)
        print(f"\n{args.shape} {precision} ({target}{', measured here' if measured else ', not measured'}): exit {code}, "
              f"{seconds:.0f} s, process peak RSS {peak / 1e9:.2f} GB = {peak / weight_bytes:.2f}x the fp32 weights "
              f"({weight_bytes / 1e9:.2f} GB); bundle model {row.get('model_mb')} MB, decode {row.get('decode_tokens_per_s')} tok/s", flush=True)
        if row["error"]:
            print(f"  error: {row['error']}")
        for stage in row["stages"]:
            stage_peak = stage["peak_rss_bytes"]
            peak_text = f"{stage_peak / 1e9:6.2f} GB {stage_peak / weight_bytes:5.2f}x" if stage_peak else "      ?"
            print(f"  {stage['name']:<9} {'cached' if stage['cached'] else 'ran':<6} {stage['seconds']:8.1f} s  peak {peak_text}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "fp32_weight_bytes": weight_bytes, "results": results}, indent=2))


if __name__ == "__main__":
    main()
