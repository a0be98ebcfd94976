"""edgeft-runner CLI: `run`, `verify`, `info`, and the install commands (edgeft_runner.install).
Exit 0 ok, 2 on any failure the user can fix (install: 1 when the new bundle failed on this device)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import REPORT_FORMAT, RunnerError, __version__
from .backends import create_backend, installed_runtimes
from .bundle import bundle_path, verify_bundle
from .install import add_commands as add_install_commands
from .measure import (first_token_and_decode, load_model, load_task, prompt_ids, smoke_test, summarize_ms, sustained,
                      task_accuracy, time_repeated)
from .slots import write_bytes_durably
from .telemetry import TelemetrySampler, cpu_governors, telemetry_summary
from .telemetry.jetson import jetson_clocks_applied, nvpmodel_mode, snapshot_counters, throttle_state
from .telemetry.tegrastats import TegrastatsSampler
from .telemetry.system import device_info, peak_rss_mb, process_age_s
from .telemetry.thermal import default_sysfs_root

PROG = "edgeft-runner"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error, instead of usage + error
        raise RunnerError(f"{message} (see {self.prog} --help)")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_durably(Path(path), (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def cmd_verify(args) -> int:
    manifest = verify_bundle(Path(args.bundle))
    print(f"ok {len(manifest['files'])} files")
    return 0


def cmd_info(args) -> int:
    print(json.dumps({"device": device_info(), "runtimes": installed_runtimes()}, indent=2))
    return 0


def _engine_info(backend) -> dict | None:
    """Engine-building runtimes (TensorRT): where the engine is and whether this run built it."""
    if not hasattr(backend, "engine_cached"):
        return None
    return {"cached": backend.engine_cached, "build_s": backend.engine_build_s, "path": str(backend.engine_path)}


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _temps_at(records: list[dict], index: int) -> dict | None:
    return records[index]["temps_c"] or None if records else None


def cmd_run(args) -> int:
    started = time.perf_counter()
    started_unix = time.time()
    # Cold start counts from exec (interpreter start and imports included), when /proc says when that was.
    age_s = process_age_s()
    process_start = started - age_s if age_s is not None else started
    cold_clock = "process start (/proc/self/stat)" if age_s is not None else "runner start (no /proc: interpreter start not included)"
    bundle_dir = Path(args.bundle)
    sysfs_root = args.sysfs_root or default_sysfs_root()
    # Jetson facts (absent elsewhere, with reasons): power mode, clock locks, over-current baseline.
    oc_before = snapshot_counters(sysfs_root)
    clocks = jetson_clocks_applied(sysfs_root)
    power_mode = nvpmodel_mode()
    with TegrastatsSampler(interval_ms=500) as tegra, \
            TelemetrySampler(sysfs_root, args.samples, tegrastats=tegra) as telemetry:
        manifest = verify_bundle(bundle_dir)
        verified = time.perf_counter()
        model, measure = manifest["model"], manifest["measure"]
        threads = args.threads or manifest.get("threads") or os.cpu_count() or 1
        if not isinstance(threads, int) or threads < 1:
            raise RunnerError(f"manifest threads must be a positive integer, got {threads!r}")
        threads_requested = threads
        if not args.threads:  # the target's count, on a device with fewer cores: oversubscribing only adds noise
            threads = min(threads, os.cpu_count() or threads)
        prompt_tokens, decode_tokens = int(measure["prompt_tokens"]), int(measure["decode_tokens"])
        max_positions = model.get("max_positions")
        if isinstance(max_positions, int) and prompt_tokens + decode_tokens > max_positions:
            raise RunnerError(f"measure.prompt_tokens + decode_tokens = {prompt_tokens + decode_tokens} "
                              f"exceeds model.max_positions {max_positions}")

        backend = create_backend(manifest.get("runtime", "onnxruntime"))
        t0 = time.perf_counter()
        load_model(backend, bundle_dir, manifest, threads)
        loaded = time.perf_counter()
        load_s = loaded - t0

        # Cold: the first inference of a fresh process, the timed prompt on an empty cache.
        prompt = prompt_ids(prompt_tokens, model["vocab_size"])
        empty_past = backend.empty_past()
        backend.forward(prompt, empty_past)
        first_done = time.perf_counter()
        cold_ms = {"process_to_loaded": _ms(loaded - process_start), "verify_bundle": _ms(verified - started),
                   "load": _ms(load_s), "first_inference": _ms(first_done - loaded),
                   "total": _ms(first_done - process_start), "clock": cold_clock}

        smoke = smoke_test(backend, bundle_path(bundle_dir, manifest["golden"]["file"]),
                           float(manifest["golden"].get("atol", 1e-3)))

        device_ms = getattr(backend, "device_compute_ms", None)  # GPU backends: time on the GPU per forward
        if device_ms is not None:
            device_ms.clear()
        warm = time_repeated(lambda: backend.forward(prompt, empty_past),
                             float(measure["warmup_s"]), float(measure["min_s"]), int(measure["min_iters"]))
        latency_ms = {"prompt_tokens": prompt_tokens, "warmup": warm.warmup, "warmup_s": round(warm.warmup_s, 3),
                      "duration_s": round(warm.duration_s, 3), **summarize_ms(warm.samples_ms, keep_samples=True)}
        if device_ms:  # like trtexec: host wall time above, GPU compute time of the same timed calls here
            latency_ms["device_compute"] = summarize_ms(device_ms[-len(warm.samples_ms):])

        sustained_s = args.sustained_s if args.sustained_s is not None else float(measure.get("sustained_s") or 0)
        soak = None
        if sustained_s > 0:
            soak = {"prompt_tokens": prompt_tokens, **sustained(lambda: backend.forward(prompt, empty_past), sustained_s)}

        decode = first_token_and_decode(backend, prompt, decode_tokens, int(measure["first_token_runs"]))

        task = load_task(bundle_path(bundle_dir, manifest["task"]["file"]))
        accuracy = task_accuracy(backend, task, model["eos_token_id"])

    thermal = telemetry.thermal_summary()
    peak_rss = peak_rss_mb()
    # A throttled run measured a slower device than the one budgeted for: the gate calls it INVALID.
    throttle = throttle_state(sysfs_root, oc_before, zone_max_c={z["name"]: z["max_c"] for z in thermal["zones"] if z.get("max_c") is not None})
    governors, governor_reason = cpu_governors(sysfs_root)
    temps_start, temps_end = _temps_at(telemetry.records, 0), _temps_at(telemetry.records, -1)
    # What a reader needs to trust (or distrust) the numbers, in one place.
    conditions = {
        "warmup": {"count": warm.warmup, "s": round(warm.warmup_s, 3)},
        "samples": len(warm.samples_ms),
        "duration_s": round(warm.duration_s, 3),
        "sustained_s": soak["duration_s"] if soak else 0,
        "threads": threads,
        "governor": governors,
        "throttled": throttle.get("throttled"),
        "throttle_reasons": throttle.get("reasons", []),
        "temps_c": {"start": temps_start, "end": temps_end} if temps_start or temps_end else None,
        "reasons": {key: reason for key, reason in (
            ("governor", governor_reason),
            ("temps_c", None if temps_start or temps_end else thermal.get("reason") or "no thermal zones")) if reason},
    }
    report = {
        "format": REPORT_FORMAT,
        "runner_version": __version__,
        "bundle": {
            "target": manifest.get("target"),
            "precision": model.get("precision"),
            "model_sha256": manifest["files"][model["file"]],
        },
        "device": device_info(),
        "runtime": {"name": backend.name, "version": backend.version, "threads": threads, "threads_requested": threads_requested,
                    "providers": backend.providers, "engine": _engine_info(backend)},
        "load_s": round(load_s, 3),
        "cold_ms": cold_ms,
        "smoke": smoke,
        "latency_ms": latency_ms,
        "sustained": soak,
        "conditions": conditions,
        **decode,
        "accuracy": accuracy,
        "peak_rss_mb": peak_rss,
        "thermal": thermal,
        "throttle": throttle,
        "jetson": {"nvpmodel": power_mode, "jetson_clocks": clocks, "tegrastats": tegra.summary()},
        "telemetry": telemetry_summary(telemetry, thermal, throttle, peak_rss, tegra.reason),
        "wall_s": round(time.perf_counter() - started, 3),
        "started_unix": round(started_unix, 3),  # when this run held the device: runs of two jobs must not overlap
        "finished_unix": round(time.time(), 3),
    }
    write_json_atomic(Path(args.report), report)
    print(f"ok p50 {latency_ms['p50']} ms, p99 {latency_ms['p99']} ms/{prompt_tokens} tokens (n={latency_ms['n']}), "
          f"cold {cold_ms['total']} ms, first token {decode['first_token_ms']} ms, "
          f"{decode['decode_tokens_per_s']} tokens/s, exact_match {accuracy['exact_match']} -> {args.report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Verify an edgeft bundle and measure its model on this device.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="example:\n  python3 runner.pyz run --bundle ~/edgeft/bundle --report report.json")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run", help="verify, smoke-test and measure a bundle; write a JSON report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Verify the bundle, load the model, check it against the golden logits, then measure\n"
                    "forward latency cold (process start to first inference), warm (the timed loop, raw\n"
                    "samples kept) and sustained (an optional soak, per window), first-token latency,\n"
                    "decode speed and task accuracy while sampling temperatures, clocks and memory.\n"
                    "A percentile from too few samples (p90 < 20, p99 < 100) is null with the reason.\n"
                    "Writes the report atomically.",
        epilog="example:\n  python3 runner.pyz run --bundle ./bundle --report report.json --threads 4 "
               "--samples samples.jsonl\n  python3 runner.pyz run --bundle ./bundle --report report.json --sustained-s 600")
    run.add_argument("--bundle", required=True, help="bundle directory (holds manifest.json)")
    run.add_argument("--report", required=True, help="where to write the JSON report")
    run.add_argument("--threads", type=_positive_int, help="intra-op threads (default: the manifest's threads)")
    run.add_argument("--sysfs-root", help="sysfs root for thermal zones (default: $EDGEFT_SYSFS_ROOT or /sys)")
    run.add_argument("--samples", help="also write one JSON line per telemetry sample (~every 0.2 s) here")
    run.add_argument("--sustained-s", type=_non_negative_float,
                     help="soak for this many seconds after the warm loop, reported per window (default: the "
                          "manifest's measure.sustained_s; 0: off)")
    run.set_defaults(func=cmd_run)

    verify = sub.add_parser(
        "verify", help="check every bundle file against its sha256 in the manifest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check that every file listed in manifest.json exists inside the bundle and matches\n"
                    "its sha256. Prints 'ok N files' or one error line (exit 2).",
        epilog="example:\n  python3 runner.pyz verify --bundle ./bundle")
    verify.add_argument("--bundle", required=True, help="bundle directory (holds manifest.json)")
    verify.set_defaults(func=cmd_verify)

    info = sub.add_parser(
        "info", help="print this device's description and which runtimes import",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print JSON: the device (arch, OS, kernel, CPU, memory) and each runtime's version\n"
                    "or null when it does not import.",
        epilog="example:\n  python3 runner.pyz info")
    info.set_defaults(func=cmd_info)
    add_install_commands(sub)  # install, commit, rollback, status, trust-key, boot-check
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except RunnerError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable bundle dir, full disk, ...: environmental, so no traceback either
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
