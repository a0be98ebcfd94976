"""Shared fixtures: a real sshd (tests/sshd.py), a build cache for the session, the demo build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sshd import lab3, sshd  # noqa: E402,F401  (one sshd and one 3-device lab per session, shared by every test file)

ROOT = Path(__file__).resolve().parent.parent
EDGEFT = [sys.executable, "-m", "edgeft.cli"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One build cache for the whole session: the demo base is pretrained once, stages cached."""
    path = Path(os.environ.get("EDGEFT_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["EDGEFT_CACHE"] = str(path)  # in-process library calls use it too
    return path


@pytest.fixture(scope="session")
def run_edgeft(cache_dir):
    """Run the real `edgeft` command line in a subprocess; returns CompletedProcess (text)."""

    def run(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        env = {**os.environ, "EDGEFT_CACHE": str(cache_dir), "COLUMNS": "200"}
        return subprocess.run([*EDGEFT, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)

    return run


def _demo_problem(result: subprocess.CompletedProcess, report: dict | None) -> str | None:
    """Why the demo build did not pass, in one line (None when it passed): the failed gate checks
    (measured vs budget), or the one-line error, or the exit status and the last line of stderr."""
    if result.returncode == 0 and report is not None:
        return None
    if report is not None and "gate" in report:
        failed = [c for c in report["gate"]["checks"] if c["status"] not in ("pass", "skipped")]
        checks = "; ".join(f"{c['budget']}: measured {c['measured']}, budget {c['limit']}" for c in failed)
        return f"{report['gate']['verdict']} (exit {result.returncode}): {checks or ', '.join(report['gate'].get('invalid_reasons', []))}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "no output")
    return f"exit {result.returncode}: {error}"


@pytest.fixture(scope="session")
def demo_build_result(run_edgeft, tmp_path_factory) -> dict:
    """The quick start itself: `edgeft build --target rpi5` on the demo, measured locally (cold cache),
    whatever its outcome. `problem` says in one line why it did not pass (None when it did)."""
    out = tmp_path_factory.mktemp("demo") / "bundle"
    result = run_edgeft("build", "--target", "rpi5", "--out", out, "--json")
    try:
        report = json.loads(result.stdout)
    except ValueError:
        report = None
    return {"out": out, "report": report, "stderr": result.stderr, "returncode": result.returncode,
            "problem": _demo_problem(result, report)}


@pytest.fixture(scope="session")
def demo_build(demo_build_result) -> dict:
    """The demo build, for tests that need a trained demo. When the demo misses its own gate, the
    tests that need it are skipped with that reason: test_build.py::test_fresh_demo_build_passes_its_own_gate
    is the one that fails, saying why."""
    if demo_build_result["problem"]:
        pytest.skip(f"the demo build did not pass its gate: {demo_build_result['problem']}")
    return demo_build_result
