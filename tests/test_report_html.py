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


def test_report_command_renders_a_bundle_and_refuses_what_is_not_a_report(demo_build, run_edgeft, tmp_path):
    out = demo_build["out"]
    result = run_edgeft("report", out, "-o", tmp_path / "r.html")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.html").read_bytes() == (out / "report.html").read_bytes()
    (tmp_path / "not-a-report.json").write_text('{"format": "edgeft-bundle/1"}')
    result = run_edgeft("report", tmp_path / "not-a-report.json")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'not-a-report.json'}: not an edgeft report (format 'edgeft-bundle/1'; expected edgeft-report/1, edgeft-hil/1 or edgeft-search/1)"]
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
