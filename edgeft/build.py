"""`edgeft build`: model + data + target + profile -> stages -> bundle -> device -> report -> gate."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import pipeline
from .artifact import atomic_dir, cache_root
from .bundle import assemble
from .config import Target, load_profile, load_target
from .context import BuildContext
from .data import load_splits
from .errors import ConfigError, DeviceError, ModelError
from .gate import evaluate

REPORT_FORMAT = "edgeft-report/1"
IMPLEMENTED_RUNTIMES = ("onnxruntime",)


@dataclass
class BuildOptions:
    target: str
    profile: str | None = None
    model: Path | None = None
    data: Path | None = None
    device: str = "local"
    lab: Path | None = None
    out: Path | None = None
    trust_new_host_key: bool = False
    force: bool = False
    sysfs_root: str | None = None  # the device's sysfs (tests point this at a fixture tree)
    threads: int = 2


def check_runtime(target: Target) -> None:
    if target.runtime not in IMPLEMENTED_RUNTIMES:
        raise ConfigError(
            f"{target.source}: runtime {target.runtime!r} of target {target.name!r} is not implemented yet "
            f"(implemented: {', '.join(IMPLEMENTED_RUNTIMES)}); use a target such as rpi5"
        )


def resolve_model(model: Path | None, progress, log: Callable[[str], None]) -> Path:
    if model is None:
        from .demo.base import demo_base_dir, is_built

        if not is_built():
            log("demo base model: pretraining it once on the shipped corpus (~2 min on 2 cores, then cached)")
        return demo_base_dir(progress)
    model = Path(model)
    if not model.is_dir():
        raise ModelError(f"{model}: model directory not found; pass a local Hugging Face model dir (config.json, weights, tokenizer)")
    if not (model / "config.json").is_file():
        raise ModelError(f"{model}: no config.json; pass a local Hugging Face causal-LM directory")
    return model


def measure_on_device(bundle_dir: Path, options: BuildOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """Ship the runner and the bundle, run the runner there, fetch its report."""
    from .device import open_transport, push_verified
    from .runner_app import build_runner_zipapp

    transport, device = open_transport(options.device, options.lab, options.trust_new_host_key)
    with transport, tempfile.TemporaryDirectory(prefix="edgeft-runner-") as tmp:
        runner = Path(tmp) / "edgeft-runner.pyz"
        build_runner_zipapp(runner)
        run_dir = f"runs/{json.loads((bundle_dir / 'manifest.json').read_text())['files']['model.onnx'][:16]}"
        log(f"device {transport.name}: pushing runner and bundle")
        push_verified(transport, runner, f"{run_dir}/edgeft-runner.pyz")
        push_verified(transport, bundle_dir, f"{run_dir}/bundle")
        argv = [transport.python, f"{run_dir}/edgeft-runner.pyz", "run", "--bundle", f"{run_dir}/bundle", "--report", f"{run_dir}/report.json"]
        if options.sysfs_root:
            argv += ["--sysfs-root", options.sysfs_root]
        log(f"device {transport.name}: measuring")
        result = transport.run(argv, timeout=3600)
        if not result.ok:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DeviceError(f"device {transport.name!r}: the runner failed (exit {result.returncode}): {detail}")
        local = Path(tmp) / "report.json"
        transport.get_file(f"{run_dir}/report.json", local)
        report = json.loads(local.read_text())
        transport.remove(run_dir)
    report["device"]["name"] = options.device
    return report


def build(options: BuildOptions, progress=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a whole build; returns the report (its gate says pass/fail). Raises EdgeftError on bad input."""
    import torch

    from . import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    torch.set_num_threads(options.threads)
    target = load_target(options.target)
    check_runtime(target)
    profile = load_profile(options.profile or target.default_profile)
    stages = pipeline.plan(profile)
    splits = load_splits(options.data)
    if options.device != "local":  # an unreachable device or unknown host key fails now, not after training
        from .device import open_transport

        transport, _ = open_transport(options.device, options.lab, options.trust_new_host_key)
        transport.close()
    out = Path(options.out) if options.out else Path("build") / target.name

    model_dir = resolve_model(options.model, progress, log)
    base = pipeline.base_artifact(model_dir)
    ctx = BuildContext(base=base, splits=splits, target=target, profile=profile, out=cache_root(), progress=progress, log=log, threads=options.threads)
    final, outcomes = pipeline.run(stages, ctx, force=options.force)
    if final.kind != "onnx":
        raise ConfigError(f"{profile.source}: the last stage must produce an ONNX model for {target.runtime}; end the stages with export (and quantize)")

    metrics = {o.name: o.metrics for o in outcomes}
    accuracy = {
        "base": metrics.get("finetune", {}).get("accuracy_base"),
        "finetuned": metrics.get("finetune", {}).get("accuracy"),
        "merged": metrics.get("merge", {}).get("accuracy"),
        "quantized": metrics.get("quantize", {}).get("accuracy"),
    }
    provenance = {
        "base_model": {"path": str(model_dir), "sha256": base.sha256, "demo": options.model is None},
        "dataset": {"path": str(splits.source), "sha256": splits.sha256, "train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "adapter_sha256": next((o.sha256 for o in outcomes if o.name == "finetune"), None),
        "stages": [{"name": o.name, "key": o.key, "sha256": o.sha256, "metrics": o.metrics} for o in outcomes],
    }
    with atomic_dir(out) as tmp:
        manifest = assemble(tmp, final, splits, target, profile, provenance)
        device_report = measure_on_device(tmp, options, log)
        accuracy["device"] = device_report["accuracy"]["exact_match"]
        reference = accuracy["merged"] if accuracy["merged"] is not None else accuracy["finetuned"]
        accuracy["drop"] = round(reference - accuracy["device"], 4) if reference is not None else None
        report = {
            "format": REPORT_FORMAT,
            "target": target.name,
            "profile": profile.name,
            "device": device_report["device"],
            "arch_matches_target": device_report["device"]["arch"] == target.arch,
            "runtime": device_report["runtime"],
            "latency_ms": device_report["latency_ms"],
            "first_token_ms": device_report["first_token_ms"],
            "decode_tokens_per_s": device_report["decode_tokens_per_s"],
            "peak_rss_mb": device_report["peak_rss_mb"],
            "thermal": device_report["thermal"],
            "accuracy": accuracy,
            "smoke": device_report["smoke"],
            "model": {**manifest["model"], "size_bytes": sum(p.stat().st_size for p in tmp.glob("model.onnx*"))},
            "stages": [{"name": o.name, "cached": o.cached, "seconds": o.seconds} for o in outcomes],
            "runner": device_report,
        }
        report["gate"] = evaluate(report, profile.budgets)
        report["bundle"] = {"path": str(out), "manifest_sha256": None}
        report["wall_s"] = round(time.perf_counter() - started, 2)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    return report
