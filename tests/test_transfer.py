"""Content-addressed, resumable transfer (edgeft.flash.transfer) and SSH without SFTP, against real parts:
real sshds on 127.0.0.1 (one with, one without an sftp subsystem), a real TCP proxy that cuts the
connection (tests/faultproxy.py), a real SIGKILL of the sending process, a real full tmpfs. The device
is this machine over loopback, so its files are checked directly on disk."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from faultproxy import FaultProxy
from sshd import SshdInfo, sshd_nosftp  # noqa: F401  (the fixture; `sshd` comes from conftest.py)

from edgeft.device import LocalTransport, SshTransport, push_verified
from edgeft.errors import BundleError, DeviceError
from edgeft.flash.transfer import CHUNK_BYTES, TransferStats, resolve_root, send_to_store

MB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


# -------------------------------------------------------------------------------- helpers
def _file(path: Path, size: int) -> tuple[str, Path]:
    """A file of random bytes and its sha256 (the identity the caller gives send_to_store)."""
    data = os.urandom(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _store(root: Path) -> dict[str, str]:
    """name -> sha256 of the content, for every complete file in the device's store."""
    store = root / "store"
    return {p.name: _digest(p) for p in store.iterdir() if p.is_file()} if store.is_dir() else {}


def _partials(root: Path) -> list[str]:
    folder = root / "store" / ".partial"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _ssh(info: SshdInfo, workdir: Path, **overrides) -> SshTransport:
    return SshTransport(info.device(workdir=str(workdir), **overrides), lab_file=info.lab_path)


@pytest.fixture(params=["local", "sftp", "exec"])
def device(request, tmp_path):
    """A connected transport (this machine; over SSH with SFTP; over SSH without it) and a fresh root."""
    if request.param == "local":
        transport = LocalTransport(workdir=tmp_path / "wd")
    else:
        info = request.getfixturevalue("sshd" if request.param == "sftp" else "sshd_nosftp")
        transport = _ssh(info, tmp_path / "wd")
    with transport:
        yield transport, tmp_path / "root", request.param


@pytest.fixture(params=["sftp", "exec"])
def ssh_device(request, tmp_path):
    info = request.getfixturevalue("sshd" if request.param == "sftp" else "sshd_nosftp")
    with _ssh(info, tmp_path / "wd") as transport:
        yield transport, info, tmp_path / "root", request.param


# ------------------------------------------------------------------------ content addressing
def test_resend_sends_only_what_is_missing(device, tmp_path):
    transport, root, channel = device
    files = [_file(tmp_path / "b" / n, s) for n, s in [("model", 2 * MB), ("tok", MB), ("cfg", 10_000), ("empty", 0)]]
    first = send_to_store(transport, str(root), files)
    assert (first.files_total, first.files_sent, first.files_present) == (4, 4, 0)
    assert first.bytes_sent == 3 * MB + 10_000 and first.bytes_resumed_from == 0
    assert first.channel == ("sftp" if channel == "sftp" else "exec")
    assert _store(root) == {sha: sha for sha, _ in files}
    assert {oct((root / "store" / sha).stat().st_mode & 0o777) for sha, _ in files} == {"0o444"}
    assert _partials(root) == []

    again = send_to_store(transport, str(root), files)
    assert (again.files_sent, again.files_present, again.bytes_sent) == (0, 4, 0)

    # A new model that keeps its tokenizer: only the model travels.
    files[0] = _file(tmp_path / "b" / "model", 2 * MB + 123)
    calls: list[tuple[int, int]] = []
    third = send_to_store(transport, str(root), files, progress=lambda done, total: calls.append((done, total)))
    assert (third.files_sent, third.files_present, third.bytes_sent) == (1, 3, 2 * MB + 123)
    assert calls[-1] == (2 * MB + 123, 2 * MB + 123)
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))
    assert files[0][0] in _store(root) and len(_store(root)) == 5


def test_bad_input_is_refused_before_the_device(tmp_path):
    transport = LocalTransport(workdir=tmp_path / "wd")
    good = _file(tmp_path / "a", 10)
    with pytest.raises(BundleError, match=r"cannot send .*missing: No such file or directory; rebuild the bundle"):
        send_to_store(transport, str(tmp_path / "root"), [good, ("0" * 64, tmp_path / "missing")])
    with pytest.raises(BundleError, match=r"not a sha256"):
        send_to_store(transport, str(tmp_path / "root"), [("../../etc/passwd", good[1])])
    assert not (tmp_path / "root").exists()
    with transport:
        assert resolve_root(transport, "inst/x/..") == str(tmp_path / "wd" / "inst")
        assert resolve_root(transport, "/opt//edgeft/") == "/opt/edgeft"
        with pytest.raises(DeviceError, match="install root is empty"):
            resolve_root(transport, " ")


# ---------------------------------------------------------------------------------- resume
_KILLED_SENDER = """
import os, signal, sys
from pathlib import Path
from edgeft.config import load_lab
from edgeft.device import SshTransport
from edgeft.flash.transfer import send_to_store
lab_path, workdir, root, sha, path, kill_at = sys.argv[1:]
device = load_lab(Path(lab_path)).device('loopback').model_copy(update={'workdir': workdir})
def progress(done, total):
    if done >= int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)  # the host dies mid-file, as in a power cut
with SshTransport(device, lab_file=Path(lab_path)) as t:
    send_to_store(t, root, [(sha, Path(path))], progress=progress)
"""


def _settled_partial(root: Path, sha: str) -> int:
    """The partial's size once nothing writes to it any more: receivers hold the partials' dir lock."""
    folder = root / "store" / ".partial"
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        sizes = [-1]
        while True:  # an SFTP server finishing queued writes holds no lock: wait for a stable size
            sizes.append((folder / sha).stat().st_size)
            if sizes[-1] == sizes[-2]:
                return sizes[-1]
            time.sleep(0.3)
    finally:
        os.close(fd)


def test_resume_after_the_host_is_killed_resends_at_most_one_chunk(ssh_device, tmp_path):
    transport, info, root, channel = ssh_device
    size = 8 * MB
    sha, path = _file(tmp_path / "model.onnx", size)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_SENDER, str(info.lab_path), str(tmp_path / "wd"), str(root), sha, str(path),
         str(3 * MB)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = _settled_partial(root, sha)
    assert 0 < partial < size and _store(root) == {}

    stats = send_to_store(transport, str(root), [(sha, path)])
    kept = partial // CHUNK_BYTES * CHUNK_BYTES
    assert stats.bytes_resumed_from == kept
    assert stats.bytes_sent == size - kept
    assert stats.bytes_sent - (size - partial) < CHUNK_BYTES  # re-sent: less than one chunk
    assert _store(root) == {sha: sha} and _partials(root) == []


@pytest.mark.parametrize("channel", ["sftp", "exec"])
def test_connection_cut_every_2mb_still_arrives_byte_identical(channel, request, tmp_path):
    info: SshdInfo = request.getfixturevalue("sshd" if channel == "sftp" else "sshd_nosftp")
    size = 12 * MB
    sha, path = _file(tmp_path / "model.onnx", size)
    root = tmp_path / "root"
    # A 20 MB/s link that drops every connection after 2 MiB (both directions), mid-packet.
    with FaultProxy((info.host, info.port), drop_every=2 * MB, bytes_per_s=20e6) as proxy:
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{proxy.port} {info.host_key_line}\n")
        with _ssh(info, tmp_path / "wd", port=proxy.port, known_hosts=str(known)) as transport:
            stats = send_to_store(transport, str(root), [(sha, path)])
    assert (root / "store" / sha).read_bytes() == path.read_bytes()
    assert proxy.drops >= size // (2 * MB) and stats.reconnects == proxy.connections - 1
    assert stats.channel == channel and stats.files_sent == 1 and _partials(root) == []


# ------------------------------------------------------------------------------ corruption
def test_flipped_byte_in_a_partial_is_caught_and_never_stored(ssh_device, tmp_path):
    transport, _, root, _ = ssh_device
    size = 3 * MB
    sha, path = _file(tmp_path / "model.onnx", size)
    damaged = bytearray(path.read_bytes()[: 2 * MB])
    damaged[1000] ^= 0xFF  # bit rot (or a torn write) in what arrived earlier
    (root / "store" / ".partial").mkdir(parents=True)
    (root / "store" / ".partial" / sha).write_bytes(bytes(damaged))

    stats = send_to_store(transport, str(root), [(sha, path)])
    assert stats.bytes_resumed_from == 2 * MB
    assert stats.bytes_sent == (size - 2 * MB) + size  # the rest, then the whole file once more
    assert _store(root) == {sha: sha} and _partials(root) == []

    # Content that never matches the sha256 asked for (a file changed after hashing): refused, nothing stored.
    other = _file(tmp_path / "changed.onnx", MB)[1]
    wrong = hashlib.sha256(b"what the manifest said").hexdigest()
    with pytest.raises(DeviceError, match=r"arrived with another sha256 twice.*nothing was stored") as exc:
        send_to_store(transport, str(root), [(wrong, other)])
    assert "\n" not in str(exc.value) and f"'{transport.name}'" in str(exc.value)
    assert _store(root) == {sha: sha} and _partials(root) == []


# ------------------------------------------------------------------------------ no SFTP
def test_ssh_without_sftp_put_get_remove_and_push_verified(sshd_nosftp, tmp_path, caplog):
    bundle = tmp_path / "bundle"
    _file(bundle / "weights" / "model.bin", 3 * MB)
    _file(bundle / "weights" / "deeper" / "name with spaces & 'quotes' $(x).txt", 100)
    (bundle / "empty-dir").mkdir()
    (bundle / "empty.txt").write_bytes(b"")
    (bundle / "run.sh").write_text("#!/bin/sh\n")
    (bundle / "run.sh").chmod(0o755)
    workdir = tmp_path / "wd"
    with caplog.at_level(logging.WARNING, logger="edgeft.device"), _ssh(sshd_nosftp, workdir) as t:
        assert not t.has_sftp
        push_verified(t, bundle, "runs/1/bundle")
        local = {p.relative_to(bundle): p for p in bundle.rglob("*")}
        remote = {p.relative_to(workdir / "runs/1/bundle"): p for p in (workdir / "runs/1/bundle").rglob("*")}
        assert local.keys() == remote.keys()
        for rel, p in local.items():
            if p.is_file():
                assert remote[rel].read_bytes() == p.read_bytes()
                assert remote[rel].stat().st_mode & 0o777 == p.stat().st_mode & 0o777
        assert not list(workdir.rglob("*.part"))

        fetched = tmp_path / "back" / "model.bin"
        t.get_file("runs/1/bundle/weights/model.bin", fetched)
        assert fetched.read_bytes() == (bundle / "weights" / "model.bin").read_bytes()
        with pytest.raises(DeviceError, match=r"cannot fetch runs/1/nope: no such file"):
            t.get_file("runs/1/nope", tmp_path / "nope")

        t.put_file(bundle / "run.sh", "runs/2/run.sh")
        assert (workdir / "runs/2/run.sh").read_bytes() == b"#!/bin/sh\n"
        t.remove("runs/1")
        assert not (workdir / "runs/1").exists() and (workdir / "runs/2").exists()
        t.reconnect()
        assert t.run(["pwd"]).stdout.strip() == str(workdir)
    announced = [r for r in caplog.records if "offers no SFTP" in r.getMessage()]
    assert len(announced) == 1 and "exec channel" in announced[0].getMessage()

    # A relative workdir is found under the login's home without SFTP (`pwd` in a login shell).
    name = f"edgeft-test-{uuid.uuid4().hex[:8]}"
    try:
        with _ssh(sshd_nosftp, Path(name)) as t:
            assert t.workdir == os.path.join(os.path.expanduser("~"), name) and Path(t.workdir).is_dir()
    finally:
        shutil.rmtree(Path("~", name).expanduser(), ignore_errors=True)


# ------------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs as the device's install root (needs root and mount rights; skipped otherwise)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_one_line_and_leaves_nothing_behind(ssh_device, small_disk, tmp_path):
    transport, _, _, _ = ssh_device
    root = small_disk

    # Known too big before sending: refused up front.
    sha, path = _file(tmp_path / "big.onnx", 6 * MB)
    with pytest.raises(DeviceError, match=rf"not enough space in {root}/store for 1 file\(s\): \d+ bytes free, {6 * MB} needed") as exc:
        send_to_store(transport, str(root), [(sha, path)])
    assert "\n" not in str(exc.value) and f"'{transport.name}'" in str(exc.value)
    assert _store(root) == {} and _partials(root) == []

    # The disk fills up while the file travels (another writer on the device): one line, partial removed.
    sha, path = _file(tmp_path / "model.onnx", 3 * MB)
    filler = root / "filler"

    def fill(done: int, total: int) -> None:
        if done and not filler.exists():
            free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
            filler.write_bytes(b"\0" * max(0, free - 128 * 1024))

    with pytest.raises(DeviceError, match=r"not enough space .* needed; the partial files of this transfer were removed") as exc:
        send_to_store(transport, str(root), [(sha, path)], progress=fill)
    assert "\n" not in str(exc.value)
    assert _store(root) == {} and _partials(root) == []
    filler.unlink()
    stats = send_to_store(transport, str(root), [(sha, path)])  # room again: the next try completes
    assert isinstance(stats, TransferStats) and _store(root) == {sha: sha}
