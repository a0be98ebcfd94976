"""The `edgeft` command line: parse, call the library, print, map errors to exit codes."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console

from . import __version__
from .errors import EdgeftError

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
        except EdgeftError as exc:
            if ctx.meta.get("debug"):
                raise
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            sys.exit(exc.exit_code)
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
    On a lab device over SSH (see hil/lab.yaml):
      edgeft build --target rpi5 --device rpi5-lab-1
    """
    ctx.meta["debug"] = debug


@main.command()
@click.option("--target", "-t", required=True, help="Target name (see `edgeft targets`) or path to a target YAML.")
@click.option("--profile", "-p", help="Profile name or YAML path. Default: the target's default_profile.")
@click.option("--model", type=click.Path(path_type=Path), help="Local Hugging Face causal-LM dir. Default: the built-in demo model.")
@click.option("--data", type=click.Path(path_type=Path), help='JSONL of {"prompt", "completion"} lines. Default: the demo task.')
@click.option("--device", "-d", default="local", show_default=True, help="'local' (this machine) or a device name from the lab file.")
@click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML. Default: hil/lab.yaml.")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Bundle directory. Default: build/<target>.")
@click.option("--trust-new-host-key", is_flag=True, help="Accept and record an SSH host key not yet in known_hosts (like ssh's accept-new).")
@click.option("--force", is_flag=True, help="Re-run every stage even when its cached result is valid.")
@click.option("--threads", default=2, show_default=True, help="Host CPU threads for training and export.")
@click.option("--sysfs-root", help="Read the device's thermal zones under this root instead of /sys (for tests).", hidden=True)
@click.option("--search", "do_search", is_flag=True, help="Build and measure every candidate (the profile's search: section, or fp32/int8/int4/pruned), keep the most accurate one within budget.")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")
def build(target, profile, model, data, device, lab, out, trust_new_host_key, force, threads, sysfs_root, do_search, as_json, quiet):
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
    """
    from .build import BuildOptions
    from .build import build as run_build

    log = _logger(quiet)
    options = BuildOptions(
        target=target, profile=profile, model=model, data=data, device=device, lab=lab, out=out,
        trust_new_host_key=trust_new_host_key, force=force, sysfs_root=sysfs_root, threads=threads,
    )
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
    if as_json:
        click.echo(json.dumps(report, indent=2))
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
    steps = ("base", "finetuned", "merged", "pruned", "distilled", "quantized", "device")
    chain = " → ".join(f"{'on device' if k == 'device' else k} {fmt(acc[k])}" for k in steps if acc.get(k) is not None)
    console.print(f"  exact match: {chain}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", "-d", default="local", show_default=True, help="'local' (this machine) or a device name from the lab file.")
@click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML. Default: hil/lab.yaml.")
@click.option("--trust-new-host-key", is_flag=True, help="Accept and record an SSH host key not yet in known_hosts.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Also write the report JSON here.")
@click.option("--sysfs-root", help="Read the device's thermal zones under this root instead of /sys (for tests).", hidden=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No status lines.")
def measure(bundle, device, lab, trust_new_host_key, report_path, sysfs_root, as_json, quiet):
    """Measure a finished bundle on a device and gate it on the budgets it was built with.

    The bundle's files are checked against its manifest first; nothing is rebuilt. For CI on lab
    devices: build once, measure on every board. Exit status as for `build`.

    \b
    Examples:
      edgeft measure build/rpi5 --device rpi5-lab-1
      edgeft measure build/rpi5 -d rpi5-lab-2 --report hil-rpi5-lab-2.json
    """
    from .build import BuildOptions, measure_bundle

    log = _logger(quiet)
    options = BuildOptions(target="", device=device, lab=lab, trust_new_host_key=trust_new_host_key, sysfs_root=sysfs_root)
    report = measure_bundle(bundle, options, log)
    if report_path:
        tmp = report_path.with_name(f".{report_path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(report_path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    if not quiet:
        _print_report(report, f"{bundle} on {device}")
    sys.exit(EXIT_BY_VERDICT[report["gate"]["verdict"]])


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
            f"{row['latency_ms_p99']:.2f}", f"{row['first_token_ms']:.2f}", f"{row['decode_tokens_per_s']:.0f}", f"{row['peak_rss_mb']:.0f}", verdict,
        )
    console.print(table)
    console.print(("[green]chosen:[/] " if result["chosen"] else "[red]none:[/] ") + result["why"], soft_wrap=True)
    if result.get("bundle"):
        console.print(f"bundle: {result['bundle']}")
    console.print(f"all results: {result['search_json']}")


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


def _list(kind: str) -> None:
    from .config import list_names, load_profile, load_target

    load = load_target if kind == "targets" else load_profile
    for name in list_names(kind):
        item = load(name)
        extra = f"  [{item.runtime}, {item.arch}, default profile {item.default_profile}]" if kind == "targets" else ""
        click.echo(f"{name:16} {item.description}{extra}")


if __name__ == "__main__":
    main()
