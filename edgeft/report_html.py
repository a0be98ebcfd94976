"""One self-contained HTML page for a report.json: summary, gate, plots (inline SVG), telemetry, training.

The page loads nothing at view time (no scripts, no fonts, no URLs) and is byte-stable: the same report and
bundle give the same bytes, so it can live in a bundle and be diffed.
"""
from __future__ import annotations

import io
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import jinja2

from .errors import BundleError
from .flash.signing import signature_state

# Plots as SVG text: fonts as <text> (small, selectable), no creation date, fixed ids: byte-stable output.
_RC = {"svg.fonttype": "none", "svg.hashsalt": "edgeft-report", "font.size": 9, "figure.dpi": 100,
       "axes.spines.top": False, "axes.spines.right": False}
_STAGES = ("base", "finetuned", "merged", "pruned", "distilled", "quantized", "device")
_STATUS = {"pass": "PASS", "fail": "FAIL", "skipped": "SKIP", "invalid": "INVALID"}
_PLOTTING = threading.Lock()  # pyplot and rcParams are process-global; HIL jobs render from parallel threads


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _svg(fig) -> str:
    """The figure as an inline <svg> element (no XML prolog, DOCTYPE or metadata block: they carry URLs)."""
    plt = _plt()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)


def _figure(width: float = 7.0, height: float = 2.6, ncols: int = 1):
    plt = _plt()
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(1, ncols, figsize=(width, height), layout="constrained")
    return fig, axes


def _latency_svg(samples: list[float], latency: dict[str, Any]) -> str:
    import numpy as np

    plt = _plt()
    with plt.rc_context(_RC):
        fig, (hist, cdf) = _figure(ncols=2)
        values = np.sort(np.asarray(samples, dtype=float))
        hist.hist(values, bins=min(60, max(10, len(values) // 20)), color="#4c78a8")
        hist.set_xlabel("latency per step (ms)")
        hist.set_ylabel("steps")
        cdf.plot(values, np.arange(1, len(values) + 1) / len(values), color="#4c78a8")
        cdf.set_xlabel("latency per step (ms)")
        cdf.set_ylabel("fraction of steps ≤ x")
        for name, colour in (("p50", "#54a24b"), ("p90", "#f58518"), ("p99", "#e45756")):
            if latency.get(name) is not None:
                for ax in (hist, cdf):
                    ax.axvline(latency[name], color=colour, linestyle="--", linewidth=1, label=f"{name} {latency[name]:g} ms")
        cdf.legend(loc="lower right", frameon=False)
        return _svg(fig)


def _telemetry_svgs(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, svg) per measured series: RSS/RAM, temperatures, clocks, power. Unmeasured series are left out."""
    plt = _plt()
    t0 = rows[0]["t"]
    ts = [r["t"] - t0 for r in rows]
    groups: list[tuple[str, str, dict[str, list[float | None]]]] = [
        ("Memory", "MB", {"process RSS": [r.get("rss_mb") for r in rows], "system RAM used": [r.get("ram_used_mb") for r in rows]}),
        ("Temperatures", "°C", _keyed(rows, "temps_c")),
        ("Clocks", "MHz", {**{f"cpu {k}": v for k, v in _keyed(rows, "cpu_freq_mhz").items()},
                           "gpu": [r.get("gpu_freq_mhz") for r in rows], "emc": [r.get("emc_freq_mhz") for r in rows]}),
        ("Power", "mW", _keyed(rows, "power_mw")),
    ]
    spans = _hot_spans(ts, rows)
    out = []
    with plt.rc_context(_RC):
        for title, unit, series in groups:
            series = {k: v for k, v in series.items() if any(x is not None for x in v)}
            if not series:
                continue
            fig, ax = _figure(height=2.2)
            for i, (start, end) in enumerate(spans):
                ax.axvspan(start, end, color="#e45756", alpha=0.15, linewidth=0, label=None if i else "throttling (zone at its passive trip)")
            for name, values in series.items():
                ax.plot(ts, [float("nan") if v is None else v for v in values], label=name, linewidth=1.2)
            ax.set_xlabel("seconds since the runner started")
            ax.set_ylabel(unit)
            ax.legend(loc="best", frameon=False, fontsize=8)
            out.append((title, _svg(fig)))
    return out


def _hot_spans(ts: list[float], rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) seconds of each run of samples with a zone at or over its passive trip (`hot_zones`), from the
    sample before the first hot one to the hot run's last sample: the throttling began somewhere in between."""
    spans: list[tuple[float, float]] = []
    start = None
    for i, row in enumerate(rows):
        if row.get("hot_zones") and start is None:
            start = ts[i - 1] if i else ts[i]
        elif not row.get("hot_zones") and start is not None:
            spans.append((start, ts[i - 1] if ts[i - 1] > start else ts[i]))
            start = None
    if start is not None:
        spans.append((start, ts[-1]))
    return spans


def _phases_svg(cold: dict[str, Any], first_token_ms: float | None, latency: dict[str, Any],
                sustained: dict[str, Any] | None) -> str | None:
    """Cold start vs warm vs sustained: the phases side by side, and the soak's windows over time."""
    bars = [(name, value) for name, value in (("cold start\n(load + first run)", cold.get("total")), ("first token", first_token_ms),
                                               ("warm p50", latency.get("p50")), ("warm p99", latency.get("p99")),
                                               ("sustained p50", ((sustained or {}).get("latency_ms") or {}).get("p50")))
            if value is not None]
    windows = (sustained or {}).get("windows") or []
    if len(bars) < 2 and not windows:
        return None
    plt = _plt()
    with plt.rc_context(_RC):
        fig, (phases, soak) = _figure(ncols=2, height=2.6)
        phases.barh([name for name, _ in bars][::-1], [value for _, value in bars][::-1], color="#4c78a8")
        phases.set_xscale("log")
        phases.set_xlabel("ms (log scale)")
        if windows:
            starts = [w["t_start_s"] for w in windows]
            soak.plot(starts, [w["p50"] for w in windows], "o-", color="#4c78a8", label="window p50")
            soak.plot(starts, [w["p99"] for w in windows], "o-", color="#e45756", label="window p99")
            if latency.get("p50") is not None:
                soak.axhline(latency["p50"], color="#54a24b", linestyle="--", linewidth=1, label="warm p50")
            soak.set_xlabel("seconds into the sustained run")
            soak.set_ylabel("latency per step (ms)")
            soak.legend(frameon=False, fontsize=8)
        else:
            soak.text(0.5, 0.5, "no sustained run\n(profile measure.sustained_s is 0)", ha="center", va="center",
                      transform=soak.transAxes, color="#666")
            soak.set_axis_off()
        return _svg(fig)


def _signature_text(bundle_dir: Path) -> str:
    """What the bundle's signature says (read, not verified: the page has no trusted key; `edgeft verify` checks)."""
    state = signature_state(bundle_dir)
    if not state["signed"]:
        return "not signed: its budgets and files are not tamper-proof (edgeft sign BUNDLE --key K)"
    if state["problem"]:
        return f"signature unreadable: {state['problem']}"
    expires = f", expires {state['expires']}" if state.get("expires") else ""
    return (f"signed with key {state['key_id']}, channel {state['channel']} version {state['version']}{expires} "
            "(check it: edgeft verify BUNDLE --pubkey edgeft.pub)")


def _data_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The data check (edgeft.data.DataReport.to_dict, as kept in the bundle's provenance) as table rows."""
    counts = data.get("counts") or {}
    splits = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "total")
    rows = [("splits", splits + (f" (total {counts['total']})" if "total" in counts else "")),
            ("duplicates removed", str(data.get("duplicates_removed", "—")))]
    lengths = data.get("lengths")
    if lengths:
        rows.append((f"length ({lengths.get('unit')}, {lengths.get('measured_with')})",
                     ", ".join(f"{k} {_fmt(lengths.get(k))}" for k in ("min", "p50", "p90", "p99", "max"))))
    if data.get("truncated") is not None:
        rows.append((f"over max_length {data.get('max_length')}", ", ".join(f"{k} {v}" for k, v in data["truncated"].items())))
    for split, leak in (data.get("leakage") or {}).items():
        rows.append((f"{split} prompts also in train", f"{leak.get('exact', 0)} exact, {leak.get('near', 0)} near-duplicate"))
    sensitive = data.get("sensitive") or {}
    if sensitive.get("mode") == "off":
        rows.append(("likely sensitive data", "not scanned (data.sensitive: off)"))
    else:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted((sensitive.get("by_kind") or {}).items()))
        rows.append(("likely sensitive data", f"{sensitive.get('count', 0)}" + (f" ({kinds})" if kinds else "") + f"; mode {sensitive.get('mode')}"))
    for warning in data.get("warnings") or []:
        rows.append(("warning", warning))
    return rows


def _keyed(rows: list[dict[str, Any]], field: str) -> dict[str, list[float | None]]:
    names = sorted({k for r in rows for k in (r.get(field) or {})})
    return {k: [(r.get(field) or {}).get(k) for r in rows] for k in names}


def _training_svg(log: list[dict[str, Any]]) -> str | None:
    train = [(r["step"], r["loss"]) for r in log if "loss" in r and "step" in r]
    evals = [r for r in log if "eval_loss" in r and "step" in r]
    if not train and not evals:
        return None
    plt = _plt()
    with plt.rc_context(_RC):
        fig, (loss, em) = _figure(ncols=2)
        if train:
            loss.plot(*zip(*train), label="train loss", color="#4c78a8")
        if evals:
            loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss", color="#f58518")
        loss.set_xlabel("step")
        loss.set_ylabel("loss")
        loss.set_yscale("log")
        loss.legend(frameon=False)
        matches = [(r["step"], r["eval_exact_match"]) for r in evals if r.get("eval_exact_match") is not None]
        if matches:
            em.plot(*zip(*matches), "o-", color="#54a24b")
        em.set_ylim(-0.05, 1.05)
        em.set_xlabel("step")
        em.set_ylabel("validation exact match")
        return _svg(fig)


def _jsonl(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as exc:
        raise BundleError(f"{path}: not JSON lines ({exc})") from exc


def _checks(gate: dict[str, Any]) -> list[dict[str, Any]]:
    from .gate import describe

    rows = []
    for check in gate.get("checks", []):
        unit = f" {check['unit']}" if check.get("unit") else ""
        sign = "≤" if check.get("direction") == "max" else "≥"
        measured = check.get("measured")
        rows.append({"status": _STATUS.get(check["status"], check["status"].upper()), "name": check["budget"],
                     "measured": "—" if measured is None or isinstance(measured, dict) else f"{measured:g}{unit}",
                     "budget": f"{sign} {check['limit']:g}{unit}" if isinstance(check.get("limit"), (int, float)) else "—",
                     # the columns say it all for a plain pass/fail; describe() explains the rest
                     "why": describe(check) if check["status"] not in ("pass", "fail") or check["budget"] == "max_regression" else ""})
    return rows


def _sustained_rows(soak: dict[str, Any]) -> list[tuple[str, Any]]:
    lat = soak.get("latency_ms") or {}
    drift = soak.get("drift_p50")
    return [("sustained duration (s)", soak.get("duration_s")), ("sustained p50 (ms)", lat.get("p50")),
            ("sustained p99 (ms)", lat.get("p99")), ("sustained windows", len(soak.get("windows") or [])),
            ("sustained p50 drift", None if drift is None else f"{drift:+.1%}")]


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:g}" if isinstance(value, float) else str(value)


def render_report(report: dict[str, Any], bundle_dir: Path | None, telemetry_path: Path | None = None) -> str:
    """The HTML page for `report` (edgeft-report/1); `bundle_dir` adds its manifest, telemetry and training log
    (telemetry from `telemetry_path` instead when given: `measure --report` writes it beside the report)."""
    if report.get("format") != "edgeft-report/1":
        raise BundleError(f"not an edgeft report (format {report.get('format')!r}, expected 'edgeft-report/1')")
    with _PLOTTING:
        return _render_report(report, bundle_dir, telemetry_path)


def _render_report(report: dict[str, Any], bundle_dir: Path | None, telemetry_path: Path | None) -> str:
    manifest = {}
    if bundle_dir is not None and (bundle_dir / "manifest.json").is_file():
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
    runner = report.get("runner") or {}
    latency = report.get("latency_ms") or runner.get("latency_ms") or {}
    samples = latency.get("samples") or []
    telemetry = _jsonl(telemetry_path or (bundle_dir / "telemetry.jsonl" if bundle_dir else None))
    train_log = _jsonl(bundle_dir / "train_log.jsonl" if bundle_dir else None)
    metrics = report.get("metrics") or {}
    metric_names = sorted({k for stage in metrics.values() if isinstance(stage, dict) for k in stage})
    device = report.get("device") or {}
    runtime = report.get("runtime") or {}
    model_file = (report.get("model") or {}).get("file")
    dataset = (manifest.get("provenance") or {}).get("dataset") or {}
    cold = report.get("cold_ms") or {}
    sustained = report.get("sustained")
    context = {
        "target": report.get("target"), "profile": report.get("profile"),
        "measured": report.get("measured", True),  # False: built with --no-measure
        "device_name": device.get("name") or "—", "emulated": device.get("emulated"), "arch": device.get("arch"),
        "runtime": f"{runtime.get('name') or manifest.get('runtime') or '?'} {runtime.get('version', '')}".strip(),
        "model_sha256": (manifest.get("files") or {}).get(model_file) or ((runner.get("bundle") or {}).get("model_sha256")),
        "signature": _signature_text(bundle_dir) if manifest else None,
        "verdict": (report.get("gate") or {}).get("verdict", "NOT MEASURED"),
        "checks": _checks(report.get("gate") or {}),
        "latency": latency, "latency_svg": _latency_svg(samples, latency) if samples else None,
        "phases_svg": _phases_svg(cold, report.get("first_token_ms"), latency, sustained if isinstance(sustained, dict) else None),
        "throttled_spans": len(_hot_spans([r["t"] for r in telemetry], telemetry)) if telemetry else 0,
        "phases": [(name, value) for name, value in (("cold start total (ms)", cold.get("total")),
                                                     ("first token (ms)", report.get("first_token_ms")),
                                                     ("warm p50 (ms)", latency.get("p50")),
                                                     ("decode (tokens/s)", report.get("decode_tokens_per_s")))
                   if value is not None],
        "sustained": _sustained_rows(sustained) if isinstance(sustained, dict) else None,
        "telemetry_svgs": _telemetry_svgs(telemetry) if telemetry else [],
        "telemetry_rows": len(telemetry),
        "throttle": report.get("throttle") or {},
        "telemetry_reasons": ((report.get("telemetry") or {}).get("reasons") or {}),
        "accuracy": [(("on device" if k == "device" else k), report["accuracy"][k]) for k in _STAGES
                     if (report.get("accuracy") or {}).get(k) is not None],
        "accuracy_drop": (report.get("accuracy") or {}).get("drop"),
        "metric_names": metric_names, "metrics": metrics,
        "forgetting": report.get("forgetting"),
        "training_svg": _training_svg(train_log),
        "data_rows": _data_rows(report["data"]) if isinstance(report.get("data"), dict) else None, "dataset": dataset,
        "fmt": _fmt,
    }
    return _TEMPLATE.render(**context)


def _search_svg(result: dict[str, Any]) -> str:
    """Accuracy vs p99 latency and vs model size, every candidate, budget lines, the chosen one marked."""
    plt = _plt()
    rows = result["candidates"]
    budgets = result.get("budgets") or {}
    latency_budget = budgets.get("latency_ms_p99")
    latency_budget = latency_budget.get("warm") if isinstance(latency_budget, dict) else latency_budget
    with plt.rc_context(_RC):
        fig, (by_latency, by_size) = _figure(ncols=2, height=3.0)
        for ax, field, scale, label, limit in ((by_latency, "latency_ms_p99", 1, "p99 latency per step (ms)", latency_budget),
                                               (by_size, "size_bytes", 1e-6, "model size (MB)", budgets.get("max_model_mb"))):
            for row in rows:
                if row[field] is None or row["accuracy"] is None:
                    continue  # failed a stage's own check: nothing measured to plot
                chosen = row["candidate"] == result.get("chosen")
                x = row[field] * scale
                ax.scatter([x], [row["accuracy"]], s=120 if chosen else 40, marker="*" if chosen else "o",
                           color="#54a24b" if row["verdict"] == "PASS" else "#e45756", zorder=3)
                ax.annotate(row["candidate"] + (" (chosen)" if chosen else ""), (x, row["accuracy"]), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
            if isinstance(limit, (int, float)):
                ax.axvline(limit, color="#888", linestyle="--", linewidth=1)
            if budgets.get("min_accuracy") is not None:
                ax.axhline(budgets["min_accuracy"], color="#888", linestyle="--", linewidth=1)
            ax.set_xlabel(label)
            ax.set_ylabel("exact match on device")
        return _svg(fig)


def render_search(result: dict[str, Any]) -> str:
    """The HTML page for a budget search (edgeft-search/1): the trade-off plot and one row per candidate."""
    with _PLOTTING:
        svg = _search_svg(result) if result["candidates"] else None
    return _SEARCH_TEMPLATE.render(r=result, svg=svg, fmt=_fmt)


def render_suite(result: dict[str, Any], page_dir: Path) -> str:
    """The HTML page for a HIL suite result (edgeft-hil/1): one row per bundle × device with its verdict,
    linking to that job's report page (relative to `page_dir`, where this page is written)."""
    rows = []
    for job in result["jobs"]:
        report = job.get("report") or {}
        latency = report.get("latency_ms") or {}
        html = job.get("html_path")
        rows.append({"bundle": job["bundle"], "device": job["device"], "verdict": job["verdict"],
                     "p50": latency.get("p50"), "p99": latency.get("p99"),
                     "accuracy": (report.get("accuracy") or {}).get("device"),
                     "failed": "; ".join(c["budget"] for c in (report.get("gate") or {}).get("checks", []) if c["status"] == "fail"),
                     "error": job.get("error"),
                     "link": Path(os.path.relpath(html, page_dir)).as_posix() if html else None})
    return _SUITE_TEMPLATE.render(suite=result["suite"], rows=rows, wall_s=result.get("wall_s"), fmt=_fmt)


def render_rollout(result: dict[str, Any]) -> str:
    """The HTML page for a flash rollout (edgeft-rollout/1): what was rolled out, whether it halted, and one row
    per device with its result, the version it runs now and before, bytes sent and why it failed or was skipped."""
    rows = []
    for device in result["devices"]:
        previous = device.get("previous")
        rows.append({"device": device["device"], "result": device["result"],
                     "css": "PASS" if device["result"] in ("installed", "already-current") else
                            "SKIP" if str(device["result"]).startswith("skipped") else "FAIL",
                     "version": device.get("version"),
                     "previous": previous.get("version") if isinstance(previous, dict) else previous,
                     "bytes_sent": device.get("bytes_sent"), "seconds": device.get("seconds"),
                     "reason": device.get("reason") or ""})
    return _ROLLOUT_TEMPLATE.render(r=result, rows=rows, fmt=_fmt)


def render_report_file(path: Path, bundle_dir: Path | None = None) -> tuple[str, Path]:
    """(HTML, report.json path) for a bundle directory, a report .json or HIL suite results. The bundle (manifest, training
    log) is `bundle_dir`, else the report's own directory when it has a manifest, else the one the report
    names; telemetry is the `measure --report` file beside it (<name>.telemetry.jsonl) when present,
    else the bundle's."""
    path = Path(path)
    report_path = path / "report.json" if path.is_dir() else path
    if not report_path.is_file():
        raise BundleError(f"{path}: no report here (give a bundle directory or a report .json file)")
    try:
        report = json.loads(report_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{report_path}: not JSON ({exc})") from exc
    if isinstance(report, dict) and report.get("format") == "edgeft-hil/1":  # `edgeft hil run --json` results
        return render_suite(report, report_path.parent), report_path
    if isinstance(report, dict) and report.get("format") == "edgeft-search/1":  # `edgeft build --search`
        return render_search(report), report_path
    if isinstance(report, dict) and report.get("format") == "edgeft-rollout/1":  # `edgeft flash -o R.json`
        return render_rollout(report), report_path
    if not isinstance(report, dict) or report.get("format") != "edgeft-report/1":
        what = f"format {report.get('format')!r}" if isinstance(report, dict) else f"a JSON {type(report).__name__}"
        raise BundleError(f"{report_path}: not an edgeft report ({what}; expected edgeft-report/1, edgeft-hil/1, edgeft-search/1 or edgeft-rollout/1)")
    if bundle_dir is not None and not (Path(bundle_dir) / "manifest.json").is_file():
        raise BundleError(f"--bundle {bundle_dir}: no manifest.json there (give the bundle directory the report was measured from)")
    if bundle_dir is None:
        bundle_dir = report_path.parent
        named = Path((report.get("bundle") or {}).get("path") or bundle_dir)
        if not (bundle_dir / "manifest.json").is_file() and (named / "manifest.json").is_file():
            bundle_dir = named
    beside = report_path.with_name(f"{report_path.stem}.telemetry.jsonl")
    return render_report(report, bundle_dir, telemetry_path=beside if beside.is_file() else None), report_path


_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_STYLE = """\
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .25em .7em; border-bottom: 1px solid #eee; text-align: left; }
td:nth-child(-n+4), th { white-space: nowrap; }
.PASS { color: #1a7f37; font-weight: bold; } .FAIL { color: #cf222e; font-weight: bold; }
.SKIP, .INVALID { color: #9a6700; font-weight: bold; } .note { color: #666; } code { font-size: .9em; }
svg { max-width: 100%; height: auto; display: block; }
"""
def _page(title: str, body: str) -> jinja2.Template:
    """A page template: the shared head (title, inline style, nothing external) and then `body`."""
    return _ENV.from_string(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{_STYLE}</style></head><body>\n" + body)


_ROLLOUT_TEMPLATE = _page("edgeft rollout: {{ r.channel }} version {{ r.version }}", """\
<h1>edgeft rollout: {{ r.target }}, channel {{ r.channel }} version {{ r.version }}</h1>
<section id="rollout"><h2>Devices</h2>
<p>Bundle <code>{{ r.bundle }}</code> from <code>{{ r.path }}</code>; {{ rows | length }} device(s), canary {{ r.canary }},
at most {{ r.parallel }} at a time{% if r.max_failures is not none %}, halt after {{ r.max_failures }} failure(s){% endif %};
{{ r.started }} → {{ r.finished }} ({{ fmt(r.wall_s) }} s).</p>
{% if r.halted %}<p class="FAIL">halted: {{ r.halted }}</p>{% endif %}
<p>{% for name, n in r.counts.items() %}{{ name }}: {{ n }}{% if not loop.last %}, {% endif %}{% endfor %}</p>
<table><tr><th>device</th><th>result</th><th>version</th><th>previous version</th><th>bytes sent</th><th>seconds</th><th>why</th></tr>
{% for d in rows %}
<tr class="device"><td>{{ d.device }}</td><td class="{{ d.css }}">{{ d.result }}</td><td>{{ fmt(d.version) }}</td><td>{{ fmt(d.previous) }}</td>
<td>{{ fmt(d.bytes_sent) }}</td><td>{{ fmt(d.seconds) }}</td><td>{{ d.reason }}</td></tr>
{% endfor %}
</table></section>
</body></html>
""")
_SEARCH_TEMPLATE = _page("edgeft budget search: {{ r.target }} ({{ r.chosen or \"nothing chosen\" }})", """\
<h1>edgeft budget search: {{ r.target }} on {{ r.device }}, profile {{ r.profile }}</h1>
<section id="search"><h2>Candidates</h2>
<p>{% if r.chosen %}Chosen: <b>{{ r.chosen }}</b>{% else %}<span class="FAIL">nothing chosen</span>{% endif %}. {{ r.why }}</p>
{% if svg %}{{ svg | safe }}<p class="note">green: meets every budget; red: misses one; star: chosen; dashed: budgets.</p>{% endif %}
<table><tr><th>candidate</th><th>verdict</th><th>exact match</th><th>p50 (ms)</th><th>p99 (ms)</th><th>size (MB)</th><th>peak RSS (MB)</th><th>failed budgets</th></tr>
{% for c in r.candidates %}
<tr class="candidate"><td>{{ c.candidate }}{% if c.candidate == r.chosen %} (chosen){% endif %}</td><td class="{{ c.verdict }}">{{ c.verdict }}</td><td>{{ fmt(c.accuracy) }}</td>
<td>{{ fmt(c.latency_ms_p50) }}</td><td>{{ fmt(c.latency_ms_p99) }}</td><td>{{ fmt(none if c.size_bytes is none else (c.size_bytes / 1e6) | round(3)) }}</td><td>{{ fmt(c.peak_rss_mb) }}</td><td>{{ c.failed | join(", ") }}{% if c.error %}: {{ c.error }}{% endif %}</td></tr>
{% endfor %}
</table></section>
</body></html>
""")
_SUITE_TEMPLATE = _page("edgeft HIL suite: {{ suite }}", """\
<h1>edgeft HIL suite: {{ suite }}</h1>
<section id="jobs"><h2>Jobs</h2>
<p>{{ rows | length }} job(s), one per bundle × device{% if wall_s is not none %}, {{ fmt(wall_s) }} s{% endif %}.</p>
<table><tr><th>bundle</th><th>device</th><th>verdict</th><th>p50 (ms)</th><th>p99 (ms)</th><th>accuracy on device</th><th>failed budgets / error</th><th>report</th></tr>
{% for r in rows %}
<tr class="job"><td>{{ r.bundle }}</td><td>{{ r.device }}</td><td class="{{ r.verdict }}">{{ r.verdict }}</td><td>{{ fmt(r.p50) }}</td><td>{{ fmt(r.p99) }}</td>
<td>{{ fmt(r.accuracy) }}</td><td>{{ r.error or r.failed }}</td><td>{% if r.link %}<a href="{{ r.link }}">report</a>{% else %}—{% endif %}</td></tr>
{% endfor %}
</table></section>
</body></html>
""")
_TEMPLATE = _page("edgeft report: {{ target }} on {{ device_name }} ({{ verdict }})", """\
<h1>edgeft report: {{ target }} on {{ device_name }} — <span class="{{ verdict }}">{{ verdict }}</span></h1>

<section id="summary"><h2>Summary</h2>
<table>
<tr><th>target / profile</th><td>{{ target }} / {{ profile }}</td></tr>
<tr><th>device</th><td>{% if not measured %}not measured (built with <code>--no-measure</code>; <code>edgeft measure</code> gates it){% else %}{{ device_name }} ({{ arch }}){% if emulated %} — <b>emulated</b>: timings are not the real board's{% else %} — real hardware{% endif %}{% endif %}</td></tr>
<tr><th>runtime</th><td>{{ runtime }}</td></tr>
<tr><th>model sha256</th><td><code>{{ model_sha256 or "—" }}</code></td></tr>
<tr><th>signature</th><td>{{ signature or "not signed" }}</td></tr>
</table>
<h3>Gate: <span class="{{ verdict }}">{{ verdict }}</span></h3>
<table><tr><th>status</th><th>budget</th><th>measured</th><th>limit</th><th>why</th></tr>
{% for c in checks %}
<tr><td class="{{ c.status }}">{{ c.status }}</td><td>{{ c.name }}</td><td>{{ c.measured }}</td><td>{{ c.budget }}</td><td>{{ c.why }}</td></tr>
{% endfor %}
</table></section>

<section id="latency"><h2>Latency</h2>
{% if latency_svg %}
<p>{{ latency.n }} decode steps of {{ latency.prompt_tokens }} prompt tokens over {{ fmt(latency.duration_s) }} s after {{ fmt(latency.warmup_s) }} s warm-up:
p50 {{ fmt(latency.p50) }} ms, p90 {{ fmt(latency.p90) }} ms, p99 {{ fmt(latency.p99) }} ms (min {{ fmt(latency.min) }}, max {{ fmt(latency.max) }}).</p>
{{ latency_svg | safe }}
{% else %}<p class="note">no latency samples in this report</p>{% endif %}
{% if phases_svg %}<h3>Cold start, warm and sustained</h3>{{ phases_svg | safe }}{% endif %}
<table>{% for name, value in phases %}<tr><th>{{ name }}</th><td>{{ fmt(value) }}</td></tr>{% endfor %}
{% if sustained %}{% for name, value in sustained %}<tr><th>{{ name }}</th><td>{{ fmt(value) }}</td></tr>{% endfor %}
{% elif measured %}<tr><th>sustained</th><td class="note">not run (profile measure.sustained_s is 0)</td></tr>{% endif %}
</table></section>

<section id="telemetry"><h2>Telemetry</h2>
{% if throttle.get("throttled") %}<p class="FAIL">the device throttled during the run: {{ throttle.get("reasons", []) | join(", ") }}</p>
{% elif throttle %}<p>no throttling seen during the run.</p>{% endif %}
{% if telemetry_rows %}<p>{{ telemetry_rows }} samples from <code>telemetry.jsonl</code>{% if throttled_spans %}; shaded: {{ throttled_spans }} span(s) with a thermal zone at or over its passive trip{% endif %}.</p>{% else %}<p class="note">no telemetry samples with this report</p>{% endif %}
{% for title, svg in telemetry_svgs %}<h3>{{ title }}</h3>{{ svg | safe }}{% endfor %}
{% if telemetry_reasons %}<p class="note">no sensors for:</p><ul class="note">{% for k, v in telemetry_reasons.items() %}<li>{{ k }}: {{ v }}</li>{% endfor %}</ul>{% endif %}
</section>

<section id="accuracy"><h2>Accuracy</h2>
{% if not accuracy %}<p class="note">no accuracy in this report</p>{% else %}<p>Exact match: {% for name, value in accuracy %}{{ name }} {{ fmt(value) }}{% if not loop.last %} → {% endif %}{% endfor %}
{% if accuracy_drop is not none %} (drop vs fine-tuned: {{ fmt(accuracy_drop) }}){% endif %}</p>{% endif %}
{% if metrics %}<table><tr><th>stage</th>{% for m in metric_names %}<th>{{ m }}</th>{% endfor %}</tr>
{% for stage, values in metrics.items() %}<tr><td>{{ stage }}</td>{% for m in metric_names %}<td>{{ fmt(values.get(m)) }}</td>{% endfor %}</tr>{% endfor %}
</table>{% endif %}
{% if forgetting %}<h3>Forgetting</h3><table>{% for k, v in forgetting.items() %}<tr><th>{{ k }}</th><td>{{ fmt(v) }}</td></tr>{% endfor %}</table>
{% else %}<p class="note">no forgetting check in this report</p>{% endif %}
</section>

<section id="finetune"><h2>Fine-tuning</h2>
{% if training_svg %}{{ training_svg | safe }}{% else %}<p class="note">no <code>train_log.jsonl</code> with this report</p>{% endif %}
</section>

<section id="data"><h2>Data</h2>
{% if data_rows %}<p>{% if dataset %}<code>{{ dataset.path }}</code> (sha256 <code>{{ dataset.sha256 }}</code>), checked before training:{% else %}Checked before training:{% endif %}</p>
<table class="data">{% for k, v in data_rows %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
{% elif dataset %}<p>splits: train {{ dataset.train }}, validation {{ dataset.val }}, test {{ dataset.test }} (sha256 <code>{{ dataset.sha256 }}</code>).</p>
<p class="note">lengths, leakage and sensitive-data counts are not stored in the bundle: run <code>edgeft data check</code>.</p>
{% else %}<p class="note">no data check with this report</p>{% endif %}
</section>
</body></html>
""")
