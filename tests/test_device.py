"""Both transports against real parts: a temp dir, and a real sshd on 127.0.0.1 (tests/sshd.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from sshd import SshdInfo  # the `sshd` fixture itself comes from conftest.py

from edgeft.device import (
    LocalTransport,
    RunResult,
    SshTransport,
    open_transport,
    push_verified,
    remote_sha256,
    sha256_file,
    verify_remote,
)
from edgeft.errors import DeviceError

FIVE_MB = 5 * 1024 * 1024


# -------------------------------------------------------------------------------- fixtures
@pytest.fixture(params=["local", "ssh"])
def transport(request, tmp_path):
    """A connected transport whose workdir is fresh for this test."""
    workdir = tmp_path / "device"
    if request.param == "local":
        t = LocalTransport(workdir=workdir)
    else:
        info: SshdInfo = request.getfixturevalue("sshd")
        t = SshTransport(info.device(workdir=str(workdir)), lab_file=info.lab_path)
    with t:
        yield t


@pytest.fixture
def bundle(tmp_path) -> Path:
    root = tmp_path / "bundle"
    (root / "weights" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "manifest.json").write_text('{"name": "demo"}\n')
    (root / "weights" / "model.bin").write_bytes(os.urandom(FIVE_MB))
    (root / "weights" / "deeper" / "name with spaces & 'quotes'.txt").write_text("hi\n")
    (root / "empty.txt").write_bytes(b"")
    return root


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _py(t, code: str, *args: str, timeout: float | None = 30) -> RunResult:
    return t.run([t.python, "-c", code, *args], timeout=timeout)


# ------------------------------------------------------------------------- both transports
def test_push_verified_dir_hashes_match_on_device(transport, bundle):
    push_verified(transport, bundle, "bundle")
    local = _tree(bundle)
    remote_paths = [f"bundle/{rel}" for rel in local]
    assert remote_sha256(transport, remote_paths) == list(local.values())
    # The device holds exactly the tree, empty dir included, and nothing else (no .part leftovers).
    listing = _py(
        transport,
        "import os,sys\nfor r,ds,fs in os.walk(sys.argv[1]):\n"
        "    for n in ds+fs: print(os.path.relpath(os.path.join(r,n),sys.argv[1]))",
        "bundle",
    )
    assert listing.returncode == 0, listing.stderr
    expected = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*")}
    assert set(listing.stdout.splitlines()) == expected
    # Pushing again over the top works (overwrite in place).
    (bundle / "manifest.json").write_text('{"name": "demo", "v": 2}\n')
    push_verified(transport, bundle, "bundle")
    assert remote_sha256(transport, ["bundle/manifest.json"]) == [sha256_file(bundle / "manifest.json")]


def test_push_verified_single_file_into_new_subdir(transport, tmp_path):
    src = tmp_path / "runner.pyz"
    src.write_bytes(b"PK\x05\x06" + bytes(18))
    src.chmod(0o755)
    push_verified(transport, src, "a/b/runner.pyz")
    assert remote_sha256(transport, ["a/b/runner.pyz", "a/b/missing"]) == [sha256_file(src), None]
    mode = _py(transport, "import os,sys; print(oct(os.stat(sys.argv[1]).st_mode & 0o777))", "a/b/runner.pyz")
    assert mode.stdout.strip() == "0o755"


def test_tampered_remote_file_is_named(transport, tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes(b"original weights")
    push_verified(transport, src, "bundle/model.onnx")
    overwrite = _py(transport, "import sys; open(sys.argv[1], 'wb').write(b'tampered weights')", "bundle/model.onnx")
    assert overwrite.returncode == 0, overwrite.stderr
    with pytest.raises(DeviceError, match=r"bundle/model\.onnx.*sha256 differs") as exc:
        verify_remote(transport, src, "bundle/model.onnx")
    assert f"'{transport.name}'" in str(exc.value) and "\n" not in str(exc.value)
    transport.remove("bundle/model.onnx")
    with pytest.raises(DeviceError, match=r"bundle/model\.onnx is missing"):
        verify_remote(transport, src, "bundle/model.onnx")


ODD_ARGS = [
    "plain",
    "with space",
    "it's",
    'say "hi"',
    "$(echo pwned)",
    "`echo pwned`",
    "x; echo injected",
    "a && b || c | d > /tmp/edgeft-should-not-exist",
    "*",
    "~",
    "$HOME ${PATH}",
    "",
    "back\\slash",
    "new\nline\ttab",
    "ünïcødé ✓",
    "-c",
    "--flag=value",
]


def test_run_quotes_every_argument(transport):
    result = _py(transport, "import sys; print(repr(sys.argv[1:]))", *ODD_ARGS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(ODD_ARGS)
    assert not Path("/tmp/edgeft-should-not-exist").exists()


def test_run_in_workdir_exit_code_and_stderr(transport):
    cwd = _py(transport, "import os; print(os.getcwd())")
    assert cwd.stdout.strip() == str(transport.workdir)
    result = _py(transport, "import sys; print('out'); sys.stderr.write('boom\\n'); sys.exit(3)")
    assert result == RunResult(3, "out\n", "boom\n")
    assert not result.ok
    missing = transport.run(["edgeft-no-such-command-xyz"])
    assert missing.returncode == 127


def test_run_large_stdout_and_stderr_does_not_deadlock(transport):
    # 2 MB on each stream, interleaved: far beyond any SSH window or pipe buffer.
    code = "import sys\nfor _ in range(256):\n    sys.stdout.write('o'*8192); sys.stderr.write('e'*8192)\n"
    result = _py(transport, code, timeout=60)
    assert result.returncode == 0
    assert len(result.stdout) == len(result.stderr) == 256 * 8192


_SLEEPER = """\
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
with open('pids', 'w') as f:
    f.write('%d %d' % (os.getpid(), child.pid))
time.sleep(60)
"""

_ALIVE = """\
import sys
def alive(pid):
    try:
        with open('/proc/%s/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False
print(' '.join(str(alive(p)) for p in open('pids').read().split()))
"""


def test_run_timeout_kills_the_command_and_its_children(transport):
    started = time.monotonic()
    with pytest.raises(DeviceError, match=r"did not finish within 1 s and was killed"):
        _py(transport, _SLEEPER, timeout=1)
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while (alive := _py(transport, _ALIVE).stdout.split()) != ["False", "False"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive == ["False", "False"]  # the command and the child it started are gone
    assert _py(transport, "print('still here')").stdout == "still here\n"


def test_get_file_round_trip_is_atomic(transport, tmp_path):
    src = tmp_path / "report-src.json"
    src.write_bytes(os.urandom(300_000))
    transport.put_file(src, "out/report.json")
    dest = tmp_path / "fetched" / "report.json"
    dest.parent.mkdir()
    dest.write_text("old")
    transport.get_file("out/report.json", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["report.json"]  # no temp leftovers
    with pytest.raises(DeviceError, match=r"cannot fetch out/nope\.json: no such file"):
        transport.get_file("out/nope.json", tmp_path / "fetched" / "nope.json")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["report.json"]


def test_remove_recursive_and_confined(transport, bundle):
    transport.put_dir(bundle, "bundle")
    transport.remove("bundle")
    assert _py(transport, "import os; print(os.path.exists('bundle'))").stdout.strip() == "False"
    transport.remove("bundle")  # already gone: no error, like rm -rf
    for bad in ["../outside", "/etc/passwd", "a/../../b", ".", ""]:
        with pytest.raises(DeviceError, match="workdir"):
            transport.remove(bad)
    with pytest.raises(DeviceError, match="outside the workdir"):
        transport.put_file(bundle / "manifest.json", "../escape.json")


# ------------------------------------------------------------------------------- SSH only
def _device(info: SshdInfo, tmp_path: Path, **overrides):
    overrides.setdefault("workdir", str(tmp_path / "device"))
    return info.device(**overrides)


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, capture_output=True)
    return path


@pytest.fixture
def no_agent(monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def test_ssh_unknown_host_key_is_refused(sshd, tmp_path, no_agent):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t = SshTransport(_device(sshd, tmp_path, known_hosts=empty), lab_file=sshd.lab_path)
    with pytest.raises(DeviceError) as exc:
        t.connect()
    msg = str(exc.value)
    assert "is not in known_hosts" in msg and f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}" in msg
    assert "--trust-new-host-key" in msg and "loopback" in msg and "\n" not in msg
    assert empty.read_text() == ""


def test_ssh_trust_new_host_key_appends_it(sshd, tmp_path, caplog, no_agent):
    known = tmp_path / "kh" / "known_hosts"  # not there yet: created, like ssh's accept-new
    device = _device(sshd, tmp_path, known_hosts=known)
    with caplog.at_level(logging.INFO, logger="edgeft.device"):
        with SshTransport(device, trust_new_host_key=True) as t:
            assert t.run(["true"]).returncode == 0
    assert known.read_text() == sshd.known_hosts_line() + "\n"
    assert any("trusting new host key" in r.getMessage() and str(known) in r.getMessage() for r in caplog.records)
    # Now known: a plain, strict connection works and nothing more is appended.
    with SshTransport(device) as t:
        assert t.run(["true"]).returncode == 0
    assert known.read_text() == sshd.known_hosts_line() + "\n"


def test_ssh_changed_host_key_is_refused_even_with_trust(sshd, tmp_path, no_agent):
    other = _keygen(tmp_path / "other_host_key")
    other_line = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {other_line}\n")
    for trust in (False, True):
        with pytest.raises(DeviceError, match=r"HAS CHANGED.*man-in-the-middle.*do not continue"):
            SshTransport(_device(sshd, tmp_path, known_hosts=known), trust_new_host_key=trust).connect()
    assert known.read_text() == f"[127.0.0.1]:{sshd.port} {other_line}\n"


def test_ssh_wrong_user_key_fails_auth(sshd, tmp_path, no_agent):
    wrong = _keygen(tmp_path / "wrong_key")
    t = SshTransport(_device(sshd, tmp_path, key_file=wrong), lab_file=sshd.lab_path)
    with pytest.raises(DeviceError, match="authentication failed") as exc:
        t.connect()
    assert str(wrong) in str(exc.value) and f"{sshd.user}@127.0.0.1:{sshd.port}" in str(exc.value)


def test_ssh_missing_key_file_is_named(sshd, tmp_path, no_agent):
    missing = tmp_path / "no_such_key"
    with pytest.raises(DeviceError, match=rf"key file {missing} does not exist.*key_file in {sshd.lab_path}"):
        SshTransport(_device(sshd, tmp_path, key_file=missing), lab_file=sshd.lab_path).connect()


def test_ssh_closed_port_is_unreachable(sshd, tmp_path, no_agent):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    t = SshTransport(_device(sshd, tmp_path, port=port), lab_file=sshd.lab_path)
    with pytest.raises(DeviceError, match=rf"\(.*@127\.0\.0\.1:{port}\) is unreachable: Connection refused; check it is powered"):
        t.connect()


def test_ssh_not_an_ssh_server(sshd, tmp_path, no_agent):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer():
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        t = SshTransport(_device(sshd, tmp_path, port=port), connect_timeout=3)
        with pytest.raises(DeviceError, match="did not complete the SSH handshake"):
            t.connect()
    finally:
        server.close()


def test_ssh_relative_workdir_is_under_home_and_created(sshd, tmp_path, no_agent):
    name = f".edgeft-test-{uuid.uuid4().hex[:8]}/nested"
    home = Path(os.path.expanduser(f"~{sshd.user}"))
    try:
        with SshTransport(_device(sshd, tmp_path, workdir=name)) as t:
            assert t.workdir == str(home / name)
            assert _py(t, "import os; print(os.getcwd())").stdout.strip() == str(home / name)
    finally:
        shutil.rmtree(home / name.split("/")[0], ignore_errors=True)


def test_ssh_progress_reports_bytes(sshd, tmp_path, bundle, no_agent):
    calls: list[tuple[int, int]] = []
    with SshTransport(_device(sshd, tmp_path), progress=lambda done, total: calls.append((done, total))) as t:
        t.put_dir(bundle, "bundle")
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert calls and calls[-1] == (total, total)
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


def test_open_transport(sshd, no_agent):
    t, device = open_transport("loopback", sshd.lab_path, trust_new_host_key=False)
    with t:
        assert isinstance(t, SshTransport) and device is not None and device.name == "loopback"
        assert t.run([t.python, "-c", "print(1)"]).stdout == "1\n"
    t, device = open_transport("local", None, trust_new_host_key=False)
    with t:
        workdir = t.workdir
        assert isinstance(t, LocalTransport) and device is None and t.python == sys.executable
        assert workdir is not None and workdir.is_dir()
    assert not workdir.exists()  # a temp workdir it made is removed on close


def test_sha256_file(tmp_path):
    p = tmp_path / "x"
    data = os.urandom(3 * 1024 * 1024 + 7)
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
