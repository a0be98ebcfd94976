"""`edgeft lab emulate`: a real arm64 Debian under qemu-user with its own sshd, used as a lab device.

The board tests need root and either a cached rootfs or the Debian mirror apt uses; they skip with
the reason otherwise (`-m "not emulate"` leaves them out). The rootfs is cached in
$EDGEFT_EMULATE_CACHE (default ~/.cache/edgeft/emulate), so only the first run pays for debootstrap
under qemu (~5 min); later runs start the board in well under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from edgeft.config import load_lab
from edgeft.device.ssh import SshTransport
from edgeft.emulate import _answers_ssh, _mounts_under, _processes_in, _rootfs_paths, host_debian_mirror, recipe, upsert_lab_device

ROOT = Path(__file__).resolve().parent.parent
EDGEFT = [sys.executable, "-m", "edgeft.cli"]
BOARD = "emu-test"
EMULATE_CACHE = Path(os.environ.get("EDGEFT_EMULATE_CACHE") or Path.home() / ".cache" / "edgeft" / "emulate")
TIMING_BUDGETS = ("latency_ms_p99", "first_token_ms", "min_decode_tokens_per_s")

LAB_WITH_COMMENTS = """\
# our lab: keep this comment
lease_s: 60
devices:
  # the real board on the bench
  - name: rpi5-lab-1
    host: 192.0.2.10   # documentation address
    user: pi
    target: rpi5
    tags: [rpi5, arm64]

  # a second board, added later
  - name: rpi5-lab-2
    host: 192.0.2.11
    user: pi
    target: rpi5
# trailing comment
"""


def _edgeft(*args, timeout: float = 1800, env: dict[str, str] | None = None, user: int | None = None):
    run_env = {**os.environ, "EDGEFT_EMULATE_CACHE": str(EMULATE_CACHE), "COLUMNS": "200", **(env or {})}
    argv = [*EDGEFT, *map(str, args)]
    if user is not None:  # as another (unprivileged) user: setpriv drops root for this one command
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
        run_env["HOME"] = "/tmp"
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=run_env, cwd=ROOT)



# ------------------------------------------------------------------ checks before any long work (no root)
def test_refused_without_root(tmp_path):
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing, so the command cannot be run unprivileged")
    start = time.monotonic()
    result = _edgeft("lab", "emulate", "emu-x", "--lab", "/tmp/edgeft-no-such-dir/lab.yaml",
                     user=65534 if os.geteuid() == 0 else None)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "needs root" in lines[0] and "sudo" in lines[0], result.stderr
    assert time.monotonic() - start < 30
    assert not Path("/tmp/edgeft-no-such-dir").exists()


def test_bad_name_is_refused(tmp_path):
    result = _edgeft("lab", "emulate", "../evil", "--lab", tmp_path / "lab.yaml")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: board name '../evil' is not usable"), result.stderr
    assert not (tmp_path / "lab.yaml").exists()


def test_real_device_of_that_name_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the lab file is read after the root check: needs root")
    lab = tmp_path / "lab.yaml"
    lab.write_text(LAB_WITH_COMMENTS)
    result = _edgeft("lab", "emulate", "rpi5-lab-2", "--lab", lab)
    assert result.returncode == 2
    assert f"{lab}: device 'rpi5-lab-2' is a real device" in result.stderr, result.stderr
    assert lab.read_text() == LAB_WITH_COMMENTS  # untouched


def test_lab_entry_is_added_then_replaced_keeping_comments(tmp_path):
    lab = tmp_path / "lab.yaml"
    lab.write_text(LAB_WITH_COMMENTS)
    entry = {"name": "emu-1", "host": "127.0.0.1", "port": 40001, "user": "pi", "key_file": "keys/emu-1_ed25519",
             "known_hosts": "keys/emu-1.known_hosts", "target": "rpi5", "python": "/home/pi/edgeft-venv/bin/python3",
             "workdir": ".edgeft", "tags": ["emulated", "arm64"], "emulated": True}
    assert upsert_lab_device(lab, entry) == "added"
    first = lab.read_text()
    for comment in ("# our lab: keep this comment", "# the real board on the bench", "# documentation address",
                    "# a second board, added later", "# trailing comment"):
        assert comment in first
    loaded = load_lab(lab)
    assert [d.name for d in loaded.devices] == ["rpi5-lab-1", "rpi5-lab-2", "emu-1"]
    assert loaded.lease_s == 60
    emu = loaded.device("emu-1")
    assert emu.emulated and emu.port == 40001 and emu.key_file == tmp_path / "keys/emu-1_ed25519"
    assert not loaded.device("rpi5-lab-2").emulated

    assert upsert_lab_device(lab, {**entry, "port": 40002}) == "replaced"
    second = lab.read_text()
    assert second.replace("40002", "40001") == first  # only the port changed, every other byte kept
    assert [d.port for d in load_lab(lab).devices if d.name == "emu-1"] == [40002]

    fresh = tmp_path / "new" / "lab.yaml"
    assert upsert_lab_device(fresh, entry) == "created"
    assert [d.name for d in load_lab(fresh).devices] == ["emu-1"]


def test_lab_file_in_flow_style_is_refused(tmp_path):
    lab = tmp_path / "lab.yaml"
    text = "devices: [{name: a, host: h, user: u, target: rpi5}]\n"
    lab.write_text(text)
    from edgeft.errors import ConfigError

    with pytest.raises(ConfigError, match="not a block list"):
        upsert_lab_device(lab, {"name": "emu-1", "host": "127.0.0.1", "port": 1, "user": "pi", "target": "rpi5"})
    assert lab.read_text() == text


# ------------------------------------------------------------------------- the board (root, slow once)
def _board_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the emulated board needs root (binfmt_misc, overlay and /proc mounts, chroot, debootstrap)"
    os.environ.setdefault("EDGEFT_EMULATE_CACHE", str(EMULATE_CACHE))
    rootfs, tarball = _rootfs_paths(recipe())
    if rootfs.is_dir() or tarball.is_file():
        return None
    mirror, suite = host_debian_mirror()
    try:
        urllib.request.urlopen(f"{mirror}/dists/{suite}/Release", timeout=15).close()
    except OSError as exc:
        return f"no cached rootfs in {EMULATE_CACHE} and debootstrap cannot reach the mirror {mirror} ({exc})"
    return None


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    reason = _board_skip_reason()
    if reason:
        pytest.skip(reason)
    lab = tmp_path_factory.mktemp("emulated-lab") / "lab.yaml"
    lab.write_text(LAB_WITH_COMMENTS)
    if (EMULATE_CACHE / "boards" / BOARD).is_dir():  # left up by an interrupted run: start from a stopped board
        _edgeft("lab", "emulate", BOARD, "--stop", timeout=120)
    start = time.monotonic()
    result = _edgeft("lab", "emulate", BOARD, "--lab", lab, "--json", timeout=3600)
    took = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout)
    yield {"lab": lab, "info": info, "stderr": result.stderr, "took_s": took}
    _edgeft("lab", "emulate", BOARD, "--lab", lab, "--stop", timeout=120)


@pytest.mark.emulate
def test_board_comes_up_and_joins_the_lab(board):
    info, lab = board["info"], board["lab"]
    assert info["state"] in ("started", "restarted") and info["emulated"] is True
    assert [p["phase"] for p in info["phases"]] == ["check", "host tools", "binfmt", "rootfs", "board", "sshd", "lab file"]
    for index, phase in enumerate(info["phases"], 1):  # each phase is printed with its time
        assert f"[{index}/7] {phase['phase']} done in {phase['s']} s" in board["stderr"]
    assert f"in {info['took_s']} s" in board["stderr"]
    assert info["device"]["machine"] == "aarch64"
    assert _answers_ssh(info["port"])
    device = load_lab(lab).device(BOARD)
    assert device.emulated and device.port == info["port"] and set(device.tags) == {"emulated", "arm64"}
    assert device.key_file == lab.parent / "keys" / f"{BOARD}_ed25519" and device.key_file.stat().st_mode & 0o077 == 0
    assert device.known_hosts.read_text().startswith(f"[127.0.0.1]:{info['port']} ssh-ed25519 ")
    assert "# the real board on the bench" in lab.read_text()


@pytest.mark.emulate
def test_second_call_only_reports(board):
    lab = board["lab"]
    before = lab.read_text()
    result = _edgeft("lab", "emulate", BOARD, "--lab", lab, "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    assert again["state"] == "already running" and again["port"] == board["info"]["port"]
    assert [p["phase"] for p in again["phases"]] == ["check"]
    assert again["took_s"] < 15 and again["lab_entry"] == "unchanged"
    assert lab.read_text() == before


@pytest.mark.emulate
def test_board_runs_aarch64_code_over_ssh(board):
    lab = board["lab"]
    device = load_lab(lab).device(BOARD)
    code = "import platform, numpy, onnxruntime; print(platform.machine(), numpy.__version__, onnxruntime.__version__)"
    with SshTransport(device, lab_file=lab) as transport:  # host key from the recorded known_hosts: no trust-on-first-use
        result = transport.run([device.python, "-c", code], timeout=300)
        file_type = transport.run(["python3", "-c", "import sys; print(open(sys.executable,'rb').read(20)[18])"], timeout=120)
    assert result.ok, result.stderr
    machine, numpy_version, ort_version = result.stdout.split()
    assert machine == "aarch64"
    assert file_type.stdout.strip() == "183"  # the ELF machine field of the board's python: EM_AARCH64
    import numpy
    import onnxruntime

    assert (numpy_version, ort_version) == (numpy.__version__, onnxruntime.__version__)  # pinned to the host's


@pytest.mark.emulate
def test_measure_on_the_emulated_board(board, demo_build, run_edgeft):
    lab = board["lab"]
    start = time.monotonic()
    result = run_edgeft("measure", demo_build["out"], "-d", BOARD, "--lab", lab, "--json", timeout=3600)
    took = time.monotonic() - start
    assert result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout)
    print(f"measure on the emulated board took {took:.0f} s; p50 {report['latency_ms']['p50']} ms")
    assert report["device"]["emulated"] is True and report["device"]["arch"] == "aarch64"
    assert report["smoke"]["passed"] is True
    assert report["accuracy"]["device"] == demo_build["report"]["accuracy"]["device"]
    timing = [c for c in report["gate"]["checks"] if c["budget"] in TIMING_BUDGETS]
    assert timing and all(c["status"] == "skipped" and "emulated" in c["reason"] for c in timing)
    # timings never decide: the verdict is what the other budgets say (the demo passes them on the host)
    assert result.returncode == {"PASS": 0, "FAIL": 1}[report["gate"]["verdict"]]


@pytest.mark.emulate
def test_concurrent_calls_start_one_sshd(board):
    lab = board["lab"]
    assert _edgeft("lab", "emulate", BOARD, "--stop", timeout=120).returncode == 0
    env = {**os.environ, "EDGEFT_EMULATE_CACHE": str(EMULATE_CACHE)}
    argv = [*EDGEFT, "lab", "emulate", BOARD, "--lab", str(lab), "--json"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    results = [json.loads(out) for out, _ in outs]
    assert sorted(r["state"] for r in results) == ["already running", "restarted"]
    assert results[0]["port"] == results[1]["port"]
    root = Path(results[0]["board_dir"]) / "root"
    listeners = [pid for pid in _processes_in(root)
                 if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0").count(b"/etc/ssh/edgeft_sshd_config")]
    assert len(listeners) == 1, listeners


@pytest.mark.emulate
def test_stop_then_restart_reuses_the_rootfs(board):
    lab, port = board["lab"], board["info"]["port"]
    board_dir = Path(board["info"]["board_dir"])
    result = _edgeft("lab", "emulate", BOARD, "--lab", lab, "--stop", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    stopped = json.loads(result.stdout)
    assert stopped["stopped_pids"] and stopped["unmounted"]
    assert not _answers_ssh(port)
    assert _mounts_under(board_dir) == []
    start = time.monotonic()
    result = _edgeft("lab", "emulate", BOARD, "--lab", lab, "--json", timeout=600)
    took = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    assert again["state"] == "restarted"
    assert next(p for p in again["phases"] if p["phase"] == "rootfs")["note"] == "cached"
    assert took < 120, f"a restart on the cached rootfs took {took:.0f} s"
    assert _answers_ssh(again["port"])
    assert yaml.safe_load(lab.read_text())["devices"][-1]["port"] == again["port"]
