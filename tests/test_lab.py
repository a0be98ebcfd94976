"""`edgeft lab list` and `edgeft lab check` on real sshd devices (and one port nobody listens on)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import numpy
import onnxruntime
import pytest
import yaml

from edgeft.device.reserve import reserve
from edgeft.errors import DeviceError
from sshd import start_lab

ROOT = Path(__file__).resolve().parent.parent
EDGEFT = [sys.executable, "-m", "edgeft.cli"]


def edgeft(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEFT, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=120)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nobody listens there


@pytest.fixture
def mixed_lab(tmp_path):
    """dead (a port nobody listens on), host-0 (this machine's arch: healthy), rpi5-0 (x86_64 posing as an
    rpi5: wrong arch); all tagged `bench`. Yields (lab path, {name: workdir})."""
    with start_lab(tmp_path, 2) as lab:
        host_target = tmp_path / "host.yaml"
        host_target.write_text(yaml.safe_dump({"arch": platform.machine(), "runtime": "onnxruntime", "default_profile": "arm-int8"}))
        data = yaml.safe_load(lab.lab_path.read_text())
        host, rpi = data["devices"]
        host.update(name="host-0", target=str(host_target), tags=["bench"])
        rpi.update(name="rpi5-0", tags=["bench"])
        dead = {**host, "name": "dead", "port": _dead_port()}
        data["devices"] = [dead, host, rpi]
        lab.lab_path.write_text(yaml.safe_dump(data, sort_keys=False))
        yield lab.lab_path, {"host-0": lab.devices[0].workdir, "rpi5-0": lab.devices[1].workdir}


def test_check_marks_unreachable_and_wrong_arch_unhealthy_and_reservations_skip_them(mixed_lab):
    lab_path, _ = mixed_lab
    result = edgeft("lab", "check", "--lab", lab_path, "--json")
    assert result.returncode == 1, result.stderr
    by_name = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(by_name) == {"dead", "host-0", "rpi5-0"}
    assert by_name["host-0"]["healthy"] and by_name["host-0"]["problems"] == []
    facts = by_name["host-0"]["facts"]
    assert facts["arch"] == platform.machine() and facts["python"] == platform.python_version()
    assert facts["numpy"] == numpy.__version__ and facts["runtime"]["version"] == onnxruntime.__version__
    assert facts["free_mb"] > 0
    assert not by_name["dead"]["healthy"] and "is unreachable" in by_name["dead"]["problems"][0]
    assert by_name["rpi5-0"]["problems"] == [f"arch {platform.machine()} is not target rpi5's aarch64"]
    # the state file records them; reservations by tag skip them, by name refuse them
    state = json.loads((lab_path.parent / ".edgeft-lab-state.json").read_text())["devices"]
    assert state["dead"]["healthy"] is False and "unreachable" in state["dead"]["reason"]
    assert state["host-0"]["healthy"] is True
    with reserve(tags=["bench"], lab_path=lab_path, log=lambda m: None) as r:
        assert r.name == "host-0"
        with pytest.raises(DeviceError, match="no device free .*host-0 held by") as busy:
            with reserve(tags=["bench"], lab_path=lab_path, log=lambda m: None):
                pass
        assert "dead" not in str(busy.value) and "rpi5-0" not in str(busy.value)  # unhealthy: not even tried
    with pytest.raises(DeviceError, match=r"device 'dead' is marked unhealthy \(dead: .*unreachable.*\(since "):
        with reserve("dead", lab_path=lab_path, log=lambda m: None):
            pass
    listed = {r["name"]: r for r in json.loads(edgeft("lab", "list", "--lab", lab_path, "--json").stdout)}
    assert listed["dead"]["state"] == "unhealthy" and listed["dead"]["unhealthy"]["since"] == state["dead"]["since"]
    assert listed["host-0"]["state"] == "free"


def test_a_later_passing_check_makes_a_device_healthy_again(mixed_lab):
    lab_path, workdirs = mixed_lab
    data = yaml.safe_load(lab_path.read_text())
    data["devices"][1]["python"] = "/nonexistent/python3"
    lab_path.write_text(yaml.safe_dump(data, sort_keys=False))
    broken = edgeft("lab", "check", "host-0", "--lab", lab_path, "--json")
    assert broken.returncode == 1
    [r] = json.loads(broken.stdout)
    assert "does not run the probe (exit 127" in r["problems"][0]
    with pytest.raises(DeviceError, match="marked unhealthy"):
        with reserve("host-0", lab_path=lab_path, log=lambda m: None):
            pass
    data["devices"][1]["python"] = sys.executable  # fixed
    lab_path.write_text(yaml.safe_dump(data, sort_keys=False))
    fixed = edgeft("lab", "check", "host-0", "--lab", lab_path)
    assert fixed.returncode == 0, fixed.stderr
    assert "healthy" in fixed.stderr and "host-0" in fixed.stderr and "warning: no readable thermal sensors" in fixed.stderr
    with reserve("host-0", lab_path=lab_path, log=lambda m: None) as r:
        assert (workdirs["host-0"] / r.run_dir).is_dir()


def test_check_by_tags_probes_in_parallel(mixed_lab):
    lab_path, _ = mixed_lab
    result = edgeft("lab", "check", "--tags", "bench", "--lab", lab_path, "--json")
    assert result.returncode == 1
    assert len(json.loads(result.stdout)) == 3
    none = edgeft("lab", "check", "--tags", "nosuchtag", "--lab", lab_path)
    assert none.returncode == 2 and "no device carries all tags nosuchtag" in none.stderr


def test_list_shows_holder_pid_and_lease(lab3):
    with reserve("dev-1", lab_path=lab3.lab_path, log=lambda m: None) as held:
        result = edgeft("lab", "list", "--lab", lab3.lab_path, "--json")
        text = edgeft("lab", "list", "--lab", lab3.lab_path)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert [rows[n]["state"] for n in ("dev-0", "dev-1", "dev-2")] == ["free", "held", "free"]
    h = rows["dev-1"]["holder"]
    assert h["owner"] == held.lock["owner"] and h["pid"] == os.getpid() and h["since"] == held.lock["since"]
    assert 0 < h["expires_in_s"] <= 120
    assert rows["dev-1"]["tags"] == ["rpi5", "lab-1"] and rows["dev-1"]["target"] == "rpi5"
    assert f"held by {held.lock['owner']} (pid {os.getpid()}" in text.stdout
