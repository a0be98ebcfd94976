"""A real OpenSSH server on 127.0.0.1 for tests: throwaway host and user keys, a known_hosts
file and a lab.yaml with one device, `loopback`, that is this machine seen over SSH.

    with start_sshd(tmp_path) as info:
        lab = load_lab(info.lab_path)          # device 'loopback'

or, in tests, the session-scoped `sshd` fixture (import it into conftest.py). Several devices in one lab:

    with start_lab(tmp_path, 3, lease_s=3) as lab:  # dev-0 .. dev-2, each its own sshd, keys, workdir
        load_lab(lab.lab_path).device("dev-1")
Needs /usr/sbin/sshd (or $EDGEFT_TEST_SSHD) and ssh-keygen (openssh-server); `make test` installs them.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

SSHD = Path(os.environ.get("EDGEFT_TEST_SSHD", "/usr/sbin/sshd"))
DEVICE_NAME = "loopback"
START_TIMEOUT_S = 10.0


class SshdUnavailable(RuntimeError):
    """OpenSSH's server or ssh-keygen is missing, or sshd would not start."""


@dataclass(frozen=True)
class SshdInfo:
    host: str
    port: int
    user: str
    root: Path  # everything below lives here
    config: Path  # sshd_config
    log: Path  # sshd's stderr (-e)
    host_key: Path  # private; host_key.pub beside it
    host_key_line: str  # "ssh-ed25519 AAAA..." (the public host key)
    user_key: Path  # private key authorised for `user`; user_key.pub beside it
    authorized_keys: Path
    known_hosts: Path  # "[127.0.0.1]:PORT ssh-ed25519 AAAA..."
    lab_path: Path  # lab.yaml with the one device DEVICE_NAME
    workdir: Path  # the device's workdir (absolute; on this machine, as it is loopback)
    pid: int
    device_name: str = DEVICE_NAME

    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} {self.host_key_line}"

    def device(self, **overrides):
        """The loopback LabDevice as load_lab reads it, with fields replaced by `overrides`."""
        from edgeft.config import load_lab

        device = load_lab(self.lab_path).device(self.device_name)
        return device.model_copy(update=overrides) if overrides else device


def _missing(what: str) -> SshdUnavailable:
    return SshdUnavailable(
        f"{what} not found: the SSH transport tests need a real OpenSSH server; "
        "run `make test` (it installs openssh-server), or `apt-get install -y openssh-server`"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL, capture_output=True,
    )
    path.chmod(0o600)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(1.0)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


@dataclass(frozen=True)
class LabInfo:
    lab_path: Path  # one lab.yaml naming every device
    devices: list[SshdInfo]  # devices[i] is `dev-i`

    def device(self, index: int, **overrides):
        return self.devices[index].device(**overrides)


@contextmanager
def _run_sshd(root: Path, sftp: bool = True) -> Iterator[dict]:
    """Keys, config and a running sshd -D in `root` on a free loopback port; stopped on exit.
    Yields the SshdInfo fields that do not depend on the lab file. sftp=False: no sftp subsystem
    (like dropbear or a minimal gateway sshd), so SFTP requests are refused."""
    if not SSHD.exists():
        raise _missing(str(SSHD))
    if shutil.which("ssh-keygen") is None:
        raise _missing("ssh-keygen")
    root.mkdir(parents=True, exist_ok=True)
    host_key, user_key = root / "host_ed25519", root / "user_ed25519"
    _keygen(host_key, "edgeft-test-host")
    _keygen(user_key, "edgeft-test-user")
    authorized_keys = root / "authorized_keys"
    authorized_keys.write_text(user_key.with_suffix(".pub").read_text())
    host_key_line = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
    log = root / "sshd.log"
    try:  # privilege separation dir; only root can (and needs to) make it
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    except OSError:
        pass

    proc = None
    for _attempt in range(3):  # the free port can be taken between probing and binding
        port = _free_port()
        config = root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"Port {port}",
                    f"HostKey {host_key}",
                    f"AuthorizedKeysFile {authorized_keys}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    f"PidFile {root / 'sshd.pid'}",
                    *(["Subsystem sftp internal-sftp"] if sftp else []),
                    "PrintMotd no",
                    "LogLevel INFO",
                    "MaxStartups 100",  # concurrent reservations open many sessions at once
                    "MaxSessions 100",
                    "",
                ]
            )
        )
        logfh = open(log, "ab")
        proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=logfh, stderr=logfh
        )
        logfh.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline and not _accepts(port):
            time.sleep(0.05)
        if proc.poll() is None and _accepts(port):
            break
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if "Address already in use" not in log.read_text(errors="replace"):
            break
    assert proc is not None
    if proc.poll() is not None or not _accepts(port):
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise SshdUnavailable(f"{SSHD} did not start on 127.0.0.1:{port} (log {log}: {tail})")

    try:
        known_hosts = root / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_key_line}\n")
        yield dict(
            host="127.0.0.1", port=port, user=getpass.getuser(), root=root, config=config, log=log,
            host_key=host_key, host_key_line=host_key_line, user_key=user_key,
            authorized_keys=authorized_keys, known_hosts=known_hosts, workdir=root / "device-workdir",
            pid=proc.pid,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _lab_entry(server: dict, name: str, tags: list[str]) -> dict:
    """The lab.yaml entry of one test sshd: this machine's python, its own key, known_hosts and workdir."""
    return {
        "name": name,
        "host": server["host"],
        "port": server["port"],
        "user": server["user"],
        "key_file": str(server["user_key"]),
        "known_hosts": str(server["known_hosts"]),
        "target": "rpi5",
        "python": sys.executable,
        "workdir": str(server["workdir"]),
        "tags": tags,
    }


@contextmanager
def start_sshd(tmp_path: Path, sftp: bool = True) -> Iterator[SshdInfo]:
    """Start sshd -D on a free loopback port; stop it (and remove nothing else) on exit.
    sftp=False starts it without an sftp subsystem."""
    root = Path(tmp_path) / "sshd"
    with _run_sshd(root, sftp=sftp) as server:
        lab_path = root / "lab.yaml"
        entry = _lab_entry(server, DEVICE_NAME, ["test"])
        lab_path.write_text(yaml.safe_dump({"devices": [entry]}, sort_keys=False))
        yield SshdInfo(**server, lab_path=lab_path)


@contextmanager
def start_lab(tmp_path: Path, n: int, **lab_fields) -> Iterator[LabInfo]:
    """n real sshds, `dev-0`..`dev-{n-1}` (target rpi5, tags [rpi5, lab-<i % 2>]), in one lab.yaml.
    `lab_fields` are extra top-level lab fields (lease_s=3, lock=..., coordinator=...)."""
    root = Path(tmp_path) / "lab"
    root.mkdir(parents=True, exist_ok=True)
    lab_path = root / "lab.yaml"
    with ExitStack() as stack:
        servers = [stack.enter_context(_run_sshd(root / f"dev-{i}")) for i in range(n)]
        entries = [_lab_entry(s, f"dev-{i}", ["rpi5", f"lab-{i % 2}"]) for i, s in enumerate(servers)]
        lab_path.write_text(yaml.safe_dump({**lab_fields, "devices": entries}, sort_keys=False))
        yield LabInfo(
            lab_path=lab_path,
            devices=[SshdInfo(**s, lab_path=lab_path, device_name=f"dev-{i}") for i, s in enumerate(servers)],
        )


def _serve(server):
    """Yield what the server context yields, for a session fixture; fail (never skip) when OpenSSH
    is not installed or will not start."""
    try:
        info = server.__enter__()
    except SshdUnavailable as exc:
        problem = str(exc)
    else:
        try:
            yield info
        finally:
            server.__exit__(None, None, None)
        return
    pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdInfo]:
    """One real sshd for the whole session. Fails (never skips) when OpenSSH is not installed."""
    yield from _serve(start_sshd(tmp_path_factory.mktemp("sshd")))


@pytest.fixture(scope="session")
def lab3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabInfo]:
    """Three real sshds (dev-0, dev-1, dev-2) in one lab.yaml, for the whole session."""
    yield from _serve(start_lab(tmp_path_factory.mktemp("lab3"), 3))


@pytest.fixture(scope="session")
def sshd_nosftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdInfo]:
    """One real sshd WITHOUT an sftp subsystem (like dropbear or a minimal gateway), for the session."""
    yield from _serve(start_sshd(tmp_path_factory.mktemp("sshd-nosftp"), sftp=False))
