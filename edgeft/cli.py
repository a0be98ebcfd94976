"""The `edgeft` command line: parse, call the library, print, map errors to exit codes."""

from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console

from . import __version__
from .artifact import write_atomic
from .errors import EdgeftError
from edgeft_runner import RunnerError

# 3: the device throttled during the run, so the measurement says nothing about the budgets.
EXIT_BY_VERDICT = {"PASS": 0, "FAIL": 1, "INVALID": 3}

# Human output goes to stderr, so `--json` leaves stdout clean for machines.
console = Console(stderr=True, highlight=False)


@contextmanager
def _progress(enabled: bool):
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as progress:
        yield progress


class _Group(click.Group):
    """Turns EdgeftError into one line on stderr and its exit code; --debug shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (EdgeftError, RunnerError) as exc:  # RunnerError: the runner's code, run on the host for checks
            if ctx.meta.get("debug"):
                raise
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            sys.exit(getattr(exc, "exit_code", 2))
        except KeyboardInterrupt:
            console.print("interrupted; nothing half-written was kept")
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgeft")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """edgeft: fine-tune a causal LM with QLoRA, compress and export it for an edge device, then
    measure it on that device and gate the build on latency, memory and accuracy budgets.

    \b
    Quick start (the built-in demo, measured on this machine):
      edgeft build --target rpi5
    \b
    Fine-tune alone (on many GPUs: accelerate launch -m edgeft.cli finetune ...):
      edgeft finetune --model ./my-llama --data train.jsonl --out adapters/a
    \b
    On a lab device over SSH (see hil/lab.yaml):
      edgeft build --target rpi5 --device rpi5-lab-1
    """
    ctx.meta["debug"] = debug
    # A CI runner's cancel sends SIGTERM: exit through the `finally` blocks, so reservations are released.
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


@main.command()
@click.option("--target", "-t", required=True, help="Target name (see `edgeft targets`) or path to a target YAML.")
@click.option("--profile", "-p", help="Profile name or YAML path. Default: the target's default_profile.")
@click.option("--model", type=click.Path(path_type=Path), help="Local Hugging Face causal-LM dir. Default: the built-in demo model.")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset: JSONL/JSON/CSV/Parquet file or saved `datasets` dir, prompt/completion, Alpaca or chat (see `edgeft data check`). Default: the demo task.")
@click.option("--device", "-d", default="local", show_default=True, help="'local' (this machine) or a device name from the lab file.")
@click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML. Default: hil/lab.yaml.")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Bundle directory. Default: build/<target>.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0, show_default=True, help="Seconds to wait for the device when another run holds it; then fail naming the holder.")
@click.option("--trust-new-host-key", is_flag=True, help="Accept and record an SSH host key not yet in known_hosts (like ssh's accept-new).")
@click.option("--force", is_flag=True, help="Re-run every stage even when its cached result is valid.")
@click.option("--threads", default=2, show_default=True, help="Host CPU threads for training and export.")
@click.option("--sysfs-root", help="Read the device's thermal zones under this root instead of /sys (for tests).", hidden=True)
@click.option("--search", "do_search", is_flag=True, help="Build and measure every candidate (the profile's search: section, or fp32/int8/int4/pruned), keep the most accurate one within budget.")
@click.option("--adapter", help="Name of the adapter to train and ship (e.g. one per customer or task on the same base); each is cached and merged on its own. Default: the profile's (\"default\").")
@click.option("--adapter-dir", type=click.Path(path_type=Path), help="Start from this adapter (written by `edgeft finetune`, e.g. on many GPUs) instead of running the profile's finetune stage.")
@click.option("--baseline", type=click.Path(path_type=Path), help="An earlier report.json, or a directory searched for the newest PASS report of the same device and model lineage: the profile's max_regression fails the gate on a slowdown beyond it with 95% confidence (bootstrap).")
@click.option("--no-measure", is_flag=True, help="Write the bundle without measuring it (e.g. a Jetson bundle built on a host without TensorRT); measure it later with `edgeft measure`.")
@click.option("--prometheus", "prometheus", type=click.Path(path_type=Path), help="Also write the result as Prometheus metrics to this *.prom file, or edgeft.prom in this directory (node_exporter textfile collector).")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")
def build(target, profile, model, data, device, lab, wait_s, out, trust_new_host_key, force, threads, sysfs_root, do_search, adapter, adapter_dir, baseline, no_measure, prometheus, as_json, quiet):
    """Fine-tune, merge, export and quantize per the profile, measure on a device, gate, write the bundle.

    \b
    Exit status: 0 the gate passed, 1 a budget failed, 2 bad input or unreachable device,
    3 invalid measurement (the device throttled during the run: cool it down and re-run).
    \b
    Examples:
      edgeft build --target rpi5                      # demo model + demo data, measured locally
      edgeft build -t rpi5 --model ./my-llama --data train.jsonl --device rpi5-lab-1
      edgeft build -t rpi5 -p arm-int4 --json > report.json
      edgeft build -t rpi5 --search --device rpi5-lab-1   # most accurate candidate within budget
      edgeft build -t rpi5 --device rpi5-lab-1 --wait 600  # CI: wait up to 10 min for the board
      edgeft build -t jetson-orin --no-measure && edgeft measure build/jetson-orin -d orin-lab-1
      edgeft build -t rpi5 --data acme.jsonl --adapter acme --out build/acme   # one adapter per customer
      edgeft build -t rpi5 --model ./my-llama --data train.jsonl --adapter-dir adapters/a   # from `edgeft finetune`
      edgeft build -t rpi5 -d rpi5-lab-1 --baseline reports/   # fail on a slowdown beyond max_regression
      edgeft build -t rpi5 --prometheus /var/lib/node_exporter/textfile/   # metrics for dashboards
    """
    from .build import BuildOptions
    from .build import build as run_build
    from .regression import check_baseline_arg

    log = _logger(quiet)
    options = BuildOptions(
        target=target, profile=profile, model=model, data=data, device=device, lab=lab, out=out,
        trust_new_host_key=trust_new_host_key, force=force, sysfs_root=sysfs_root, threads=threads,
        measure=not no_measure, adapter=adapter, adapter_dir=adapter_dir, wait_s=wait_s,
        baseline=check_baseline_arg(baseline) if baseline else None,
    )
    if adapter and adapter_dir:
        raise click.UsageError("--adapter names the adapter to train; an --adapter-dir adapter has its name already (edgeft finetune --adapter)")
    if do_search and no_measure:
        raise click.UsageError("--search measures every candidate; it cannot be combined with --no-measure")
    if prometheus and (do_search or no_measure):
        raise click.UsageError("--prometheus writes one measured bundle's results; it cannot be combined with --search or --no-measure")
    prometheus_file = _prometheus_path(prometheus)
    if do_search:
        from .search import search

        with _progress(not quiet) as progress:
            result = search(options, progress=progress, log=log)
        if as_json:
            click.echo(json.dumps(result, indent=2))
        if not quiet:
            _search_table(result)
        sys.exit(0 if result["chosen"] else 1)
    with _progress(not quiet) as progress:
        report = run_build(options, progress=progress, log=log)
    if prometheus_file:
        _write_prometheus(prometheus_file, [(report["bundle"]["path"], report)])
    if as_json:
        click.echo(json.dumps(report, indent=2))
    if no_measure:
        if not quiet:
            console.print(f"[bold]{report['target']}[/] bundle written, not measured: {report['bundle']['path']} "
                          f"({report['model']['precision']}, {report['model']['size_mb']} MB)\n"
                          f"  measure and gate it on the device: edgeft measure {report['bundle']['path']} --device NAME")
        sys.exit(0)
    if not quiet:
        _print_report(report, f"bundle: {report['bundle']['path']}")
    sys.exit(EXIT_BY_VERDICT[report["gate"]["verdict"]])


def _print_report(report: dict, where: str) -> None:
    """The human view of a report: summary, one line per budget check, throttling, verdict."""
    from .gate import describe

    _summary(report)
    for check in report["gate"]["checks"]:
        failed = check["status"] == "fail"
        console.print(("  [red]" if failed else "  ") + describe(check) + ("[/]" if failed else ""))
    for reason in report["gate"].get("invalid_reasons", []):
        console.print(f"  [yellow]throttled:[/] {reason}")
    colour = {"PASS": "green", "FAIL": "red", "INVALID": "yellow"}[report["gate"]["verdict"]]
    console.print(f"[bold {colour}]{report['gate']['verdict']}[/]  {where}")


def _prometheus_path(dest: Path | None) -> Path | None:
    """The file --prometheus will write, checked before any long work (None without --prometheus)."""
    from .prometheus import prometheus_path

    return prometheus_path(dest) if dest else None


def _write_prometheus(path: Path, results: list[tuple[Path | str, dict]]) -> None:
    from .prometheus import bundle_label, write_prometheus

    write_prometheus(path, [(bundle_label(bundle), report) for bundle, report in results])


def _logger(quiet: bool):
    return (lambda message: None) if quiet else (lambda message: console.print(f"[dim]•[/] {message}"))


def _summary(report: dict) -> None:
    acc = report["accuracy"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lat = report["latency_ms"]
    device = report["device"]
    console.print(
        f"[bold]{report['target']}[/] on {device['name']} ({device['arch']}, {device['os']}), "
        f"{report['runtime']['name']} {report['runtime']['version']}, {report['model']['precision']}, "
        f"{report['model']['size_bytes'] / 1e6:.2f} MB"
    )
    if not report["arch_matches_target"]:
        console.print(f"  [yellow]note:[/] device arch {device['arch']} is not the target's; latency is indicative only")
    console.print(
        f"  latency p50 {lat['p50']} / p99 {lat['p99']} ms ({lat['prompt_tokens']} tokens, n={lat['n']}), "
        f"first token {report['first_token_ms']} ms, decode {report['decode_tokens_per_s']} tok/s, peak RSS {report['peak_rss_mb']} MB"
    )
    cold, soak = report.get("cold_ms") or {}, report.get("sustained")
    if cold:
        console.print(f"  cold start {cold['total']} ms (loaded after {cold['process_to_loaded']} ms, first inference {cold['first_inference']} ms)")
    if soak:
        soak_lat = soak["latency_ms"]
        console.print(f"  sustained {soak['duration_s']} s: p50 {soak_lat['p50']} / p99 {soak_lat['p99']} ms, "
                      f"{len(soak['windows'])} windows, drift p50 {soak['drift_p50']:+.1%}" if soak["drift_p50"] is not None else
                      f"  sustained {soak['duration_s']} s: p50 {soak_lat['p50']} / p99 {soak_lat['p99']} ms")
    steps = ("base", "finetuned", "merged", "pruned", "distilled", "quantized", "device")
    chain = " → ".join(f"{'on device' if k == 'device' else k} {fmt(acc[k])}" for k in steps if acc.get(k) is not None)
    console.print(f"  exact match: {chain}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", "-d", default="local", show_default=True, help="'local' (this machine) or a device name from the lab file.")
@click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML. Default: hil/lab.yaml.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0, show_default=True, help="Seconds to wait for the device when another run holds it; then fail naming the holder.")
@click.option("--tags", "tags", multiple=True, help="Instead of --device: measure on any healthy, free lab device that has all these tags (repeat the option).")
@click.option("--trust-new-host-key", is_flag=True, help="Accept and record an SSH host key not yet in known_hosts.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Also write the report JSON here, the telemetry samples (JSON lines) beside it as <name>.telemetry.jsonl, and the HTML report as <name>.html.")
@click.option("--sysfs-root", help="Read the device's thermal zones under this root instead of /sys (for tests).", hidden=True)
@click.option("--baseline", type=click.Path(path_type=Path), help="An earlier report.json, or a directory searched for the newest PASS report of the same device and model lineage: the profile's max_regression fails the gate on a slowdown beyond it with 95% confidence (bootstrap).")
@click.option("--prometheus", "prometheus", type=click.Path(path_type=Path), help="Also write the result as Prometheus metrics to this *.prom file, or edgeft.prom in this directory (node_exporter textfile collector).")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No status lines.")
def measure(bundle, device, lab, wait_s, tags, trust_new_host_key, report_path, sysfs_root, baseline, prometheus, as_json, quiet):
    """Measure a finished bundle on a device and gate it on the budgets it was built with.

    The bundle's files are checked against its manifest first; nothing is rebuilt. For CI on lab
    devices: build once, measure on every board. Exit status as for `build`.

    \b
    Examples:
      edgeft measure build/rpi5 --device rpi5-lab-1
      edgeft measure build/rpi5 -d rpi5-lab-2 --report hil-rpi5-lab-2.json
      edgeft measure build/rpi5 -d rpi5-lab-1 --wait 600   # the board is shared: wait for it
      edgeft measure build/rpi5 --tags rpi5 --wait 600     # any free, healthy rpi5 board
      edgeft measure build/rpi5 -d rpi5-lab-1 --report r.json --baseline last-good/   # regression gate
      edgeft measure build/rpi5 -d rpi5-lab-1 --prometheus /var/lib/node_exporter/textfile/
    """
    from .build import BuildOptions, measure_bundle
    from .regression import check_baseline_arg

    log = _logger(quiet)
    if tags and device != "local":
        raise click.UsageError("give --device or --tags, not both")
    options = BuildOptions(target="", device=device, lab=lab, trust_new_host_key=trust_new_host_key, sysfs_root=sysfs_root, wait_s=wait_s, tags=tuple(tags),
                           baseline=check_baseline_arg(baseline) if baseline else None)
    samples = report_path.with_name(f"{report_path.stem}.telemetry.jsonl") if report_path else None
    if report_path:  # before measuring: a --report that cannot be written fails now, not after the run
        try:
            report_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise click.UsageError(f"--report {report_path}: cannot create its directory ({exc.strerror})") from None
    prometheus_file = _prometheus_path(prometheus)
    report = measure_bundle(bundle, options, log, samples)
    if prometheus_file:
        _write_prometheus(prometheus_file, [(bundle, report)])
    if report_path:
        write_atomic(report_path, json.dumps(report, indent=2))
        from .report_html import render_report

        write_atomic(report_path.with_suffix(".html"), render_report(report, Path(bundle), telemetry_path=samples))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    if not quiet:
        _print_report(report, f"{bundle} on {report['device']['name']}")
    sys.exit(EXIT_BY_VERDICT[report["gate"]["verdict"]])


@main.command("report")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), help="HTML file to write. Default: the report's name with .html, beside it.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), help="The bundle a `measure --report` file was measured from (its manifest and training log). Default: the report's directory, else the bundle it names.")
def report_cmd(source, out, bundle_dir):
    """Write the HTML report of a bundle, a report .json or HIL results: self-contained (no network), plots inline.

    Summary and gate checks, latency histogram and CDF, telemetry over time, accuracy per stage and
    forgetting, fine-tuning curves, data splits. `edgeft build` and `edgeft measure --report` write it
    already; this renders it again, e.g. for an older report.

    \b
    Examples:
      edgeft report build/rpi5                       # writes build/rpi5/report.html
      edgeft report hil-rpi5-lab-2.json --bundle build/rpi5 -o r.html   # a `measure --report` file
      edgeft report hil.json                          # `hil run --json` results: one row per job, linked
    """
    from .report_html import render_report_file

    html, report_path = render_report_file(source, bundle_dir)
    dest = out or report_path.with_suffix(".html")
    write_atomic(dest, html)
    click.echo(str(dest))


@main.command()
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Adapter directory to write (replaced whole, atomically).")
@click.option("--model", type=click.Path(path_type=Path), help="Local Hugging Face causal-LM dir. Default: the built-in demo model.")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset, as for `edgeft build`. Default: the demo task.")
@click.option("--profile", "-p", default="arm-int8", show_default=True, help="Profile name or YAML path whose finetune stage (and data: section) is used.")
@click.option("--adapter", help="Adapter name (overrides the profile's finetune.adapter).")
@click.option("--threads", default=2, show_default=True, help="Host CPU threads per process.")
@click.option("--force", is_flag=True, help="Start from scratch instead of resuming this run's last checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the adapter's artifact (metrics, hashes) as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")
def finetune(out, model, data, profile, adapter, threads, force, as_json, quiet):
    """Run only the profile's finetune stage and write the adapter to --out.

    Runs unchanged on many GPUs or processes: every process trains (data parallel), rank 0 alone
    evaluates and writes --out. Build from the adapter afterwards with `edgeft build --adapter-dir`.

    \b
    Examples:
      edgeft finetune --model ./my-llama --data train.jsonl --out adapters/support
      accelerate launch --num_processes 2 -m edgeft.cli finetune --model ./my-llama --data train.jsonl --out adapters/support
      torchrun --nproc_per_node 2 -m edgeft.cli finetune --model ./my-llama --data train.jsonl --out adapters/support
      edgeft build -t rpi5 --model ./my-llama --data train.jsonl --adapter-dir adapters/support
    """
    from .adapter import FinetuneOptions, process_rank
    from .adapter import finetune as run_finetune

    lead = process_rank() == 0  # the other processes of a multi-process run train silently
    options = FinetuneOptions(out=out, model=model, data=data, profile=profile, adapter=adapter, threads=threads, force=force)
    with _progress(lead and not quiet) as progress:
        artifact = run_finetune(options, progress=progress, log=_logger(quiet or not lead))
    if artifact is None:
        return
    if as_json:
        click.echo(json.dumps({"path": str(artifact.path), "kind": artifact.kind, "sha256": artifact.sha256, "metrics": artifact.metrics,
                               "info": artifact.info, "files": artifact.files}, indent=2, default=str))
    if not quiet:
        m = artifact.metrics
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        console.print(f"adapter {artifact.info.get('adapter')!r} ({artifact.info.get('method')}): train loss {fmt(m.get('train_loss'))}, "
                      f"val loss {fmt(m.get('val_loss'))}, exact match {fmt(m.get('accuracy_base'))} → {fmt(m.get('accuracy'))}, "
                      f"{m.get('train_steps')} steps in {m.get('train_s')} s\n"
                      f"[bold green]written[/]  {artifact.path}", soft_wrap=True)


def _search_table(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"search: {result['target']} on {result['device']}", title_justify="left")
    for column in ("candidate", "size MB", "accuracy", "p50 ms", "p99 ms", "first tok ms", "tok/s", "peak MB", "verdict"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for row in result["candidates"]:
        verdict = {"PASS": "[green]PASS[/]", "INVALID": "[yellow]INVALID[/] throttled"}.get(row["verdict"], f"[red]FAIL[/] {','.join(row['failed'])}")
        mark = "→ " if row["candidate"] == result["chosen"] else "  "
        table.add_row(
            mark + row["candidate"], f"{row['size_bytes'] / 1e6:.2f}", f"{row['accuracy']:.3f}", f"{row['latency_ms_p50']:.2f}",
            "-" if row["latency_ms_p99"] is None else f"{row['latency_ms_p99']:.2f}", f"{row['first_token_ms']:.2f}", f"{row['decode_tokens_per_s']:.0f}", f"{row['peak_rss_mb']:.0f}", verdict,
        )
    console.print(table)
    console.print(("[green]chosen:[/] " if result["chosen"] else "[red]none:[/] ") + result["why"], soft_wrap=True)
    if result.get("bundle"):
        console.print(f"bundle: {result['bundle']}")
    console.print(f"all results: {result['search_json']}")


@main.group("data")
def data_group():
    """Inspect a dataset before building with it."""


@data_group.command("check")
@click.option("--data", "data_path", type=click.Path(path_type=Path), help="JSONL/JSON/CSV/TSV/Parquet file or saved `datasets` dir. Default: the demo task.")
@click.option("--profile", "-p", help="Profile name or YAML path whose data: section applies. Default: the data: defaults.")
@click.option("--model", type=click.Path(path_type=Path), help="Count tokens with this model dir's tokenizer. Default: the demo tokenizer if built, else whitespace words.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")
def data_check(data_path, profile, model, as_json):
    """Check a dataset: format, splits, duplicates, lengths, train/test leakage, sensitive data.

    Uses the same loading and splitting as `edgeft build`. Exit status: 0 clean or only warnings,
    2 bad input, or likely sensitive data when the profile says `data: {sensitive: fail}`.

    \b
    Examples:
      edgeft data check --data train.jsonl
      edgeft data check --data chats.parquet -p my-profile --model ./my-llama
      edgeft data check --data train.csv --json > data-report.json
    """
    from .data import DataConfig, check_data, load_splits

    config = DataConfig()
    if profile:
        from .config import load_profile

        config = load_profile(profile).data
    splits = load_splits(data_path, config)
    tokenizer, measured_with, fallback_note = _data_tokenizer(model, splits)
    report = check_data(splits, config, tokenizer=tokenizer, length_unit=measured_with, enforce=False)
    if fallback_note:
        report.warnings.append(fallback_note)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _data_table(report)
    report.enforce()


def _data_tokenizer(model: Path | None, splits):
    """(tokenizer or None, what measured the lengths, a note when the demo tokenizer could not be used)."""
    from . import quiet_libraries
    from .stages.finetune import load_tokenizer

    if model is not None:
        if not Path(model).is_dir():
            from .errors import ModelError

            raise ModelError(f"{model}: model directory not found; pass a local Hugging Face model dir with tokenizer files")
        quiet_libraries()
        return load_tokenizer(model), f"tokenizer of {model}", None
    from .demo.base import demo_base_dir, is_built

    if not is_built():
        return None, "whitespace words (no --model, demo model not built)", None
    quiet_libraries()
    tokenizer = load_tokenizer(demo_base_dir())
    if splits.format == "chat" and not getattr(tokenizer, "chat_template", None):
        note = "the demo model's tokenizer has no chat template, so building this chat dataset with it would fail; pass --model"
        return None, "whitespace words (the demo tokenizer has no chat template)", note
    return tokenizer, "demo model tokenizer", None


def _data_table(report) -> None:
    from rich.markup import escape
    from rich.table import Table

    d = report.to_dict()
    table = Table(title=f"data check: {escape(d['source'])}", title_justify="left", show_header=False)
    table.add_column("check")
    table.add_column("result")
    c = d["counts"]
    table.add_row("format", d["format"] + (f" (validation: {escape(d['validation_source'])})" if d["validation_source"] else ""))
    table.add_row("examples", f"{c['total']}: {c['train']} train / {c['val']} val / {c['test']} test")
    table.add_row("duplicates removed", str(d["duplicates_removed"]))
    if d["lengths"]:
        n = d["lengths"]
        table.add_row(f"length ({n['unit']})", f"min {n['min']} / p50 {n['p50']} / p90 {n['p90']} / p99 {n['p99']} / max {n['max']}  [dim]({escape(n['measured_with'])})[/]")
    if d["max_length"] is not None:
        t = d["truncated"]
        table.add_row(f"over max_length {d['max_length']}", "needs a tokenizer (--model)" if t is None else f"{t['train']} train / {t['val']} val / {t['test']} test truncated")
    for name in ("test", "val"):
        leak = d["leakage"][name]
        found = leak["exact"] or leak["near"]
        text = f"{leak['exact']} identical, {leak['near']} near-identical prompts"
        if found:
            first = leak["examples"][0]
            text = f"[yellow]{text}[/] (e.g. {escape(first['example'])} ~ {escape(first['train'])})"
        table.add_row(f"{name} prompts in train", text)
    s = d["sensitive"]
    if s["mode"] == "off":
        table.add_row("sensitive data", "not scanned (sensitive: off)")
    else:
        colour = "red" if s["mode"] == "fail" and s["count"] else "yellow" if s["count"] else "green"
        kinds = ", ".join(f"{kind} {n}" for kind, n in s["by_kind"].items())
        table.add_row("sensitive data", f"[{colour}]{s['count']} found[/]" + (f" ({kinds})" if kinds else "") + f"  [dim](sensitive: {s['mode']})[/]")
    console.print(table)
    shown = 20
    for finding in s["findings"][:shown]:
        console.print(f"  {finding['where']}: {finding['kind']} {finding['masked']}", soft_wrap=True, markup=False)
    if s["count"] > shown:
        console.print(f"  ... and {s['count'] - shown} more (--json lists up to {len(s['findings'])})")
    for warning in d["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    if not d["warnings"]:
        console.print("[green]clean[/]")


@main.group("hil")
def hil_group():
    """Hardware-in-the-loop suites: bundles × lab devices, measured in parallel, JUnit for CI."""


@hil_group.command("run")
@click.argument("suite", type=click.Path(path_type=Path))
@click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML. Default: hil/lab.yaml.")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), help="Write JUnit XML here: one test case per bundle × device.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write every job's record and report here (JSON); the device reports go to hil-results/ beside it.")
@click.option("--parallel", type=click.IntRange(min=1), help="Devices measured at once. Default: every device of the suite.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), help="Seconds a job waits for a device another run holds. Default: the suite's wait_s (0).")
@click.option("--trust-new-host-key", is_flag=True, help="Accept and record an SSH host key not yet in known_hosts.")
@click.option("--threads", default=2, show_default=True, help="Host CPU threads for the suite's build recipes.")
@click.option("--baseline", type=click.Path(path_type=Path), help="A report.json or a directory (e.g. an earlier run's hil-results/) searched for the newest PASS report of each device and model lineage: max_regression gates on it.")
@click.option("--prometheus", "prometheus", type=click.Path(path_type=Path), help="Also write every job's result as Prometheus metrics (one sample set per bundle × device) to this *.prom file, or edgeft.prom in this directory.")
@click.option("--quiet", "-q", is_flag=True, help="No status lines; the summary table still prints.")
def hil_run(suite, lab, junit_path, json_path, parallel, wait_s, trust_new_host_key, threads, baseline, prometheus, quiet):
    """Run a suite: every bundle on every device it selects, each device reserved, pushed, measured and
    gated as `edgeft measure` does; devices run in parallel. A device that is unreachable, unhealthy or
    held past --wait fails its jobs (JUnit <error>) and the others go on.

    \b
    Exit status: 0 every job passed, 1 a budget failed or a job could not run, 3 a result is INVALID
    (throttled: re-run), 2 nothing ran (bad suite, no such device, every job errored).
    \b
    Examples:
      edgeft hil run hil/suites/smoke.yaml
      edgeft hil run hil/suites/smoke.yaml --junit hil-junit.xml --json hil.json --wait 600
      edgeft hil run my-suite.yaml --lab ci/lab.yaml --parallel 2
      edgeft hil run hil/suites/smoke.yaml --baseline hil-results/   # regression vs the last good run
      edgeft hil run hil/suites/smoke.yaml --prometheus /var/lib/node_exporter/textfile/
    """
    from .hil import default_results_dir, load_suite, plan_suite, run_suite, suite_exit_code, write_results
    from .regression import check_baseline_arg

    log = _logger(quiet)
    prometheus_file = _prometheus_path(prometheus)
    loaded = load_suite(suite)
    with _progress(not quiet and any(b.target for b in loaded.bundles)) as progress:  # bars only for build recipes
        plan = plan_suite(loaded, lab, default_results_dir(json_path), log, threads=threads, progress=progress)
    result = run_suite(plan, parallel=parallel, wait_s=wait_s, trust_new_host_key=trust_new_host_key, log=log,
                       baseline=check_baseline_arg(baseline) if baseline else None)
    write_results(result, json_path, junit_path)
    if prometheus_file:  # a job that could not run (ERROR) has no report, so no samples
        _write_prometheus(prometheus_file, [(job["bundle"], job["report"]) for job in result["jobs"] if job.get("report")])
    _hil_table(result)
    for path, what in ((json_path, "results"), (junit_path, "JUnit")):
        if path is not None:
            console.print(f"{what}: {path}")
    sys.exit(suite_exit_code(result))


def _hil_table(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .hil import summary_row

    fmt = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    table = Table(title=f"hil: {result['suite']} ({result['wall_s']:.1f} s)", title_justify="left")
    for column in ("bundle", "device", "verdict", "p50 ms", "p99 ms", "first tok ms", "tok/s", "RSS MB", "max °C", "accuracy", "s"):
        table.add_column(column, justify="left" if column in ("bundle", "device", "verdict") else "right")
    errors = []
    for job in result["jobs"]:
        row = summary_row(job)
        verdict = {"PASS": "[green]PASS[/]", "INVALID": "[yellow]INVALID[/]", "ERROR": "[red]ERROR[/]"}.get(
            row["verdict"], f"[red]FAIL[/] {','.join(row['failed'])}")
        if row["error"]:
            errors.append(f"[red]error[/] {escape(row['bundle'])} @ {escape(row['device'])}: {escape(row['error'])}")
        table.add_row(escape(row["bundle"]), escape(row["device"]), verdict, fmt(row["p50_ms"], ".2f"), fmt(row["p99_ms"], ".2f"),
                      fmt(row["first_token_ms"], ".2f"), fmt(row["tokens_per_s"], ".0f"), fmt(row["peak_rss_mb"], ".0f"),
                      fmt(row["max_temp_c"], ".1f"), fmt(row["accuracy"], ".3f"), f"{row['wall_s']:.1f}")
    console.print(table)
    for line in errors:
        console.print(line, soft_wrap=True)


@main.group("lab")
def lab_group():
    """The lab (hil/lab.yaml): who holds which device, which devices are healthy, stale locks."""


@lab_group.command("list")
@click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML. Default: hil/lab.yaml.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def lab_list(lab, as_json):
    """Every device with its target, tags and state: free, held (by user@host, pid, since, lease
    expiry), unhealthy (why, since when, from the last `edgeft lab check`) or unreachable.

    \b
    Examples:
      edgeft lab list
      edgeft lab list --lab ci/lab.yaml --json
    """
    from .lab import lab_list as list_devices

    rows = list_devices(lab)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if row["state"] == "held":
            h = row["holder"]
            state = f"held by {h['owner']} (pid {h['pid']}, lease expires in {h['expires_in_s']:.0f} s)"
        elif row["state"] == "unhealthy":
            state = f"unhealthy since {row['unhealthy']['since']}: {row['unhealthy']['reason']}"
        elif row["state"] == "unreachable":
            state = f"unreachable: {row['error']}"
        else:
            state = "free" + (f" (stale lock of {row['holder']['owner']}: the next run takes it over)" if row["holder"] else "")
        emulated = " (emulated)" if row["emulated"] else ""
        click.echo(f"{row['name']:16} {row['target']:12} [{', '.join(row['tags'])}]{emulated}  {state}")


@lab_group.command("check")
@click.argument("devices", nargs=-1)
@click.option("--tags", "tags", multiple=True, help="Only devices carrying this tag (repeat for several; all must match).")
@click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML. Default: hil/lab.yaml.")
@click.option("--trust-new-host-key", is_flag=True, help="Accept and record an SSH host key not yet in known_hosts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def lab_check(devices, tags, lab, trust_new_host_key, as_json):
    """Probe devices in parallel: SSH reachable with a known host key, the lab file's python with numpy
    and the target's runtime (version), free disk in the workdir, arch matches the target, thermal
    sensors (a warning only). Failing devices are marked unhealthy and reservations skip them until a
    later check passes. Exit 1 when any checked device is unhealthy.

    \b
    Examples:
      edgeft lab check                     # every device
      edgeft lab check rpi5-lab-1
      edgeft lab check --tags rpi5 --json
    """
    from .lab import lab_check as check_devices

    results = check_devices(lab, tuple(devices), tuple(tags), trust_new_host_key)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            f = r["facts"]
            runtime = f.get("runtime") or {}
            facts = (f"python {f['python']}, numpy {f.get('numpy')}, {runtime.get('name')} {runtime.get('version', '-')}, "
                     f"{f['arch']}, {f['free_mb']} MB free") if "python" in f else ""
            if r["healthy"]:
                console.print(f"[green]healthy[/]    {r['name']:16} {facts}", soft_wrap=True)
            else:
                console.print(f"[red]unhealthy[/]  {r['name']:16} since {r['since']}: {'; '.join(r['problems'])}", soft_wrap=True, markup=False)
            for warning in r["warnings"]:
                console.print(f"  [yellow]warning:[/] {warning}")
    sys.exit(0 if all(r["healthy"] for r in results) else 1)


@lab_group.command("unlock")
@click.argument("device")
@click.option("--kick-stale", is_flag=True, help="Remove the lock only if its lease has expired (its holder died).")
@click.option("--force", is_flag=True, help="Remove it even if the lease is live (a hung run); that run loses its lease.")
@click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML. Default: hil/lab.yaml.")
@click.option("--trust-new-host-key", is_flag=True, help="Accept and record an SSH host key not yet in known_hosts.")
def lab_unlock(device, kick_stale, force, lab, trust_new_host_key):
    """Remove a device's lock left by a run that died, and the run dirs it left; with `lock: labgrid`,
    also unlock the labgrid place that run held (labgrid never expires it by itself).

    A reservation takes over an expired lease by itself; this is for clearing it by hand (e.g. so
    `edgeft lab list` shows the device free, or to free a labgrid place for people using labgrid).

    \b
    Examples:
      edgeft lab unlock rpi5-lab-1 --kick-stale
      edgeft lab unlock rpi5-lab-1 --force      # the holder is hung but still renewing
    """
    from .device.reserve import describe_holder, unlock

    if kick_stale == force:
        raise click.UsageError("say what to remove: --kick-stale (only an expired lease) or --force (a live one too)")
    answer = unlock(device, lab, force=force, trust_new_host_key=trust_new_host_key, log=_logger(False))
    if not answer.get("locked"):
        console.print(f"{device}: not locked")
        return
    console.print(f"{device}: removed the lock of {describe_holder(answer.get('lock'), answer.get('now'))}"
                  + (f", {len(answer['removed_runs'])} run dir(s)" if answer.get("removed_runs") else "")
                  + (f", labgrid place lock of {answer['labgrid_unlocked']}" if answer.get("labgrid_unlocked") else ""))


@lab_group.command("emulate")
@click.argument("name")
@click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML to add the board to (created if missing). Default: hil/lab.yaml.")
@click.option("--target", "-t", default="rpi5", show_default=True, help="The target the board stands in for (an aarch64 onnxruntime target).")
@click.option("--stop", is_flag=True, help="Stop the board's sshd and what runs in it, and unmount its root (its rootfs and lab entry stay).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No status lines.")
def lab_emulate(name, lab, target, stop, as_json, quiet):
    """Bring up an emulated ARM64 board on this machine and add it to the lab file as NAME.

    An arm64 Debian under qemu-user with its own sshd on 127.0.0.1 and the real aarch64 numpy and
    onnxruntime wheels: `build`/`measure`/`hil run` on it exercise the ARM runner, runtime and
    install path for real. Compute is ~450x slower than the host, so its latency budgets are
    skipped (reported, never gated); smoke test and accuracy are gated. Needs root. The first run
    builds the rootfs (~5 min; cached under $EDGEFT_EMULATE_CACHE); later ones take seconds, and
    with the board up it only reports it.

    \b
    Examples:
      sudo edgeft lab emulate rpi5-emu-1
      edgeft measure build/rpi5 -d rpi5-emu-1
      edgeft lab emulate rpi5-emu-1 --lab ci/lab.yaml --json
      edgeft lab emulate rpi5-emu-1 --stop
    """
    from .emulate import emulate, stop as stop_board

    log = _logger(quiet)
    result = stop_board(name, log=log) if stop else emulate(name, lab, target=target, log=log)
    if as_json:
        click.echo(json.dumps(result, indent=2))


@main.command()
@click.option("--device", "-d", help="Also probe this lab device, as `edgeft lab check` does.")
@click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML (its key_file entries are checked too). Default: hil/lab.yaml with --device.")
@click.option("--trust-new-host-key", is_flag=True, help="Accept and record an SSH host key not yet in known_hosts.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def doctor(device, lab, trust_new_host_key, as_json):
    """Check this host (and a device) for what edgeft needs: Python, the torch build (CPU or CUDA),
    bitsandbytes, transformers, peft, ONNX and ONNX Runtime, the optional LiteRT converter,
    quantizer and runtime, TensorRT, paramiko, an SSH key, the build cache and its free space.
    One line per check (ok, warn or missing) with the command that fixes it.

    \b
    Exit status: 0 nothing required is missing (optional parts may be), 1 something required is
    missing or the device is unhealthy, 2 bad input (e.g. no such device in the lab file).
    \b
    Examples:
      edgeft doctor
      edgeft doctor --device rpi5-lab-1
      edgeft doctor --json | jq '.checks[] | select(.status != "ok")'
    """
    from rich.markup import escape

    from .doctor import doctor as run_doctor

    result = run_doctor(device, lab, trust_new_host_key)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        colour = {"ok": "green", "warn": "yellow", "missing": "red"}
        for c in result["checks"]:
            optional = "" if c["required"] or c["status"] == "ok" else " (optional)"
            console.print(f"[{colour[c['status']]}]{c['status']:7}[/] {escape(c['name']):18} {escape(c['detail'])}{optional}", soft_wrap=True)
            if c["fix"]:
                console.print(f"        {'':18} [dim]fix:[/] {escape(c['fix'])}", soft_wrap=True)
    sys.exit(0 if result["ok"] else 1)


@main.command()
def targets():
    """List the targets (device classes) in targets/: runtime, arch, default profile.

    \b
    Example:
      edgeft targets
      edgeft build --target rpi5
    """
    _list("targets")


@main.command()
def profiles():
    """List the build profiles (stages, measure settings, budgets) in profiles/.

    \b
    Example:
      edgeft profiles
      edgeft build --target rpi5 --profile arm-int4
    """
    _list("profiles")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def adapters(as_json):
    """List the trained adapters in the build cache: name, base and data they belong to, accuracy.

    Every `edgeft build --adapter NAME` (or finetune stage) stores its adapter there, keyed by base,
    data and config; a build with the same inputs reuses it, and each merges on its own.

    \b
    Example:
      edgeft build -t rpi5 --data acme.jsonl --adapter acme
      edgeft build -t rpi5 --data globex.jsonl --adapter globex
      edgeft adapters
    """
    from .artifact import cache_root

    rows = []
    for meta_path in sorted((cache_root() / "artifacts").glob("finetune-*/artifact.json")):
        meta = json.loads(meta_path.read_text())
        card_path = meta_path.parent / "adapter" / "edgeft_adapter.json"
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        rows.append({"name": meta["info"].get("adapter", "default"), "method": meta["info"].get("method"),
                     "base_sha256": meta["info"].get("base_sha256"), "data_sha256": card.get("data_sha256"),
                     "accuracy": meta["metrics"].get("accuracy"), "path": str(meta_path.parent / "adapter")})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no adapters in {cache_root() / 'artifacts'}; train one with edgeft build --adapter NAME")
    for row in rows:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        click.echo(f"{row['name']:16} {row['method'] or '?':6} base {str(row['base_sha256'])[:12]}  "
                   f"data {str(row['data_sha256'])[:12]}  exact match {accuracy}  {row['path']}")


def _list(kind: str) -> None:
    from .config import list_names, load_profile, load_target

    load = load_target if kind == "targets" else load_profile
    for name in list_names(kind):
        item = load(name)
        extra = f"  [{item.runtime}, {item.arch}, default profile {item.default_profile}]" if kind == "targets" else ""
        click.echo(f"{name:16} {item.description}{extra}")


if __name__ == "__main__":
    main()
