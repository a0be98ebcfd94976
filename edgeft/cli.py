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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    # Elapsed and, for work of known size (evaluation, training), the time left: a 1B model's evaluation takes minutes.
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
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
@click.option("--sign-key", "sign_key", type=click.Path(path_type=Path), help="Sign the bundle with this private key (edgeft.key) as the last step, when the gate passes or with --no-measure (as `edgeft sign` does: channel = target, next version). Checked before any work.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop: the stages, which are cached, the model's parameter count, each stage's estimated peak memory and disk; warn when memory looks short. Trains nothing, contacts no device.")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")
def build(target, profile, model, data, device, lab, wait_s, out, trust_new_host_key, force, threads, sysfs_root, do_search, adapter, adapter_dir, baseline, no_measure, prometheus, sign_key, dry_run, as_json, quiet):
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
      edgeft build -t rpi5 --sign-key keys/edgeft.key   # a signed release (edgeft keys new --out keys)
      edgeft build -t jetson-orin --model ./tinyllama --dry-run   # the plan, memory and disk before anything runs
    """
    from .build import BuildOptions
    from .build import build as run_build
    from .regression import check_baseline_arg

    log = _logger(quiet)
    options = BuildOptions(
        target=target, profile=profile, model=model, data=data, device=device, lab=lab, out=out,
        trust_new_host_key=trust_new_host_key, force=force, sysfs_root=sysfs_root, threads=threads,
        measure=not no_measure, adapter=adapter, adapter_dir=adapter_dir, wait_s=wait_s,
        baseline=check_baseline_arg(baseline) if baseline else None, sign_key=sign_key,
    )
    if adapter and adapter_dir:
        raise click.UsageError("--adapter names the adapter to train; an --adapter-dir adapter has its name already (edgeft finetune --adapter)")
    if do_search and no_measure:
        raise click.UsageError("--search measures every candidate; it cannot be combined with --no-measure")
    if prometheus and no_measure:
        raise click.UsageError("--prometheus writes measured results; it cannot be combined with --no-measure")
    prometheus_file = _prometheus_path(prometheus)
    if dry_run:
        from .build import dry_run as plan_build

        plan = plan_build(options)
        if as_json:
            click.echo(json.dumps(plan, indent=2))
        else:
            _print_plan(plan)
        sys.exit(0)
    if do_search:
        from .search import search

        candidate_reports: dict[str, dict] = {}
        with _progress(not quiet) as progress:
            result = search(options, progress=progress, log=log, reports=candidate_reports)
        if prometheus_file:  # one sample set per candidate, bundle="search:<candidate>"
            _write_prometheus(prometheus_file, [(f"search:{name}", report) for name, report in candidate_reports.items()])
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


def _print_plan(plan: dict) -> None:
    """The human view of `build --dry-run`."""
    from rich.table import Table

    params = plan["parameters"]
    size = f"{params / 1e9:.2f}B parameters, {plan['fp32_weight_bytes'] / 1e9:.1f} GB in fp32" if params else "size unknown (no *.safetensors)"
    console.print(f"[bold]plan[/]: {plan['target']} / {plan['profile']}, model {plan['model']} ({size}), data {plan['data']}, out {plan['out']}")
    table = Table(box=None, pad_edge=False)
    for column in ("stage", "cached", "peak memory (est.)", "disk (est.)", "config"):
        table.add_column(column)
    for row in plan["stages"]:
        peak, disk = row.get("peak_memory_bytes"), row.get("disk_bytes")
        table.add_row(row["name"], "yes" if row["cached"] else "no", _human_bytes(peak) if peak else "?",
                      _human_bytes(disk) if disk else "?", json.dumps(row["config"]) if row["config"] else "")
    console.print(table)
    available = plan["available_memory_bytes"]
    if available is not None:
        console.print(f"memory free now: {_human_bytes(available)}")
    if plan["warning"]:
        console.print(f"[yellow]{plan['warning']}[/]")


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
@click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(path_type=Path), help="Verify the bundle's signature with this public key (edgeft.pub; repeat for several) before anything goes to the device; refuse it otherwise.")
@click.option("--quiet", "-q", is_flag=True, help="No status lines.")
def measure(bundle, device, lab, wait_s, tags, trust_new_host_key, report_path, sysfs_root, baseline, prometheus, pubkeys, as_json, quiet):
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
      edgeft measure build/rpi5 -d rpi5-lab-1 --pubkey keys/edgeft.pub   # only a signed, unedited bundle
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
            raise click.UsageError(f"--report {report_path}: cannot create its directory ({exc.strerror})") from exc
    prometheus_file = _prometheus_path(prometheus)
    _check_signature(bundle, tuple(pubkeys))
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


@main.group("keys")
def keys_group():
    """Signing keys: a device installs only bundles signed by a key it trusts."""


@keys_group.command("new")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Directory for edgeft.key (private, mode 0600) and edgeft.pub (public); created if missing, an existing key is never overwritten.")
@click.option("--json", "as_json", is_flag=True, help="Print {key, pub, key_id} as JSON on stdout.")
def keys_new(out_dir, as_json):
    """Make an Ed25519 key pair for signing bundles.

    Keep edgeft.key on the machine that signs releases and back it up offline: it is the only copy,
    and devices trust nothing else. Hand out edgeft.pub: `edgeft verify --pubkey`, and devices install
    it once. versions.json, kept beside the key by `edgeft sign`, counts the versions signed per channel.

    \b
    Examples:
      edgeft keys new --out ~/.edgeft/keys
      edgeft sign build/rpi5 --key ~/.edgeft/keys/edgeft.key
      edgeft verify build/rpi5 --pubkey ~/.edgeft/keys/edgeft.pub
    """
    from .flash.signing import load_public_key, new_keypair

    key_path, pub_path = new_keypair(out_dir)
    key_id, _ = load_public_key(pub_path)
    if as_json:
        click.echo(json.dumps({"key": str(key_path), "pub": str(pub_path), "key_id": key_id}, indent=2))
    else:
        console.print(f"key {key_id}\n  private {key_path} (mode 0600: keep it secret, back it up)\n  public  {pub_path}", soft_wrap=True)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "-k", "key_path", required=True, type=click.Path(path_type=Path), help="The private key: edgeft.key from `edgeft keys new`.")
@click.option("--version", "version", type=click.IntRange(min=1), help="Release version within the channel. Default: one above the highest signed for the channel with this key (versions.json beside it).")
@click.option("--channel", help="Release channel; devices keep the highest version installed per channel and refuse older ones. Default: the bundle's target.")
@click.option("--expires", help="Devices and `edgeft verify` refuse the bundle from then on: a date (2027-06-30 means 00:00 UTC that day) or an ISO time (2027-06-30T12:00:00+02:00). Default: never.")
@click.option("--json", "as_json", is_flag=True, help="Print {bundle, bundle_sha256, key_id, channel, version, expires} as JSON on stdout.")
def sign(bundle, key_path, version, channel, expires, as_json):
    """Sign a bundle: every file is checked against manifest.json first, then a `release` block
    (channel, version, expiry) is added to the manifest and manifest.sig signs all of it (file hashes,
    budgets, release). Editing anything afterwards makes `edgeft verify` and devices refuse it.

    \b
    Examples:
      edgeft sign build/rpi5 --key keys/edgeft.key                   # channel rpi5, next version
      edgeft sign build/rpi5 --key keys/edgeft.key --channel rpi5-beta --version 7 --expires 2027-06-30
      edgeft build -t rpi5 --sign-key keys/edgeft.key               # sign as the build's last step
    """
    from .flash.signing import sign_bundle

    result = sign_bundle(bundle, key_path, version=version, channel=channel, expires=expires)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        until = f", expires {result['expires']}" if result["expires"] else ""
        console.print(f"[bold green]signed[/] {bundle}: channel {result['channel']} version {result['version']}{until}, "
                      f"key {result['key_id']}, bundle {result['bundle_sha256'][:16]}", soft_wrap=True)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--pubkey", "pubkeys", required=True, multiple=True, type=click.Path(path_type=Path), help="A trusted public key (edgeft.pub); repeat for several (e.g. while rotating keys).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout, also when refused ({\"ok\": false, \"problem\": ...}).")
def verify(bundle, pubkeys, as_json):
    """Check a bundle as a device does before installing it: the signature with a trusted key, then
    every file's sha256, then the expiry. Files not in the manifest are ignored.

    \b
    Exit status: 0 verified, 2 refused, with one line naming the file or the reason (unsigned, a key
    not trusted, manifest.json edited after signing, a file's sha256, missing file, expired).
    \b
    Examples:
      edgeft verify build/rpi5 --pubkey keys/edgeft.pub
      edgeft verify build/rpi5 --pubkey old.pub --pubkey new.pub --json
    """
    from .errors import BundleError
    from .flash.signing import verify_bundle

    try:
        result = verify_bundle(bundle, pubkeys)
    except BundleError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "bundle": str(bundle), "problem": str(exc)}, indent=2))
        raise
    result.pop("manifest")
    if as_json:
        click.echo(json.dumps({"ok": True, **result}, indent=2))
    else:
        until = f", expires {result['expires']}" if result["expires"] else ""
        console.print(f"[bold green]verified[/] {bundle}: key {result['key_id']}, channel {result['channel']} version "
                      f"{result['version']}{until}, {result['files']} files", soft_wrap=True)


def _check_signature(bundle: Path, pubkeys: tuple[Path, ...]) -> None:
    """measure --pubkey: refuse an unsigned, foreign or edited bundle before any device work. Without
    --pubkey, say so when the bundle is unsigned: its budgets (what the gate reads) could have been edited."""
    from .flash.signing import signature_state, verify_bundle

    if pubkeys:
        verify_bundle(bundle, pubkeys)
    elif (Path(bundle) / "manifest.json").is_file() and not signature_state(bundle)["signed"]:
        console.print(f"[yellow]warning:[/] {bundle} is unsigned: its manifest and budgets are not tamper-proof "
                      f"(sign it: edgeft sign {bundle} --key KEY; then measure with --pubkey)", soft_wrap=True)


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
        fmt = lambda value, spec, scale=1: "-" if value is None else format(value / scale, spec)  # noqa: E731  (None: not measured)
        table.add_row(
            mark + row["candidate"], fmt(row["size_bytes"], ".2f", 1e6), fmt(row["accuracy"], ".3f"), fmt(row["latency_ms_p50"], ".2f"),
            fmt(row["latency_ms_p99"], ".2f"), fmt(row["first_token_ms"], ".2f"), fmt(row["decode_tokens_per_s"], ".0f"), fmt(row["peak_rss_mb"], ".0f"), verdict,
        )
    console.print(table)
    for row in result["candidates"]:
        if row.get("error"):
            console.print(f"  {row['candidate']}: {row['error']}", soft_wrap=True, markup=False)
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
    from .build import check_threads
    from .hil import default_results_dir, load_suite, plan_suite, run_suite, suite_exit_code, write_results
    from .regression import check_baseline_arg

    check_threads(threads)
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
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", "-d", "devices", multiple=True, help="A lab device to flash (repeat the option for several).")
@click.option("--devices", "tags", multiple=True, metavar="TAG", help="Instead of --device: every lab device carrying this tag (repeat: all tags must match); devices of another target are skipped.")
@click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(path_type=Path), help="Public key (edgeft.pub) the bundle's signature must verify with, on this host, before any device is contacted (repeatable).")
@click.option("--install-pubkey", type=click.Path(path_type=Path), help="First make each device trust this public key (its <root>/keys); also used to verify here.")
@click.option("--allow-downgrade", is_flag=True, help="Install a version older than the highest this device installed for the bundle's channel.")
@click.option("--canary", type=click.IntRange(min=0), default=0, show_default=True, help="Flash this many devices first; the others start only if every canary ends installed.")
@click.option("--max-failures", type=click.IntRange(min=1), default=1, show_default=True, help="Halt after this many devices failed; devices not started are skipped.")
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True, help="Devices flashed at once.")
@click.option("--root", help="Install root on the devices (absolute, or relative to the device's workdir). Default: each device's install.root in the lab file (edgeft-install).")
@click.option("--no-latency-check", is_flag=True, help="Skip the smoke test's latency budget (emulated devices always skip it).")
@click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML. Default: hil/lab.yaml.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0, show_default=True, help="Seconds to wait for a device another run holds; then fail naming the holder.")
@click.option("--trust-new-host-key", is_flag=True, help="Accept and record an SSH host key not yet in known_hosts.")
@click.option("--json", "as_json", is_flag=True, help="Print the rollout result (one record per device) as JSON on stdout.")
@click.option("--out", "-o", "out_path", type=click.Path(path_type=Path), help="Also write the rollout result JSON to this file (atomically), and its HTML page beside it (.html).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines; the summary table still prints.")
def flash(bundle, devices, tags, pubkeys, install_pubkey, allow_downgrade, canary, max_failures, parallel, root,
          no_latency_check, lab, wait_s, trust_new_host_key, as_json, out_path, quiet):
    """Install a signed bundle on lab devices: A/B slots, smoke test, switch, health check, rollback.

    The signature and every hash are checked here before any device is contacted; each device is
    reserved, checked (target, runtime, free disk), sent only the files its store lacks (resuming a
    cut transfer), and its runner installs the bundle into the inactive slot, smoke-tests it there,
    switches <root>/current and runs the lab file's install.health_check; a failure rolls back to
    the previous version. A device already running the bundle is skipped (re-running is safe).

    \b
    Exit status: 0 every device installed or already current, 1 a device failed its smoke test or
    health check (it runs its previous version) or the rollout halted, 2 a device refused the
    bundle (signature, version, disk, target) or could not be reached, or bad input.
    \b
    Examples:
      edgeft flash build/rpi5 --device rpi5-lab-1 --pubkey keys/edgeft.pub
      edgeft flash build/rpi5 -d rpi5-lab-1 --install-pubkey keys/edgeft.pub    # first flash: trust the key
      edgeft flash build/rpi5 --devices store-42 --pubkey keys/edgeft.pub --canary 1 --max-failures 2 -o rollout.json
      edgeft flash build/rpi5-v3 -d rpi5-lab-1 --pubkey keys/edgeft.pub --allow-downgrade
    """
    from .flash.flash import FlashOptions
    from .flash.rollout import rollout, rollout_exit_code

    if bool(devices) == bool(tags):
        raise click.UsageError("name the devices: --device NAME (repeatable) or --devices TAG, not both")
    if out_path is not None and out_path.is_dir():
        raise click.UsageError(f"--out {out_path} is a directory; name a file, e.g. {out_path / 'rollout.json'}")
    options = FlashOptions(allow_downgrade=allow_downgrade, no_latency_check=no_latency_check,
                           install_pubkey=install_pubkey, root=root)
    with _transfer_progress(not quiet) as progress:
        result = rollout(bundle, devices=devices, tags=tags, lab_path=lab, pubkeys=pubkeys, options=options, canary=canary,
                         max_failures=max_failures, parallel=parallel, wait_s=wait_s, trust_new_host_key=trust_new_host_key,
                         progress=progress, log=_logger(quiet))
    if out_path is not None:
        from .report_html import render_rollout

        write_atomic(out_path, json.dumps(result, indent=2) + "\n")
        write_atomic(out_path.with_suffix(".html"), render_rollout(result))  # one row per device, for people
    if as_json:
        click.echo(json.dumps(result, indent=2))
    _flash_table(result)
    if out_path is not None:
        console.print(f"result: {out_path} (and {out_path.with_suffix('.html')})")
    sys.exit(rollout_exit_code(result))


@contextmanager
def _transfer_progress(enabled: bool):
    """One bar per device in flight: bytes, rate and time left."""
    if not enabled:
        yield None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        yield progress


def _flash_table(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    colour = {"installed": "green", "already-current": "green", "skipped": "yellow", "rolled-back": "red",
              "refused": "red", "failed": "red", "error": "red", "pending": "yellow"}
    table = Table(title=f"flash: {result['target']} version {result['version']} ({result['channel']}), bundle "
                        f"{result['bundle'][:12]}, {result['wall_s']:.1f} s", title_justify="left")
    for column in ("device", "result", "version", "previous", "sent MB", "s", "reason"):
        table.add_column(column, justify="right" if column in ("sent MB", "s") else "left")
    for r in result["devices"]:
        previous = r.get("previous") or {}
        table.add_row(escape(r["device"]), f"[{colour.get(r['result'], 'red')}]{r['result']}[/]",
                      "-" if r.get("version") is None else str(r["version"]),
                      str(previous.get("version", "-")) if isinstance(previous, dict) else str(previous),
                      f"{r.get('bytes_sent', 0) / 1e6:.2f}", f"{r.get('seconds', 0):.1f}", escape(r.get("reason") or ""))
    console.print(table)
    for r in result["devices"]:  # the whole line, which the table may have wrapped
        if r["result"] in ("refused", "failed", "error", "rolled-back"):
            console.print(f"[red]{r['result']}[/] {escape(r['device'])}: {escape(r.get('reason') or '')}", soft_wrap=True)
    if result["halted"]:
        console.print(f"[red]rollout halted:[/] {escape(result['halted'])}", soft_wrap=True)


def _installed_device_options(command):
    """The options of the commands that look at one device's install root (status, rollback)."""
    for option in reversed((
        click.option("--device", "-d", required=True, help="The lab device."),
        click.option("--root", help="Install root on the device. Default: its install.root in the lab file (edgeft-install)."),
        click.option("--lab", type=click.Path(path_type=Path), help="Lab inventory YAML. Default: hil/lab.yaml."),
        click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0, show_default=True,
                     help="Seconds to wait for the device when another run holds it."),
        click.option("--trust-new-host-key", is_flag=True, help="Accept and record an SSH host key not yet in known_hosts."),
    )):
        command = option(command)
    return command


@main.command("status")
@_installed_device_options
@click.option("--json", "as_json", is_flag=True, help="Print the device's install state and last log lines as JSON on stdout.")
def status_cmd(device, root, lab, wait_s, trust_new_host_key, as_json):
    """Show what a device has installed: both slots (bundle, version, channel, good/pending/failed),
    which one is active, a pending install, the highest version per channel, and the install log.

    \b
    Examples:
      edgeft status --device rpi5-lab-1
      edgeft status -d rpi5-lab-1 --json | jq .state.active
    """
    from .flash.flash import status

    answer = status(device, lab_path=lab, root=root, wait_s=wait_s, trust_new_host_key=trust_new_host_key, log=_logger(as_json))
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    _print_install_state(answer)


def _print_install_state(answer: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    state = answer.get("state", answer)
    active, pending = state.get("active"), state.get("pending")
    table = Table(title=f"{answer['device']}: {answer['root']}", title_justify="left")
    for column in ("slot", "active", "status", "version", "channel", "bundle", "installed"):
        table.add_column(column)
    for name, slot in sorted((state.get("slots") or {}).items()):
        slot = slot or {}
        table.add_row(name, "*" if name == active else "", escape(str(slot.get("status", "empty"))),
                      str(slot.get("version", "-")), escape(str(slot.get("channel", "-"))), str(slot.get("bundle", "-"))[:12],
                      escape(str(slot.get("installed_at", "-"))))
    console.print(table)
    if pending:
        console.print(f"[yellow]pending:[/] slot {pending.get('slot')} (previous {pending.get('previous')}), since {pending.get('since')}")
    highest = state.get("highest_version") or {}
    if highest:
        console.print("highest version: " + ", ".join(f"{escape(k)} {v}" for k, v in sorted(highest.items())))
    for line in answer.get("log") or []:
        detail = line.get("detail")
        reason = detail.get("reason") if isinstance(detail, dict) else detail  # the one detail worth a line
        what = " ".join(str(part) for part in (
            line.get("step"), line.get("result"), line.get("version") and f"v{line['version']}",
            line.get("slot") and f"slot {line['slot']}", str(line.get("bundle") or "")[:12], reason) if part)
        console.print(f"  [dim]{escape(str(line.get('time', '')))}[/] {escape(what)}", soft_wrap=True)


@main.command("rollback")
@_installed_device_options
@click.option("--json", "as_json", is_flag=True, help="Print the runner's answer as JSON on stdout.")
def rollback_cmd(device, root, lab, wait_s, trust_new_host_key, as_json):
    """Switch a device back to its other slot (when that slot holds a good, verified bundle), or cancel
    a pending install; the runner does it under the install lock and logs it.

    \b
    Exit status: 0 rolled back, 2 nothing to roll back to (or bad input).
    \b
    Example:
      edgeft rollback --device rpi5-lab-1 && edgeft status --device rpi5-lab-1
    """
    from .flash.flash import rollback

    code, answer = rollback(device, lab_path=lab, root=root, wait_s=wait_s, trust_new_host_key=trust_new_host_key, log=_logger(as_json))
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    elif code == 0:
        console.print(f"{device}: {answer.get('result', 'rolled back')}: slot {answer.get('slot')}, version {answer.get('version')}")
    else:
        console.print(f"[bold red]error:[/] {device}: {answer.get('reason') or answer.get('result')}", soft_wrap=True)
    sys.exit(code)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Kit directory to write (written whole or not at all; an earlier kit there is replaced).")
@click.option("--pubkey", required=True, type=click.Path(path_type=Path), help="The public key (edgeft.pub) the bundle is verified with; it goes into the kit and the gateway is told to trust it.")
@click.option("--root", default="/var/lib/edgeft", show_default=True, help="Install root on the gateway (absolute); the application reads its model in ROOT/current/.")
@click.option("--python", "python", default="python3", show_default=True, help="The gateway's interpreter with numpy and the bundle's runtime (e.g. /opt/venv/bin/python).")
@click.option("--json", "as_json", is_flag=True, help="Print {kit, bundle_sha256, channel, version, key_id, root, files, bytes, runner_sha256} as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or status lines.")
def kit(bundle, out_dir, pubkey, root, python, as_json, quiet):
    """Write a field kit for a gateway with no host connection: the signed bundle, the public key,
    the runner and install.sh. Copy the folder onto the gateway and run `sh install.sh` there: it
    trusts the key, then installs with the same steps as `edgeft flash` (verify the signature and every
    hash, smoke test in the spare slot, switch ROOT/current, roll back on failure).

    \b
    The bundle is verified on the host first. install.sh exits 0 installed (or already current),
    1 smoke test failed (the previous version still runs), 2 refused (nothing installed).
    \b
    Examples:
      edgeft kit build/rpi5 -o /media/usb/rpi5-kit --pubkey keys/edgeft.pub
      edgeft kit build/rpi5 -o kit --pubkey keys/edgeft.pub --root /data/edgeft --python /opt/venv/bin/python
      # on the gateway:  sh /media/usb/rpi5-kit/install.sh
    """
    from .flash.kit import write_kit

    with _progress(not quiet) as progress:
        result = write_kit(bundle, out_dir, pubkey, root=root, python=python, progress=progress)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif not quiet:
        console.print(f"[bold green]kit[/] {out_dir}: bundle {result['bundle_sha256'][:16]} channel {result['channel']} "
                      f"version {result['version']}, {result['files']} files, {result['bytes'] / 1e6:.1f} MB; "
                      f"on the gateway: sh {out_dir}/install.sh", soft_wrap=True)


@main.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--device-type", "-t", "device_types", multiple=True, help="Mender device type the artifact installs on (repeat for several); the device's /var/lib/mender/device_type must match.")
@click.option("--out", "-o", "out_path", type=click.Path(path_type=Path), help="Artifact file to write, e.g. model.mender.")
@click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(path_type=Path), help="Verify the bundle's signature with this public key first (repeat for several). Without it, the bundle must still be signed and every hash match.")
@click.option("--artifact-name", "-n", help="Mender artifact name (what `mender show-artifact` prints after install). Default: edgeft-<channel>-v<version>.")
@click.option("--module-out", type=click.Path(path_type=Path), help="Write the update module `edgeft-model` here (for device images: /usr/share/mender/modules/v3/edgeft-model); BUNDLE is then optional.")
@click.option("--json", "as_json", is_flag=True, help="Print {artifact, artifact_name, device_types, bundle_sha256, channel, version, bytes, sha256} as JSON on stdout.")
def mender(bundle, device_types, out_path, pubkeys, artifact_name, module_out, as_json):
    """Write a Mender artifact (a module-image of type edgeft-model) for OTA fleets, with Mender's own
    mender-artifact tool (Debian/Ubuntu: apt-get install mender-artifact). It carries the signed bundle and
    the matching runner; on the device the update module `edgeft-model` installs it with the same steps as
    `edgeft flash`: ArtifactInstall verifies, smoke-tests and switches, ArtifactCommit marks it good,
    ArtifactRollback restores the previous slot.

    \b
    Each device needs, once: the update module (--module-out), the signing key trusted
    (python3 runner.pyz trust-key --root /var/lib/edgeft edgeft.pub), and optionally /etc/edgeft/mender.conf
    (EDGEFT_ROOT=..., EDGEFT_PYTHON=..., EDGEFT_HEALTH_CHECK=...; see the module's header).
    \b
    Examples:
      edgeft mender build/rpi5 --device-type raspberrypi5 -o model.mender --pubkey keys/edgeft.pub
      edgeft mender --module-out rootfs/usr/share/mender/modules/v3/edgeft-model
      mender-artifact read model.mender;  on a device: mender install model.mender && mender commit
    """
    from .errors import ConfigError
    from .flash.mender import write_mender_artifact, write_update_module

    if bundle is None and module_out is None:
        raise ConfigError("give a BUNDLE (with --device-type and -o model.mender) or --module-out PATH; see edgeft mender --help")
    result: dict = {}
    if module_out is not None:
        result["module"] = str(write_update_module(module_out))
        if not as_json:
            console.print(f"update module written: {result['module']} (install it on devices as "
                          "/usr/share/mender/modules/v3/edgeft-model, mode 0755)", soft_wrap=True)
    if bundle is not None:
        if out_path is None:
            raise ConfigError("give the artifact file to write: -o model.mender")
        with console.status("writing the Mender artifact (bundle.tar, runner.pyz, mender-artifact write and read)"):
            result.update(write_mender_artifact(bundle, out_path, device_types=device_types, pubkeys=pubkeys,
                                                artifact_name=artifact_name))
        if not as_json:
            if not result["signature_checked"]:
                console.print("[yellow]note:[/] signature not checked here (no --pubkey); devices check it with the keys they trust", soft_wrap=True)
            console.print(f"[bold green]artifact[/] {out_path}: {result['artifact_name']} for {', '.join(device_types)}, "
                          f"bundle {result['bundle_sha256'][:16]} channel {result['channel']} version {result['version']}, "
                          f"{result['bytes'] / 1e6:.1f} MB", soft_wrap=True)
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON (name, origin, path, shadows, fields) instead of lines.")
def targets(as_json):
    """List the targets (device classes): where each came from, runtime, arch, default profile.

    A name is looked up in ./targets of the current directory, then $EDGEFT_HOME/targets, then the
    targets shipped with edgeft; the first wins, and the list says which ones it shadows. Put your own
    device class in ./targets/NAME.yaml (copy a shipped one: the list shows its path).

    \b
    Examples:
      edgeft targets
      edgeft build --target rpi5
      edgeft targets --json | jq -r '.[] | select(.origin != "shipped") | .path'
    """
    _list("targets", as_json)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (name, origin, path, shadows, fields) instead of lines.")
def profiles(as_json):
    """List the build profiles (stages, measure settings, budgets): where each came from, its stages.

    A name is looked up in ./profiles of the current directory, then $EDGEFT_HOME/profiles, then the
    profiles shipped with edgeft; the first wins, and the list says which ones it shadows.

    \b
    Examples:
      edgeft profiles
      edgeft build --target rpi5 --profile arm-int4
      cp "$(edgeft profiles --json | jq -r '.[] | select(.name == "arm-int8") | .path')" profiles/my-int8.yaml
    """
    _list("profiles", as_json)


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


@main.group("cache")
def cache_group():
    """The build cache ($EDGEFT_CACHE, else ~/.cache/edgeft): each stage's result, keyed by its inputs,
    data, config, edgeft's code and the library versions; device measurements; interrupted fine-tunes.

    A build reuses an entry only when every one of those is unchanged. At 1-8B parameters entries are
    GBs each: list them and prune what is no longer used.
    """


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _cache_table(rows: list[dict], title: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("stage", "kind", "key", "size", "age", "last used", "path"):
        table.add_column(column, justify="right" if column in ("size", "age", "last used") else "left")
    for row in rows:
        table.add_row(row["stage"], row["kind"], row["key"][:12], _human_bytes(row["size_bytes"]), _human_age(row["age_s"]),
                      _human_age(row["idle_s"]) + " ago", escape(row["path"]))
    console.print(table)


@cache_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per entry) instead of a table.")
def cache_list(as_json):
    """Every cache entry, most recently used first: stage, kind, key, size, age (since it was built) and
    when a build last used it. Kinds: artifact (a stage's result), measurement, checkpoint (an interrupted
    finetune, resumed by the next identical build), demo-base, incomplete (left by a killed build).

    \b
    Examples:
      edgeft cache list
      edgeft cache list --json | jq 'map(.size_bytes) | add'
    """
    from .artifact import cache_root
    from .cache import list_rows

    rows = list_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"{cache_root()}: empty")
        return
    total = sum(row["size_bytes"] for row in rows)
    _cache_table(rows, f"{cache_root()}: {len(rows)} entries, {_human_bytes(total)}")


@cache_group.command("prune")
@click.option("--older-than", help="Remove entries no build has used for this long: 90s, 30m, 12h, 7d, 2w.")
@click.option("--keep-last", type=click.IntRange(min=0), help="Keep the N most recently used entries of each stage, whatever their age.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def cache_prune(older_than, keep_last, dry_run, as_json):
    """Free the cache: remove entries unused for longer than --older-than, keeping the --keep-last most
    recently used of each stage. What killed builds left behind goes too. An entry a running build
    holds is never removed (it is reported as in use); a later build re-creates what it needs.

    \b
    Examples:
      edgeft cache prune --older-than 7d                  # unused for a week
      edgeft cache prune --older-than 7d --keep-last 2    # ... but keep the 2 latest of each stage
      edgeft cache prune --keep-last 1 --dry-run          # what keeping only the latest would free
    """
    from .cache import parse_duration, prune

    result = prune(parse_duration(older_than) if older_than else None, keep_last, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if result["removed"]:
        _cache_table(result["removed"], "would remove" if dry_run else "removed")
    for row in result["in_use"]:
        console.print(f"[yellow]in use, kept:[/] {row['stage']} {row['key'][:12]} (a build holds it)")
    console.print(f"{'would free' if dry_run else 'freed'} {_human_bytes(result['freed_bytes'])} "
                  f"({len(result['removed'])} removed, {result['kept']} kept)")


def _list(kind: str, as_json: bool) -> None:
    from .config import find_named, load_profile, load_target, search_dirs

    load = load_target if kind == "targets" else load_profile
    rows = []
    for named in find_named(kind):
        row = {"name": named.name, "origin": named.origin, "path": str(named.path), "shadows": list(named.shadows)}
        try:  # one broken file of the user's is reported in its row, not in place of the whole list
            item = load(str(named.path))
        except EdgeftError as exc:
            row["error"] = str(exc)
        else:
            row["description"] = item.description
            if kind == "targets":
                row.update(runtime=item.runtime, arch=item.arch, default_profile=item.default_profile)
            else:
                row["stages"] = [next(iter(stage)) for stage in item.stages]  # each stage is {kind: settings}
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if "error" in row:
            detail = f"error: {row['error']}"
        elif kind == "targets":
            detail = f"{row['description']}  [{row['runtime']}, {row['arch']}, default profile {row['default_profile']}]"
        else:
            detail = f"{row['description']}  [{' → '.join(row['stages'])}]"
        shadows = f"  (shadows {', '.join(row['shadows'])})" if row["shadows"] else ""
        click.echo(f"{row['name']:16} {row['origin']:13} {detail}{shadows}")
    searched = ", ".join(f"{origin} ({folder})" for origin, folder in search_dirs(kind))
    console.print(f"[dim]looked in {searched}; the first folder with NAME.yaml wins[/]", soft_wrap=True)


if __name__ == "__main__":
    main()
