"""A lab device over SSH (paramiko): SFTP for files, exec for commands.

Many gateways run dropbear or a minimal sshd without an sftp subsystem: then files travel over the
exec channel instead (streamed into the device's python, fsynced, renamed into place; POSIX sh for
mkdir/rm), announced once with a log line. Callers see the same calls and the same verification.

Secure by default: host keys come from known_hosts files (the device's own `known_hosts`,
~/.ssh/known_hosts, /etc/ssh/ssh_known_hosts) and an unknown host is refused unless the caller
passes trust_new_host_key, which behaves like OpenSSH's StrictHostKeyChecking=accept-new: the
key is accepted once, appended to the known_hosts file and announced with a log line. A CHANGED
key is always refused. Auth is by key only (key_file, else the agent and ~/.ssh/id_*); nothing
ever prompts, and no secret is logged.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import posixpath
import re
import shlex
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import paramiko

from ..config import LabDevice
from ..errors import ConnectionLost, DeviceError
from . import FEED_BLOCK, OutputCollector, RunResult, Sent, Transport, local_tree, receive_into, remote_relpath

log = logging.getLogger("edgeft.device")
# paramiko logs handshake/auth failures with tracebacks; we turn them into one-line DeviceErrors,
# so keep them off stderr unless the application configures logging itself.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

CONNECT_TIMEOUT = 10.0
KEEPALIVE_S = 30
SFTP_OP_TIMEOUT = 120.0  # per SFTP request (or per stalled send on the exec channel), not per transfer
SFTP_WRITE_DEFAULT = 32768  # bytes per SFTP write request every server accepts (the protocol's minimum)
SFTP_WRITE_MAX = 255 * 1024  # what OpenSSH's sftp-server takes (it says so in limits@openssh.com)
# Preferred first, the rest of paramiko's list after: AES-GCM authenticates and encrypts in one call into
# OpenSSL, which made bulk transfers 1.3-1.6x faster than aes128-ctr + HMAC here (bench/bench_flash.py).
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
USER_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")

Progress = Callable[[int, int], None]

PID_MARKER = b"__edgeft_pid__="

# get_file without SFTP, run by the device's python (stdlib, 3.6+): '<size> <sha256>\n' then the bytes;
# exit 3 when the file is missing, 4 when it cannot be read.
_CAT_SCRIPT = r"""
import errno, hashlib, sys
try:
    with open(sys.argv[1], 'rb') as f:
        h, n = hashlib.sha256(), 0
        for b in iter(lambda: f.read(1 << 20), b''):
            h.update(b)
            n += len(b)
        f.seek(0)
        out = sys.stdout.buffer
        out.write(('%d %s\n' % (n, h.hexdigest())).encode())
        for b in iter(lambda: f.read(1 << 20), b''):
            out.write(b)
        out.flush()
except OSError as e:
    sys.stderr.write('%s\n' % (e.strerror or e))
    sys.exit(3 if e.errno == errno.ENOENT else 4)
"""
_PID_LINE = re.compile(re.escape(PID_MARKER) + rb"(\d+)\n")


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style fingerprint: SHA256:<base64 without padding>."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey):
        super().__init__(f"host key for {hostname} is not known")
        self.hostname = hostname
        self.key = key


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _UnknownHostKey(hostname, key)


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """OpenSSH's accept-new: trust a host seen for the first time and remember it in `path`."""

    def __init__(self, device_name: str, path: Path):
        self.device_name = device_name
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as fh:
                fh.write(("\n" if needs_newline else "") + line)
        except OSError as exc:
            raise DeviceError(
                f"device '{self.device_name}': cannot record the new host key in {self.path}: "
                f"{exc.strerror or exc}; make that file writable or add the key by hand"
            ) from exc
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning(
            "device '%s': trusting new host key %s %s for %s; added it to %s",
            self.device_name, key.get_name(), fingerprint(key), hostname, self.path,
        )


class SshTransport(Transport):
    def __init__(
        self,
        device: LabDevice,
        trust_new_host_key: bool = False,
        progress: Progress | None = None,
        *,
        lab_file: Path | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ):
        self.device = device
        self.name = device.name
        self.python = device.python
        self.trust_new_host_key = trust_new_host_key
        self.progress = progress
        self.connect_timeout = connect_timeout
        self._lab = str(lab_file) if lab_file else "hil/lab.yaml"
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None  # None after connect(): the server has no SFTP
        self._sftp_write_size: int | None = None  # bytes per SFTP write request, asked of the server once
        self._told_no_sftp = False
        self.workdir: str | None = None  # absolute path on the device, known after connect()

    # ---------------------------------------------------------------------------- messages
    @property
    def where(self) -> str:
        return f"{self.device.user}@{self.device.host}:{self.device.port}"

    @property
    def _host_id(self) -> str:
        d = self.device
        return d.host if d.port == 22 else f"[{d.host}]:{d.port}"

    def _known_hosts_file(self) -> Path:
        path = self.device.known_hosts or USER_KNOWN_HOSTS
        return Path(os.path.expanduser(path))

    def _key_file(self) -> Path | None:
        kf = self.device.key_file
        return Path(os.path.expanduser(kf)) if kf is not None else None

    # ---------------------------------------------------------------------------- lifecycle
    def connect(self) -> None:
        if self._client is not None:
            return
        d = self.device
        key_file = self._key_file()
        if key_file is not None:
            if not key_file.is_file():
                raise DeviceError(f"device '{self.name}': key file {key_file} does not exist; check key_file in {self._lab}")
            try:
                with open(key_file, "rb"):
                    pass
            except OSError as exc:
                raise DeviceError(
                    f"device '{self.name}': key file {key_file} is not readable ({exc.strerror}); "
                    f"fix its permissions or key_file in {self._lab}"
                ) from exc

        client = paramiko.SSHClient()
        known_hosts = self._known_hosts_file()
        # First match wins in paramiko's lookup, so the device's own file goes first.
        for path in dict.fromkeys([known_hosts, Path(os.path.expanduser(USER_KNOWN_HOSTS)), SYSTEM_KNOWN_HOSTS]):
            if path.is_file():
                try:
                    client.load_system_host_keys(str(path))
                except (OSError, paramiko.SSHException) as exc:
                    raise DeviceError(f"device '{self.name}': cannot read known_hosts file {path}: {exc}; fix or remove it") from exc
        if self.trust_new_host_key:
            client.set_missing_host_key_policy(_AcceptNew(self.name, known_hosts))
        else:
            client.set_missing_host_key_policy(_RejectUnknown())

        try:
            client.connect(
                d.host,
                port=d.port,
                username=d.user,
                key_filename=str(key_file) if key_file is not None else None,
                allow_agent=True,
                look_for_keys=key_file is None,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
                transport_factory=_transport_preferring_gcm,
            )
        except BaseException as exc:
            ssh = client.get_transport()
            handshake_done = ssh is not None and ssh.is_active()
            client.close()
            if isinstance(exc, (KeyboardInterrupt, SystemExit, DeviceError)):
                raise
            raise self._connect_error(exc, handshake_done, key_file) from exc

        try:
            transport = client.get_transport()
            assert transport is not None
            transport.set_keepalive(KEEPALIVE_S)
            self._client = client
            self._sftp = self._open_sftp()
            self.workdir = self._resolve_workdir()
            self._mkdirs(self.workdir)
        except BaseException:
            self.close()
            raise

    def _open_sftp(self) -> paramiko.SFTPClient | None:
        """The SFTP session, or None when the server offers no sftp subsystem (then files go over exec)."""
        assert self._client is not None
        try:
            sftp = self._client.open_sftp()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if self._link_down(exc):
                raise ConnectionLost(
                    f"device '{self.name}' ({self.where}): connection lost while opening SFTP; "
                    "check the device and the network, then retry"
                ) from None
            if not self._told_no_sftp:
                log.warning(
                    "device '%s' (%s): its SSH server offers no SFTP (%s); sending files over the SSH exec channel",
                    self.name, self.where, _reason(exc),
                )
                self._told_no_sftp = True
            return None
        # A dead link without a TCP reset would otherwise hang an SFTP call for many minutes.
        sftp.get_channel().settimeout(SFTP_OP_TIMEOUT)
        return sftp

    @property
    def has_sftp(self) -> bool:
        if self._client is None:
            self.connect()
        return self._sftp is not None

    def _connect_error(self, exc: BaseException, handshake_done: bool, key_file: Path | None) -> DeviceError:
        d = self.device
        if isinstance(exc, _UnknownHostKey):
            kh = self._known_hosts_file()
            port = f"-p {d.port} " if d.port != 22 else ""
            return DeviceError(
                f"device '{self.name}': host key for {exc.hostname} ({exc.key.get_name()} {fingerprint(exc.key)}) "
                f"is not in known_hosts; verify it and add it (ssh-keyscan {port}{d.host} >> {kh}), "
                "or pass --trust-new-host-key"
            )
        if isinstance(exc, paramiko.BadHostKeyException):
            return DeviceError(
                f"device '{self.name}': WARNING: THE HOST KEY FOR {self._host_id} HAS CHANGED "
                f"(now {exc.key.get_name()} {fingerprint(exc.key)}, known_hosts has {fingerprint(exc.expected_key)}); "
                "this may be a man-in-the-middle attack: do not continue; only if the device was reinstalled, "
                f"verify the new key and replace its line in {self._known_hosts_file()}"
            )
        with_key = f"with key {key_file}" if key_file else "with the SSH agent / ~/.ssh/id_* keys"
        if isinstance(exc, paramiko.PasswordRequiredException):
            return DeviceError(
                f"device '{self.name}': key {key_file or '(default)'} is passphrase-protected and edgeft never prompts; "
                f"load it into ssh-agent (ssh-add) or use an unencrypted deploy key in {self._lab}"
            )
        if isinstance(exc, paramiko.AuthenticationException):
            return DeviceError(
                f"device '{self.name}': authentication failed for {self.where} {with_key}; "
                f"check user and key_file in {self._lab} and the device's authorized_keys"
            )
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return self._unreachable(f"timed out after {self.connect_timeout:g} s")
        if isinstance(exc, socket.gaierror):
            return self._unreachable(f"cannot resolve host name {d.host!r} ({exc.strerror})")
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
            inner = next(iter(exc.errors.values()), None)
            return self._unreachable(_reason(inner) if inner is not None else str(exc))
        if isinstance(exc, OSError):
            return self._unreachable(_reason(exc))
        if isinstance(exc, paramiko.SSHException) and handshake_done:
            # Handshake went through but a key could not be used (not a key file, wrong format, ...).
            return DeviceError(
                f"device '{self.name}': authentication failed for {self.where} {with_key}: {exc}; "
                f"check key_file in {self._lab}"
            )
        if isinstance(exc, (paramiko.SSHException, EOFError)):
            detail = str(exc) or "connection closed during the handshake"
            return ConnectionLost(  # a flaky link cuts handshakes too: worth a retry
                f"device '{self.name}' ({self.where}) did not complete the SSH handshake: {detail}; "
                f"check that host/port in {self._lab} point at an SSH server"
            )
        return DeviceError(f"device '{self.name}' ({self.where}): cannot connect: {type(exc).__name__}: {exc}")

    def _unreachable(self, reason: str) -> DeviceError:
        return ConnectionLost(
            f"device '{self.name}' ({self.where}) is unreachable: {reason}; "
            f"check it is powered and on the network, and the host/port in {self._lab}"
        )

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:
                pass
        if self._client is not None:
            self._client.close()
        self._sftp = None
        self._client = None
        self.workdir = None

    # ------------------------------------------------------------------------------- paths
    def _resolve_workdir(self) -> str:
        wd = self.device.workdir.strip() or "."
        if wd == "~":
            wd = "."
        elif wd.startswith("~/"):
            wd = wd[2:]
        if not posixpath.isabs(wd):
            what = "find the login's home directory"
            if self._sftp is not None:
                with self._op(what):
                    home = self._sftp.normalize(".")
            else:  # a login shell starts in the home directory
                home = self._shell("pwd", what).decode("utf-8", "replace").strip()
            wd = posixpath.join(home, wd)
        return posixpath.normpath(wd)

    def _remote(self, remote: str, *, allow_root: bool = False) -> str:
        if self.workdir is None:
            self.connect()
        assert self.workdir is not None
        rel = remote_relpath(self.name, remote, allow_root=allow_root)
        return self.workdir if rel == "." else posixpath.join(self.workdir, rel)

    @contextmanager
    def _op(self, what: str) -> Iterator[None]:
        """Turn SFTP/SSH/socket failures inside the block into one-line DeviceErrors."""
        try:
            yield
        except DeviceError:
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if self._link_down(exc):
                raise ConnectionLost(
                    f"device '{self.name}' ({self.where}): connection lost while trying to {what}; "
                    "check the device and the network, then retry"
                ) from exc
            raise DeviceError(f"device '{self.name}': cannot {what}: {_reason(exc)}") from exc

    def _link_down(self, exc: BaseException) -> bool:
        """Whether `exc` came from a dead SSH connection rather than a refused request. paramiko's reader
        thread may mark the transport inactive a moment after a write already hit the closed socket."""
        if isinstance(exc, (EOFError, ConnectionError)):
            return True
        ssh = self._client.get_transport() if self._client is not None else None
        deadline = time.monotonic() + 0.2
        while ssh is not None and ssh.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)
        return ssh is None or not ssh.is_active()

    def _mkdirs(self, path: str) -> None:
        """mkdir -p over SFTP (or sh)."""
        if self._sftp is None:
            self._shell(f"mkdir -p -- {shlex.quote(path)}", f"create directory {path}")
            return
        sftp = self._sftp
        with self._op(f"create directory {path}"):
            try:
                if stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                    return
                raise DeviceError(f"device '{self.name}': {path} exists and is not a directory; remove it or change workdir")
            except FileNotFoundError:
                pass
            parent = posixpath.dirname(path)
            if parent and parent != path:
                self._mkdirs(parent)
            try:
                sftp.mkdir(path)
            except OSError:
                # Lost a race with another creator? Fine if it is a directory now.
                if not stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                    raise

    # ---------------------------------------------------------------------------- transfer
    def _put_one(self, local: Path, dest: str, callback: Progress | None) -> None:
        """Upload to a temp name beside `dest`, then rename over it: no half-written `dest`."""
        tmp = posixpath.join(posixpath.dirname(dest), f".{posixpath.basename(dest)}.{os.getpid()}.part")
        try:
            st = local.stat()
        except OSError as exc:
            raise DeviceError(f"device '{self.name}': cannot push {local}: {exc.strerror or exc}") from exc
        mode = st.st_mode & 0o777
        if self._sftp is None:  # exec channel: stream into the device's python, fsync, chmod, rename
            sent = (lambda n: callback(n, st.st_size)) if callback is not None else None
            answer = receive_into(self, local, tmp, offset=0, end=st.st_size, mode=mode, rename_to=dest, progress=sent)
            if answer["result"] != "ok":
                try:
                    self._shell(f"rm -f -- {shlex.quote(tmp)}", f"remove {tmp}")
                except DeviceError:
                    pass
                raise DeviceError(
                    f"device '{self.name}': cannot put {local} to {dest}: {answer.get('detail') or answer['result']}"
                )
            return
        sftp = self._sftp
        with self._op(f"put {local} to {dest}"):
            try:
                sftp.put(str(local), tmp, callback=callback)
                sftp.chmod(tmp, mode)
                try:
                    sftp.posix_rename(tmp, dest)
                except OSError:
                    # Server without the posix-rename extension: plain SFTP rename refuses to overwrite.
                    try:
                        sftp.remove(dest)
                    except FileNotFoundError:
                        pass
                    sftp.rename(tmp, dest)
            except BaseException:
                try:
                    sftp.remove(tmp)
                except Exception:
                    pass
                raise

    def put_file(self, local: Path, remote: str) -> None:
        local = Path(local)
        if not local.is_file():
            raise DeviceError(f"device '{self.name}': cannot push {local}: not a file")
        dest = self._remote(remote)
        self._mkdirs(posixpath.dirname(dest))
        self._put_one(local, dest, self.progress)

    def put_dir(self, local: Path, remote: str) -> None:
        local = Path(local)
        if not local.is_dir():
            raise DeviceError(f"device '{self.name}': cannot push {local}: not a directory")
        dest = self._remote(remote)
        dirs, files = local_tree(local)
        self._mkdirs(dest)
        for rel in dirs:
            self._mkdirs(posixpath.join(dest, rel))
        total = sum(p.stat().st_size for _, p in files)
        done = 0
        for rel, path in files:
            callback = None
            if self.progress is not None:
                base = done
                callback = lambda sent, _size, base=base: self.progress(base + sent, total)  # noqa: E731
            self._put_one(path, posixpath.join(dest, rel), callback)
            done += path.stat().st_size
        if self.progress is not None and not files:
            self.progress(0, 0)

    def get_file(self, remote: str, local: Path) -> None:
        src = self._remote(remote)
        local = Path(local)
        if self._sftp is None:
            self._get_file_exec(remote, src, local)
            return
        sftp = self._sftp
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".part")
            os.close(fd)
        except OSError as exc:
            raise DeviceError(f"device '{self.name}': cannot write {local}: {exc.strerror or exc}") from exc
        tmp = Path(name)
        try:
            with self._op(f"fetch {remote} to {local}"):
                try:
                    sftp.get(src, str(tmp))
                except FileNotFoundError:
                    raise DeviceError(
                        f"device '{self.name}': cannot fetch {remote}: no such file in the workdir {self.workdir}"
                    )
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def _get_file_exec(self, remote: str, src: str, local: Path) -> None:
        """get_file over the exec channel: the device sends '<size> <sha256>' and the bytes (held in memory:
        fetched files are reports and logs), both checked here before the atomic write."""
        code, out, err = self._exec(self.command_line([self.python, "-c", _CAT_SCRIPT, src]), self.python)
        if code == 3:
            raise DeviceError(f"device '{self.name}': cannot fetch {remote}: no such file in the workdir {self.workdir}")
        header, _, data = out.partition(b"\n")
        fields = header.decode("ascii", "replace").split()
        if code != 0 or len(fields) != 2:
            detail = (err.decode("utf-8", "replace").strip().splitlines() or [f"exit {code}"])[-1]
            raise DeviceError(f"device '{self.name}': cannot fetch {remote}: {detail}")
        if int(fields[0]) != len(data) or hashlib.sha256(data).hexdigest() != fields[1]:
            raise DeviceError(
                f"device '{self.name}': {remote} arrived incomplete or changed while it was read "
                f"({len(data)} of {fields[0]} bytes, or its sha256 differs); fetch it again"
            )
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, local)
        except OSError as exc:
            raise DeviceError(f"device '{self.name}': cannot write {local}: {exc.strerror or exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self, remote: str) -> None:
        path = self._remote(remote)
        if self._sftp is None:
            self._shell(f"rm -rf -- {shlex.quote(path)}", f"remove {remote}")
            return
        sftp = self._sftp
        with self._op(f"remove {remote}"):
            try:
                attr = sftp.lstat(path)
            except FileNotFoundError:
                return
            self._remove_tree(sftp, path, attr)

    def _remove_tree(self, sftp: paramiko.SFTPClient, path: str, attr: paramiko.SFTPAttributes) -> None:
        if stat.S_ISDIR(attr.st_mode or 0):
            for child in sftp.listdir_attr(path):
                self._remove_tree(sftp, posixpath.join(path, child.filename), child)
            sftp.rmdir(path)
        else:
            sftp.remove(path)

    def write_range(self, remote_path: str, local: Path, offset: int, length: int, *, progress: Sent | None = None) -> None:
        if self._client is None:
            self.connect()
        if self._sftp is None:
            super().write_range(remote_path, local, offset, length, progress=progress)
            return
        sftp = self._sftp
        if self._sftp_write_size is None:
            self._sftp_write_size = _sftp_write_limit(sftp)
        try:
            src = open(local, "rb")
        except OSError as exc:
            raise DeviceError(f"device '{self.name}': cannot read {local}: {exc.strerror or exc}") from None
        with src, self._op(f"send {local} to {remote_path}"):
            src.seek(offset)
            with sftp.open(remote_path, "r+b" if offset else "wb", bufsize=0) as f:
                if offset:
                    f.truncate(offset)  # drop whatever followed the resume point
                    f.seek(offset)
                f.MAX_REQUEST_SIZE = self._sftp_write_size
                f.set_pipelined(True)  # no round trip per request
                sent = 0
                while sent < length:
                    block = src.read(min(FEED_BLOCK, length - sent))
                    if not block:
                        break
                    if sent + len(block) >= length:
                        # paramiko checks no pipelined write's answer at close (and a failed close is silent):
                        # an unpipelined last write waits for every answer and raises the first error.
                        f.set_pipelined(False)
                    f.write(block)
                    sent += len(block)
                    if progress is not None:
                        progress(sent)

    # --------------------------------------------------------------------------------- run
    def command_line(self, argv: list[str]) -> str:
        """The shell line run on the device: every argument quoted, run from the workdir.

        It first prints a marker with the shell's pid (which `exec` hands on to the command, a
        session leader under sshd), so a timed-out command's whole process group can be killed.
        The marker is removed from the output that run() returns.
        """
        assert self.workdir is not None
        command = " ".join(shlex.quote(str(a)) for a in argv)
        return f"cd {shlex.quote(self.workdir)} && echo {PID_MARKER.decode()}$$ && exec {command}"

    def run(self, argv: list[str], timeout: float | None = None) -> RunResult:
        if not argv:
            raise ValueError("run() needs a non-empty argv")
        if self._client is None:
            self.connect()
        code, out, err = self._exec(self.command_line(argv), str(argv[0]), timeout=timeout)
        return RunResult(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def run_with_input(
        self, argv: list[str], local: Path, offset: int = 0, length: int | None = None, *,
        timeout: float | None = None, progress: Sent | None = None, ready: bool = False,
    ) -> RunResult:
        if not argv:
            raise ValueError("run_with_input() needs a non-empty argv")
        if self._client is None:
            self.connect()
        try:
            src = open(local, "rb")
        except OSError as exc:
            raise DeviceError(f"device '{self.name}': cannot read {local}: {exc.strerror or exc}") from None
        with src:
            feed = _Feed(src, offset, None if length is None else offset + length, progress, ready)
            code, out, err = self._exec(self.command_line(argv), str(argv[0]), timeout=timeout, feed=feed)
        return RunResult(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def _shell(self, command: str, what: str) -> bytes:
        """Run a POSIX sh line as it is (no cd into the workdir, which may not exist yet); its stdout."""
        code, out, err = self._exec(command, "sh")
        if code != 0:
            detail = (err.decode("utf-8", "replace").strip().splitlines() or [f"exit {code}"])[-1]
            raise DeviceError(f"device '{self.name}': cannot {what}: {detail}")
        return out

    def _exec(
        self, command: str, name: str, *, timeout: float | None = None,
        feed: _Feed | None = None,
    ) -> tuple[int, bytes, bytes]:
        """Run a shell line on an exec channel: (exit status, stdout without the pid marker, stderr),
        with `feed` (a local file range) streamed into its stdin."""
        assert self._client is not None
        ssh = self._client.get_transport()
        what = f"run {name}"
        if ssh is None or not ssh.is_active():
            raise ConnectionLost(f"device '{self.name}' ({self.where}): connection lost before trying to {what}; retry")
        with self._op(what):
            chan = ssh.open_session(timeout=self.connect_timeout)
        try:
            with self._op(what):
                chan.exec_command(command)
            out, err = OutputCollector(), OutputCollector()
            # Drain stdout and stderr at once: reading one while the other's window fills deadlocks.
            readers = [
                threading.Thread(target=_drain, args=(chan.recv, out), daemon=True),
                threading.Thread(target=_drain, args=(chan.recv_stderr, err), daemon=True),
            ]
            for t in readers:
                t.start()
            with self._op(what):
                if feed is not None:
                    self._feed(chan, ssh, feed, out)
                chan.shutdown_write()  # the command sees EOF on stdin, like the local transport's DEVNULL
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                for t in readers:
                    t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except BaseException:  # Ctrl-C: don't leave the command running on the device
                self._kill(_remote_pid(out.value()))
                raise
            if any(t.is_alive() for t in readers):
                self._kill(_remote_pid(out.value()))
                raise DeviceError(
                    f"device '{self.name}': {posixpath.basename(name)} did not finish within {timeout:g} s "
                    "and was killed; raise the timeout or make the run shorter"
                )
            chan.status_event.wait(self.connect_timeout)
            code = chan.recv_exit_status() if chan.exit_status_ready() else -1
            if code == -1 and not ssh.is_active():
                raise ConnectionLost(
                    f"device '{self.name}' ({self.where}): connection lost while trying to {what}; "
                    "check the device and the network, then retry"
                )
        finally:
            try:
                chan.close()
            except (OSError, EOFError, paramiko.SSHException):
                pass  # the connection is gone; what happened was raised above
        return code, _PID_LINE.sub(b"", out.value(), count=1), err.value()

    def _feed(self, chan: paramiko.Channel, ssh: paramiko.Transport, feed: _Feed, out: OutputCollector) -> None:
        """Send the feed's bytes into the channel (sendall, before any shutdown_write)."""
        start = out.wait_ready(SFTP_OP_TIMEOUT) if feed.ready else feed.offset
        if start is None:
            return  # the command ended (or hung) before asking for input: its output says why
        feed.src.seek(start)
        chan.settimeout(SFTP_OP_TIMEOUT)  # a send stalled this long on a full window: the link is dead
        try:
            sent = 0
            while feed.end is None or start + sent < feed.end:
                block = feed.src.read(FEED_BLOCK if feed.end is None else min(FEED_BLOCK, feed.end - start - sent))
                if not block:
                    return
                try:
                    chan.sendall(memoryview(block))  # paramiko slices what it has left: a view slices for free
                except (OSError, EOFError):
                    if ssh.is_active() and (chan.closed or chan.eof_received or chan.exit_status_ready()):
                        return  # the command stopped reading (it ended): its output says why
                    raise
                sent += len(block)
                if feed.progress is not None:
                    feed.progress(sent)
        finally:
            chan.settimeout(None)

    def _kill(self, pid: int | None) -> None:
        """Best effort: SIGKILL a timed-out command's process group (its children too) on the device."""
        if pid is None or self._client is None:
            return
        try:
            ssh = self._client.get_transport()
            if ssh is None or not ssh.is_active():
                return
            chan = ssh.open_session(timeout=self.connect_timeout)
            try:
                chan.settimeout(self.connect_timeout)
                chan.exec_command(f"kill -s KILL -- -{pid} 2>/dev/null || kill -s KILL {pid} 2>/dev/null")
                chan.recv_exit_status()
            finally:
                chan.close()
        except Exception:
            pass


def _transport_preferring_gcm(sock: socket.socket, **kwargs) -> paramiko.Transport:
    """paramiko's Transport with FAST_CIPHERS first; the server still picks from the whole list."""
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    offered = tuple(options.ciphers)
    options.ciphers = tuple(c for c in FAST_CIPHERS if c in offered) + tuple(c for c in offered if c not in FAST_CIPHERS)
    return transport


def _sftp_write_limit(sftp: paramiko.SFTPClient) -> int:
    """Bytes per SFTP write request: the server's max-write-length from OpenSSH's limits@openssh.com
    extension (capped), else the protocol's 32 KiB. Bigger requests cut per-request overhead ~1.3x."""
    try:
        # paramiko has no API for extended requests with a reply; its posix_rename uses this same call.
        kind, msg = sftp._request(paramiko.sftp.CMD_EXTENDED, "limits@openssh.com")
        if kind != paramiko.sftp.CMD_EXTENDED_REPLY:
            return SFTP_WRITE_DEFAULT
        msg.get_int64()  # max packet length
        msg.get_int64()  # max read length
        max_write = msg.get_int64()
    except (OSError, EOFError, paramiko.SSHException):  # not offered (or the link dropped: the write says so)
        return SFTP_WRITE_DEFAULT
    return min(max(max_write, SFTP_WRITE_DEFAULT), SFTP_WRITE_MAX) if max_write else SFTP_WRITE_DEFAULT


@dataclass
class _Feed:
    """A local file range for a command's stdin (see Transport.run_with_input)."""

    src: BinaryIO
    offset: int
    end: int | None  # None: to the end of the file
    progress: Sent | None
    ready: bool  # wait for the command's `ready START` line, then send from START


def _drain(recv: Callable[[int], bytes], sink: OutputCollector) -> None:
    try:
        while True:
            try:
                data = recv(65536)
            except socket.timeout:
                continue  # the channel's timeout is set while stdin is fed; the command's output can take longer
            except (OSError, EOFError, paramiko.SSHException):
                return
            if not data:
                return
            sink.add(data)
    finally:
        sink.close()


def _remote_pid(stdout: bytes) -> int | None:
    match = _PID_LINE.search(stdout)
    return int(match.group(1)) if match else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.strerror:
            return exc.strerror
        if exc.errno:
            return os.strerror(exc.errno)
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return "timed out"
    return str(exc) or type(exc).__name__

