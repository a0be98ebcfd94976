"""The on-device installer (edgeft_runner.install), run as the device runs it: `python -m edgeft_runner` in a
real subprocess on real signed bundles of a tiny ONNX model, killed with a real SIGKILL at each step.
The bundle is exported once per session (torch): run under `flock /tmp/edgeft-heavy.lock`."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "runner", Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from edgeft.runner_app import build_runner_zipapp  # noqa: E402
from edgeft_runner.install import accuracy_reference, min_correct  # noqa: E402
from tiny_bundle import bundle_template, corrupt_golden, make_release, new_key, sha256, sign  # noqa: E402

RUNNER = [sys.executable, "-m", "edgeft_runner"]
RUNNER_ENV = {**os.environ, "PYTHONPATH": str(REPO / "runner")}
RUNNER_ENV.pop("EDGEFT_INSTALL_FAULT", None)
RUNNER_ENV.pop("EDGEFT_BOOT_ID_FILE", None)


def runner(*args, env: dict | None = None, argv: list[str] | None = None) -> tuple[int, dict | None, str]:
    """(exit status, the JSON answer on stdout's last line or None, stderr)."""
    proc = subprocess.run([*(argv or RUNNER), *map(str, args)], env={**RUNNER_ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    return proc.returncode, answer, proc.stderr


def install(root: Path, bundle: Path, *extra, env: dict | None = None) -> tuple[int, dict | None, str]:
    return runner("install", "--root", root, "--bundle", bundle, *extra, env=env)


def state_of(root: Path) -> dict:
    return json.loads((root / "state.json").read_text())


def current_slot(root: Path) -> str | None:
    return os.readlink(root / "current").split("/")[-1] if os.path.lexists(root / "current") else None


def log_lines(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "install.log").read_text().splitlines()]


def assert_slot_holds(root: Path, slot: str, bundle: Path) -> None:
    """The slot is exactly the bundle: its manifest, signature and every file, by sha256, nothing else."""
    slot_dir = root / "slots" / slot
    manifest = json.loads((bundle / "manifest.json").read_text())
    expected = {**manifest["files"], "manifest.json": sha256(bundle / "manifest.json"), "manifest.sig": sha256(bundle / "manifest.sig")}
    assert {p.relative_to(slot_dir).as_posix(): sha256(p) for p in slot_dir.rglob("*") if p.is_file()} == expected


def assert_current_verifies(root: Path) -> str:
    """`current` resolves to a slot whose every file matches the sha256 in that slot's own manifest; its bundle hash."""
    target = (root / "current").resolve(strict=True)
    manifest = json.loads((target / "manifest.json").read_text())
    for rel, digest in manifest["files"].items():
        assert sha256(target / rel) == digest, f"{target / rel} does not match its manifest"
    return sha256(target / "manifest.json")


def snapshot(root: Path) -> dict:
    """Everything an install could change: every path's mtime (links not followed) and the state/link contents."""
    return {"mtimes": {str(p.relative_to(root)): os.lstat(p).st_mtime_ns for p in [root, *root.rglob("*")]},
            "state": (root / "state.json").read_bytes(), "current": os.readlink(root / "current")}


def copy_root(src: Path, dest: Path) -> Path:
    return Path(shutil.copytree(src, dest, symlinks=True))


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict:
    """Signed releases of one tiny model: v1, v2, v3 (task.json differs), and bundles made to fail."""
    template = bundle_template(tmp_path_factory)
    base = tmp_path_factory.mktemp("releases")
    key, pub = new_key(base / "key")
    foreign_key, _ = new_key(base / "foreign_key")
    out = {"pub": pub, "key": key}
    for version in (1, 2, 3):
        out[f"v{version}"] = make_release(template, base / f"v{version}", note=f"v{version}")
        sign(out[f"v{version}"], key, version)
    out["bad_golden"] = make_release(template, base / "bad_golden", note="v4", edit=corrupt_golden)
    sign(out["bad_golden"], key, 4)

    def wrong_task(bundle: Path, manifest: dict) -> None:
        task = json.loads((bundle / "task.json").read_text())
        for example in task["examples"]:
            example["completion_ids"] = [(token + 1) % 64 for token in example["completion_ids"]]
        (bundle / "task.json").write_text(json.dumps(task))
    out["bad_task"] = make_release(template, base / "bad_task", note="v4", edit=wrong_task)
    sign(out["bad_task"], key, 4)
    out["slow"] = make_release(template, base / "slow", note="v4", latency_ms_p99=1e-6)  # no model meets 1 ns
    sign(out["slow"], key, 4)
    out["foreign"] = make_release(template, base / "foreign", note="v4")
    sign(out["foreign"], foreign_key, 4)
    out["unsigned"] = make_release(template, base / "unsigned", note="v4")
    out["other_arch"] = make_release(template, base / "other_arch", note="v4",
                                     edit=lambda b, m: m.update(arch="riscv64", target="riscv-board"))
    sign(out["other_arch"], key, 4, channel="test-cpu")
    out["no_runtime"] = make_release(template, base / "no_runtime", note="v4", edit=lambda b, m: m.update(runtime="tensorrt"))
    sign(out["no_runtime"], key, 4)
    out["v2_again"] = make_release(template, base / "v2_again", note="v2 rebuilt")  # same version, other bundle
    sign(out["v2_again"], key, 2)
    return out


@pytest.fixture(scope="module")
def root_v1(kit, tmp_path_factory) -> Path:
    """An install root that trusts the key and runs v1 (slot a). Tests work on copies of it."""
    root = tmp_path_factory.mktemp("root_v1") / "root"
    assert runner("trust-key", "--root", root, kit["pub"])[0] == 0
    code, answer, err = install(root, kit["v1"])
    assert code == 0 and answer["result"] == "installed", err
    return root


@pytest.fixture(scope="module")
def root_v2(kit, root_v1, tmp_path_factory) -> Path:
    """v1 in slot a, v2 active in slot b."""
    root = copy_root(root_v1, tmp_path_factory.mktemp("root_v2") / "root")
    code, answer, err = install(root, kit["v2"])
    assert code == 0 and answer["result"] == "installed", err
    return root


# --- the normal path ---------------------------------------------------------------------------------------

def test_install_switch_keep_previous_and_version_rule(kit, tmp_path):
    root = tmp_path / "root"
    code, answer, err = runner("trust-key", "--root", root, kit["pub"])
    assert code == 0 and answer["key_id"] in {p.stem for p in (root / "keys").glob("*.pub")}, err

    code, answer, err = install(root, kit["v1"])
    assert code == 0, err
    assert answer["result"] == "installed" and answer["slot"] == "a" and answer["version"] == 1 and answer["previous"] is None
    assert answer["bundle"] == sha256(kit["v1"] / "manifest.json")
    assert answer["smoke"]["golden"]["passed"] and answer["smoke"]["accuracy"]["correct"] == 4
    assert current_slot(root) == "a" and (root / "current" / "manifest.json").read_bytes() == (kit["v1"] / "manifest.json").read_bytes()
    assert_slot_holds(root, "a", kit["v1"])
    state = state_of(root)
    assert state["active"] == "a" and state["pending"] is None and state["slots"]["b"] is None
    assert state["slots"]["a"]["status"] == "good" and state["slots"]["a"]["version"] == 1
    assert state["highest_version"] == {"test-cpu": 1}
    assert (root / "store" / sha256(kit["v1"] / "model.onnx")).stat().st_mode & 0o777 == 0o444

    # v2 from the store by hash (what `edgeft flash` does after sending the files): slot b, v1 kept.
    for path in kit["v2"].iterdir():
        stored = root / "store" / sha256(path)
        if not stored.exists():
            shutil.copyfile(path, stored)
    code, answer, err = runner("install", "--root", root, "--manifest", sha256(kit["v2"] / "manifest.json"),
                               "--signature", sha256(kit["v2"] / "manifest.sig"))
    assert code == 0 and answer["result"] == "installed" and answer["slot"] == "b", err
    assert answer["previous"]["slot"] == "a" and answer["previous"]["version"] == 1
    assert current_slot(root) == "b"
    assert_slot_holds(root, "a", kit["v1"])
    assert_slot_holds(root, "b", kit["v2"])
    state = state_of(root)
    assert (state["slots"]["a"]["status"], state["slots"]["b"]["status"]) == ("good", "good")
    assert state["highest_version"] == {"test-cpu": 2}

    # The same bundle again: already current, nothing written (not even the log).
    before = snapshot(root)
    code, answer, err = install(root, kit["v2"])
    assert code == 0 and answer["result"] == "already-current" and answer["slot"] == "b", err
    assert snapshot(root) == before

    # Older version refused, state untouched; then allowed explicitly.
    code, answer, err = install(root, kit["v1"])
    assert code == 2 and answer["result"] == "refused" and "older than version 2" in answer["reason"], err
    assert err.strip().splitlines()[-1].startswith("edgeft-runner: ") and "--allow-downgrade" in err
    assert snapshot(root)["state"] == before["state"] and current_slot(root) == "b"
    code, answer, err = install(root, kit["v2_again"])
    assert code == 2 and "already bundle" in answer["reason"], err
    code, answer, err = install(root, kit["v1"], "--allow-downgrade")
    assert code == 0 and answer["result"] == "installed" and answer["slot"] == "a", err
    assert state_of(root)["highest_version"] == {"test-cpu": 2}  # a downgrade never lowers the bar

    # The store keeps only what the slots use: v1 replaced v1, v2 stays.
    used = {sha256(p) for slot in ("a", "b") for p in (root / "slots" / slot).iterdir()}
    assert {p.name for p in (root / "store").iterdir() if p.is_file()} == used

    # Manual rollback goes to the other good slot and back.
    code, answer, err = runner("rollback", "--root", root)
    assert code == 0 and answer["result"] == "rolled-back" and answer["slot"] == "b" and current_slot(root) == "b", err
    code, answer, err = runner("status", "--root", root, "--json")
    assert code == 0 and answer["active"] == "b" and answer["current"] == "b", err
    assert answer["slots"]["a"]["version"] == 1 and answer["slots"]["b"]["version"] == 2 and answer["log"][-1]["step"] == "rollback"
    text = subprocess.run([*RUNNER, "status", "--root", str(root)], env=RUNNER_ENV, capture_output=True, text=True, check=True).stdout
    assert "current  -> slots/b" in text and "slot b * good     test-cpu v2" in text and "highest  test-cpu v2" in text


@pytest.mark.parametrize("case, fragment", [
    ("flipped_model", "sha256 mismatch for model.onnx"),
    ("flipped_manifest", "signature does not match manifest.json"),
    ("foreign", "not trusted"),
    ("unsigned", "unsigned bundle"),
    ("other_arch", "this device is"),
    ("no_runtime", "tensorrt"),
])
def test_refused_bundles_change_nothing(kit, root_v1, tmp_path, case, fragment):
    root = copy_root(root_v1, tmp_path / "root")
    bundle = kit.get(case)
    if case.startswith("flipped"):
        bundle = Path(shutil.copytree(kit["v2"], tmp_path / "bundle"))
        target = bundle / ("model.onnx" if case == "flipped_model" else "manifest.json")
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    before = snapshot(root)
    code, answer, err = install(root, bundle)
    assert code == 2 and answer["result"] == "refused" and fragment in answer["reason"], err
    assert len(err.strip().splitlines()) == 1 and fragment in err
    after = snapshot(root)
    assert after["state"] == before["state"] and after["current"] == before["current"]
    assert sorted(p.name for p in (root / "store").iterdir()) == sorted(p.name for p in (root_v1 / "store").iterdir())
    assert log_lines(root)[-1]["result"] == "refused"


def test_missing_or_damaged_store_files_are_named(kit, root_v1, tmp_path):
    root = copy_root(root_v1, tmp_path / "root")
    manifest_sha, sig_sha = sha256(kit["v2"] / "manifest.json"), sha256(kit["v2"] / "manifest.sig")
    code, answer, err = runner("install", "--root", root, "--manifest", manifest_sha, "--signature", sig_sha)
    assert code == 2 and f"store/{manifest_sha}" in answer["reason"] and "send" in answer["reason"], err
    for path in kit["v2"].iterdir():
        if not (root / "store" / sha256(path)).exists():
            shutil.copyfile(path, root / "store" / sha256(path))
    model = root / "store" / sha256(kit["v2"] / "model.onnx")  # shared with v1: damage it on "disk"
    os.chmod(model, 0o644)
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF
    model.write_bytes(bytes(data))
    code, answer, err = runner("install", "--root", root, "--manifest", manifest_sha, "--signature", sig_sha)
    assert code == 2 and "sha256 mismatch for model.onnx" in answer["reason"], err
    assert not model.exists()  # dropped, so the next flash sends it again
    assert current_slot(root) == "a"


# --- the new bundle fails on the device ----------------------------------------------------------------------

@pytest.mark.parametrize("case, fragment", [
    ("bad_golden", "max |logits - golden|"),
    ("bad_task", "task exact match 0/4"),
    ("slow", "over the p99 budget"),
])
def test_smoke_test_failure_switches_nothing(kit, root_v1, tmp_path, case, fragment):
    root = copy_root(root_v1, tmp_path / "root")
    code, answer, err = install(root, kit[case])
    assert code == 1 and answer["result"] == "rolled-back" and fragment in answer["reason"], err
    assert current_slot(root) == "a" and answer["slot"] == "a"
    state = state_of(root)
    assert state["active"] == "a" and state["pending"] is None and state["slots"]["b"]["status"] == "failed"
    assert state["highest_version"] == {"test-cpu": 1}
    if case == "slow":  # the latency run is what failed: skipping it installs the bundle
        code, answer, err = install(root, kit[case], "--no-latency-check")
        assert code == 0 and answer["result"] == "installed" and answer["smoke"]["latency"]["checked"] is False, err


def test_failed_health_check_rolls_back_and_reruns_post_install(kit, root_v1, tmp_path):
    root = copy_root(root_v1, tmp_path / "root")
    post_log = tmp_path / "post.log"
    post = f"cat current/task.json | head -c 0; readlink current >> {post_log}"
    code, answer, err = install(root, kit["v2"], "--post-install", post, "--health-check", "false", "--grace-s", "1.5")
    assert code == 1 and answer["result"] == "rolled-back" and "health check failed" in answer["reason"], err
    assert current_slot(root) == "a" and answer["slot"] == "a"
    assert post_log.read_text().splitlines() == ["slots/b", "slots/a"]  # the app reloaded the new, then the old
    state = state_of(root)
    assert state["active"] == "a" and state["slots"]["b"]["status"] == "failed" and state["pending"] is None
    health = next(e for e in log_lines(root) if e["step"] == "health-check")
    assert health["detail"]["passed"] is False and health["detail"]["attempts"] >= 2

    # A health check that passes only once the app is up (here: a second later) is retried until then.
    ready = tmp_path / "ready"
    code, answer, err = install(root, kit["v2"], "--post-install", f"(sleep 1; touch {ready}) >/dev/null 2>&1 &",
                                "--health-check", f"test -e {ready}", "--grace-s", "10")
    assert code == 0 and answer["result"] == "installed" and current_slot(root) == "b", err
    health = [e for e in log_lines(root) if e["step"] == "health-check"][-1]
    assert health["detail"]["passed"] is True and health["detail"]["attempts"] >= 2


def test_deferred_commit_and_reboot_before_commit(kit, root_v1, tmp_path):
    root = copy_root(root_v1, tmp_path / "root")
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    env = {"EDGEFT_BOOT_ID_FILE": str(boot)}
    code, answer, err = install(root, kit["v2"], "--defer-commit", env=env)
    assert code == 0 and answer["result"] == "pending" and current_slot(root) == "b", err
    code, answer, err = runner("status", "--root", root, "--json", env=env)  # a deferred install survives status
    assert answer["pending"]["slot"] == "b" and answer["recovered"] is None and current_slot(root) == "b"
    code, answer, err = install(root, kit["v3"], env=env)
    assert code == 2 and "waits for `commit`" in answer["reason"], err
    code, answer, err = runner("commit", "--root", root, env=env)
    assert code == 0 and answer["result"] == "installed" and answer["slot"] == "b", err
    assert state_of(root)["slots"]["b"]["status"] == "good" and state_of(root)["highest_version"] == {"test-cpu": 2}

    code, answer, err = install(root, kit["v3"], "--defer-commit", env=env)
    assert code == 0 and answer["result"] == "pending" and answer["slot"] == "a", err
    boot.write_text("boot-2\n")  # the device rebooted before anyone committed
    code, answer, err = runner("boot-check", "--root", root, env=env)
    assert code == 0 and answer["result"] == "rolled-back" and "rebooted" in answer["reason"], err
    assert current_slot(root) == "b" and assert_current_verifies(root) == sha256(kit["v2"] / "manifest.json")
    state = state_of(root)
    assert state["active"] == "b" and state["pending"] is None and state["slots"]["a"]["status"] == "failed"
    # Mender's ArtifactCommit after that reboot fails (so Mender records the failure), once; then there is nothing to do.
    code, answer, err = runner("commit", "--root", root, env=env)
    assert code == 1 and answer["result"] == "rolled-back" and answer["bundle"] == sha256(kit["v3"] / "manifest.json"), err
    code, answer, err = runner("commit", "--root", root, env=env)
    assert code == 0 and answer["result"] == "nothing-pending", err


def test_lock_nothing_to_roll_back_and_bad_key(kit, root_v1, tmp_path):
    root = copy_root(root_v1, tmp_path / "root")
    fd = os.open(root / ".install.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, answer, err = install(root, kit["v2"], "--wait-s", "0.3")
        assert code == 2 and "another installer holds" in answer["reason"], err
        code, answer, err = runner("status", "--root", root, "--json")
        assert code == 0 and answer["installer_running"] is True and answer["active"] == "a", err
    finally:
        os.close(fd)
    code, answer, err = runner("rollback", "--root", root)
    assert code == 2 and "nothing to roll back to" in answer["reason"], err
    bad = tmp_path / "bad.pub"
    bad.write_text("ed25519 not-base64 0123456789abcdef\n")
    code, answer, err = runner("trust-key", "--root", root, bad)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.pub" in err, err


def test_accuracy_floor_and_reference():
    # Binomial lower bounds at 1% (by hand: P(X <= 5 | 8, 0.97) = 0.0013, P(X <= 6) = 0.0223).
    assert [min_correct(8, p) for p in (1.0, 0.97, 0.9, 0.5, 0.0)] == [8, 6, 5, 1, 0]
    manifest = {"profile": {"budgets": {"max_accuracy_drop": 0.01, "min_accuracy": 0.5}},
                "provenance": {"stages": [{"name": "merge", "metrics": {"accuracy": 0.5}},
                                          {"name": "quantize", "metrics": {"accuracy": 0.98}}]}}
    reference, source = accuracy_reference(manifest, 50)
    assert reference == pytest.approx(50 / 52 - 0.01) and "0.98 on 50" in source  # (49 + 1) / (50 + 2), the last stage's
    assert accuracy_reference({}, 50)[0] is None


def test_status_of_a_missing_root_creates_nothing(tmp_path):
    code, answer, err = runner("status", "--root", tmp_path / "nothing", "--json")
    assert code == 0 and answer["active"] is None and answer["slots"] == {"a": None, "b": None}, err
    code, answer, err = runner("boot-check", "--root", tmp_path / "nothing")
    assert code == 0 and answer["result"] == "ok", err
    assert not (tmp_path / "nothing").exists()


def test_zipapp_installs(kit, tmp_path):
    runner_pyz = tmp_path / "runner.pyz"
    build_runner_zipapp(runner_pyz)
    argv = [sys.executable, str(runner_pyz)]
    root = tmp_path / "root"
    assert runner("trust-key", "--root", root, kit["pub"], argv=argv)[0] == 0
    code, answer, err = runner("install", "--root", root, "--bundle", kit["v1"], argv=argv)
    assert code == 0 and answer["result"] == "installed", err
    assert_slot_holds(root, "a", kit["v1"])


# --- power cuts ----------------------------------------------------------------------------------------------

# Every step a SIGKILL is injected at: step entries and points inside steps (mid-*), the rollback path included.
INSTALL_FAULTS = ["verify-signature", "clear-slot", "mid-clear-slot", "store-copy", "mid-store-copy", "after-store",
                  "link-slot", "mid-link-slot", "verify-slot", "smoke-test", "mid-smoke-test", "before-switch", "switch",
                  "mid-switch", "after-switch", "post-install", "health-check", "mid-health-check", "before-commit", "commit"]
ROLLBACK_FAULTS = ["rollback-switch", "after-rollback-switch"]


def test_sigkill_at_every_step_leaves_a_verified_version(kit, root_v2, tmp_path):
    """v1 in a, v2 active in b; installing v3 (into a) is killed at each step. Afterwards `current` is a slot
    whose files verify; the next command recovers; a re-run installs v3."""
    v2, v3 = sha256(kit["v2"] / "manifest.json"), sha256(kit["v3"] / "manifest.json")
    post_log = tmp_path / "post.log"
    outcomes = {}
    for fault in INSTALL_FAULTS + ROLLBACK_FAULTS:
        root = copy_root(root_v2, tmp_path / fault)
        health = "false" if fault in ROLLBACK_FAULTS else "true"
        code, answer, err = install(root, kit["v3"], "--post-install", f"echo {fault} >> {post_log}", "--health-check", health,
                                    "--grace-s", "0", env={"EDGEFT_INSTALL_FAULT": fault})
        assert code == -signal.SIGKILL, f"{fault}: the fault did not fire (exit {code}): {err}"
        running = assert_current_verifies(root)
        assert running in (v2, v3), fault

        code, answer, err = runner("status", "--root", root, "--json")  # recovery: finish or undo
        assert code == 0, err
        state = state_of(root)
        assert state["pending"] is None and current_slot(root) == state["active"], fault
        assert state["slots"][state["active"]]["status"] == "good", fault
        outcomes[fault] = assert_current_verifies(root)

        code, answer, err = install(root, kit["v3"], "--post-install", "true", "--health-check", "true")
        assert code == 0 and answer["result"] == "installed" and answer["bundle"] == v3, f"{fault}: {err}"
        state = state_of(root)
        assert state["slots"][state["active"]] | {"installed_at": None} == {
            "bundle": v3, "version": 3, "channel": "test-cpu", "status": "good", "installed_at": None}
        assert_slot_holds(root, state["active"], kit["v3"])
        assert_slot_holds(root, "b", kit["v2"])  # the previous version is kept whatever happened
    # Killed before the switch the device ran v2 throughout; after it, recovery rolled back to v2.
    assert set(outcomes.values()) == {v2}, outcomes


def test_sigkill_in_manual_rollback_and_commit(kit, root_v2, tmp_path):
    root = copy_root(root_v2, tmp_path / "rollback")
    code, _, err = runner("rollback", "--root", root, env={"EDGEFT_INSTALL_FAULT": "rollback-switch"})
    assert code == -signal.SIGKILL, err
    assert runner("boot-check", "--root", root)[1]["result"] == "ok"
    assert current_slot(root) == state_of(root)["active"] == "a"  # the state said a: the link follows it
    assert assert_current_verifies(root) == sha256(kit["v1"] / "manifest.json")

    root = copy_root(root_v2, tmp_path / "commit")
    code, answer, err = install(root, kit["v3"], "--defer-commit")
    assert code == 0 and answer["result"] == "pending", err
    code, _, err = runner("commit", "--root", root, env={"EDGEFT_INSTALL_FAULT": "commit"})
    assert code == -signal.SIGKILL, err
    code, answer, err = runner("commit", "--root", root)  # still deferred and pending: the commit is redone
    assert code == 0 and answer["result"] == "installed" and state_of(root)["slots"]["a"]["status"] == "good", err
