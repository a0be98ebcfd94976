"""`edgeft lab emulate`: an emulated ARM64 board on this machine, for checking the ARM path for real.

An arm64 Debian userland runs under qemu-user (binfmt_misc) in a chroot, with its own sshd on
127.0.0.1 and a venv holding the real aarch64 numpy and onnxruntime wheels from the package index.
The board is then a lab device like any other (`emulated: true`): the runner, the runtime and the
install steps run on aarch64 code, only ~450x slower, so its timings are reported but never gated.

Layout, under $EDGEFT_EMULATE_CACHE (default: <build cache>/emulate):

    rootfs-<recipe hash>/          the built userland (read-only once built; renamed into place whole)
    rootfs-<recipe hash>.tar.zst   the same as a tarball: a lost or copied-away cache is back in < 1 min
    boards/<name>/board.json       the board's port and rootfs
    boards/<name>/{upper,work}     the board's own changes, an overlay over the rootfs
    boards/<name>/root             the board's root (overlay mount) with /proc, /dev and an ARM cpuinfo
    logs/                          full output of debootstrap and pip

Everything needs root (mounts, chroot, debootstrap). Only this machine's Debian mirror and package
index are contacted, and only while the rootfs is built.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from .artifact import atomic_dir, cache_root, digest_of, held_lock, write_atomic
from .config import Lab, LabDevice, default_lab_path, load_lab, load_yaml
from .device.ssh import SshTransport
from .errors import ConfigError, DeviceError

RECIPE_VERSION = 1  # bump when the build steps below change what ends up in the rootfs
BOARD_USER = "pi"
VENV = f"/home/{BOARD_USER}/edgeft-venv"
BOARD_PYTHON = f"{VENV}/bin/python3"
# debootstrap's minbase plus what the runner and an SSH login need.
PACKAGES = ("python3", "python3-venv", "python3-pip", "openssh-server", "ca-certificates")
WHEELS = ("numpy", "onnxruntime")  # pinned to the host's versions where aarch64 wheels exist
# host command -> the apt package that provides it
HOST_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap", "update-binfmts": "binfmt-support"}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
SSHD_CONFIG = "/etc/ssh/edgeft_sshd_config"
SSHD_PID = "/run/edgeft-sshd.pid"
SSHD_LOG = "/var/log/edgeft-sshd.log"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
MARKER = "/etc/edgeft-emulate.json"  # inside the rootfs: its recipe and the installed wheel versions
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_MIRROR = ("http://deb.debian.org/debian", "bookworm")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HEARTBEAT_S = 15.0  # a long step prints its latest output line this often
SSHD_START_TIMEOUT_S = 90.0  # sshd under qemu takes a few seconds to answer
STEP_TIMEOUT_S = 3600.0

# qemu-user shows the host's /proc/cpuinfo, and onnxruntime's cpuinfo parser crashes (SIGSEGV at import)
# on x86 text while running aarch64 code: the board sees this instead (a Raspberry Pi 5's Cortex-A76 x4).
CORTEX_A76_CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
    for i in range(4)
)

Log = Callable[[str], None]


def emulate_root() -> Path:
    return Path(os.environ.get("EDGEFT_EMULATE_CACHE") or cache_root() / "emulate")


@dataclass
class BoardState:
    """boards/<name>/board.json: what a later call needs to find, restart or stop the board."""

    name: str
    rootfs: str  # the rootfs dir the overlay's lower layer is
    port: int
    lab: str  # the lab file the board was last written to


# --------------------------------------------------------------------------------------- helpers
class _Phases:
    """Times each phase and prints it: '[3/7] rootfs ... done in 12.3 s (cached)'."""

    NAMES = ("check", "host tools", "binfmt", "rootfs", "board", "sshd", "lab file")

    def __init__(self, log: Log):
        self.log = log
        self.done: list[dict[str, Any]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[dict[str, Any]]:
        index = self.NAMES.index(name) + 1
        self.log(f"[{index}/{len(self.NAMES)}] {name} ...")
        record: dict[str, Any] = {"phase": name, "note": ""}
        start = time.monotonic()
        yield record
        record["s"] = round(time.monotonic() - start, 1)
        self.done.append(record)
        note = f" ({record['note']})" if record["note"] else ""
        self.log(f"[{index}/{len(self.NAMES)}] {name} done in {record['s']} s{note}")


def _chroot_env() -> dict[str, str]:
    """A clean environment for commands in the board: the host's PIP_* and paths must not leak in."""
    return {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}


def _run(argv: list[str], what: str, log: Log, log_file: Path, env: dict[str, str] | None = None,
         timeout: float = STEP_TIMEOUT_S) -> str:
    """Run `argv`, its output going to `log_file`, and print its latest line every HEARTBEAT_S (also
    while it is silent). A failure is one DeviceError line: the last output line and the full log's path."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    with open(log_file, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, text=True, errors="replace")

        def pump() -> None:  # a thread, so the heartbeat keeps time while the command prints nothing
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if line.strip():
                    lines.append(line.strip())
                    del lines[:-20]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        start = time.monotonic()
        try:
            while True:
                try:
                    proc.wait(timeout=HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - start
                    if elapsed > timeout:
                        raise DeviceError(f"{what} did not finish in {timeout:.0f} s; full log: {log_file}")
                    log(f"  {what}: {elapsed:.0f} s, {(lines[-1] if lines else 'no output yet')[:120]}")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            reader.join(timeout=10)
    if proc.returncode != 0:
        last = lines[-1] if lines else "no output"
        raise DeviceError(f"{what} failed (exit {proc.returncode}): {last}; full log: {log_file}")
    return "\n".join(lines)


def _mount_points() -> list[str]:
    """Every mount point on this machine, from /proc/self/mountinfo (octal escapes decoded)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        field = line.split()[4]
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field))
    return points


def _mounts_under(path: Path) -> list[str]:
    base = str(path.resolve())
    return [p for p in _mount_points() if p == base or p.startswith(base + "/")]


def _unmount_under(path: Path) -> list[str]:
    """Unmount everything at or below `path`, deepest first (lazily where busy); returns what was mounted.
    Always before removing a tree a chroot ran in: a recursive delete must never reach a host /dev."""
    mounted = _mounts_under(path)
    for point in sorted(set(mounted), key=lambda p: (p.count("/"), p), reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
    left = _mounts_under(path)
    if left:
        raise DeviceError(f"cannot unmount {', '.join(left)}; stop what uses them and retry")
    return mounted


def _free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise DeviceError("no free TCP port on 127.0.0.1")


def _answers_ssh(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
            s.settimeout(5.0)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _processes_in(root: Path) -> list[int]:
    """Processes whose root directory is the board's root: its sshd and whatever runs in its sessions."""
    base = str(root.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                proc_root = os.readlink(entry / "root")
            except OSError:
                continue
            if proc_root == base or proc_root.startswith(base + "/"):
                pids.append(int(entry.name))
    return pids


# ------------------------------------------------------------------------------------ host facts
def host_debian_mirror() -> tuple[str, str]:
    """(mirror URL, suite) of the Debian archive this machine's apt uses (not -security/-updates)."""
    entries: list[tuple[str, list[str]]] = []  # (uri, suites)
    apt = Path("/etc/apt")
    lists = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in lists:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    entries.append((words[1], [words[2]]))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line and not line.startswith("#") and ":" in line and not line[0].isspace():
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split()))
    codename = _os_release().get("VERSION_CODENAME", "")
    for uri, suites in entries:
        if "security" in uri or "debian" not in uri:
            continue
        for suite in suites:
            if suite == codename or (not codename and "-" not in suite):
                return uri.rstrip("/"), suite
    return DEFAULT_MIRROR


def _os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return {}
    return {k: v.strip('"') for k, _, v in (line.partition("=") for line in text.splitlines()) if k}


def host_pip_index() -> dict[str, str]:
    """The package index this machine's pip uses (config files and PIP_* environment), as pip.conf
    [global] keys. Local paths (file://, find-links) are left out: they do not exist in the board."""
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    found: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        key = key.rsplit(".", 1)[-1].strip()
        value = value.strip().strip("'\"")
        if key in ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout"):
            found[key] = value
    index: dict[str, str] = {}
    if found.get("index-url", "").startswith(("http://", "https://")):
        index["index-url"] = found["index-url"]
    extra = [u for u in found.get("extra-index-url", "").split() if u.startswith(("http://", "https://"))]
    if extra:
        index["extra-index-url"] = " ".join(extra)
    if found.get("trusted-host"):
        index["trusted-host"] = found["trusted-host"]
    timeout = found.get("timeout") or found.get("default-timeout")
    if timeout:
        index["timeout"] = timeout
    return index


def host_wheel_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in WHEELS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def recipe() -> dict[str, Any]:
    """Everything that decides the rootfs's content; its hash names the cached rootfs."""
    mirror, suite = host_debian_mirror()
    return {"version": RECIPE_VERSION, "arch": "arm64", "suite": suite, "mirror": mirror, "variant": "minbase",
            "packages": list(PACKAGES), "user": BOARD_USER, "venv": VENV, "wheels": host_wheel_versions(),
            "pip_index": host_pip_index()}


# ------------------------------------------------------------------------------------ the phases
def _check_root(what: str) -> None:
    if os.geteuid() != 0:
        raise DeviceError(f"{what} needs root (it mounts binfmt_misc, an overlay and /proc, and runs debootstrap and "
                          "chroot); run it with sudo, or as root in CI")


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ConfigError(f"board name {name!r} is not usable: letters, digits, '.', '_' and '-' only (it names a "
                          "lab device, a key file and a directory), e.g. rpi5-emu-1")


def _lab_path(lab_path: Path | None) -> Path:
    return Path(lab_path) if lab_path else default_lab_path()


def _check_lab(name: str, lab_path: Path) -> LabDevice | None:
    """The lab's entry for `name` if any; refuses to overwrite a real (non-emulated) device."""
    if not lab_path.exists():
        return None
    lab = load_lab(lab_path)
    for device in lab.devices:
        if device.name == name:
            if not device.emulated:
                raise ConfigError(f"{lab_path}: device {name!r} is a real device (no 'emulated: true'); choose another "
                                  "name for the emulated board or remove that entry")
            return device
    return None


def ensure_host_tools(log: Log) -> str:
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return "present"
    log(f"  installing {', '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    logs = emulate_root() / "logs" / "apt.log"
    _run(["apt-get", "update", "-q"], "apt-get update", log, logs, env=env, timeout=600)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], "apt-get install", log, logs, env=env,
         timeout=1200)
    still = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if still:
        raise DeviceError(f"apt-get installed {', '.join(missing)} but {', '.join(still)} is still missing; see {logs}")
    return f"installed {', '.join(missing)}"


def ensure_binfmt(log: Log) -> str:
    """binfmt_misc mounted and qemu-aarch64 enabled, so the kernel runs aarch64 ELF files through qemu."""
    notes = []
    if not (BINFMT_DIR / "register").exists():
        done = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], capture_output=True, text=True)
        if done.returncode != 0:
            raise DeviceError(f"cannot mount binfmt_misc on {BINFMT_DIR}: {done.stderr.strip()}; the emulated board needs it "
                              "(in a container: run it privileged)")
        notes.append("mounted binfmt_misc")
    entry = BINFMT_DIR / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        done = subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True, text=True)
        if done.returncode != 0 or not entry.exists():
            raise DeviceError(f"cannot enable qemu-aarch64 in binfmt_misc: {(done.stderr or done.stdout).strip()}; "
                              "reinstall qemu-user-static and binfmt-support")
        notes.append("enabled qemu-aarch64")
    flags = next((line.split(":", 1)[1].strip() for line in entry.read_text().splitlines() if line.startswith("flags:")), "")
    if "F" not in flags:
        # Without F the kernel looks the interpreter up inside the chroot: build_rootfs copies it in.
        notes.append(f"flags {flags or 'none'}")
    return ", ".join(notes) or "enabled"


def _rootfs_paths(rec: dict[str, Any]) -> tuple[Path, Path]:
    key = digest_of(rec)[:16]
    base = emulate_root()
    return base / f"rootfs-{key}", base / f"rootfs-{key}.tar.zst"


def ensure_rootfs(rec: dict[str, Any], log: Log) -> tuple[Path, str]:
    """The built rootfs for `rec`: the cached dir, else unpacked from the cached tarball, else built."""
    rootfs, tarball = _rootfs_paths(rec)
    if (rootfs / MARKER.lstrip("/")).is_file():
        note = "cached"
    elif tarball.is_file():
        log(f"  unpacking {tarball}")
        with atomic_dir(rootfs) as tmp:
            tmp.chmod(0o755)
            _run(["tar", "--zstd", "-xpf", str(tarball), "--numeric-owner", "-C", str(tmp)], "unpacking the rootfs", log,
                 emulate_root() / "logs" / "tar.log")
        return rootfs, "unpacked from the tarball"
    else:
        with atomic_dir(rootfs) as tmp:
            tmp.chmod(0o755)
            try:
                build_rootfs(tmp, rec, log)
            finally:
                _unmount_under(tmp)  # debootstrap mounts /proc (and more) in it: never delete through a mount
        note = "built"
    if not tarball.is_file():
        log(f"  writing the tarball cache {tarball}")
        tmp_tar = tarball.with_name(f".{tarball.name}.{os.getpid()}.tmp")
        try:
            _run(["tar", "-I", "zstd -T0 -3", "-cpf", str(tmp_tar), "--numeric-owner", "-C", str(rootfs), "."],
                 "writing the rootfs tarball", log, emulate_root() / "logs" / "tar.log")
            os.replace(tmp_tar, tarball)
        finally:
            tmp_tar.unlink(missing_ok=True)
    return rootfs, note


def build_rootfs(root: Path, rec: dict[str, Any], log: Log) -> None:
    """debootstrap an arm64 userland into `root`, then the board user, CA certs, pip config and the venv."""
    logs = emulate_root() / "logs" / f"rootfs-{digest_of(rec)[:16]}.log"
    log(f"  debootstrap {rec['suite']} arm64 from {rec['mirror']} (first stage; full log {logs})")
    _run(["debootstrap", "--arch=arm64", "--foreign", f"--variant={rec['variant']}", f"--include={','.join(rec['packages'])}",
          rec["suite"], str(root), rec["mirror"]], "debootstrap (first stage)", log, logs,
         env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    qemu = shutil.which("qemu-aarch64-static")
    if qemu:  # needed inside the chroot only when binfmt lacks the F flag; harmless otherwise
        shutil.copy2(qemu, root / "usr/bin/qemu-aarch64-static")
    log("  debootstrap second stage under qemu (the slow part: a few minutes)")
    _run(["chroot", str(root), "/debootstrap/debootstrap", "--second-stage"], "debootstrap (second stage)", log, logs,
         env=_chroot_env())
    chroot = ["chroot", str(root)]
    for key in root.glob("etc/ssh/ssh_host_*"):
        key.unlink()  # every board gets its own host key
    _run([*chroot, "useradd", "--create-home", "--shell", "/bin/bash", BOARD_USER], "useradd", log, logs, env=_chroot_env())
    # pip in the board reaches the index the way this machine does: the same CA certificates and index.
    local_cas = root / "usr/local/share/ca-certificates"
    local_cas.mkdir(parents=True, exist_ok=True)
    for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy2(crt, local_cas / crt.name)
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():  # already holds those CAs: no update-ca-certificates run under qemu
        shutil.copy2(bundle, root / "etc/ssl/certs/ca-certificates.crt")
    pip_conf = configparser.ConfigParser()
    pip_conf["global"] = {**rec["pip_index"], "cert": "/etc/ssl/certs/ca-certificates.crt", "disable-pip-version-check": "1"}
    with open(root / "etc/pip.conf", "w") as fh:
        pip_conf.write(fh)
    log(f"  venv {VENV} with aarch64 wheels")
    _run([*chroot, "python3", "-m", "venv", VENV], "python3 -m venv", log, logs, env=_chroot_env())
    pip = [*chroot, f"{VENV}/bin/python3", "-m", "pip", "install", "--no-cache-dir", "--only-binary=:all:"]
    pinned = [f"{name}=={version}" if version else name for name, version in rec["wheels"].items()]
    try:
        _run([*pip, *pinned], "pip install (pinned to the host's versions)", log, logs, env=_chroot_env())
    except DeviceError as exc:
        log(f"  no aarch64 wheels for {' '.join(pinned)} ({exc}); installing the newest instead")
        _run([*pip, *WHEELS], "pip install", log, logs, env=_chroot_env())
    _run([*chroot, "chown", "-R", f"{BOARD_USER}:{BOARD_USER}", f"/home/{BOARD_USER}"], "chown", log, logs, env=_chroot_env())
    versions = _run([*chroot, f"{VENV}/bin/python3", "-c",
                     "import importlib.metadata as m, json, platform; "
                     f"print(json.dumps({{n: m.version(n) for n in {list(WHEELS)!r}}} | {{'python': platform.python_version()}}))"],
                    "reading the venv's versions", log, logs, env=_chroot_env())
    marker = {"recipe": rec, "installed": json.loads(versions.splitlines()[-1]), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (root / MARKER.lstrip("/")).write_text(json.dumps(marker, indent=2) + "\n")


def _board_dir(name: str) -> Path:
    return emulate_root() / "boards" / name


def _load_state(name: str) -> BoardState | None:
    path = _board_dir(name) / "board.json"
    try:
        return BoardState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _save_state(state: BoardState) -> None:
    write_atomic(_board_dir(state.name) / "board.json", json.dumps(asdict(state), indent=2) + "\n")


def mount_board(name: str, rootfs: Path, log: Log) -> str:
    """The board's root: an overlay over the rootfs (its own writes stay in boards/<name>/upper), with
    /proc, a bind of /dev and the ARM cpuinfo over /proc/cpuinfo. /sys stays unmounted (the host's
    x86 CPU topology there also confuses onnxruntime)."""
    board = _board_dir(name)
    root = board / "root"
    mounted = set(_mounts_under(board))
    notes = []
    state = _load_state(name)
    if state is not None and state.rootfs != str(rootfs) and str(root.resolve()) not in mounted:
        log(f"  the rootfs changed ({Path(state.rootfs).name} -> {rootfs.name}): the board starts from the new one")
        for part in ("upper", "work"):
            shutil.rmtree(board / part, ignore_errors=True)
        notes.append("reset to the new rootfs")
    for part in ("upper", "work", "root"):
        (board / part).mkdir(parents=True, exist_ok=True)
    if str(root.resolve()) not in mounted:
        options = f"lowerdir={rootfs},upperdir={board / 'upper'},workdir={board / 'work'}"
        done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(root)], capture_output=True, text=True)
        if done.returncode != 0:
            raise DeviceError(f"cannot mount the board's overlay on {root}: {done.stderr.strip()}; the emulated board needs "
                              "overlayfs (in a container: run it privileged)")
        notes.append("overlay mounted")
    cpuinfo = board / "cpuinfo"
    if not cpuinfo.is_file() or cpuinfo.read_text() != CORTEX_A76_CPUINFO:
        write_atomic(cpuinfo, CORTEX_A76_CPUINFO)
    for target, argv in (
        (root / "proc", ["mount", "-t", "proc", "proc", str(root / "proc")]),
        (root / "dev", ["mount", "--bind", "/dev", str(root / "dev")]),
        (root / "proc/cpuinfo", ["mount", "--bind", str(cpuinfo), str(root / "proc/cpuinfo")]),
    ):
        if str(target) not in _mounts_under(board):
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise DeviceError(f"cannot mount {target}: {done.stderr.strip()}")
            notes.append(f"{target.relative_to(root)} mounted")
    return ", ".join(notes) or "already mounted"


def _board_ids(root: Path) -> tuple[int, int]:
    """uid and gid of the board user, read from the board's own /etc/passwd."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == BOARD_USER:
            return int(fields[2]), int(fields[3])
    raise DeviceError(f"the board's /etc/passwd has no user {BOARD_USER!r}; delete {root.parent} and run again")


def _keygen(path: Path, comment: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    done = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise DeviceError(f"ssh-keygen failed for {path}: {done.stderr.strip()}")
    path.chmod(0o600)


def lab_keys(name: str, lab_path: Path) -> tuple[Path, Path]:
    """(the lab's private key for the board, its known_hosts file), beside the lab file under keys/."""
    keys = lab_path.resolve().parent / "keys"
    return keys / f"{name}_ed25519", keys / f"{name}.known_hosts"


def authorize(name: str, root: Path, key_file: Path) -> None:
    """The lab's key may log in as the board user (added next to any earlier lab's key)."""
    if not key_file.is_file():
        _keygen(key_file, f"edgeft-lab-{name}")
    public = key_file.with_name(key_file.name + ".pub").read_text().strip()
    ssh_dir = root / f"home/{BOARD_USER}/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    lines = authorized.read_text().splitlines() if authorized.is_file() else []
    if public not in lines:
        write_atomic(authorized, "\n".join([*lines, public]) + "\n")
    uid, gid = _board_ids(root)
    for path in (ssh_dir, authorized):
        os.chown(path, uid, gid)
    authorized.chmod(0o600)
    _unlock_account(root)


def _unlock_account(root: Path) -> None:
    """useradd leaves the password '!' (locked), and sshd without PAM refuses a locked account even for a
    key; '*' means "no password" without the lock, so only the key logs in."""
    shadow = root / "etc/shadow"
    lines = shadow.read_text().splitlines()
    fixed = [":".join([f[0], "*", *f[2:]]) if (f := line.split(":"))[0] == BOARD_USER and f[1].startswith("!") else line
             for line in lines]
    if fixed != lines:
        before = shadow.stat()
        write_atomic(shadow, "\n".join(fixed) + "\n")
        os.chown(shadow, before.st_uid, before.st_gid)
        shadow.chmod(before.st_mode & 0o7777)


def sshd_running(name: str, state: BoardState | None) -> int | None:
    """The pid of the board's sshd when it runs and answers on its port, else None."""
    if state is None:
        return None
    pid_file = _board_dir(name) / "root" / SSHD_PID.lstrip("/")
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if _pid_alive(pid) and pid in _processes_in(_board_dir(name) / "root") and _answers_ssh(state.port):
        return pid
    return None


def start_sshd(name: str, port: int, log: Log) -> int:
    """Start the board's sshd (its own config and host key) on 127.0.0.1:port; returns its pid."""
    root = _board_dir(name) / "root"
    host_key = root / HOST_KEY.lstrip("/")
    if not host_key.is_file():
        _keygen(host_key, f"edgeft-emulated-{name}")
    (root / "run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # sshd's privilege separation dir
    (root / SSHD_PID.lstrip("/")).unlink(missing_ok=True)
    write_atomic(root / SSHD_CONFIG.lstrip("/"), "\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {HOST_KEY}", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "PermitRootLogin no",
        f"AllowUsers {BOARD_USER}", "StrictModes no", f"PidFile {SSHD_PID}", "Subsystem sftp internal-sftp",
        "PrintMotd no", "LogLevel INFO", "MaxStartups 100", "MaxSessions 100", "",
    ]))
    done = subprocess.run(["chroot", str(root), "/usr/sbin/sshd", "-f", SSHD_CONFIG, "-E", SSHD_LOG],
                          env=_chroot_env(), capture_output=True, text=True, timeout=SSHD_START_TIMEOUT_S, start_new_session=True)
    if done.returncode != 0:
        raise DeviceError(f"the board's sshd did not start (exit {done.returncode}): {(done.stderr or done.stdout).strip()}; "
                          f"see {root / SSHD_LOG.lstrip('/')}")
    deadline = time.monotonic() + SSHD_START_TIMEOUT_S
    pid_file = root / SSHD_PID.lstrip("/")
    while time.monotonic() < deadline:
        if pid_file.is_file() and _answers_ssh(port):
            return int(pid_file.read_text().split()[0])
        time.sleep(0.3)
    tail = " | ".join((root / SSHD_LOG.lstrip("/")).read_text(errors="replace").strip().splitlines()[-3:]) \
        if (root / SSHD_LOG.lstrip("/")).is_file() else "no log"
    raise DeviceError(f"the board's sshd does not answer on 127.0.0.1:{port} after {SSHD_START_TIMEOUT_S:.0f} s ({tail})")


def write_known_hosts(name: str, port: int, known_hosts: Path) -> None:
    """Record the board's host key for its port: the first connection is verified, no trust-on-first-use."""
    public = (_board_dir(name) / "root" / (HOST_KEY.lstrip("/") + ".pub")).read_text().split()[:2]
    write_atomic(known_hosts, f"[127.0.0.1]:{port} {' '.join(public)}\n")
    known_hosts.chmod(0o600)


def device_entry(name: str, port: int, lab_path: Path, target: str) -> dict[str, Any]:
    """The lab file entry of the board; key paths relative to the lab file when they lie beside it."""
    key_file, known_hosts = lab_keys(name, lab_path)
    base = lab_path.resolve().parent

    def rel(path: Path) -> str:
        return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)

    return {"name": name, "host": "127.0.0.1", "port": port, "user": BOARD_USER, "key_file": rel(key_file),
            "known_hosts": rel(known_hosts), "target": target, "python": BOARD_PYTHON, "workdir": ".edgeft",
            "tags": ["emulated", "arm64"], "emulated": True}


def probe(device: LabDevice, lab_path: Path) -> dict[str, str]:
    """Log in as the lab will and import the runtime: the ARM path answers for real."""
    code = ("import json, platform, numpy, onnxruntime; print(json.dumps({'machine': platform.machine(), "
            "'python': platform.python_version(), 'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__}))")
    with SshTransport(device, lab_file=lab_path) as transport:
        result = transport.run([device.python, "-c", code], timeout=300)
    if not result.ok:
        raise DeviceError(f"emulated board '{device.name}': importing numpy and onnxruntime failed (exit {result.returncode}): "
                          f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- the lab file
def _last_line(node: yaml.Node) -> int:
    """The 0-based line of a node's last character (block collections end where the next token starts)."""
    if isinstance(node, yaml.ScalarNode) or getattr(node, "flow_style", False):
        mark = node.end_mark
        return mark.line if mark.column > 0 else mark.line - 1
    children = node.value
    if not children:
        return node.start_mark.line
    last = children[-1]
    return _last_line(last[1] if isinstance(last, tuple) else last)


def upsert_lab_device(lab_path: Path, entry: dict[str, Any]) -> str:
    """Add `entry` to the lab file's devices, or replace the device of that name, editing the text so
    comments and the other entries stay as written. The result is validated before it replaces the file."""
    text = lab_path.read_text() if lab_path.exists() else ""
    block = yaml.safe_dump([entry], sort_keys=False, default_flow_style=None).rstrip("\n").splitlines()
    node = yaml.compose(text) if text.strip() else None
    devices = None
    if isinstance(node, yaml.MappingNode):
        devices = next((v for k, v in node.value if k.value == "devices"), None)
    lines = text.splitlines()
    if node is None:
        header = "# The lab inventory (see README.md, \"The lab\"). Devices are added by hand or by `edgeft lab emulate`.\n"
        new_text = (text.rstrip("\n") + "\n" if text.strip() else header) + "devices:\n" + "".join(f"  {line}\n" for line in block)
        action = "created"
    elif devices is None:
        new_text = text.rstrip("\n") + "\ndevices:\n" + "".join(f"  {line}\n" for line in block)
        action = "added"
    elif isinstance(devices, yaml.SequenceNode) and not devices.flow_style:
        indent = " " * devices.start_mark.column
        new_lines = [f"{indent}{line}" for line in block]
        existing = next((item for item in devices.value if isinstance(item, yaml.MappingNode)
                         and any(k.value == "name" and v.value == entry["name"] for k, v in item.value)), None)
        if existing is not None:
            first, last = existing.start_mark.line, _last_line(existing)
            lines[first:last + 1] = new_lines
            action = "replaced"
        else:
            after = _last_line(devices.value[-1]) + 1
            lines[after:after] = new_lines
            action = "added"
        new_text = "\n".join(lines) + "\n"
    elif isinstance(devices, yaml.SequenceNode) and not devices.value:  # devices: []
        start, end = devices.start_mark, devices.end_mark
        line = lines[start.line]
        lines[start.line] = line[:start.column].rstrip() + line[end.column:]
        lines[start.line + 1:start.line + 1] = [f"  {line}" for line in block]
        new_text = "\n".join(lines) + "\n"
        action = "added"
    else:
        raise ConfigError(f"{lab_path}: 'devices' is not a block list (one '- name: ...' entry per device); rewrite it as one "
                          "so `edgeft lab emulate` can add its board, or add the entry by hand")
    check = lab_path.with_name(f".{lab_path.name}.{os.getpid()}.check.yaml")
    lab_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        check.write_text(new_text)
        lab = load_yaml(check, Lab)
        if lab.device(entry["name"]).port != entry["port"]:
            raise ConfigError(f"{lab_path}: editing the file did not give the expected entry for {entry['name']!r}; "
                              "add it by hand")
    finally:
        check.unlink(missing_ok=True)
    write_atomic(lab_path, new_text)
    return action


def _lab_entry_matches(lab_path: Path, entry: dict[str, Any]) -> bool:
    try:
        device = load_lab(lab_path).device(entry["name"])
    except ConfigError:
        return False
    key_file, known_hosts = lab_keys(entry["name"], lab_path)
    return (device.port == entry["port"] and device.emulated and device.host == entry["host"]
            and device.user == entry["user"] and device.python == entry["python"] and device.target == entry["target"]
            and device.key_file == key_file and device.known_hosts == known_hosts)


def _lab_device(entry: dict[str, Any], lab_path: Path) -> LabDevice:
    key_file, known_hosts = lab_keys(entry["name"], lab_path)
    return LabDevice(**{**entry, "key_file": key_file, "known_hosts": known_hosts})


# ------------------------------------------------------------------------------------ the commands
def emulate(name: str, lab_path: Path | None = None, *, target: str = "rpi5", log: Log = print) -> dict[str, Any]:
    """Bring up (or find up) the emulated board `name` and make it a device of the lab file.

    Idempotent: a board already up is only reported (its lab entry and key written if missing); a
    board whose sshd is down is restarted on its rootfs; everything else is built or unpacked."""
    start = time.monotonic()
    lab_path = _lab_path(lab_path)
    _check_name(name)  # bad input: one error line before anything is printed or started
    _check_root("edgeft lab emulate")
    _check_lab(name, lab_path)
    with _exclusive(log):
        return _bring_up(name, lab_path, target, log, start)


@contextmanager
def _exclusive(log: Log) -> Iterator[None]:
    """One bring-up or stop at a time on this machine: two CI jobs must not build (and replace) the rootfs
    a running board's overlay sits on, nor start two sshds for one board."""
    path = emulate_root() / "emulate.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with held_lock(FileLock(str(path)), f"waiting for another `edgeft lab emulate` on this machine (lock {path})", log):
        yield


def _bring_up(name: str, lab_path: Path, target: str, log: Log, start: float) -> dict[str, Any]:
    phases = _Phases(log)
    with phases("check") as record:
        state = _load_state(name)
        pid = sshd_running(name, state)
        record["note"] = f"sshd up on port {state.port} (pid {pid})" if pid and state else "board not running"
    key_file, known_hosts = lab_keys(name, lab_path)
    if pid and state:
        root = _board_dir(name) / "root"
        authorize(name, root, key_file)
        write_known_hosts(name, state.port, known_hosts)
        entry = device_entry(name, state.port, lab_path, target)
        lab_action = "unchanged"
        if not _lab_entry_matches(lab_path, entry):
            lab_action = upsert_lab_device(lab_path, entry)
        state.lab = str(lab_path.resolve())
        _save_state(state)
        took = round(time.monotonic() - start, 1)
        log(f"emulated board '{name}' is already up on 127.0.0.1:{state.port} (lab entry {lab_action}); {took} s")
        return _result(name, "already running", state, entry, lab_path, lab_action, None, phases, took)

    restarted = state is not None and (_board_dir(name) / "upper").is_dir()
    with phases("host tools") as record:
        record["note"] = ensure_host_tools(log)
    with phases("binfmt") as record:
        record["note"] = ensure_binfmt(log)
    with phases("rootfs") as record:
        rec = recipe()
        rootfs, record["note"] = ensure_rootfs(rec, log)
    with phases("board") as record:
        record["note"] = mount_board(name, rootfs, log)
        root = _board_dir(name) / "root"
        authorize(name, root, key_file)
    with phases("sshd") as record:
        for stale in _processes_in(root):  # a half-dead sshd (its port no longer answering) goes first
            _signal(stale, signal.SIGTERM)
        port = _free_port(state.port if state else None)
        pid = start_sshd(name, port, log)
        state = BoardState(name=name, rootfs=str(rootfs), port=port, lab=str(lab_path.resolve()))
        _save_state(state)
        write_known_hosts(name, port, known_hosts)
        entry = device_entry(name, port, lab_path, target)
        facts = probe(_lab_device(entry, lab_path), lab_path)
        if facts["machine"] != "aarch64":
            raise DeviceError(f"emulated board '{name}' reports machine {facts['machine']!r}, not aarch64; check binfmt_misc "
                              f"({BINFMT_DIR / 'qemu-aarch64'})")
        record["note"] = (f"127.0.0.1:{port}, pid {pid}; {facts['machine']}, python {facts['python']}, "
                          f"numpy {facts['numpy']}, onnxruntime {facts['onnxruntime']}")
    with phases("lab file") as record:
        lab_action = "unchanged" if _lab_entry_matches(lab_path, entry) else upsert_lab_device(lab_path, entry)
        record["note"] = f"{name} {lab_action} in {lab_path}"
    took = round(time.monotonic() - start, 1)
    how = "restarted" if restarted else "started"
    log(f"emulated board '{name}' {how} on 127.0.0.1:{port} in {took} s; measure on it with "
        f"`edgeft measure BUNDLE -d {name} --lab {lab_path}`")
    return _result(name, how, state, entry, lab_path, lab_action, facts, phases, took)


def _result(name, how, state, entry, lab_path, lab_action, facts, phases, took) -> dict[str, Any]:
    return {"name": name, "state": how, "host": "127.0.0.1", "port": state.port, "user": BOARD_USER,
            "python": BOARD_PYTHON, "target": entry["target"], "emulated": True, "rootfs": state.rootfs,
            "board_dir": str(_board_dir(name)), "lab": str(lab_path), "lab_entry": lab_action, "device": facts,
            "phases": phases.done, "took_s": took}


def stop(name: str, log: Log = print) -> dict[str, Any]:
    """Stop the board's sshd and everything running in it, and unmount its root. The rootfs cache,
    the board's own changes and its lab entry stay, so `edgeft lab emulate NAME` brings it back."""
    start = time.monotonic()
    _check_name(name)
    _check_root("edgeft lab emulate --stop")
    with _exclusive(log):
        return _stop(name, log, start)


def _stop(name: str, log: Log, start: float) -> dict[str, Any]:
    board = _board_dir(name)
    root = board / "root"
    if not board.is_dir():
        raise ConfigError(f"no emulated board named {name!r} in {emulate_root() / 'boards'}; `edgeft lab emulate {name}` makes one")
    pids = _processes_in(root) if root.is_dir() else []
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_pid_alive(p) and p in _processes_in(root) for p in pids):
        time.sleep(0.2)
    for pid in _processes_in(root):
        _signal(pid, signal.SIGKILL)
    unmounted = _unmount_under(board)
    took = round(time.monotonic() - start, 1)
    log(f"emulated board '{name}': stopped {len(pids)} process(es), unmounted {len(unmounted)} mount(s) in {took} s")
    return {"name": name, "stopped_pids": pids, "unmounted": unmounted, "took_s": took}
