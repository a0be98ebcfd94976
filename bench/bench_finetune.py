"""QLoRA (4-bit NF4 base, double quant) vs LoRA on a full-precision (fp32) base: peak memory and step time.

One random Llama (hidden 1024, 8 layers, vocab 32000, ~168M params, untied embeddings) is saved once as a
HF model dir; each method then runs in its own fresh subprocess, so one's peak cannot pollute the other's:
the base is loaded through edgeft's own `load_base` (the finetune stage's loader), wrapped with peft LoRA
exactly like the stage (r 16, alpha 32, dropout 0.05, all-linear), and trained for `--warmup` + `--steps`
AdamW steps on random token batches (labels = inputs). Same weights, batch, sequence length and seed for both.

Memory. On CPU the peak is the process's VmHWM (/proc/self/status), reported absolute and as the delta over
its RSS right after imports: torch + transformers + peft + bitsandbytes cost ~0.5 GB of RSS whatever the
method, which would pull any ratio of absolute peaks towards 1, so the ratio is taken on the delta
(what the method itself costs: weights, activations, gradients, optimizer state). "train" is the same
delta with the high-water mark reset (clear_refs 5) after loading, i.e. training alone, without the
transient of reading the fp32 checkpoint during the load; "loaded" is the RSS delta once the base is loaded
(after copying the weights out of the checkpoint's mmap, see _materialize), so train - loaded is what
training adds (activations, gradients, AdamW). On CUDA: torch.cuda.max_memory_allocated(),
with compute in bf16 autocast as the stage's Trainer does there (fp32 on CPU, as the stage chooses).
Step time: median of the timed steps (forward + backward + optimizer step; CUDA synchronized around).
MB in the table are MiB.

Usage: .venv/bin/python bench/bench_finetune.py [--steps 6] [--warmup 1] [--batch 4] [--seq 128] [--layers 8]
                                                [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "BENCH_RESULT "


def _proc_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := current RSS
        return True
    except OSError:
        return False


def _materialize(model) -> None:
    """Copy the non-quantized weights out of the checkpoint's mmap into process memory, then hand freed heap back.

    transformers maps the safetensors file: fp32 weights stay file-backed pages (counted in RSS once touched), and
    the 4-bit load touches every fp32 page it quantizes, which stay mapped (and in RSS) while any tensor still
    references the file (here the fp32 embeddings). Copying releases the map, so both methods' RSS holds exactly
    the weights their model keeps: LoRA's count is unchanged (it touches all its pages every step anyway)."""
    import ctypes
    import gc

    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not hasattr(param, "quant_state"):  # bitsandbytes Params4bit: already in process memory
                param.data = param.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(method: str, model_dir: str, steps: int, warmup: int, batch: int, seq: int, checkpointing: bool) -> dict:
    import contextlib
    import gc
    import statistics
    import time

    import bitsandbytes  # noqa: F401  (imported before the baseline, like everything the run needs)
    import torch
    import transformers.integrations.bitsandbytes  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from peft import LoraConfig, get_peft_model

    from edgeft.stages.finetune import FinetuneConfig, load_base

    cuda = torch.cuda.is_available()
    gc.collect()
    rss_imports_kb = _proc_kb("VmRSS")

    config = FinetuneConfig(method=method, base_dtype="float32", gradient_checkpointing=checkpointing)
    base = load_base(model_dir, config)
    if cuda and next(base.parameters()).device.type != "cuda":
        base.to("cuda")  # the 4-bit base is placed on the GPU by the quantizer; the fp32 one is not
    if not cuda:
        load_peak_kb = _proc_kb("VmHWM")  # before the copy below, whose transient is the benchmark's, not the method's
        rss_raw = (_proc_kb("RssAnon"), _proc_kb("RssFile"))
        _materialize(base)
        rss_materialized = (_proc_kb("RssAnon"), _proc_kb("RssFile"))
    weights_bytes = base.get_memory_footprint()
    if checkpointing:  # as the stage's Trainer does for gradient_checkpointing: true
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                            target_modules=config.target_modules, task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, vocab, (batch, seq), generator=generator) for _ in range(warmup + steps)]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if config.resolved_dtype() == "bfloat16" else contextlib.nullcontext

    if cuda:
        torch.cuda.synchronize()
        load_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset = _reset_peak_rss()
        rss_loaded_kb = _proc_kb("VmRSS")

    times, losses = [], []
    for i, ids in enumerate(batches):
        ids = ids.to(device)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast():
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
        losses.append(loss.item())

    result = {
        "method": method,
        "step_s": statistics.median(times),
        "trainable": sum(p.numel() for p in trainable),
        "weights_mb": weights_bytes / 2**20,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "compute_dtype": config.resolved_dtype(),
        "threads": torch.get_num_threads(),
    }
    if cuda:
        train_peak = torch.cuda.max_memory_allocated()
        result.update(peak_mb=max(load_peak, train_peak) / 2**20, delta_mb=max(load_peak, train_peak) / 2**20,
                      train_mb=train_peak / 2**20, rss_imports_mb=0.0)
    else:
        hwm_kb = max(load_peak_kb, _proc_kb("VmHWM"))
        result.update(peak_mb=hwm_kb / 1024, delta_mb=(hwm_kb - rss_imports_kb) / 1024, rss_imports_mb=rss_imports_kb / 1024,
                      train_mb=(_proc_kb("VmHWM") - rss_imports_kb) / 1024 if reset else None,
                      loaded_mb=(rss_loaded_kb - rss_imports_kb) / 1024,
                      anon_file_raw_mb=[v / 1024 for v in rss_raw], anon_file_materialized_mb=[v / 1024 for v in rss_materialized])
    return result


def run_worker(method: str, model_dir: Path, args) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--model-dir", str(model_dir), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq)]
    command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        sys.exit(f"{method}: worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    try:
        model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations, like finetune.gradient_checkpointing")
    parser.add_argument("--worker", choices=("qlora", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(MARK + json.dumps(worker(args.worker, args.model_dir, args.steps, args.warmup, args.batch, args.seq, args.gradient_checkpointing)), flush=True)
        return

    import bitsandbytes
    import peft
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=max(512, args.seq),
                         tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "base"
        model = LlamaForCausalLM(config)
        params = sum(p.numel() for p in model.parameters())
        linear = sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head")
        model.save_pretrained(model_dir)
        del model
        results = {method: run_worker(method, model_dir, args) for method in ("lora", "qlora")}

    lora, qlora = results["lora"], results["qlora"]
    cuda = torch.cuda.is_available()
    print(f"QLoRA vs LoRA (fp32 base), random Llama {params / 1e6:.1f}M params ({linear / 1e6:.1f}M in decoder linears, "
          f"{(params - linear) / 1e6:.1f}M embeddings + lm_head + norms), batch {args.batch} x seq {args.seq}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, AdamW, LoRA r 16 all-linear, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    print(f"device: {device_name()}; compute {lora['compute_dtype']}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}")
    if cuda:
        print(f"  {'method':6} {'weights MB':>10} {'peak MB':>9} {'train MB':>9} {'step s':>8} {'trainable':>10} {'loss first→last':>16}")
    else:
        print(f"  {'method':6} {'weights MB':>10} {'RSS imports':>11} {'peak MB':>8} {'peak Δ MB':>9} {'loaded Δ':>8} {'train Δ MB':>10} "
              f"{'step s':>7} {'trainable':>10} {'loss first→last':>16}")
    for r in (lora, qlora):
        loss = f"{r['loss_first']:.3f}→{r['loss_last']:.3f}"
        train = f"{r['train_mb']:.0f}" if r["train_mb"] is not None else "n/a"
        if cuda:
            print(f"  {r['method']:6} {r['weights_mb']:10.0f} {r['peak_mb']:9.0f} {train:>9} {r['step_s']:8.3f} {r['trainable']:10,} {loss:>16}")
        else:
            print(f"  {r['method']:6} {r['weights_mb']:10.0f} {r['rss_imports_mb']:11.0f} {r['peak_mb']:8.0f} {r['delta_mb']:9.0f} {r['loaded_mb']:8.0f} {train:>10} "
                  f"{r['step_s']:7.2f} {r['trainable']:10,} {loss:>16}")
    if not cuda:
        for r in (lora, qlora):
            (anon, file), (anon2, file2) = r["anon_file_raw_mb"], r["anon_file_materialized_mb"]
            print(f"  {r['method']}: RSS anon/file after load_base {anon:.0f}/{file:.0f} MB, after copying out of the mmap {anon2:.0f}/{file2:.0f} MB")
    memory = qlora["delta_mb"] / lora["delta_mb"]
    print(f"QLoRA/LoRA peak memory{' (delta over imports)' if not cuda else ''}: {memory:.2f}x (goal <= 0.45x: {'met' if memory <= 0.45 else 'NOT met'})")
    if lora["train_mb"] and qlora["train_mb"] is not None:
        print(f"QLoRA/LoRA peak memory while training only{' (delta over imports)' if not cuda else ''}: {qlora['train_mb'] / lora['train_mb']:.2f}x")
    if not cuda:
        print(f"QLoRA/LoRA absolute peak RSS: {qlora['peak_mb'] / lora['peak_mb']:.2f}x")
    print(f"QLoRA/LoRA weights alone (get_memory_footprint): {qlora['weights_mb'] / lora['weights_mb']:.2f}x")
    print(f"QLoRA/LoRA step time: {qlora['step_s'] / lora['step_s']:.2f}x")


if __name__ == "__main__":
    main()
