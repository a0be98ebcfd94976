"""`edgeft hil run` on real sshd "devices" (the session's 3-device lab): parallel lanes, reservations
between two competing runs, an unreachable device, JUnit counts, exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from edgeft.errors import ConfigError
from edgeft.hil import load_suite, plan_suite

ROOT = Path(__file__).resolve().parent.parent
EDGEFT = [sys.executable, "-m", "edgeft.cli"]

# Every budget of the demo profile turned off except two that any working run meets (or, for the
# "fail" bundle, that no model can meet): the verdicts then depend on this test alone.
OFF = {"latency_ms_p99": None, "first_token_ms": None, "peak_rss_mb": None, "max_accuracy_drop": None,
       "min_accuracy": None, "max_temp_c": None, "max_general_ppl_increase": None, "min_decode_tokens_per_s": None}
PASSING = {**OFF, "max_model_mb": 1000, "min_accuracy": 0.0}
FAILING = {**OFF, "max_model_mb": 0.001}


@pytest.fixture(scope="module")
def bundle(demo_build) -> Path:
    return Path(demo_build["out"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def lab(lab3, tmp_path) -> Path:
    """The session's 3 sshd devices plus `dead`, a lab entry on a loopback port nobody listens on, and
    `orin`, dev-0 listed as a Jetson (a device of another target)."""
    data = yaml.safe_load(lab3.lab_path.read_text())
    dead = {**data["devices"][0], "name": "dead", "port": _closed_port(), "tags": ["dead"]}
    orin = {**data["devices"][0], "name": "orin", "target": "jetson-orin", "tags": ["jetson"]}
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump({**data, "devices": [*data["devices"], dead, orin]}, sort_keys=False))
    return path


def _suite(tmp_path: Path, name: str, **fields) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def _hil(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*EDGEFT, "hil", "run", *map(str, args)], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


def _runner_interval(job: dict) -> tuple[float, float]:
    """When the runner measured: its own telemetry sample timestamps (first, last)."""
    times = [json.loads(line)["t"] for line in Path(job["samples_path"]).read_text().splitlines() if line.strip()]
    assert len(times) >= 2, job["samples_path"]
    return min(times), max(times)


def test_suite_runs_devices_in_parallel_and_reports_junit(bundle, lab, lab3, tmp_path):
    suite = _suite(tmp_path, "lanes", bundles=[{"name": "demo-pass", "path": str(bundle), "budgets": PASSING},
                                               {"name": "demo-fail", "path": str(bundle), "budgets": FAILING}],
                   devices=["dev-0", {"tags": ["lab-1"]}, "dead"])
    result = _hil(suite, "--lab", lab, "--junit", tmp_path / "junit.xml", "--json", tmp_path / "out" / "hil.json", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]  # a budget failed (and a device could not be reached)

    out = json.loads((tmp_path / "out" / "hil.json").read_text())
    jobs = {(j["bundle"], j["device"]): j for j in out["jobs"]}
    assert set(jobs) == {(b, d) for b in ("demo-pass", "demo-fail") for d in ("dev-0", "dev-1", "dead")}
    for device in ("dev-0", "dev-1"):  # the tag selector lab-1 reserved dev-1, the only device carrying it
        assert jobs["demo-pass", device]["verdict"] == "PASS"
        assert jobs["demo-fail", device]["verdict"] == "FAIL"
        report = jobs["demo-pass", device]["report"]
        assert report["device"]["name"] == device and report["latency_ms"]["n"] >= 20
        on_disk = json.loads(Path(jobs["demo-pass", device]["report_path"]).read_text())
        assert Path(jobs["demo-pass", device]["report_path"]).parent == tmp_path / "out" / "hil-results" / "lanes"
        assert on_disk["gate"] == report["gate"]
    for bundle_name in ("demo-pass", "demo-fail"):
        dead = jobs[bundle_name, "dead"]
        assert dead["verdict"] == "ERROR" and "dead" in dead["error"] and "report" not in dead

    # Lanes ran side by side: a run on dev-0 and one on dev-1 measured at the same time (runner clocks);
    # on one device, the suite's two jobs ran one after the other.
    dev0 = sorted(_runner_interval(jobs[b, "dev-0"]) for b in ("demo-pass", "demo-fail"))
    dev1 = sorted(_runner_interval(jobs[b, "dev-1"]) for b in ("demo-pass", "demo-fail"))
    assert any(max(a[0], b[0]) < min(a[1], b[1]) for a in dev0 for b in dev1), (dev0, dev1)
    assert dev0[0][1] < dev0[1][0] and dev1[0][1] < dev1[1][0]

    root = ET.parse(tmp_path / "junit.xml").getroot()
    (testsuite,) = root.iter("testsuite")
    assert testsuite.get("name") == "lanes"
    assert (testsuite.get("tests"), testsuite.get("failures"), testsuite.get("errors")) == ("6", "2", "2")
    cases = {(c.get("classname"), c.get("name")): c for c in testsuite.iter("testcase")}
    assert set(cases) == set(jobs)
    failure = cases["demo-fail", "dev-0"].find("failure")
    assert "max_model_mb" in failure.get("message")
    assert "FAIL max_model_mb: measured" in failure.text and "budget <= 0.001 MB" in failure.text
    assert cases["demo-pass", "dev-1"].find("failure") is None and cases["demo-pass", "dev-1"].find("error") is None
    assert "dead" in cases["demo-pass", "dead"].find("error").get("message")
    assert abs(float(cases["demo-pass", "dev-0"].get("time")) - jobs["demo-pass", "dev-0"]["wall_s"]) < 0.01
    # The summary table on stderr: one row per bundle × device.
    rows = [line for line in result.stderr.splitlines() if line.lstrip("│ ").startswith(("demo-pass", "demo-fail"))]
    assert len(rows) == 6, result.stderr[-3000:]

    # The HTML pages: one per job that ran, and the suite's page (hil.html beside hil.json) linking to them.
    page = tmp_path / "out" / "hil.html"
    html = page.read_text()
    assert html.count('<tr class="job">') == 6 and html.count('<td class="ERROR">ERROR</td>') == 2
    links = re.findall(r'<a href="([^"]+)">report</a>', html)
    assert sorted(links) == sorted(Path(jobs[b, d]["html_path"]).relative_to(tmp_path / "out").as_posix()
                                   for b in ("demo-pass", "demo-fail") for d in ("dev-0", "dev-1"))
    job_page = Path(jobs["demo-fail", "dev-0"]["html_path"]).read_text()
    assert '<td class="FAIL">FAIL</td><td>max_model_mb</td>' in job_page and job_page.count("<svg") >= 3
    if shutil.which("chromium"):  # the suite page and a linked job page, drawn by a real browser
        from test_report_html import SECTIONS, _chromium

        dom = _chromium(tmp_path / "profile", "--dump-dom", page.as_uri()).stdout
        assert dom.count('<tr class="job">') == 6
        dom = _chromium(tmp_path / "profile", "--dump-dom", (page.parent / links[0]).as_uri()).stdout
        assert all(f'<section id="{section}">' in dom for section in SECTIONS) and dom.count("<svg") >= 3


def test_two_runs_on_one_device_never_overlap(bundle, lab, tmp_path):
    suite = _suite(tmp_path, "one", bundles=[{"path": str(bundle), "budgets": PASSING}], devices=["dev-2"])
    runs = [subprocess.Popen([*EDGEFT, "hil", "run", str(suite), "--lab", str(lab), "--wait", "300", "--json", str(tmp_path / f"run{i}" / "hil.json")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path) for i in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    jobs = [json.loads((tmp_path / f"run{i}" / "hil.json").read_text())["jobs"][0] for i in range(2)]
    assert [job["device"] for job in jobs] == ["dev-2", "dev-2"]
    first, second = sorted(_runner_interval(job) for job in jobs)
    assert first[1] < second[0], (first, second)  # the second measured only after the first finished
    assert any("waiting up to" in err for _, err in outputs)  # and one of them really had to wait


def test_unreachable_then_unhealthy_device_fails_its_jobs(bundle, lab, tmp_path):
    suite = _suite(tmp_path, "dead", bundles=[{"path": str(bundle)}], devices=["dead"])
    result = _hil(suite, "--lab", lab, "--junit", tmp_path / "junit.xml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]  # every job errored: nothing ran
    suite_el = next(ET.parse(tmp_path / "junit.xml").getroot().iter("testsuite"))
    assert (suite_el.get("tests"), suite_el.get("failures"), suite_el.get("errors")) == ("1", "0", "1")
    assert "unreachable" in next(suite_el.iter("error")).get("message")
    # Once `lab check` has marked it unhealthy, reservations skip it and say why.
    check = subprocess.run([*EDGEFT, "lab", "check", "dead", "--lab", str(lab)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 1, check.stderr
    result = _hil(suite, "--lab", lab, "--junit", tmp_path / "junit.xml", cwd=tmp_path)
    assert result.returncode == 2
    assert "marked unhealthy" in next(ET.parse(tmp_path / "junit.xml").getroot().iter("error")).get("message")


def test_bad_suites_fail_before_any_device(bundle, lab, tmp_path):
    cases = {
        "unknown": ({"bundles": [{"path": str(bundle)}], "devices": ["nope"]}, "field 'devices.0': no device 'nope'"),
        "tags": ({"bundles": [{"path": str(bundle)}], "devices": [{"tags": ["nosuch"]}]}, "carries every tag of nosuch"),
        "target": ({"bundles": [{"path": str(bundle)}], "devices": ["dev-0", "orin"]}, "device 'orin' is a jetson-orin"),
        "each": ({"bundles": [{"path": str(bundle)}], "devices": [{"tags": ["jetson"], "each": True}]}, "can run bundle 'bundle' (built for rpi5)"),
        "both": ({"bundles": [{"path": str(bundle), "target": "rpi5"}], "devices": ["dev-0"]}, "field 'bundles.0'"),
        "budget": ({"bundles": [{"path": str(bundle)}], "devices": ["dev-0"], "budgets": {"latency_ms": 3}}, "field 'budgets.latency_ms'"),
        "missing": ({"bundles": [{"path": str(tmp_path / "nothing")}], "devices": ["dev-0"]}, "field 'bundles.0': bundle"),
    }
    for name, (fields, expected) in cases.items():
        result = _hil(_suite(tmp_path, name, **fields), "--lab", lab, "--junit", tmp_path / f"{name}.xml", cwd=tmp_path)
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.startswith("error: ") and expected in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr and not (tmp_path / f"{name}.xml").exists()


def test_plan_expands_each_and_reads_the_example_suite(bundle, lab3, tmp_path):
    suite = load_suite(_suite(tmp_path, "each", bundles=[{"path": str(bundle)}],
                              devices=[{"tags": ["lab-0"], "each": True}, {"tags": ["rpi5"]}]))
    plan = plan_suite(suite, lab3.lab_path, tmp_path / "results", log=lambda _: None)
    assert [job.lane for job in plan.jobs] == ["dev-0", "dev-2", "tags:rpi5"]
    example = load_suite(ROOT / "hil" / "suites" / "smoke.yaml")
    assert [b.name for b in example.bundles] == ["demo-int8"] and example.wait_s > 0
    with pytest.raises(ConfigError, match="arm64"):  # its selectors resolve against the documented lab only
        plan_suite(example, lab3.lab_path, tmp_path / "results", log=lambda _: None)
