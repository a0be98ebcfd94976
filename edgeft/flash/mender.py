"""Mender artifacts for fleets past one lab: `edgeft mender BUNDLE --device-type T -o model.mender`.

The artifact is a module-image of type `edgeft-model`, written with Mender's own `mender-artifact` tool
(Debian: `apt-get install mender-artifact`). Module-image payload files are flat, so it carries two:
bundle.tar (the signed bundle: manifest.json, manifest.sig and the files the manifest lists) and
runner.pyz (the edgeft runner that matches this edgeft). On the device, the update module `edgeft-model`
(runner/mender/edgeft-model, installed at /usr/share/mender/modules/v3/edgeft-model) unpacks the tar and
runs the runner's install: verify, smoke test in the spare slot, switch; ArtifactCommit marks it good,
ArtifactRollback restores the previous slot. Mender's server then does the phased rollouts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from edgeft_runner import RunnerError
from edgeft_runner.bundle import verify_bundle as verify_files
from edgeft_runner.signature import SIGNATURE_FILE, read_signature_file

from ..artifact import sha256_file
from ..errors import BundleError, ConfigError
from ..runner_app import build_runner_zipapp
from .signing import bundle_sha256, verify_bundle

__all__ = ["MODULE_TYPE", "MODULE_INSTALL_PATH", "PAYLOAD_FILES", "artifact_name_for", "mender_artifact_tool",
           "read_artifact", "update_module_text", "write_mender_artifact", "write_update_module"]

MODULE_TYPE = "edgeft-model"
MODULE_INSTALL_PATH = f"/usr/share/mender/modules/v3/{MODULE_TYPE}"
BUNDLE_TAR = "bundle.tar"
RUNNER_FILE = "runner.pyz"
PAYLOAD_FILES = (BUNDLE_TAR, RUNNER_FILE)
TOOL = "mender-artifact"
TOOL_TIMEOUT_S = 1800.0  # a large model on a slow disk; mender-artifact hashes and copies it twice
TAR_MTIME = 1577836800  # 2020-01-01: a fixed time, so the same bundle gives the same tar
# Mender artifact names and device types travel in headers and URLs; keep them to a safe set.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def update_module_text() -> bytes:
    """The update module shipped with edgeft (runner/mender/edgeft-model, installed as edgeft._shipped.mender)."""
    return (resources.files("edgeft._shipped.mender") / MODULE_TYPE).read_bytes()


def write_update_module(path: Path) -> Path:
    """Write the update module to `path` (a file, or a folder to put `edgeft-model` in), mode 0755, atomically."""
    path = Path(path)
    if path.is_dir():
        path = path / MODULE_TYPE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(update_module_text())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def mender_artifact_tool() -> str:
    """The mender-artifact executable; ConfigError naming how to install it when it is missing."""
    tool = shutil.which(TOOL)
    if tool is None:
        raise ConfigError(f"{TOOL} not found on PATH: install it (Debian/Ubuntu: apt-get install mender-artifact; "
                          "others: https://docs.mender.io/downloads) and run `edgeft mender` again")
    return tool


def artifact_name_for(release: dict[str, Any]) -> str:
    """The default artifact name: edgeft-<channel>-v<version> (what `mender show-artifact` prints after install)."""
    return f"edgeft-{release['channel']}-v{release['version']}"


def _check_name(value: str, what: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ConfigError(f"{what} {value!r}: use letters, digits and . _ + - (up to 128, starting with a letter or digit)")
    return value


def _bundle_release(bundle_dir: Path, pubkeys: Sequence[Path]) -> dict[str, Any]:
    """Verify as a device would: with `pubkeys`, the signature and every hash; without, that it is signed and
    every hash matches (the device checks the signature with the keys it trusts)."""
    if pubkeys:
        verified = verify_bundle(bundle_dir, pubkeys)
        verified["signature_checked"] = True
        return verified
    try:
        signature = read_signature_file(bundle_dir)
        manifest = verify_files(bundle_dir)
    except RunnerError as exc:
        raise BundleError(str(exc)) from None
    release = manifest.get("release")
    if not isinstance(release, dict):
        raise BundleError(f"{bundle_dir}/manifest.json has no release block; sign it: edgeft sign {bundle_dir} --key KEY")
    return {"bundle": str(bundle_dir), "bundle_sha256": bundle_sha256(bundle_dir), "key_id": signature["key_id"],
            **{k: release.get(k) for k in ("channel", "version", "expires")}, "files": len(manifest["files"]),
            "manifest": manifest, "signature_checked": False}


def _write_bundle_tar(bundle_dir: Path, manifest: dict[str, Any], out: Path) -> None:
    """The signed bundle as one tar: only the files the manifest lists plus manifest.json and manifest.sig,
    sorted, with fixed owner, mode and time (the same bundle gives the same bytes)."""
    names = sorted(manifest["files"]) + ["manifest.json", SIGNATURE_FILE]

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = TAR_MTIME
        info.mode = 0o644
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT, dereference=True) as tar:  # a linked file goes in as a file
        for rel in names:
            tar.add(bundle_dir / rel, arcname=rel, recursive=False, filter=normalize)
    # The bundle was verified before; check what went into the tar, so a file changed meanwhile never ships.
    with tarfile.open(out) as tar:
        for rel, sha in manifest["files"].items():
            if _sha256_stream(tar.extractfile(rel)) != sha:
                raise BundleError(f"{bundle_dir / rel} changed while the artifact was written; run `edgeft mender` again")


def _sha256_stream(f) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _run_tool(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BundleError(f"{TOOL} {argv[1]} did not finish in {TOOL_TIMEOUT_S:.0f} s") from None
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise BundleError(f"{TOOL} {argv[1]} failed (exit {result.returncode}): {detail}")
    return result.stdout


def read_artifact(path: Path) -> dict[str, Any]:
    """`mender-artifact read PATH`, parsed: {name, device_types, type, files: {name: sha256}, output}. `output`
    is the tool's own text; the parse reads the few fields edgeft checks (mender-artifact 3.x layout)."""
    text = _run_tool([mender_artifact_tool(), "read", str(path)])
    info: dict[str, Any] = {"name": None, "device_types": [], "type": None, "files": {}, "output": text}
    file_name = None
    for raw in text.splitlines():
        key, _, value = raw.strip().partition(":")
        value = value.strip()
        if key == "Name" and info["name"] is None:
            info["name"] = value
        elif key == "Compatible devices":
            info["device_types"] = value.strip("'[]").split()
        elif key == "Type" and info["type"] is None:
            info["type"] = value
        elif key == "name":  # a payload file (Files: name, size, modified, checksum)
            file_name = value
            info["files"][file_name] = None
        elif key == "checksum" and file_name is not None:
            info["files"][file_name] = value
    return info


def write_mender_artifact(bundle_dir: Path, out_path: Path, *, device_types: Sequence[str],
                          pubkeys: Sequence[Path] = (), artifact_name: str | None = None) -> dict[str, Any]:
    """Verify `bundle_dir` (see _bundle_release), then write a Mender module-image artifact of type
    edgeft-model at `out_path` (atomically) with mender-artifact, read it back and check its name, type,
    device types and payload files. Returns {artifact, artifact_name, device_types, bundle_sha256, channel,
    version, key_id, signature_checked, bytes, sha256, runner_sha256}."""
    bundle_dir, out_path = Path(bundle_dir), Path(out_path)
    if not device_types:
        raise ConfigError("give the Mender device type(s) the artifact is for: --device-type T (repeat for several)")
    for device_type in device_types:
        _check_name(device_type, "--device-type")
    tool = mender_artifact_tool()  # before any long work: without it nothing can be written
    verified = _bundle_release(bundle_dir, pubkeys)
    manifest = verified.pop("manifest")
    name = _check_name(artifact_name or artifact_name_for(verified), "--artifact-name")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgeft-mender-", dir=out_path.parent) as tmp:
        work = Path(tmp)
        _write_bundle_tar(bundle_dir, manifest, work / BUNDLE_TAR)
        runner_sha = build_runner_zipapp(work / RUNNER_FILE)
        meta = {"edgeft": {"bundle_sha256": verified["bundle_sha256"], "channel": verified["channel"],
                           "version": verified["version"], "key_id": verified["key_id"], "runner_sha256": runner_sha}}
        (work / "meta-data.json").write_text(json.dumps(meta), encoding="utf-8")
        written = work / "artifact.mender"
        argv = [tool, "write", "module-image", "-T", MODULE_TYPE, "-n", name]
        for device_type in device_types:
            argv += ["-t", device_type]
        argv += ["-f", str(work / BUNDLE_TAR), "-f", str(work / RUNNER_FILE), "-m", str(work / "meta-data.json"),
                 "-o", str(written)]
        _run_tool(argv)
        info = read_artifact(written)
        problems = []
        if info["name"] != name:
            problems.append(f"name {info['name']!r}, expected {name!r}")
        if info["type"] != MODULE_TYPE:
            problems.append(f"type {info['type']!r}, expected {MODULE_TYPE!r}")
        if sorted(info["device_types"]) != sorted(device_types):
            problems.append(f"device types {info['device_types']}, expected {list(device_types)}")
        expected = {BUNDLE_TAR: sha256_file(work / BUNDLE_TAR), RUNNER_FILE: runner_sha}
        if info["files"] != expected:
            problems.append(f"payload files {info['files']}, expected {expected}")
        if problems:
            raise BundleError(f"{TOOL} read of the new artifact disagrees: {'; '.join(problems)}; nothing was written")
        with open(written, "rb") as f:
            os.fsync(f.fileno())
        os.replace(written, out_path)
    return {"artifact": str(out_path), "artifact_name": name, "device_types": list(device_types),
            **{k: verified[k] for k in ("bundle_sha256", "channel", "version", "key_id", "signature_checked")},
            "bytes": out_path.stat().st_size, "sha256": sha256_file(out_path), "runner_sha256": runner_sha}
