"""The field kit (`edgeft kit`, its install.sh run for real) and Mender (`edgeft mender`, the update module
`edgeft-model` driven by the real Debian mender-client in standalone mode). The tiny bundle imports torch:
run under `flock /tmp/edgeft-heavy.lock`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_bundle import bundle_template, corrupt_golden, make_release, new_key, sign  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODULE_SOURCE = REPO / "runner" / "mender" / "edgeft-model"
DEVICE_TYPE = "edgeft-test-gw"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def runner_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """The runner from the source tree (what runner.pyz zips), for reading an install root's state."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "runner"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgeft_runner", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def root_status(root: Path, env: dict | None = None) -> dict:
    result = runner_cli("status", "--root", root, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return last_json(result.stdout)


def active(status: dict) -> dict:
    return status["slots"][status["active"]]


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict:
    """Signed releases of the tiny bundle: v1, v2, v4 (good), bad = v3 whose golden logits were edited (smoke
    test fails, hashes and signature valid); a foreign key pair."""
    base = tmp_path_factory.mktemp("releases")
    key, pub = new_key(base / "keys")
    _, foreign_pub = new_key(base / "foreign")
    template = bundle_template(tmp_path_factory)
    out = {"key": key, "pub": pub, "foreign_pub": foreign_pub}
    for name, version, edit in (("v1", 1, None), ("v2", 2, None), ("bad", 3, corrupt_golden), ("v4", 4, None)):
        bundle = make_release(template, base / name, note=name, edit=edit)
        out[name] = bundle
        out[name + "_sha"] = sign(bundle, key, version=version)
    return out


# ------------------------------------------------------------------------------------------------ kit
@pytest.fixture(scope="module")
def kit(releases, run_edgeft, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("kit")
    kit_dir, root = base / "kit v1", base / "gateway root"  # spaces: install.sh quotes everything
    result = run_edgeft("kit", releases["v1"], "-o", kit_dir, "--pubkey", releases["pub"], "--root", root,
                        "--python", sys.executable, "--json")
    assert result.returncode == 0, result.stderr
    return {"dir": kit_dir, "root": root, "json": json.loads(result.stdout)}


def run_install_sh(kit_dir: Path, *args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # From another directory: install.sh finds its files beside itself.
    return subprocess.run(["sh", str(kit_dir / "install.sh"), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd or kit_dir.parent, env={**os.environ, **(env or {})})


def test_kit_contents(kit, releases):
    kit_dir, info = kit["dir"], kit["json"]
    assert info["bundle_sha256"] == releases["v1_sha"] and info["version"] == 1 and info["channel"] == "test-cpu"
    files = sorted(p.relative_to(kit_dir).as_posix() for p in kit_dir.rglob("*") if p.is_file())
    assert files == ["README.txt", "SHA256SUMS", "bundle/golden.npz", "bundle/manifest.json", "bundle/manifest.sig",
                     "bundle/model.onnx", "bundle/task.json", "edgeft.pub", "install.sh", "runner.pyz"]
    assert info["files"] == len(files) and info["bytes"] == sum((kit_dir / f).stat().st_size for f in files)
    for rel in ("manifest.json", "manifest.sig", "model.onnx", "golden.npz", "task.json"):
        assert sha256(kit_dir / "bundle" / rel) == sha256(releases["v1"] / rel)
    assert sha256(kit_dir / "edgeft.pub") == sha256(releases["pub"])
    assert sha256(kit_dir / "runner.pyz") == info["runner_sha256"]
    # coreutils' own check of SHA256SUMS: every file but itself, all OK.
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=kit_dir, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == len(files) - 1, check.stdout
    assert len((kit_dir / "README.txt").read_text().splitlines()) == 10
    assert (kit_dir / "install.sh").stat().st_mode & stat.S_IXUSR


def test_kit_install_then_already_current(kit, releases):
    root = kit["root"]
    first = run_install_sh(kit["dir"])
    assert first.returncode == 0, first.stderr[-3000:]
    answer = last_json(first.stdout)
    assert answer["result"] == "installed" and answer["bundle"] == releases["v1_sha"] and answer["version"] == 1
    assert "install.sh: done" in first.stderr
    status = root_status(root)
    assert active(status)["bundle"] == releases["v1_sha"] and active(status)["status"] == "good"
    assert status["pending"] is None
    assert sha256(root / "current" / "model.onnx") == sha256(releases["v1"] / "model.onnx")
    key_line = (kit["dir"] / "edgeft.pub").read_text()
    assert (root / "keys" / f"{key_line.split()[2]}.pub").read_text() == key_line

    log_lines = (root / "install.log").read_text().splitlines()
    second = run_install_sh(kit["dir"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert last_json(second.stdout)["result"] == "already-current"
    assert root_status(root)["state"] == status["state"]
    assert (root / "install.log").read_text().splitlines() == log_lines  # touched nothing


def test_kit_damaged_or_tampered_is_refused(kit, releases, tmp_path):
    damaged = Path(shutil.copytree(kit["dir"], tmp_path / "damaged"))
    model = damaged / "bundle" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))

    # A copy damaged on the way: SHA256SUMS names the file, the runner is never started.
    root1 = tmp_path / "root1"
    result = run_install_sh(damaged, env={"EDGEFT_ROOT": str(root1)})
    assert result.returncode == 2, result.stderr
    assert "bundle/model.onnx: FAILED" in result.stderr and "the kit is damaged" in result.stderr
    assert not root1.exists()

    # Tampered with SHA256SUMS updated too: the runner's signature and hash check refuses it.
    sums = (damaged / "SHA256SUMS").read_text().replace(sha256(kit["dir"] / "bundle" / "model.onnx"), sha256(model))
    (damaged / "SHA256SUMS").write_text(sums)
    root2 = tmp_path / "root2"
    result = run_install_sh(damaged, env={"EDGEFT_ROOT": str(root2)})
    assert result.returncode == 2, result.stderr[-3000:]
    answer = last_json(result.stdout)
    assert answer["result"] == "refused" and "model.onnx" in answer["reason"], answer
    assert "refused (exit 2); nothing was installed" in result.stderr
    status = root_status(root2)
    assert status["active"] is None and status["slots"] == {"a": None, "b": None}
    assert not os.path.lexists(root2 / "current")


def test_kit_refuses_bad_input(releases, run_edgeft, tmp_path):
    out = tmp_path / "kit"
    result = run_edgeft("kit", releases["v1"], "-o", out, "--pubkey", releases["foreign_pub"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert not out.exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    result = run_edgeft("kit", releases["v1"], "-o", tmp_path / "notes", "--pubkey", releases["pub"])
    assert result.returncode == 2 and "is not an edgeft field kit" in result.stderr
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    result = run_edgeft("kit", releases["v1"], "-o", out, "--pubkey", releases["pub"], "--root", "relative/root")
    assert result.returncode == 2 and "must be an absolute path" in result.stderr and not out.exists()


# --------------------------------------------------------------------------------------------- mender
needs_mender_artifact = pytest.mark.skipif(shutil.which("mender-artifact") is None,
                                           reason="mender-artifact not installed (apt-get install mender-artifact)")


@pytest.fixture(scope="module")
def artifacts(releases, run_edgeft, tmp_path_factory) -> dict:
    if shutil.which("mender-artifact") is None:
        pytest.skip("mender-artifact not installed (apt-get install mender-artifact)")
    base = tmp_path_factory.mktemp("artifacts")
    out = {}
    for name in ("v1", "v2", "bad", "v4"):
        result = run_edgeft("mender", releases[name], "--device-type", DEVICE_TYPE, "-o", base / f"{name}.mender",
                            "--pubkey", releases["pub"], "--json")
        assert result.returncode == 0, result.stderr
        out[name] = json.loads(result.stdout)
    return out


def payload_files(artifact: Path) -> dict[str, bytes]:
    """The payload files inside a Mender artifact (version 3: data/0000.tar.gz in the outer tar)."""
    with tarfile.open(artifact) as outer:
        data = outer.extractfile("data/0000.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(data)) as inner:
        return {m.name: inner.extractfile(m).read() for m in inner if m.isfile()}


@needs_mender_artifact
def test_mender_artifact(artifacts, releases):
    info = artifacts["v1"]
    assert info["artifact_name"] == "edgeft-test-cpu-v1" and info["bundle_sha256"] == releases["v1_sha"]
    assert info["device_types"] == [DEVICE_TYPE] and info["signature_checked"] is True
    read = subprocess.run(["mender-artifact", "read", info["artifact"]], capture_output=True, text=True, check=True).stdout
    assert "Name: edgeft-test-cpu-v1" in read and "Type:   edgeft-model" in read and DEVICE_TYPE in read
    assert sha256(info["artifact"]) == info["sha256"]
    files = payload_files(Path(info["artifact"]))
    assert sorted(files) == ["bundle.tar", "runner.pyz"]
    assert hashlib.sha256(files["runner.pyz"]).hexdigest() == info["runner_sha256"]
    with tarfile.open(fileobj=io.BytesIO(files["bundle.tar"])) as tar:
        members = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar}
    expected = json.loads((releases["v1"] / "manifest.json").read_text())["files"]
    assert members == {**expected, "manifest.json": releases["v1_sha"],
                       "manifest.sig": sha256(releases["v1"] / "manifest.sig")}


@needs_mender_artifact
def test_mender_refuses_bad_input(releases, run_edgeft, tmp_path):
    out = tmp_path / "x.mender"
    result = run_edgeft("mender", releases["v1"], "--device-type", DEVICE_TYPE, "-o", out, "--pubkey", releases["foreign_pub"])
    assert result.returncode == 2 and "Traceback" not in result.stderr and not out.exists()
    unsigned = Path(shutil.copytree(releases["v1"], tmp_path / "unsigned"))
    (unsigned / "manifest.sig").unlink()
    result = run_edgeft("mender", unsigned, "--device-type", DEVICE_TYPE, "-o", out)
    assert result.returncode == 2 and "manifest.sig" in result.stderr and not out.exists()


def test_mender_without_tool_names_the_package(releases, tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no mender-artifact on it
    result = subprocess.run([sys.executable, "-m", "edgeft.cli", "mender", str(releases["v1"]), "--device-type",
                             DEVICE_TYPE, "-o", str(tmp_path / "x.mender")], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2 and "apt-get install mender-artifact" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.mender").exists()


def test_module_out_writes_the_update_module(run_edgeft, tmp_path):
    result = run_edgeft("mender", "--module-out", tmp_path)
    assert result.returncode == 0, result.stderr
    module = tmp_path / "edgeft-model"
    assert module.read_bytes() == MODULE_SOURCE.read_bytes()
    assert stat.S_IMODE(module.stat().st_mode) == 0o755
    assert subprocess.run(["sh", "-n", str(module)]).returncode == 0
    for query, answer in (("SupportsRollback", "Yes"), ("NeedsArtifactReboot", "No")):
        out = subprocess.run(["sh", str(module), query, str(tmp_path)], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout == answer + "\n"


# ------------------------------------------------------------------------- the real mender-client
SYSTEM_PATHS = ("/etc/mender", "/var/lib/mender", "/data/mender", "/usr/share/mender/modules/v3/edgeft-model", "/etc/edgeft")


def _save(path: Path, backup: Path) -> bool:
    if not os.path.lexists(path):
        return False
    if path.is_symlink():
        backup.symlink_to(os.readlink(path))
    elif path.is_dir():
        shutil.copytree(path, backup, symlinks=True)
    else:
        shutil.copy2(path, backup)
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


@pytest.fixture
def mender_device(tmp_path, releases):
    """This machine as a standalone Mender device (platform.md): device_type, mender.conf, artifact_info,
    the edgeft-model module and /etc/edgeft/mender.conf; every system path it touches is restored after."""
    if os.geteuid() != 0:
        pytest.skip("the real mender-client test needs root (it writes /etc/mender, /data/mender, /usr/share/mender)")
    if shutil.which("mender") is None:
        pytest.skip("mender-client not installed (apt-get install mender-client)")
    # Two test sessions on one machine (a helper and CI) must not share /etc/mender: one at a time.
    lock = FileLock("/tmp/edgeft-mender-device.lock", timeout=600)
    lock.acquire()
    backups = tmp_path / "system-backup"
    backups.mkdir()
    saved = {p: _save(Path(p), backups / str(i)) for i, p in enumerate(SYSTEM_PATHS)}
    made_data = not os.path.lexists("/data")
    try:
        Path("/data/mender").mkdir(parents=True, exist_ok=True)
        data_dir = Path("/var/lib/mender")
        if not data_dir.exists():
            data_dir.mkdir(parents=True)
        (data_dir / "device_type").write_text(f"device_type={DEVICE_TYPE}\n")
        Path("/etc/mender").mkdir(parents=True, exist_ok=True)
        Path("/etc/mender/mender.conf").write_text(json.dumps({"ServerURL": "", "RootfsPartA": "/dev/null",
                                                               "RootfsPartB": "/dev/null"}))
        Path("/etc/mender/artifact_info").write_text("artifact_name=factory\n")
        module = subprocess.run([sys.executable, "-m", "edgeft.cli", "mender", "--module-out",
                                 "/usr/share/mender/modules/v3/edgeft-model"], capture_output=True, text=True, cwd=REPO)
        assert module.returncode == 0, module.stderr
        root = tmp_path / "edgeft root"
        Path("/etc/edgeft").mkdir(exist_ok=True)
        Path("/etc/edgeft/mender.conf").write_text(f"EDGEFT_ROOT='{root}'\nEDGEFT_PYTHON='{sys.executable}'\n")
        trusted = runner_cli("trust-key", "--root", root, releases["pub"])
        assert trusted.returncode == 0, trusted.stderr
        yield root
    finally:
        for i, p in enumerate(SYSTEM_PATHS):
            path = Path(p)
            if os.path.lexists(path):
                _remove(path)
            if saved[p]:
                backup = backups / str(i)
                if backup.is_symlink():
                    path.symlink_to(os.readlink(backup))
                elif backup.is_dir():
                    shutil.copytree(backup, path, symlinks=True)
                else:
                    shutil.copy2(backup, path)
        if made_data:
            os.rmdir("/data")
        lock.release()


def mender(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["mender", *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def show_artifact() -> str:
    return mender("show-artifact").stdout.strip()


@needs_mender_artifact
def test_real_mender_install_commit_rollback(mender_device, artifacts, releases):
    root = mender_device
    v1, v2, bad = (artifacts[name]["artifact"] for name in ("v1", "v2", "bad"))

    installed = mender("install", v1)
    assert installed.returncode == 0, installed.stderr[-3000:]
    status = root_status(root)
    assert status["pending"] is not None and status["pending"]["deferred"]  # waits for Mender's commit
    assert active(status)["bundle"] == releases["v1_sha"]
    committed = mender("commit")
    assert committed.returncode == 0, committed.stderr[-3000:]
    status = root_status(root)
    assert status["pending"] is None and active(status)["status"] == "good"
    assert active(status)["bundle"] == releases["v1_sha"] and show_artifact() == "edgeft-test-cpu-v1"

    # Mender's own rollback of an installed, uncommitted artifact: ArtifactRollback restores v1.
    installed = mender("install", v2)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert active(root_status(root))["bundle"] == releases["v2_sha"]
    rolled = mender("rollback")
    assert rolled.returncode == 0, rolled.stderr[-3000:]
    status = root_status(root)
    assert status["pending"] is None and active(status)["bundle"] == releases["v1_sha"] and active(status)["status"] == "good"
    assert show_artifact() == "edgeft-test-cpu-v1"
    assert os.readlink(root / "current") == f"slots/{status['active']}"

    assert mender("install", v2).returncode == 0 and mender("commit").returncode == 0
    status = root_status(root)
    assert active(status)["bundle"] == releases["v2_sha"] and active(status)["status"] == "good"
    assert show_artifact() == "edgeft-test-cpu-v2"

    # A bundle whose smoke test fails: ArtifactInstall fails, Mender runs ArtifactRollback, v2 stays.
    failed = mender("install", bad)
    assert failed.returncode != 0
    assert "ArtifactRollback" in failed.stderr and "nothing to roll back" in failed.stderr, failed.stderr[-3000:]
    status = root_status(root)
    assert status["pending"] is None and active(status)["bundle"] == releases["v2_sha"] and active(status)["status"] == "good"
    assert show_artifact() == "edgeft-test-cpu-v2"
    log = [json.loads(line) for line in (root / "install.log").read_text().splitlines()]
    smoke = [e for e in log if e.get("bundle") == releases["bad_sha"] and e["result"] not in ("ok",)]
    assert smoke and any("smoke" in e["step"] for e in smoke), smoke
    assert sha256(root / "current" / "task.json") == sha256(releases["v2"] / "task.json")

    # A reboot between ArtifactInstall and ArtifactCommit (the runner's boot id changes): the commit finds the
    # install rolled back and fails, so Mender records a failure too; v2 stays.
    boot_id = root.parent / "boot_id"
    boot_id.write_text("boot-1\n")
    env = {"EDGEFT_BOOT_ID_FILE": str(boot_id)}  # mender passes its environment on to the module
    installed = mender("install", artifacts["v4"]["artifact"], env=env)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert active(root_status(root, env))["bundle"] == releases["v4_sha"]  # status recovers too: same "boot"
    boot_id.write_text("boot-2\n")
    committed = mender("commit", env=env)
    assert committed.returncode != 0 and "rebooted" in committed.stderr, committed.stderr[-3000:]
    status = root_status(root, env)
    assert status["pending"] is None and active(status)["bundle"] == releases["v2_sha"] and active(status)["status"] == "good"
    assert {slot["bundle"]: slot["status"] for slot in status["slots"].values()}[releases["v4_sha"]] == "failed"
    assert show_artifact() == "edgeft-test-cpu-v2"
