"""The HTML report: rendered from the real demo bundle, byte-stable, self-contained, and drawn by a real
headless Chromium (sections and plots in the DOM, a screenshot that is not blank)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeft.report_html import render_report

SECTIONS = ("summary", "latency", "telemetry", "accuracy", "finetune", "data")
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make sysdeps` installs it, Debian package `chromium`)")


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with its own profile dir (no state shared with other runs)."""
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=60)


def test_build_writes_a_stable_self_contained_html_report(demo_build):
    out = demo_build["out"]
    html = (out / "report.html").read_text()
    report = json.loads((out / "report.json").read_text())
    assert render_report(report, out) == html  # byte-stable: the same input renders the same bytes
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
    assert html.count("<svg") >= 3  # latency, memory over time, fine-tuning curves
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|url\(\s*["']?(https?:)?//|<script|@import""", html, re.I)
    assert f"p99 {report['latency_ms']['p99']:g} ms" in html
    assert report["runner"]["bundle"]["model_sha256"] in html
    assert html.count('<td class="PASS">PASS</td>') == sum(c["status"] == "pass" for c in report["gate"]["checks"])
    # the data check made before training travels in the bundle: splits as loaded, lengths, leakage, sensitive counts
    dataset = json.loads((out / "manifest.json").read_text())["provenance"]["dataset"]
    n = {split: dataset[split] for split in ("train", "val", "test")}
    assert report["data"]["counts"] == {**n, "total": sum(n.values())}
    assert "findings" not in report["data"]["sensitive"]  # counts only: flagged values stay out of the bundle
    assert f"<th>splits</th><td>train {n['train']}, val {n['val']}, test {n['test']} (total {sum(n.values())})</td>" in html
    assert "<th>test prompts also in train</th>" in html and "<th>likely sensitive data</th>" in html


def test_report_command_renders_a_bundle_and_refuses_what_is_not_a_report(demo_build, run_edgeft, tmp_path):
    out = demo_build["out"]
    result = run_edgeft("report", out, "-o", tmp_path / "r.html")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.html").read_bytes() == (out / "report.html").read_bytes()
    (tmp_path / "not-a-report.json").write_text('{"format": "edgeft-bundle/1"}')
    result = run_edgeft("report", tmp_path / "not-a-report.json")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'not-a-report.json'}: not an edgeft report (format 'edgeft-bundle/1'; expected edgeft-report/1, edgeft-hil/1, edgeft-search/1 or edgeft-rollout/1)"]
    assert not (tmp_path / "not-a-report.html").exists()


def test_measure_report_writes_the_html_beside_it(demo_build, run_edgeft, tmp_path):
    out = demo_build["out"]
    result = run_edgeft("measure", out, "--report", tmp_path / "R.json", "-q")
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "R.html").read_text()
    samples = sum(1 for line in (tmp_path / "R.telemetry.jsonl").read_text().splitlines() if line.strip())
    assert f"{samples} samples from" in html and html.count("<svg") >= 3
    # the same page again from the files: the report, its telemetry beside it, the bundle named
    result = run_edgeft("report", tmp_path / "R.json", "--bundle", out, "-o", tmp_path / "again.html")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "again.html").read_text() == html


def _page_requests(net_log: Path) -> list[str]:
    """URLs the page asked for, from Chromium's net log. The browser's own background requests (update
    checks, time sync) have no origin; the page's (a file:// page has the opaque origin "null") do."""
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"]
            if e["type"] == start and "url" in e.get("params", {}) and e["params"].get("initiator") != "not an origin"]


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_headless_chromium_sees_page_requests_and_console_messages(tmp_path):
    """The checks below can fail: a page with a remote image and a console error trips both."""
    page = tmp_path / "bad.html"
    page.write_text('<html><body><img src="http://example.invalid/x.png"><script>console.error("boom")</script></body></html>')
    result = _chromium(tmp_path / "profile", "--enable-logging=stderr", "--v=0", f"--log-net-log={tmp_path / 'net.json'}", "--dump-dom", page.as_uri())
    assert _page_requests(tmp_path / "net.json") == ["http://example.invalid/x.png"]
    assert len(_console_messages(result.stderr)) == 1 and '"boom"' in result.stderr


@needs_chromium
def test_html_report_renders_in_headless_chromium(demo_build, tmp_path):
    page = demo_build["out"] / "report.html"
    dom = _chromium(tmp_path / "profile", "--enable-logging=stderr", "--v=0", f"--log-net-log={tmp_path / 'net.json'}", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _page_requests(tmp_path / "net.json") == []
    assert _console_messages(dom.stderr) == []
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom.stdout
    assert dom.stdout.count("<svg") >= 3

    shot = tmp_path / "report.png"
    result = _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 2400)
        grey = image.convert("L")
        dark = sum(grey.histogram()[:128])  # text, axes and plot lines
        colours = len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])
    assert dark > 0.005 * 1200 * 2400, f"only {dark} dark pixels: the page looks blank"
    assert colours > 50, f"{colours} colours: no plots drawn"


def _zone(sysfs: Path, temp_c: float, trip_c: float = 60.0) -> None:
    zone = sysfs / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "trip_point_0_type").write_text("passive\n")
    (zone / "trip_point_0_temp").write_text(f"{int(trip_c * 1000)}\n")
    (zone / "temp").write_text(f"{int(temp_c * 1000)}\n")


def test_throttled_spans_and_the_soak_are_drawn_from_real_samples(tmp_path):
    """Samples from the runner's own sampler over a sysfs tree whose zone crosses its passive trip and cools
    again: the samples say which were hot, and the page shades exactly that one span on every telemetry plot."""
    from edgeft_runner.telemetry import TelemetrySampler

    sysfs = tmp_path / "sys"
    _zone(sysfs, 45.0)
    sampler = TelemetrySampler(sysfs, interval_s=3600)  # samples only when asked
    rows = [sampler.sample()]
    for temp_c in (61.0, 72.5, 40.0, 41.0):
        _zone(sysfs, temp_c)
        rows.append(sampler.sample())
    assert [r["hot_zones"] for r in rows] == [[], ["thermal_zone0"], ["thermal_zone0"], [], []]
    assert [r["temps_c"]["thermal_zone0"] for r in rows] == [45.0, 61.0, 72.5, 40.0, 41.0]
    for i, row in enumerate(rows):
        row["t"] = 1000.0 + i  # one sample a second, so the page is byte-stable across runs
    (tmp_path / "R.telemetry.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    windows = [{"t_start_s": 15.0 * i, "n": 50, "p50": 2.0 + 0.5 * i, "p99": 3.0 + 0.5 * i, "reasons": []} for i in range(4)]
    report = {"format": "edgeft-report/1", "target": "rpi5", "profile": "arm-int8", "device": {"name": "dev-0", "arch": "aarch64"},
              "latency_ms": {"p50": 2.0, "p90": 2.4, "p99": 3.1, "n": 200}, "first_token_ms": 9.5,
              "cold_ms": {"total": 850.0}, "sustained": {"duration_s": 60, "windows": windows, "drift_p50": 0.75,
                                                         "latency_ms": {"p50": 2.6, "p99": 4.0}},
              "throttle": {"throttled": True, "reasons": ["thermal_zone0 (cpu-thermal) at 72.5 C, passive trip 60 C"]},
              "gate": {"verdict": "INVALID", "checks": []}}
    html = render_report(report, None, telemetry_path=tmp_path / "R.telemetry.jsonl")
    assert "5 samples from <code>telemetry.jsonl</code>; shaded: 1 span(s) with a thermal zone at or over its passive trip" in html
    plots = html.split('<section id="telemetry">')[1].split("</section>")[0]
    assert plots.count("throttling (zone at its passive trip)") == plots.count("<svg") >= 2  # memory and temperatures
    latency = html.split('<section id="latency">')[1].split("</section>")[0]
    assert "<h3>Cold start, warm and sustained</h3>" in latency and "window p99" in latency and "cold start" in latency
    assert render_report(report, None, telemetry_path=tmp_path / "R.telemetry.jsonl") == html
