"""Fault injection for `edgeft flash`, all real: the installer SIGKILLed at each step (the device's sshd
sets EDGEFT_INSTALL_FAULT=<step> in its sessions with `SetEnv`, so no host-side hook exists), the host's
`edgeft flash` process SIGKILLed mid-transfer, the connection cut every 2 MiB by a TCP proxy
(tests/faultproxy.py), the device's disk filled mid-transfer (a tmpfs install root; needs root).

After every fault `current` must resolve to a slot whose files match its manifest, and the next flash
must finish with the new version good. Each test records faults injected / survived / data lost; the
last test checks the totals and prints the table.

Imports torch (the tiny bundle's export): run under `flock /tmp/edgeft-heavy.lock`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from edgeft.flash.flash import FlashOptions
from edgeft.flash.rollout import rollout
from faultproxy import FaultProxy
from sshd import _accepts, start_lab
from tiny_bundle import CHANNEL, bundle_template, make_release, new_key, sha256, sign

ROOT = Path(__file__).resolve().parent.parent
BLOB_BYTES = 32 << 20  # big enough that a transfer lasts long enough to be interrupted on purpose
TALLY: dict[str, dict[str, int]] = {}  # fault kind -> {"injected", "survived", "data_lost"}


def tally(kind: str, survived: bool, data_lost: bool) -> None:
    row = TALLY.setdefault(kind, {"injected": 0, "survived": 0, "data_lost": 0})
    row["injected"] += 1
    row["survived"] += survived
    row["data_lost"] += data_lost


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with start_lab(tmp_path_factory.mktemp("fault-lab"), 1, lease_s=3) as info:  # a killed holder's lease ends fast
        configure(info.lab_path)
        yield info


def configure(lab_path: Path, **install) -> None:
    data = yaml.safe_load(lab_path.read_text())
    for entry in data["devices"]:
        entry.update(target=CHANNEL, install={"grace_s": 0, "health_check": "true", **install})
    lab_path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return new_key(tmp_path_factory.mktemp("keys") / "ours")


class Releases:
    """Signed releases on demand, each one version above the last (a new task.json note each time)."""

    def __init__(self, template: Path, out: Path, key_path: Path):
        self.template, self.out, self.key_path = template, out, key_path
        self.version = 0

    def next(self, blob: int = 0, small_before_blob: bool = False) -> Path:
        """small_before_blob: also a small new file that the transfer sends before the blob (files go in
        sha256 order), so a failure during the blob finds another file of this transfer already uploaded."""
        self.version += 1

        def add_blob(bundle: Path, manifest: dict) -> None:
            data = os.urandom(blob)
            (bundle / "blob.bin").write_bytes(data)
            manifest["files"]["blob.bin"] = ""
            if small_before_blob:
                blob_sha = hashlib.sha256(data).hexdigest()
                text = next(t for t in (f"small {i}\n".encode() for i in range(1 << 20))
                            if hashlib.sha256(t).hexdigest() < blob_sha)
                (bundle / "small.txt").write_bytes(text)
                manifest["files"]["small.txt"] = ""

        bundle = make_release(self.template, self.out / f"v{self.version}", note=f"v{self.version}",
                              edit=add_blob if blob else None)
        sign(bundle, self.key_path, version=self.version)
        return bundle


@pytest.fixture(scope="module")
def releases(tmp_path_factory, key):
    return Releases(bundle_template(tmp_path_factory), tmp_path_factory.mktemp("releases"), key[0])


def root_of(lab) -> Path:
    return lab.devices[0].workdir / "edgeft-install"


def flash(lab_path: Path, bundle: Path, key, **kwargs) -> dict:
    result = rollout(bundle, devices=["dev-0"], lab_path=lab_path, options=FlashOptions(install_pubkey=key[1], **kwargs),
                     wait_s=15, log=lambda message: None)
    return result["devices"][0]


def verified_current(root: Path) -> dict | None:
    """The release `current` points at when every file of that slot matches its manifest's sha256, else None."""
    current = root / "current"
    try:
        manifest = json.loads((current / "manifest.json").read_text())
        if all(sha256(current / rel) == digest for rel, digest in manifest["files"].items()):
            return manifest["release"]
    except (OSError, ValueError, KeyError):
        pass
    return None


def active_entry(root: Path) -> dict | None:
    state = json.loads((root / "state.json").read_text())
    return state["slots"][state["active"]] if state["active"] else None


def set_fault(info, step: str | None) -> None:
    """sshd's SetEnv EDGEFT_INSTALL_FAULT=<step> (None: none) for new sessions: SIGHUP makes sshd -D re-exec
    itself and read its config again."""
    lines = [line for line in info.config.read_text().splitlines() if not line.startswith("SetEnv ")]
    if step is not None:
        lines.append(f"SetEnv EDGEFT_INSTALL_FAULT={step}")
    info.config.write_text("\n".join(lines) + "\n")
    os.kill(info.pid, signal.SIGHUP)
    time.sleep(0.05)
    deadline = time.monotonic() + 10
    while not _accepts(info.port):
        assert time.monotonic() < deadline, "sshd did not come back after SIGHUP"
        time.sleep(0.02)


def watch_partial(root: Path, sha: str, at_least: int, then, timeout: float = 120) -> threading.Thread:
    """Call then() once store/.partial/<sha> on the device has grown to `at_least` bytes (polled every 2 ms)."""
    partial = root / "store" / ".partial" / sha

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if partial.stat().st_size >= at_least:
                    then()
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------------------- installer killed
# Where the runner SIGKILLs itself (edgeft_runner.install step names and fault points), and whether that
# flash's health check fails (the rollback path).
INSTALLER_FAULTS = [
    ("verify-signature", False), ("mid-clear-slot", False), ("mid-link-slot", False), ("verify-slot", False),
    ("mid-smoke-test", False), ("before-switch", False), ("mid-switch", False), ("after-switch", False),
    ("mid-health-check", False), ("before-commit", False), ("rollback-switch", True), ("after-rollback-switch", True),
]


def test_installer_killed_at_each_step_leaves_a_verified_version(lab, key, releases):
    info, root = lab.devices[0], root_of(lab)
    first = flash(lab.lab_path, releases.next(), key)
    assert first["result"] == "installed", first
    try:
        for step, rollback in INSTALLER_FAULTS:
            good = verified_current(root)
            bundle = releases.next()
            configure(lab.lab_path, health_check="false" if rollback else "true")
            set_fault(info, step)
            killed = flash(lab.lab_path, bundle, key)
            set_fault(info, None)
            configure(lab.lab_path)
            after = verified_current(root)  # before anything runs on the device again
            again = flash(lab.lab_path, bundle, key)
            entry = active_entry(root)
            survived = (killed["result"] == "failed" and after is not None
                        and after["version"] in (good["version"], releases.version)
                        and again["result"] == "installed" and entry["version"] == releases.version
                        and entry["status"] == "good" and verified_current(root)["version"] == releases.version)
            tally("installer SIGKILL", survived, data_lost=after is None)
            assert survived, (step, killed, after, again, entry)
            assert "installer ended without a result" in killed["reason"]
    finally:
        set_fault(info, None)
        configure(lab.lab_path)
    log = [json.loads(line) for line in (root / "install.log").read_text().splitlines()]
    assert sum(1 for line in log if line["step"] == "recover" and line["result"] == "rolled-back") >= 4


# ------------------------------------------------------------------------------------ host killed
def test_host_killed_mid_transfer_resumes(lab, key, releases, cache_dir):
    root = root_of(lab)
    good = verified_current(root)
    bundle = releases.next(blob=BLOB_BYTES)
    blob_sha = sha256(bundle / "blob.bin")
    proc = subprocess.Popen([sys.executable, "-m", "edgeft.cli", "flash", str(bundle), "--device", "dev-0", "--lab",
                             str(lab.lab_path), "--pubkey", str(key[1]), "--quiet", "--wait", "15"],
                            cwd=ROOT, env={**os.environ, "EDGEFT_CACHE": str(cache_dir)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch_partial(root, blob_sha, 4 << 20, lambda: proc.send_signal(signal.SIGKILL)).join(timeout=120)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    arrived = (root / "store" / ".partial" / blob_sha).stat().st_size
    assert 0 < arrived < BLOB_BYTES
    after = verified_current(root)

    again = flash(lab.lab_path, bundle, key)  # waits for the dead holder's lease (3 s) to expire
    total = sum(p.stat().st_size for p in bundle.iterdir())  # what a transfer from scratch sends
    survived = (again["result"] == "installed" and again["bytes_resumed"] >= (arrived >> 20 << 20) - (1 << 20)
                and again["bytes_sent"] < total and sha256(root / "store" / blob_sha) == blob_sha
                and verified_current(root)["version"] == releases.version)
    tally("host SIGKILL mid-transfer", survived, data_lost=after is None)
    print(f"\nhost killed with {arrived} bytes on the device; the next flash resumed from {again['bytes_resumed']}, "
          f"sent {again['bytes_sent']} of {total}")
    assert after == good  # the running version was never touched
    assert survived, (again, arrived, total)
    assert not (root / "store" / ".partial" / blob_sha).exists()


# ------------------------------------------------------------------------------- flaky connection
def test_connection_cut_every_2_mib_still_delivers_byte_identical(lab, key, releases, tmp_path):
    info, root = lab.devices[0], root_of(lab)
    bundle = releases.next(blob=12 << 20)
    with FaultProxy(("127.0.0.1", info.port), drop_every=2 << 20, bytes_per_s=20e6) as proxy:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{proxy.port} {info.host_key_line}\n")
        data = yaml.safe_load(lab.lab_path.read_text())
        data["devices"][0].update(port=proxy.port, known_hosts=str(known_hosts))
        data["lease_s"] = 120  # the lease is renewed over the same flaky link
        lab_path = tmp_path / "lab.yaml"
        lab_path.write_text(yaml.safe_dump(data, sort_keys=False))
        result = flash(lab_path, bundle, key)
    identical = all((root / "current" / p.name).read_bytes() == p.read_bytes() for p in bundle.iterdir())
    survived = result["result"] == "installed" and identical and proxy.drops >= 5
    tally("connection cut every 2 MiB", survived, data_lost=verified_current(root) is None)
    print(f"\nproxy: {proxy.drops} cuts, {result['reconnects']} reconnects, {result['bytes_sent']} bytes sent "
          f"for {sum(p.stat().st_size for p in bundle.iterdir())} in {result['seconds']} s")
    assert survived, (result, proxy.drops)
    assert result["reconnects"] >= 5


# ------------------------------------------------------------------------------------- disk full
def test_disk_filling_up_mid_transfer_fails_cleanly(lab, key, releases, run_edgeft, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs as the install root needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        configure(lab.lab_path, root=str(mount / "install"))
        root = mount / "install"
        small = releases.next()
        assert flash(lab.lab_path, small, key)["result"] == "installed"
        big = releases.next(blob=BLOB_BYTES, small_before_blob=True)
        blob_sha = sha256(big / "blob.bin")

        def fill() -> None:  # everything left on the tmpfs, while the blob is on its way
            with open(mount / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                except OSError:
                    pass

        watcher = watch_partial(root, blob_sha, 2 << 20, fill)
        result = run_edgeft("flash", big, "--device", "dev-0", "--lab", lab.lab_path, "--pubkey", key[1], "--json",
                            timeout=300)
        watcher.join(timeout=10)
        answer = json.loads(result.stdout)["devices"][0]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error ")]
        clean = (result.returncode == 2 and answer["result"] == "error" and "not enough space" in answer["reason"]
                 and len(errors) == 1 and "Traceback" not in result.stderr)
        kept = verified_current(root) is not None and verified_current(root)["version"] == small_version(small)
        partials = list((root / "store" / ".partial").iterdir())
        (mount / "filler").unlink()
        again = flash(lab.lab_path, big, key)
        survived = clean and kept and not partials and again["result"] == "installed"
        tally("disk full mid-transfer", survived, data_lost=not kept)
        assert clean, (result.returncode, answer, result.stderr)
        assert kept and partials == [] and again["result"] == "installed", (partials, again)
    finally:
        configure(lab.lab_path)
        subprocess.run(["umount", str(mount)], check=False)


def small_version(bundle: Path) -> int:
    return json.loads((bundle / "manifest.json").read_text())["release"]["version"]


# ------------------------------------------------------------------------------------------ totals
def test_fault_table():
    if not TALLY:
        pytest.skip("no fault test ran in this session")
    width = max(len(kind) for kind in TALLY)
    lines = [f"{'fault':{width}}  injected  survived  data lost"]
    for kind, row in TALLY.items():
        lines.append(f"{kind:{width}}  {row['injected']:8}  {row['survived']:8}  {row['data_lost']:9}")
    totals = {k: sum(row[k] for row in TALLY.values()) for k in ("injected", "survived", "data_lost")}
    lines.append(f"{'total':{width}}  {totals['injected']:8}  {totals['survived']:8}  {totals['data_lost']:9}")
    print("\n" + "\n".join(lines))
    assert totals["data_lost"] == 0 and totals["survived"] == totals["injected"]
