"""`edgeft build`: model + data + target + profile -> stages -> bundle -> device -> report -> gate."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import estimate, memory, onnx_io, pipeline
from .artifact import Artifact, atomic_dir, cache_root, digest_of, hash_dir, write_atomic
from .bundle import MEASUREMENT_FILES, assemble
from .config import Budgets, Profile, Target, load_lab, load_profile, load_target
from .context import BuildContext
from .data import Splits, check_data, load_splits
from .device.reserve import Reservation, check_target, reserve
from .errors import BundleError, ConfigError, DeviceError, ModelError
from .flash.signing import load_private_key, sign_bundle
from .gate import evaluate
from .regression import regression_block
from .report_html import render_report
from .stages.export import FUSED_ARCHITECTURES, FUSED_RUNTIMES
from .stages.finetune import check_max_length, load_tokenizer
from .stages.quantize import MODES as QUANTIZE_MODES

REPORT_FORMAT = "edgeft-report/1"
# The exported model each runtime loads, and the precisions it can run.
RUNTIME_FORMAT = {"onnxruntime": "onnx", "tensorrt": "onnx", "tflite": "tflite"}
TENSORRT_PRECISIONS = ("fp32", "fp16", "int8-static")


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
    adapter: str | None = None  # the finetune stage's adapter name (one adapter per customer/task on a base)
    measure: bool = True  # False: write the bundle only (`edgeft measure` gates it later, on the device)
    adapter_dir: Path | None = None  # an `edgeft finetune` output: replaces the profile's finetune stage
    wait_s: float = 0.0  # how long to wait for a held device (reservation) before failing
    tags: tuple[str, ...] = ()  # reserve any healthy free device with all these tags instead of `device`
    baseline: Path | None = None  # an earlier report (or a dir of them): gate max_regression against it
    sign_key: Path | None = None  # sign the bundle with this private key (edgeft.key) when the build succeeds


def check_plan(planned: list[pipeline.PlannedStage], target: Target, where: str, context_tokens: int | None = None) -> None:
    """Before anything trains: the stages must end in the format and precision the runtime takes (and a
    TFLite cache must hold the general-text chunks every stage is scored on, eval.context_tokens)."""
    exports = [s.config for s in planned if s.name == "export"]
    quantizes = [s.config for s in planned if s.name == "quantize"]
    fmt = exports[-1].format if exports else None
    wanted = RUNTIME_FORMAT[target.runtime]
    if fmt is not None and fmt != wanted:
        raise ConfigError(f"{where}: target {target.name} runs {target.runtime}, which needs a {wanted} model, "
                          f"but export writes {fmt}; set export format: {wanted} or pick another profile")
    if exports and exports[-1].graph == "fused" and target.runtime not in FUSED_RUNTIMES:
        raise ConfigError(f"{where}: export graph: fused runs on {', '.join(FUSED_RUNTIMES)} (GroupQueryAttention is ONNX Runtime's "
                          f"own op), but target {target.name} runs {target.runtime}; set export graph: auto or generic")
    if fmt is not None and quantizes and quantizes[-1].mode not in QUANTIZE_MODES[fmt]:
        raise ConfigError(f"{where}: quantize mode {quantizes[-1].mode} does not apply to {fmt} models; "
                          f"use one of {', '.join(QUANTIZE_MODES[fmt])}")
    if target.runtime == "tensorrt" and quantizes and quantizes[-1].mode not in TENSORRT_PRECISIONS:
        raise ConfigError(f"{where}: TensorRT cannot run quantize mode {quantizes[-1].mode} (ONNX Runtime's own ops); "
                          f"use one of {', '.join(TENSORRT_PRECISIONS)}")
    if fmt == "tflite" and context_tokens and exports[-1].cache_tokens < context_tokens:
        raise ConfigError(f"{where}: export cache_tokens {exports[-1].cache_tokens} is below eval.context_tokens {context_tokens}, so the "
                          "TFLite model's general perplexity would not compare with the other stages'; raise one or lower the other")


def check_fused_architecture(planned: list[pipeline.PlannedStage], model_config: dict[str, Any], model: Any, where: str) -> None:
    """`export graph: fused` for a model the fused builder does not cover fails now, not after training."""
    exports = [s.config for s in planned if s.name == "export"]
    architecture = (model_config.get("architectures") or ["?"])[0]
    if exports and exports[-1].graph == "fused" and architecture not in FUSED_ARCHITECTURES:
        raise ConfigError(f"{where}: export graph: fused covers {', '.join(FUSED_ARCHITECTURES)}, but {model} is a {architecture}; "
                          "set export graph: auto (the generic graph for it) or generic")


def with_adapter(profile: Profile, adapter: str) -> Profile:
    """The profile with its finetune stage training (and caching) the adapter named `adapter`."""
    stages = [{name: ({**config, "adapter": adapter} if name == "finetune" else config)} for item in profile.stages
              for name, config in item.items()]
    if not any("finetune" in item for item in stages):
        raise ConfigError(f"{profile.source}: --adapter names the finetune stage's adapter, but this profile has no finetune stage")
    return profile.model_copy(update={"stages": stages})


def check_model_for_runtime(final: Artifact, target: Target, where: str) -> None:
    """The compiled model must be what the target's runtime loads, in a precision it runs."""
    wanted = RUNTIME_FORMAT[target.runtime]
    if final.kind != wanted:
        ending = "export {format: tflite} (and quantize)" if wanted == "tflite" else "export (and quantize)"
        raise ConfigError(f"{where}: target {target.name} runs {target.runtime}, which needs a {wanted} model, "
                          f"but the stages end with a {final.kind} model; end the stages with {ending}")
    if target.runtime == "tensorrt" and final.info.get("precision") not in TENSORRT_PRECISIONS:
        raise ConfigError(f"{where}: TensorRT cannot run a {final.info.get('precision')} ONNX (ONNX Runtime's own "
                          "int8/int4 ops); quantize with mode fp16 or int8-static (Q/DQ) for Jetson")


# Any one of these says a model dir carries a tokenizer (which one a tokenizer needs, loading it tells).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")


def check_model_dir(model: Path) -> dict[str, Any]:
    """The cheap checks of a user's model dir, before anything is imported or trained: it exists, its
    config.json is there and is a JSON object naming a model_type, and it has tokenizer files.
    Returns the parsed config.json."""
    model = Path(model)
    config_path = model / "config.json"
    if not model.is_dir():
        raise ModelError(f"{model}: model directory not found; pass a local Hugging Face model dir (config.json, weights, tokenizer)")
    if not config_path.is_file():
        raise ModelError(f"{config_path}: missing; a Hugging Face causal-LM directory has config.json (save_pretrained writes it)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path}: cannot read it ({exc}); restore config.json from the model's source") from exc
    except ValueError as exc:
        raise ModelError(f"{config_path}: corrupt, not valid JSON ({exc}); restore config.json from the model's source") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{config_path}: corrupt, no \"model_type\" in it; restore config.json from the model's source")
    if not any((model / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{model}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's tokenizer into it "
                         "(tokenizer.save_pretrained(dir))")
    return config


def resolve_model(model: Path | None, progress, log: Callable[[str], None]) -> Path:
    """The model dir to build from: the user's, checked (config.json and tokenizer load), or the demo base."""
    if model is None:
        from .demo.base import demo_base_dir, is_built

        if not is_built():
            log("demo base model: pretraining it once on the shipped corpus (~2 min on 2 cores, then cached)")
        return demo_base_dir(progress)
    model = Path(model)
    check_model_dir(model)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{model / 'config.json'}: transformers cannot read it ({str(exc).strip().splitlines()[0]}); "
                         "pass a causal-LM directory written by save_pretrained") from exc
    load_tokenizer(model)  # a ModelError naming the tokenizer problem
    return model


def check_threads(threads: int) -> None:
    if threads < 1:
        raise ConfigError(f"--threads {threads}: must be at least 1 (host CPU threads for training and export)")


def check_writable_dir(path: Path, what: str) -> None:
    """`path` must be a directory this process can write in: created now (parents too) and probed with a
    temp file, so a path under a file, on a read-only disk or without permission fails before any work.
    `what` names the setting in the message (e.g. "--out build/rpi5")."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{what}: {existing} is a file, not a directory; choose a path in a directory you can write")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"{what}: cannot create or write {path} ({exc.strerror or exc}); choose a path in a directory you can write") from exc


def check_out(out: Path) -> None:
    """--out is replaced whole by the new bundle (written beside it, then renamed): its parent must be
    writable, and an existing --out must be an earlier bundle or empty, never other files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory; pass a new path for the bundle directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ConfigError(f"--out {out}: exists and is not an edgeft bundle (no manifest.json); it would be replaced whole: "
                          "pass a new or empty directory, or an earlier bundle's")
    check_writable_dir(out.absolute().parent, f"--out {out}")


def check_model_fits(planned: list[pipeline.PlannedStage], model: Path, model_config: dict[str, Any], where: str) -> None:
    """Stage settings the model's own config rules out (an explicit max_length beyond its positions)."""
    positions = model_config.get("max_position_embeddings") or model_config.get("n_positions")
    for stage in planned:
        if stage.name in ("finetune", "prune", "distill"):
            check_max_length(stage.config, positions, model, where, stage.name)


def measure_reserved(reservation: Reservation, bundle_dir: Path, log: Callable[[str], None],
                     samples_to: Path | None = None, sysfs_root: str | None = None,
                     runner_args: Sequence[str] = ()) -> dict[str, Any]:
    """Ship the runner and the bundle into the reservation's run dir, run the runner there, fetch its
    report (and, to samples_to, the telemetry samples as JSON lines). The run dir is emptied afterwards."""
    from .device import push_verified
    from .runner_app import build_runner_zipapp

    transport, run_dir = reservation.transport, reservation.run_dir
    with tempfile.TemporaryDirectory(prefix="edgeft-runner-") as tmp:
        runner = Path(tmp) / "edgeft-runner.pyz"
        build_runner_zipapp(runner)
        try:
            log(f"device {transport.name}: pushing runner and bundle")
            push_verified(transport, runner, f"{run_dir}/edgeft-runner.pyz")
            push_verified(transport, bundle_dir, f"{run_dir}/bundle")
            argv = [transport.python, f"{run_dir}/edgeft-runner.pyz", "run", "--bundle", f"{run_dir}/bundle",
                    "--report", f"{run_dir}/report.json", "--samples", f"{run_dir}/telemetry.jsonl"]
            if sysfs_root:
                argv += ["--sysfs-root", sysfs_root]
            argv += [str(a) for a in runner_args]
            log(f"device {transport.name}: measuring")
            result = transport.run(argv, timeout=3600)
            if not result.ok:
                detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise DeviceError(f"device {transport.name!r}: the runner failed (exit {result.returncode}): {detail}")
            local = Path(tmp) / "report.json"
            transport.get_file(f"{run_dir}/report.json", local)
            report = json.loads(local.read_text())
            if samples_to is not None:
                transport.get_file(f"{run_dir}/telemetry.jsonl", samples_to)
        finally:
            try:  # the release removes it too; emptied now so a second measurement on this reservation starts clean
                transport.remove(run_dir)
            except DeviceError:
                pass
    reservation.check_lease()
    report["device"]["emulated"] = reservation.emulated
    return report


def _reserve_for(options: BuildOptions, log: Callable[[str], None], manifest: dict[str, Any] | None):
    """The reservation a build or measurement takes on options.device (or any device with options.tags)."""
    name = None if options.tags else options.device
    return reserve(name, tags=options.tags, lab_path=options.lab, wait_s=options.wait_s,
                   trust_new_host_key=options.trust_new_host_key, bundle_manifest=manifest, log=log)


@dataclass
class Prepared:
    """Everything a build needs before its stages run: validated inputs and a reachable device."""

    options: BuildOptions
    target: Target
    profile: Profile
    splits: Splits
    ctx: BuildContext
    out: Path
    started: float
    adapter: Artifact | None = None  # from --adapter-dir: the stages after finetune start from it
    data_check: dict[str, Any] | None = None  # check_data's report, kept in the bundle's provenance
    device_runtime: dict[str, Any] | None = None  # the runtime module and version on the device (device_runtime)


@dataclass
class Checked:
    """A build's inputs after the cheap checks (nothing heavy imported, no device contacted)."""

    target: Target
    profile: Profile
    planned: list[pipeline.PlannedStage]
    out: Path
    splits: Splits
    data_report: Any
    model_config: dict[str, Any] | None  # the user's config.json (None: the demo model)


def check_inputs(options: BuildOptions) -> Checked:
    """Every check that needs no torch and no device: options, the target and profile, --out, the cache,
    the model dir and its config, the data. Bad input fails here in about a second."""
    check_threads(options.threads)
    if options.sign_key is not None:  # a wrong key fails now, not after training
        load_private_key(options.sign_key)
    target = load_target(options.target)
    profile = load_profile(options.profile or target.default_profile)
    if options.adapter:
        profile = with_adapter(profile, options.adapter)
    planned = pipeline.plan(profile)
    check_plan(planned, target, str(profile.source), profile.eval.context_tokens)
    out = Path(options.out) if options.out else Path("build") / target.name
    check_out(out)
    check_writable_dir(cache_root(), f"the build cache {cache_root()} (EDGEFT_CACHE)")
    model_config = None
    if options.model is not None:
        model_config = check_model_dir(options.model)
        check_fused_architecture(planned, model_config, options.model, str(profile.source))
        if options.adapter_dir is None:  # an --adapter-dir build runs no finetune stage
            check_model_fits(planned, Path(options.model), model_config, str(profile.source))
    splits = load_splits(options.data, profile.data)
    data_report = check_data(splits, profile.data)  # raises ConfigError when data.sensitive: fail finds something
    return Checked(target, profile, planned, out, splits, data_report, model_config)


def memory_plan(planned: list[pipeline.PlannedStage], model_dir: Path | None, model_config: dict[str, Any] | None) -> dict[str, Any]:
    """The model's size and each stage's estimated peak memory and disk (edgeft.estimate), with a one-line
    warning when the largest peak is above the memory free now. Reads only file headers."""
    params = None
    if model_dir is not None:
        params = estimate.safetensors_params(model_dir)
        if params is None and model_config:
            params = estimate.config_params(model_config)
    stages = []
    for stage in planned:
        row: dict[str, Any] = {"name": stage.name}
        if params is not None:
            row.update({k: round(v) for k, v in estimate.stage_estimate(stage.name, stage.config, 4 * params).items()})
        stages.append(row)
    available = memory.available_bytes()
    warning = None
    peaks = [row for row in stages if "peak_memory_bytes" in row]
    if peaks and available is not None:
        worst = max(peaks, key=lambda row: row["peak_memory_bytes"])
        if worst["peak_memory_bytes"] > available:
            advice = {"finetune": "set finetune.method: qlora and gradient_checkpointing: true, or a smaller finetune.batch_size",
                      "distill": "set a smaller distill.student"}.get(worst["name"], "free memory or build on a larger machine "
                                                                             "(stages are cached: a build resumes where it stopped)")
            warning = (f"memory warning: {worst['name']} may peak at ~{worst['peak_memory_bytes'] / 1e9:.1f} GB (estimate) for "
                       f"{params / 1e9:.2f}B parameters, above the {available / 1e9:.1f} GB free now; {advice}")
    return {"parameters": params, "fp32_weight_bytes": 4 * params if params else None, "available_memory_bytes": available,
            "stages": stages, "warning": warning}


def prepare(options: BuildOptions, progress=None, log: Callable[[str], None] = print) -> Prepared:
    """Validate every input and reach the device first, so mistakes fail in a second, not after training.
    The cheap checks (options, --out, the cache, the profile, the model dir and its config) run before
    torch is even imported."""
    started = time.perf_counter()
    checked = check_inputs(options)
    target, profile, out, splits, data_report = checked.target, checked.profile, checked.out, checked.splits, checked.data_report
    log(data_report.summary())
    for warning in data_report.warnings:
        log(f"data warning: {warning}")
    if options.model is not None:
        warning = memory_plan(checked.planned, Path(options.model), checked.model_config)["warning"]
        if warning:
            log(warning)
    probed_runtime = None
    if options.device != "local" and not options.tags:  # a wrong or unreachable device fails now, not after training
        from .device import open_transport
        from .lab import probe_facts

        check_target(load_lab(options.lab).device(options.device), target.name, target.arch, target.runtime, "this build is")
        transport, _ = open_transport(options.device, options.lab, options.trust_new_host_key)
        try:  # the same connection reads the device's runtime version, for the measurement cache key
            probed_runtime = probe_facts(transport, target.runtime)["runtime"]
        except DeviceError:
            pass  # its python cannot run the probe: the measurement says so, in its own words
        finally:
            transport.close()
    import torch

    from . import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(options.threads)
    base = pipeline.base_artifact(resolve_model(options.model, progress, log))
    ctx = BuildContext(base=base, splits=splits, target=target, profile=profile, out=cache_root(), progress=progress, log=log, threads=options.threads)
    adapter = None
    if options.adapter_dir is not None:
        from .adapter import after_finetune, load_adapter_dir

        after_finetune(pipeline.plan(profile), str(profile.source))  # the profile must have a finetune stage to replace
        adapter = load_adapter_dir(options.adapter_dir, base)
        log(f"finetune: using the adapter in {options.adapter_dir} ({adapter.info.get('method')}, {adapter.info.get('adapter')!r}), not training")
        if adapter.info.get("data_sha256") not in (None, splits.sha256):
            log(f"data warning: the adapter was trained on other data ({adapter.info.get('data_path')}); accuracy is measured on {splits.source}")
    return Prepared(options, target, profile, splits, ctx, out, started, adapter, data_check=_data_check_summary(data_report),
                    device_runtime=probed_runtime)


def _data_check_summary(data_report) -> dict[str, Any]:
    """The data check as the bundle keeps it: counts and kinds, not the flagged values themselves."""
    summary = data_report.to_dict()
    summary["sensitive"] = {k: v for k, v in summary["sensitive"].items() if k != "findings"}
    summary["leakage"] = {split: {"exact": leak["exact"], "near": leak["near"]} for split, leak in summary["leakage"].items()}
    return summary


def compile_model(prep: Prepared, stages: list[pipeline.PlannedStage], where: str) -> tuple[Artifact, list[pipeline.StageOutcome]]:
    if prep.adapter is not None:  # --adapter-dir: the adapter stands in for the finetune stage (and any before it)
        from .adapter import adapter_outcome, after_finetune

        final, outcomes = pipeline.run(after_finetune(stages, where), prep.ctx, force=prep.options.force, start=prep.adapter)
        outcomes = [adapter_outcome(prep.adapter), *outcomes]
    else:
        final, outcomes = pipeline.run(stages, prep.ctx, force=prep.options.force)
    check_model_for_runtime(final, prep.target, where)
    return final, outcomes


def measurement_key(prep: Prepared, final: Artifact, runtime: dict[str, Any], runner_sha256: str) -> str:
    """What a device measurement depends on: the model, the device and the runtime its python imports
    (module and version, from device_runtime), the runner that measured (its runner.pyz sha256), the
    measure settings, threads and task. An upgraded runtime or a changed runner is measured afresh."""
    return digest_of({
        "model": final.sha256, "device": prep.options.device, "runtime": runtime, "runner_sha256": runner_sha256,
        "measure": prep.profile.measure.model_dump(), "threads": prep.target.threads, "task": prep.splits.sha256,
        "sysfs": prep.options.sysfs_root,
    })


def device_runtime(prep: Prepared) -> dict[str, Any]:
    """The target's runtime as the device's python imports it ({"module", "version"}, or {"error"}): read by
    prepare()'s reachability check for a named lab device, else probed here once per build."""
    if prep.device_runtime is None:
        from .device import open_transport
        from .lab import probe_facts

        transport, _ = open_transport(prep.options.device, prep.options.lab, prep.options.trust_new_host_key)
        try:
            prep.device_runtime = probe_facts(transport, prep.target.runtime)["runtime"]
        finally:
            transport.close()
    return prep.device_runtime


def measure_cached(prep: Prepared, final: Artifact, bundle_dir: Path, use_cache: bool) -> tuple[dict[str, Any], bool]:
    """The device report for this model on this device; from the cache when it was measured before by the
    same runner with the same runtime. With --tags the device is only known once reserved: never cached."""
    from .runner_app import runner_sha256

    path = None
    if not prep.options.tags:
        key = measurement_key(prep, final, device_runtime(prep), runner_sha256())
        path = cache_root() / "measurements" / f"{key[:32]}.json"
        if use_cache and path.exists():
            pipeline.mark_used(path)
            return json.loads(path.read_text()), True
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    with _reserve_for(prep.options, prep.ctx.log, manifest) as reservation:  # reserved right before measuring
        report = measure_reserved(reservation, bundle_dir, prep.ctx.log, samples_to=bundle_dir / "telemetry.jsonl",
                                  sysfs_root=prep.options.sysfs_root)
    if path is not None:
        write_atomic(path, json.dumps(report))
    return report, False


def package_and_measure(prep: Prepared, final: Artifact, outcomes, bundle_dir: Path, use_measure_cache: bool = False) -> dict[str, Any]:
    """Assemble the bundle in `bundle_dir`, measure it on the device, gate it; returns the report."""
    splits, base = prep.splits, prep.ctx.base
    provenance = {
        "base_model": {"path": str(base.path), "sha256": base.sha256, "demo": prep.options.model is None},
        "dataset": {"path": str(splits.source), "sha256": splits.sha256, "train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "adapter_sha256": next((o.sha256 for o in outcomes if o.name == "finetune"), None),
        "adapter": next((o.info.get("adapter", "default") for o in outcomes if o.name == "finetune"), None),
        "stages": [{"name": o.name, "key": o.key, "sha256": o.sha256, "metrics": o.metrics} for o in outcomes],
        "data_check": prep.data_check,
    }
    finetune = next((o for o in outcomes if o.name == "finetune"), None)
    if finetune is not None:  # the fine-tuning curve travels with the model it made (plot-ready JSON lines)
        stage_dir = prep.adapter.path if prep.adapter is not None else cache_root() / "artifacts" / f"finetune-{finetune.key[:24]}"
        if (stage_dir / "train_log.jsonl").is_file():
            shutil.copyfile(stage_dir / "train_log.jsonl", bundle_dir / "train_log.jsonl")
    manifest = assemble(bundle_dir, final, splits, prep.target, prep.profile, provenance)
    if not prep.options.measure:
        return {"format": REPORT_FORMAT, "target": manifest["target"], "profile": manifest["profile"]["name"], "measured": False,
                "model": model_summary(manifest, bundle_dir),
                "stages": [{"name": o.name, "cached": o.cached, "seconds": o.seconds, "metrics": o.metrics} for o in outcomes]}
    device_report, measure_was_cached = measure_cached(prep, final, bundle_dir, use_measure_cache)
    report = make_report(manifest, bundle_dir, device_report, prep.options.device, baseline=prep.options.baseline)
    report["stages"] = [{"name": o.name, "cached": o.cached, "seconds": o.seconds, "peak_rss_bytes": o.metrics.get("peak_rss_bytes")}
                        for o in outcomes]
    report["measurement_cached"] = measure_was_cached
    return report


def eval_metrics(stages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{"base": ..., stage name: ...}: the `eval` metrics (edgeft.evaluate.stage_eval) each stage reported,
    in stage order; the base model's come from finetune's `eval_base`."""
    out: dict[str, dict[str, Any]] = {}
    for stage in stages:
        metrics = stage.get("metrics") or {}
        if stage["name"] == "finetune" and metrics.get("eval_base"):
            out["base"] = metrics["eval_base"]
        if metrics.get("eval"):
            out[stage["name"]] = metrics["eval"]
    return out


def forgetting(evals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """General-text perplexity of the base, the fine-tuned and the final model (the last stage that
    reported it), and the final's relative increase over the base: what max_general_ppl_increase gates."""
    ppl = {name: values.get("general_perplexity") for name, values in evals.items()}
    reported = [name for name, value in ppl.items() if name != "base" and value is not None]
    final = reported[-1] if reported else None
    base = ppl.get("base")
    increase = round(ppl[final] / base - 1, 4) if final and base else None
    return {"base_ppl": base, "finetuned_ppl": ppl.get("finetune"), "final_ppl": ppl.get(final) if final else None,
            "final_stage": final, "general_ppl_increase": increase}


def model_summary(manifest: dict[str, Any], bundle_dir: Path) -> dict[str, Any]:
    """The manifest's model entry plus the size of its files (model.onnx and any external data)."""
    size = onnx_io.model_bytes(bundle_dir / manifest["model"]["file"])
    return {**manifest["model"], "size_bytes": size, "size_mb": round(size / 1e6, 3)}


def make_report(manifest: dict[str, Any], bundle_dir: Path, device_report: dict[str, Any], device_name: str,
                baseline: Path | None = None) -> dict[str, Any]:
    """The build report from a bundle's manifest and the runner's device report, gated on the
    budgets the bundle was built with (and, with `baseline`, on regression against an earlier report)."""
    metrics = {stage["name"]: stage["metrics"] for stage in manifest["provenance"]["stages"]}
    accuracy = {
        "base": metrics.get("finetune", {}).get("accuracy_base"),
        "finetuned": metrics.get("finetune", {}).get("accuracy"),
        "merged": metrics.get("merge", {}).get("accuracy"),
        "pruned": metrics.get("prune", {}).get("accuracy"),
        "distilled": metrics.get("distill", {}).get("accuracy"),
        "quantized": metrics.get("quantize", {}).get("accuracy"),
        "device": device_report["accuracy"]["exact_match"],
    }
    reference = accuracy["merged"] if accuracy["merged"] is not None else accuracy["finetuned"]
    accuracy["drop"] = round(reference - accuracy["device"], 4) if reference is not None else None
    report = {
        "format": REPORT_FORMAT,
        "target": manifest["target"],
        "profile": manifest["profile"]["name"],
        "device": {"emulated": False, **device_report["device"], "name": device_name},  # emulated: set by measure_reserved
        "arch_matches_target": device_report["device"]["arch"] == manifest["arch"],
        "runtime": device_report["runtime"],
        "latency_ms": device_report["latency_ms"],  # warm: the timed loop (raw samples in latency_ms.samples)
        "cold_ms": device_report.get("cold_ms"),  # process start -> model loaded -> first inference
        "sustained": device_report.get("sustained"),  # the soak (measure.sustained_s), per window; None when off
        "conditions": device_report.get("conditions"),  # warm-up, samples, threads, governor, throttle, temps
        "first_token_ms": device_report["first_token_ms"],
        "decode_tokens_per_s": device_report["decode_tokens_per_s"],
        "peak_rss_mb": device_report["peak_rss_mb"],
        "thermal": device_report["thermal"],
        "telemetry": device_report.get("telemetry"),
        "throttle": device_report.get("throttle"),
        "accuracy": accuracy,
        "metrics": eval_metrics(manifest["provenance"]["stages"]),  # per stage: profile eval.metrics + general_perplexity
        "smoke": device_report["smoke"],
        "data": manifest["provenance"].get("data_check"),  # splits, lengths, leakage, sensitive counts
        "model": model_summary(manifest, bundle_dir),
        "runner": device_report,
        # What --baseline matches on: the same device, base model, profile and target.
        "lineage": {"base_model_sha256": (manifest["provenance"].get("base_model") or {}).get("sha256"),
                    "profile": manifest["profile"]["name"], "target": manifest["target"]},
        "measured_at_unix": device_report.get("finished_unix") or round(time.time(), 3),
    }
    report["forgetting"] = forgetting(report["metrics"])
    if baseline is not None:
        report["regression"] = regression_block(report, Path(baseline))
    report["gate"] = evaluate(report, Budgets.model_validate(manifest["profile"]["budgets"]))
    return report


def measure_bundle(bundle_dir: Path, options: BuildOptions, log: Callable[[str], None] = print,
                   samples_to: Path | None = None, reservation: Reservation | None = None,
                   runner_args: Sequence[str] = ()) -> dict[str, Any]:
    """`edgeft measure`: re-measure a finished bundle on a device (e.g. a lab board in CI) and gate it.
    Reserves options.device (or options.tags) for the measurement, unless given a reservation to use."""
    from . import quiet_libraries

    quiet_libraries()
    bundle_dir = Path(bundle_dir)
    try:
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{bundle_dir}: not an edgeft bundle (manifest.json unreadable: {exc}); pass a dir written by `edgeft build`") from exc
    actual = hash_dir(bundle_dir, skip=MEASUREMENT_FILES)
    changed = sorted(name for name in files if actual.get(name) != files[name])
    if changed:
        raise BundleError(f"{bundle_dir}: {len(changed)} file(s) differ from the manifest ({', '.join(changed[:3])}); the bundle was modified: rebuild it")
    if reservation is not None:
        if reservation.device is not None:
            check_target(reservation.device, manifest["target"], manifest.get("arch"), manifest.get("runtime"))
        device_report = measure_reserved(reservation, bundle_dir, log, samples_to, options.sysfs_root, runner_args)
        return make_report(manifest, bundle_dir, device_report, reservation.name, baseline=options.baseline)
    with _reserve_for(options, log, manifest) as taken:
        device_report = measure_reserved(taken, bundle_dir, log, samples_to, options.sysfs_root, runner_args)
    return make_report(manifest, bundle_dir, device_report, taken.name, baseline=options.baseline)


def write_bundle(prep: Prepared, final: Artifact, outcomes, use_measure_cache: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Package, measure and gate into a temp dir, then rename it to prep.out: complete or absent."""
    with atomic_dir(prep.out) as tmp:
        report = package_and_measure(prep, final, outcomes, tmp, use_measure_cache)
        report.update(extra or {})
        report["bundle"] = {"path": str(prep.out)}
        if prep.options.sign_key is not None:
            report["bundle"]["signature"] = sign_built(tmp, prep.out, prep.options.sign_key, report, prep.ctx.log)
        report["wall_s"] = round(time.perf_counter() - prep.started, 2)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.html").write_text(render_report(report, tmp))  # the same report, for people
    return report


def sign_built(bundle_dir: Path, final_dir: Path, key_path: Path, report: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """--sign-key, the last step of a build: sign the bundle (in its temp dir, so it appears signed or not at
    all) when its gate passed or it was not measured. A bundle that broke its budgets is not a release."""
    verdict = report["gate"]["verdict"] if "gate" in report else None
    if verdict not in (None, "PASS"):
        log(f"not signed: the gate verdict is {verdict}; only a bundle within its budgets is signed")
        return {"signed": False, "reason": f"gate {verdict}"}
    signed = sign_bundle(bundle_dir, key_path)
    log(f"signed: channel {signed['channel']} version {signed['version']}, key {signed['key_id']}")
    return {"signed": True, **signed, "bundle": str(final_dir)}


def build(options: BuildOptions, progress=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a whole build; returns the report (its gate says pass/fail). Raises EdgeftError on bad input."""
    prep = prepare(options, progress, log)
    final, outcomes = compile_model(prep, pipeline.plan(prep.profile), str(prep.profile.source))
    return write_bundle(prep, final, outcomes)


def dry_run(options: BuildOptions) -> dict[str, Any]:
    """The plan of a build, nothing run and no device contacted: its stages, which are cached, the
    model's parameter count and each stage's estimated peak memory and disk (edgeft.estimate)."""
    checked = check_inputs(options)
    model_dir = Path(options.model) if options.model is not None else None
    if model_dir is None:
        from .demo.base import demo_base_dir, is_built

        model_dir = demo_base_dir() if is_built() else None  # a demo base not built yet: pretrained by the first build
    plan = memory_plan(checked.planned, model_dir, checked.model_config)
    # Cached: walk the keys from the base; after the first stage that must run, the rest must run too.
    current = pipeline.base_artifact(model_dir) if model_dir is not None and options.adapter_dir is None else None
    evaluation = None
    if current is not None:
        from .evaluate import eval_identity

        evaluation = eval_identity(checked.profile.eval)
    for stage, row in zip(checked.planned, plan["stages"]):
        row["config"] = stage.config.model_dump(mode="json", exclude_unset=True)  # what the profile set
        if current is None or options.force:
            row["cached"] = False
            continue
        entry = pipeline.entry_path(stage.name, pipeline.stage_key(stage, current, checked.splits.sha256, evaluation, runtime=checked.target.runtime))
        row["cached"] = pipeline.is_complete(entry)
        current = Artifact.load(entry) if row["cached"] else None
    return {"target": checked.target.name, "profile": checked.profile.name, "model": str(model_dir) if model_dir else "demo (not built yet)",
            "data": str(checked.splits.source), "out": str(checked.out), "device": options.device, **plan}
