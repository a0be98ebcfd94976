"""Reservation on real sshd devices: runs never overlap, dead holders' leases expire, tags pick a free
device, a bundle for another target is refused before anything is sent, labgrid places are locked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgeft.cli import EXIT_BY_VERDICT
from edgeft.device.reserve import labgrid_holder, labgrid_identity, reserve
from edgeft.errors import DeviceError
from sshd import start_lab

ROOT = Path(__file__).resolve().parent.parent
EDGEFT = [sys.executable, "-m", "edgeft.cli"]

# A separate process that reserves a device, records when it held it, and (HOLD_S < 0) holds until killed,
# or, given a release file, holds until that file appears (so a test can release it at a known moment).
HOLDER = r"""
import json, os, sys, time
from pathlib import Path
from edgeft.cli import _terminated
import signal
signal.signal(signal.SIGTERM, _terminated)
from edgeft.device.reserve import reserve
lab, name, hold_s, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
release = Path(sys.argv[5]) if len(sys.argv) > 5 else None
with reserve(name, lab_path=Path(lab), wait_s=60, log=lambda m: None) as r:
    acquired = time.time()
    print("READY", r.run_dir, flush=True)
    if hold_s < 0:
        while True:
            time.sleep(1)
    if release is not None:
        deadline = time.time() + hold_s
        while not release.exists() and time.time() < deadline:
            time.sleep(0.05)
    else:
        time.sleep(hold_s)
    released = time.time()
out.write_text(json.dumps({"acquired": acquired, "released": released, "run_dir": r.run_dir, "pid": os.getpid()}))
"""


def holder(lab_path: Path, name: str, hold_s: float, out: Path, env: dict | None = None,
           release: Path | None = None) -> subprocess.Popen:
    extra = [str(release)] if release is not None else []
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lab_path), name, str(hold_s), str(out), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def ready(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line.startswith("READY"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return line.split()[1]


def fake_bundle(path: Path, target: str = "rpi5", arch: str = "aarch64", runtime: str = "onnxruntime") -> Path:
    """A bundle dir whose manifest lists no files: enough to get `edgeft measure` to the reservation."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"target": target, "arch": arch, "runtime": runtime, "files": {}}))
    return path


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def assert_disjoint(intervals: list[tuple[float, float]]) -> None:
    intervals = sorted(intervals)
    for (a0, a1), (b0, b1) in zip(intervals, intervals[1:]):
        assert a1 <= b0, f"reservations overlap: [{a0}, {a1}] and [{b0}, {b1}]"


# --------------------------------------------------------------------------------- device locks
def test_concurrent_reservations_never_overlap(lab3, tmp_path):
    outs = [tmp_path / f"h{i}.json" for i in range(4)]
    procs = [holder(lab3.lab_path, "dev-0", 0.4, out) for out in outs]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    records = [json.loads(o.read_text()) for o in outs]
    assert len({r["pid"] for r in records}) == 4
    assert len({r["run_dir"] for r in records}) == 4  # every run its own dir
    assert_disjoint([(r["acquired"], r["released"]) for r in records])
    assert all(r["released"] - r["acquired"] >= 0.4 for r in records)
    workdir = lab3.devices[0].workdir
    assert not (workdir / ".edgeft-lock").exists()
    assert list((workdir / "runs").iterdir()) == []  # each run dir removed on release


def test_wait_zero_fails_fast_naming_the_holder(lab3, tmp_path):
    bundle = fake_bundle(tmp_path / "bundle")
    with reserve("dev-1", lab_path=lab3.lab_path, log=lambda m: None) as held:
        started = time.monotonic()
        result = subprocess.run([*EDGEFT, "measure", str(bundle), "-d", "dev-1", "--lab", str(lab3.lab_path), "--wait", "0"],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
        took = time.monotonic() - started
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]  # the unsigned-bundle warning
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        assert "dev-1" in lines[0] and f"held by {held.lock['owner']} (pid {os.getpid()}" in lines[0]
        assert "--wait" in lines[0]
        assert took < 15
    with reserve("dev-1", lab_path=lab3.lab_path, wait_s=0, log=lambda m: None) as again:
        assert again.name == "dev-1"


def test_wait_gets_the_device_when_released(lab3, tmp_path):
    out = tmp_path / "first.json"
    first = holder(lab3.lab_path, "dev-2", 2.0, out)
    ready(first)
    started = time.time()
    with reserve("dev-2", lab_path=lab3.lab_path, wait_s=30, log=lambda m: None):
        got = time.time()
    assert first.wait(timeout=30) == 0
    record = json.loads(out.read_text())
    assert got >= record["released"] and got - started < 15


def test_tag_reservation_picks_a_free_device(lab3):
    msgs: list[str] = []
    with reserve("dev-0", lab_path=lab3.lab_path, log=msgs.append):
        with reserve(tags=["rpi5"], lab_path=lab3.lab_path, log=msgs.append) as r:
            assert r.name == "dev-1"
        with reserve(tags=["lab-0"], lab_path=lab3.lab_path, log=msgs.append) as r:  # dev-0 and dev-2 carry lab-0
            assert r.name == "dev-2"
            with pytest.raises(DeviceError) as exc:
                with reserve(tags=["lab-0"], lab_path=lab3.lab_path, log=msgs.append):
                    pass
    text = str(exc.value)
    assert "dev-0 held by" in text and "dev-2 held by" in text and "dev-1" not in text


def test_sigkilled_holder_lease_expires_and_its_run_dir_is_removed(tmp_path):
    with start_lab(tmp_path, 1, lease_s=3) as lab:
        workdir = lab.devices[0].workdir
        proc = holder(lab.lab_path, "dev-0", -1, tmp_path / "never.json")
        dead_run = ready(proc)
        (workdir / dead_run / "partial.bin").write_bytes(b"x" * 1000)  # what a killed run leaves behind
        time.sleep(4.5)  # longer than the lease: it lives because the holder renews it
        with pytest.raises(DeviceError, match="held by .*lease expires in"):
            with reserve("dev-0", lab_path=lab.lab_path, log=lambda m: None):
                pass
        proc.kill()
        proc.wait()
        killed = time.time()
        msgs: list[str] = []
        with reserve("dev-0", lab_path=lab.lab_path, wait_s=15, log=msgs.append) as r:
            took = time.time() - killed
            assert not (workdir / dead_run).exists()
            assert (workdir / r.run_dir).is_dir()
        assert 0.5 < took < 10  # waited for the lease to expire, not for the 15 s
        assert any("took over the expired lease of" in m and f"pid {proc.pid}" in m for m in msgs), msgs
        assert any("removed 1 run dir(s) left by a killed run" in m and dead_run.split("/")[1] in m for m in msgs), msgs
        assert tree(workdir) == [".edgeft-lock.guard", "runs"]


def test_sigterm_releases_the_device_at_once(tmp_path):
    with start_lab(tmp_path, 1, lease_s=60) as lab:
        proc = holder(lab.lab_path, "dev-0", -1, tmp_path / "never.json")
        run_dir = ready(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        msgs: list[str] = []
        with reserve("dev-0", lab_path=lab.lab_path, wait_s=0, log=msgs.append):  # no 60 s lease to wait out
            pass
        assert not any("took over" in m for m in msgs), msgs
        assert not (lab.devices[0].workdir / run_dir).exists()


def test_a_run_whose_lease_was_taken_discards_its_result(tmp_path):
    with start_lab(tmp_path, 1, lease_s=2) as lab:
        msgs: list[str] = []
        with reserve("dev-0", lab_path=lab.lab_path, log=msgs.append) as r:
            forced = subprocess.run([*EDGEFT, "lab", "unlock", "dev-0", "--force", "--lab", str(lab.lab_path)],
                                    capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert forced.returncode == 0 and f"pid {os.getpid()}" in forced.stderr, forced.stderr
            with reserve("dev-0", lab_path=lab.lab_path, log=lambda m: None) as other:
                assert r.lost.wait(timeout=5)  # the next renewal finds the lock is someone else's
                with pytest.raises(DeviceError, match="lease was lost"):
                    r.check_lease()
                assert (lab.devices[0].workdir / ".edgeft-lock").exists()
            assert other.run_dir != r.run_dir
        assert any("lease lost" in m for m in msgs), msgs


def test_target_mismatch_is_refused_before_anything_is_sent(lab3, tmp_path):
    bundle = fake_bundle(tmp_path / "orin", target="jetson-orin", runtime="tensorrt")
    workdir = lab3.devices[0].workdir
    before = tree(workdir)
    log_before = lab3.devices[0].log.read_text()
    result = subprocess.run([*EDGEFT, "measure", str(bundle), "-d", "dev-0", "--lab", str(lab3.lab_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "device 'dev-0' is a rpi5 (aarch64, onnxruntime)" in result.stderr
    assert "jetson-orin (aarch64, tensorrt)" in result.stderr
    assert tree(workdir) == before
    assert lab3.devices[0].log.read_text().count("Accepted publickey") == log_before.count("Accepted publickey")


def test_target_mismatch_of_a_build_is_refused_before_training(lab3):
    result = subprocess.run([*EDGEFT, "build", "-t", "jetson-orin", "-d", "dev-0", "--lab", str(lab3.lab_path), "--no-measure"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "device 'dev-0' is a rpi5" in result.stderr and "this build is for jetson-orin" in result.stderr


def test_lab_file_lock_fields_are_validated(tmp_path):
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump({"lock": "labgrid", "devices": []}))
    result = subprocess.run([*EDGEFT, "lab", "list", "--lab", str(lab)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and "coordinator: HOST:PORT" in result.stderr, result.stderr
    lab.write_text(yaml.safe_dump({"lock": "labgrid", "coordinator": "nohost", "devices": []}))
    result = subprocess.run([*EDGEFT, "lab", "list", "--lab", str(lab)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and f"{lab}:1: field 'coordinator'" in result.stderr, result.stderr


# ------------------------------------------------------------------------------------- labgrid
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def coordinator(tmp_path):
    """A real labgrid coordinator on loopback, in its own dir; yields HOST:PORT."""
    exe = Path(sys.executable).parent / "labgrid-coordinator"
    if not exe.exists():
        pytest.fail("labgrid-coordinator not found: pip install -e '.[dev]' (labgrid==26.0.1)", pytrace=False)
    address = f"127.0.0.1:{_free_port()}"
    workdir = tmp_path / "coordinator"
    workdir.mkdir()
    proc = subprocess.Popen([str(exe), "-l", address], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = Path(sys.executable).parent / "labgrid-client"
    deadline = time.monotonic() + 20
    while subprocess.run([str(client), "-x", address, "places"], capture_output=True).returncode != 0:
        assert proc.poll() is None and time.monotonic() < deadline, "labgrid-coordinator did not start"
        time.sleep(0.2)
    yield address
    proc.terminate()
    proc.wait(timeout=10)


def _labgrid(address: str, place: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    client = Path(sys.executable).parent / "labgrid-client"
    return subprocess.run([str(client), "-x", address, "-p", place, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=30)


def test_labgrid_lock_two_holders_never_overlap(tmp_path, coordinator):
    with start_lab(tmp_path, 1, lock="labgrid", coordinator=coordinator) as lab:
        assert _labgrid(coordinator, "dev-0", "create").returncode == 0
        with reserve("dev-0", lab_path=lab.lab_path, log=lambda m: None):
            assert labgrid_holder(coordinator, "dev-0") == labgrid_identity()
        assert labgrid_holder(coordinator, "dev-0") is None
        outs = [tmp_path / f"h{i}.json" for i in range(2)]
        procs = [holder(lab.lab_path, "dev-0", 0.5, out) for out in outs]
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stderr.read()
        assert_disjoint([(r["acquired"], r["released"]) for r in (json.loads(o.read_text()) for o in outs)])
        # Someone using labgrid by hand holds the place: respected, named, and the device lock is not kept.
        assert _labgrid(coordinator, "dev-0", "lock", env={"LG_USERNAME": "alice"}).returncode == 0
        with pytest.raises(DeviceError, match=r"dev-0 held by \S+/alice \(labgrid place"):
            with reserve("dev-0", lab_path=lab.lab_path, log=lambda m: None):
                pass
        assert not (lab.devices[0].workdir / ".edgeft-lock").exists()


def test_labgrid_stale_place_of_a_killed_holder(tmp_path, coordinator):
    with start_lab(tmp_path, 1, lock="labgrid", coordinator=coordinator, lease_s=3) as lab:
        assert _labgrid(coordinator, "dev-0", "create").returncode == 0
        dead = {"LG_USERNAME": "ci-job-1"}
        # 1. the next reservation takes over the expired lease and kicks the place the dead run left locked
        proc = holder(lab.lab_path, "dev-0", -1, tmp_path / "never.json", env=dead)
        ready(proc)
        proc.kill()
        proc.wait()
        stale_holder = labgrid_holder(coordinator, "dev-0")
        assert stale_holder is not None and stale_holder.endswith("/ci-job-1")  # labgrid keeps it: nothing expires it
        msgs: list[str] = []
        with reserve("dev-0", lab_path=lab.lab_path, wait_s=15, log=msgs.append):
            assert labgrid_holder(coordinator, "dev-0") == labgrid_identity()
        assert any(f"unlocking labgrid place dev-0, left locked by {stale_holder}" in m for m in msgs), msgs
        assert labgrid_holder(coordinator, "dev-0") is None
        # 2. by hand: `edgeft lab unlock --kick-stale` refuses a live lease, clears an expired one
        proc = holder(lab.lab_path, "dev-0", -1, tmp_path / "never.json", env=dead)
        ready(proc)
        unlock = [*EDGEFT, "lab", "unlock", "dev-0", "--kick-stale", "--lab", str(lab.lab_path)]
        live = subprocess.run(unlock, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert live.returncode == 2 and "a live lease" in live.stderr, live.stderr
        proc.kill()
        proc.wait()
        time.sleep(3.5)
        result = subprocess.run(unlock, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "removed the lock of" in result.stderr and "ci-job-1" in result.stderr
        assert labgrid_holder(coordinator, "dev-0") is None
        assert not (lab.devices[0].workdir / ".edgeft-lock").exists()
        assert list((lab.devices[0].workdir / "runs").iterdir()) == []


# ------------------------------------------------------------------------ measuring on a reservation
def measure_on_a_shared_emulated_device(bundle: Path, tmp_path: Path) -> None:
    """`edgeft measure --wait` waits for a held device, measures in its own run dir, reports `emulated`
    from the lab file and leaves nothing behind."""
    with start_lab(tmp_path, 1) as lab:
        data = yaml.safe_load(lab.lab_path.read_text())
        data["devices"][0]["emulated"] = True
        lab.lab_path.write_text(yaml.safe_dump(data, sort_keys=False))
        out, release = tmp_path / "first.json", tmp_path / "release"
        first = holder(lab.lab_path, "dev-0", 60, out, release=release)
        ready(first)
        # The holder lets go only once measure says it waits: a slow start of the CLI cannot miss the wait.
        measure = subprocess.Popen([*EDGEFT, "measure", str(bundle), "-d", "dev-0", "--lab", str(lab.lab_path), "--wait", "60", "--json"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        waiting = ""
        for line in measure.stderr:
            waiting += line
            if "waiting up to" in line:
                break
        release.touch()
        stdout, rest = measure.communicate(timeout=300)
        stderr = waiting + rest
        assert first.wait(timeout=30) == 0
        report = json.loads(stdout)
        assert measure.returncode == EXIT_BY_VERDICT[report["gate"]["verdict"]], stderr
        assert "waiting up to" in stderr and "dev-0 held by" in stderr
        assert report["device"]["name"] == "dev-0" and report["device"]["emulated"] is True
        assert report["accuracy"]["device"] is not None
        workdir = lab.devices[0].workdir
        assert tree(workdir) == [".edgeft-lock.guard", "runs"]
        # --tags instead of a name: any free device with the tags (here the only one)
        by_tags = subprocess.run([*EDGEFT, "measure", str(bundle), "--tags", "rpi5", "--tags", "lab-0", "--lab", str(lab.lab_path), "--json"],
                                 capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert json.loads(by_tags.stdout)["device"]["name"] == "dev-0", by_tags.stderr
        assert tree(workdir) == [".edgeft-lock.guard", "runs"]


def test_measure_waits_for_a_shared_device_and_reports_emulated(demo_build, tmp_path):
    measure_on_a_shared_emulated_device(demo_build["out"], tmp_path)
