"""LiteRT (TFLite) precisions vs fp32, measured in one run on the same model and input.

A ~21M-parameter random Llama (hidden 512, 4 layers: the size where quantization shows) is converted
once with litert-torch (KV cache 128, prefill signature 64), quantized to fp16 / int8-weight /
int8-dynamic / int8-static, and each file is driven by the runner's own tflite backend: size, p50 of
a 64-token prompt (prefill + first token), decode tokens/s. Ratios are vs fp32 from the same run.

Usage: .venv/bin/python bench/bench_tflite.py [--threads 1]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_build import measure_precisions, print_precision_table  # bench/ is on sys.path when run as a script
    from edgeft import tflite
    from edgeft.demo.base import demo_base_dir
    from edgeft_runner.measure import prompt_ids

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "hf"
        model.save_pretrained(model_dir)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # the converter wants a tokenizer beside the weights
            shutil.copyfile(demo_base_dir() / name, model_dir / name)
        paths = {"fp32": Path(tmp) / "fp32.tflite"}
        tflite.convert(model_dir, paths["fp32"], [64], 128)
        rng = np.random.default_rng(0)
        calibration = [(list(rng.integers(3, 8192, 40)), list(rng.integers(3, 8192, 8))) for _ in range(8)]
        for mode in ("fp16", "int8-weight", "int8-dynamic", "int8-static"):
            paths[mode] = Path(tmp) / f"{mode}.tflite"
            tflite.quantize(paths["fp32"], paths[mode], mode, calibration)

        results = measure_precisions(paths, prompt_ids(64, config.vocab_size), args.threads, min_iters=20,
                                     options={"pad_token_id": 0})
    print(f"LiteRT, random Llama {params / 1e6:.1f}M params, 64-token prompt, 32 decode steps, {args.threads} thread(s)")
    print_precision_table(results, indent="  ")

if __name__ == "__main__":
    main()
