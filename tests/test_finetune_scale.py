"""`edgeft finetune` on several processes: a real 2-process data-parallel run on CPU (gloo) under
`accelerate launch` writes the same adapter format as a 1-process run, once, and a build starts from it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_models

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")
PROFILE = """\
stages:
  - finetune: {method: qlora, r: 4, alpha: 8, epochs: 1, batch_size: 4, lr: 0.005, max_length: 64, eval_task_examples: 4}
  - merge: {}
  - export: {}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("scale")
    model = tiny_models.build("llama", root / "llama")
    data, _ = tiny_models.write_data("prompt_completion", root / "data", tiny_models.task_rows(48))
    profile = root / "tiny.yaml"
    profile.write_text(PROFILE)
    return {"root": root, "model": model, "data": data, "profile": profile}


@pytest.fixture(scope="module")
def one_process(setup):
    """The same command's library call in this (single) process."""
    from edgeft.adapter import FinetuneOptions, finetune

    out = setup["root"] / "one" / "adapter-dir"
    artifact = finetune(FinetuneOptions(out=out, model=setup["model"], data=setup["data"], profile=str(setup["profile"]), threads=1),
                        log=lambda message: None)
    return artifact


@pytest.fixture(scope="module")
def two_processes(setup):
    """`accelerate launch` with 2 CPU processes. On a host without GPUs, accelerate 1.15's `--cpu`
    starts 2 processes only through mpirun (without it: one process), so this uses `--multi_gpu`, which
    spawns them with torch.distributed.run; the Trainer runs DDP over gloo on CPU."""
    out = setup["root"] / "two" / "adapter-dir"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    argv = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", _free_port(), "-m", "edgeft.cli", "finetune", "--model", setup["model"],
            "--data", setup["data"], "--profile", setup["profile"], "--out", out, "--threads", "1", "--json"]
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    return {"out": out, "result": result}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter_tensors(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def test_two_processes_train_one_writes(two_processes, one_process):
    result, out = two_processes["result"], two_processes["out"]
    assert result.returncode == 0, result.stderr[-4000:]
    printed = json.loads(result.stdout)  # rank 0's --json, alone on stdout
    assert printed["info"]["world_size"] == 2
    # Data parallel: each optimizer step takes a batch per process, so half the steps of one process.
    one_steps = one_process.metrics["train_steps"]
    assert printed["metrics"]["train_steps"] == (one_steps + 1) // 2, (printed["metrics"], one_process.metrics)
    # Written once, by rank 0: one summary line, one adapter dir, nothing else beside it.
    assert result.stderr.count("written ") == 1 and result.stderr.count("finetune: training") == 1, result.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter-dir"]
    assert [p.relative_to(out).as_posix() for p in out.rglob("edgeft_adapter.json")] == ["adapter/edgeft_adapter.json"]
    card = json.loads((out / "adapter" / "edgeft_adapter.json").read_text())
    assert card["name"] == "default" and card["method"] == "qlora"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and any("eval_loss" in entry for entry in log) and any("train_loss" in entry for entry in log)


def test_same_format_as_one_process(two_processes, one_process):
    one, two = one_process.path, two_processes["out"]
    assert two_processes["result"].returncode == 0, two_processes["result"].stderr[-4000:]
    assert sorted(p.relative_to(two).as_posix() for p in two.rglob("*")) == sorted(p.relative_to(one).as_posix() for p in one.rglob("*"))
    config_one = json.loads((one / "adapter" / "adapter_config.json").read_text())
    config_two = json.loads((two / "adapter" / "adapter_config.json").read_text())
    assert config_one.keys() == config_two.keys()
    assert set(config_one["target_modules"]) == set(config_two["target_modules"])  # a set in peft: saved in any order
    assert _adapter_tensors(one / "adapter") == _adapter_tensors(two / "adapter")
    assert json.loads((one / "adapter" / "edgeft_adapter.json").read_text()).keys() == json.loads((two / "adapter" / "edgeft_adapter.json").read_text()).keys()
    meta_one, meta_two = (json.loads((d / "artifact.json").read_text()) for d in (one, two))
    assert meta_one.keys() == meta_two.keys() and meta_one["kind"] == meta_two["kind"] == "adapter"
    assert meta_one["metrics"].keys() == meta_two["metrics"].keys()


def test_adapter_loads_onto_the_base(two_processes, setup):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert two_processes["result"].returncode == 0, two_processes["result"].stderr[-4000:]
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, two_processes["out"] / "adapter").eval()
        after = tuned(input_ids=ids).logits
    assert float((after - before).abs().max()) > 1e-4  # trained: LoRA B starts at zero


def test_build_from_the_adapter_dir(two_processes, setup, tmp_path):
    """`edgeft build --adapter-dir`: merge and export start from the adapter; nothing is trained."""
    from edgeft.artifact import Artifact
    from edgeft.build import BuildOptions, build

    out = two_processes["out"]
    lines: list[str] = []
    report = build(BuildOptions(target="rpi5", profile=str(setup["profile"]), model=setup["model"], data=setup["data"],
                                out=tmp_path / "bundle", threads=1, measure=False, adapter_dir=out), log=lines.append)
    assert [s["name"] for s in report["stages"]] == ["finetune", "merge", "export"]
    assert report["stages"][0]["cached"] is True and report["stages"][0]["seconds"] == 0.0
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["provenance"]["adapter_sha256"] == Artifact.load(out).sha256
    assert any("using the adapter in" in line for line in lines), lines


def test_adapter_dir_refuses_another_base(two_processes, setup, tmp_path):
    from edgeft.adapter import load_adapter_dir
    from edgeft.errors import ModelError
    from edgeft.pipeline import base_artifact

    other = tiny_models.build("gpt2", tmp_path / "gpt2")
    with pytest.raises(ModelError, match="trained on another base"):
        load_adapter_dir(two_processes["out"], base_artifact(other))
    with pytest.raises(ModelError, match="not an adapter dir written by `edgeft finetune`"):
        load_adapter_dir(tmp_path, base_artifact(other))
