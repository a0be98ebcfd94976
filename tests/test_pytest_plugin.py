"""The pytest plugin (entry point pytest11 `edgeft`): a real HIL test file run by pytest in a subprocess
against the session's sshd devices; skipped with a reason without --edgeft-lab."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.device.reserve import LOCK_DIR

HIL_TESTS = '''
import hashlib, json, pathlib, pytest

BUNDLE = pathlib.Path({bundle!r})
RECORD = pathlib.Path({record!r})
PASSING = {{"latency_ms_p99": None, "first_token_ms": None, "peak_rss_mb": None, "max_accuracy_drop": None,
           "min_accuracy": 0.0, "max_temp_c": None, "max_model_mb": 1000}}


def note(**fields):
    RECORD.write_text(json.dumps({{**(json.loads(RECORD.read_text()) if RECORD.exists() else {{}}), **fields}}))


@pytest.mark.edgeft_device("dev-1")
def test_push_run_measure(edgeft_device):
    assert edgeft_device.name == "dev-1" and edgeft_device.lab_device.port > 0
    remote = edgeft_device.push(BUNDLE / "manifest.json")
    hashed = edgeft_device.run([edgeft_device.lab_device.python, "-c",
                               "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())", remote])
    assert hashed.ok and hashed.stdout.strip() == hashlib.sha256((BUNDLE / "manifest.json").read_bytes()).hexdigest()
    report = edgeft_device.measure(BUNDLE, budgets=PASSING)
    assert report["gate"]["verdict"] == "PASS" and report["device"]["name"] == "dev-1"
    note(pushed=remote, workdir=str(edgeft_device.lab_device.workdir), run_dir=edgeft_device.reservation.run_dir)


@pytest.mark.edgeft_device(tags=["lab-0"])
def test_by_tags(edgeft_device):
    assert edgeft_device.name in ("dev-0", "dev-2")
    result = edgeft_device.run(["pwd"])
    assert result.ok and result.stdout.strip() == str(edgeft_device.lab_device.workdir)
    note(tagged=edgeft_device.name)


@pytest.mark.parametrize("edgeft_device", [{{"tags": ["lab-1"]}}], indirect=True)
def test_indirect(edgeft_device):
    assert edgeft_device.name == "dev-1"
'''


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture
def hil_tests(demo_build, tmp_path) -> tuple[Path, Path]:
    bundle = demo_build["out"]
    record = tmp_path / "record.json"
    test_file = tmp_path / "test_board.py"
    test_file.write_text(HIL_TESTS.format(bundle=str(bundle), record=str(record)))
    return test_file, record


def test_plugin_runs_hil_tests_on_the_lab(hil_tests, lab3, tmp_path):
    test_file, record = hil_tests
    result = _pytest("--edgeft-lab", str(lab3.lab_path), test_file.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout
    seen = json.loads(record.read_text())
    assert seen["tagged"] in ("dev-0", "dev-2")
    # Released after the test: the run dir it pushed into is gone, and so is the device's lock.
    workdir = Path(seen["workdir"])
    assert seen["pushed"].startswith(seen["run_dir"] + "/")
    assert not (workdir / seen["run_dir"]).exists() and not (workdir / LOCK_DIR).exists()


def test_plugin_skips_without_a_lab(hil_tests, tmp_path):
    test_file, record = hil_tests
    result = _pytest(test_file.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 skipped" in result.stdout and "no lab: pass --edgeft-lab hil/lab.yaml" in result.stdout
    assert not record.exists()
