"""Shared fixtures: a real sshd (tests/sshd.py), a build cache for the session, the demo build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sshd import sshd  # noqa: E402,F401  (one sshd per session, shared by every test file)

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


@pytest.fixture(scope="session")
def demo_build(run_edgeft, tmp_path_factory):
    """The quick start itself: `edgeft build --target rpi5` on the demo, measured locally (cold cache)."""
    out = tmp_path_factory.mktemp("demo") / "bundle"
    result = run_edgeft("build", "--target", "rpi5", "--out", out, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    return {"out": out, "report": report, "stderr": result.stderr}
