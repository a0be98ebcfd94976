"""Signing keys and signed bundles on the host: `edgeft keys new`, `edgeft sign`, `edgeft verify`.

A signature covers the canonical form of manifest.json, which holds the sha256 of every file, the
budgets and the `release` block (channel, version, expiry), so nothing a gate or an install reads is
outside it. The formats and the verification itself are the runner's (edgeft_runner.signature), so the
host refuses exactly what a device refuses; signing needs the private key and lives here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from filelock import FileLock

from edgeft_runner import RunnerError
from edgeft_runner.bundle import verify_bundle as verify_files
from edgeft_runner.signature import (EXPIRES_FORMAT, SIGNATURE_FILE, SIGNATURE_FORMAT, canonical_manifest, check_release,
                                     key_id_of, parse_expires, public_key_line, read_public_key, read_signature_file,
                                     verify_signed_bundle)

from ..artifact import write_atomic
from ..errors import BundleError, ConfigError

__all__ = ["KEY_FILE", "PUB_FILE", "VERSIONS_FILE", "bundle_sha256", "canonical_manifest", "expires_at", "load_private_key",
           "load_public_key", "new_keypair", "sign_bundle", "signature_state", "verify_bundle"]

KEY_FILE = "edgeft.key"
PUB_FILE = "edgeft.pub"
VERSIONS_FILE = "versions.json"  # beside the private key: the highest version signed per channel
VERSIONS_FORMAT = "edgeft-versions/1"


def new_keypair(out_dir: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 pair: out_dir/edgeft.key (PEM PKCS8, unencrypted, mode 0600) and out_dir/edgeft.pub
    (one line). Refuses to overwrite either: a lost signing key means devices must be re-keyed."""
    out_dir = Path(out_dir)
    key_path, pub_path = out_dir / KEY_FILE, out_dir / PUB_FILE
    for path in (key_path, pub_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite a key (choose another --out, or move the old pair away first)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create key directory {out_dir}: {exc.strerror}") from None
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_secret_once(key_path, pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        write_atomic(pub_path, public_key_line(raw))
    except OSError as exc:
        raise ConfigError(f"cannot write {pub_path}: {exc.strerror or exc}") from None
    return key_path, pub_path


def _write_secret_once(path: Path, data: bytes) -> None:
    """Create `path` whole with mode 0600 from the first byte (no window where others could read it), and
    never replace an existing file: a temp file, fsynced, then a hard link, which fails if the name exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConfigError(f"{path} already exists; refusing to overwrite a key") from None
        except OSError:  # a filesystem without hard links (e.g. FAT on a USB stick): checked for absence above
            if path.exists():
                raise ConfigError(f"{path} already exists; refusing to overwrite a key") from None
            os.rename(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in `path` (edgeft.key); ConfigError with one line when it is missing or not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"signing key not found: {path}; make a key pair with `edgeft keys new --out DIR`") from None
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc.strerror}") from None
    if data.startswith(b"ed25519 "):
        raise ConfigError(f"{path} is a public key; sign with the private key ({KEY_FILE}) beside it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path}: the key is password-protected; edgeft signs with an unencrypted {KEY_FILE} (keep it on a protected machine)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM private key; pass the {KEY_FILE} written by `edgeft keys new`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: a {type(key).__name__.lstrip('_')} key, not Ed25519; make one with `edgeft keys new --out DIR`")
    return key


def load_public_key(path: Path) -> tuple[str, bytes]:
    """(key_id, raw 32-byte key) from a public key file (edgeft.pub); ConfigError with one line when malformed."""
    try:
        return read_public_key(Path(path))
    except RunnerError as exc:
        raise ConfigError(str(exc)) from None


def bundle_sha256(bundle_dir: Path) -> str:
    """A bundle's identity everywhere (device state, install log, rollouts): sha256 of its manifest.json bytes."""
    return hashlib.sha256((Path(bundle_dir) / "manifest.json").read_bytes()).hexdigest()


def expires_at(value: str | datetime | None, now: float | None = None) -> str | None:
    """A release's `expires` ("YYYY-MM-DDTHH:MM:SSZ") from a date (2027-06-30: midnight UTC, the start of
    that day) or an ISO time (a time without a zone is UTC); refuses a time already past."""
    if value is None:
        return None
    when = value
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):  # Python 3.10's fromisoformat does not take a trailing Z
            text = text[:-1] + "+00:00"
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"expires {value!r}: give a date (2027-06-30, midnight UTC) or an ISO time (2027-06-30T12:00:00+02:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    text = when.astimezone(timezone.utc).strftime(EXPIRES_FORMAT)
    if parse_expires(text) <= (datetime.now(timezone.utc).timestamp() if now is None else now):
        raise ConfigError(f"expires {value}: {text} is already past; give a later date")
    return text


def _read_versions(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        versions = data["highest_version"]
        if data.get("format") != VERSIONS_FORMAT or not all(isinstance(v, int) for v in versions.values()):
            raise ValueError("unexpected content")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: unreadable version counter ({exc}); fix it or pass --version N explicitly") from None
    return versions


def sign_bundle(bundle_dir: Path, key_path: Path, *, version: int | None = None, channel: str | None = None,
                expires: str | datetime | None = None) -> dict[str, Any]:
    """Sign a bundle: check every file against its manifest, add the `release` block (channel: default
    the target; version: default one above the highest signed for that channel, from versions.json beside
    the key; expires: optional), then rewrite manifest.json and write manifest.sig, each atomically.
    Returns {bundle, bundle_sha256, key_id, channel, version, expires}."""
    key = load_private_key(key_path)  # first: a wrong key fails before anything is read or written
    bundle_dir = Path(bundle_dir)
    try:
        verify_files(bundle_dir)  # never vouch for files that already differ from the manifest
    except RunnerError as exc:
        raise BundleError(f"cannot sign: {exc}") from None
    manifest_path = bundle_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    expires_text = expires_at(expires)
    channel = manifest.get("target") if channel is None else channel
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        raise ConfigError(f"version {version!r} must be an integer >= 1")
    versions_path = Path(key_path).parent / VERSIONS_FILE
    try:
        with FileLock(str(versions_path) + ".lock", timeout=30):  # two signers with one key never pick the same version
            versions = _read_versions(versions_path)
            if version is None:
                version = versions.get(channel, 0) + 1 if isinstance(channel, str) else 1
            release = {"channel": channel, "version": version, "expires": expires_text}
            try:
                check_release(release, "release")
            except RunnerError as exc:
                raise ConfigError(str(exc)) from None
            manifest["release"] = release
            signature = key.sign(canonical_manifest(manifest))
            # The counter first: a crash after it skips a version (harmless); before it, a version could repeat.
            versions[channel] = max(version, versions.get(channel, 0))
            write_atomic(versions_path, json.dumps({"format": VERSIONS_FORMAT, "highest_version": versions}, indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot update the version counter {versions_path}: {exc.strerror or exc}") from None
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = {"format": SIGNATURE_FORMAT, "alg": "ed25519", "key_id": key_id_of(raw), "signature": base64.b64encode(signature).decode("ascii")}
    # Two files cannot change at once; between the renames the bundle fails verification, never passes wrongly.
    try:
        write_atomic(manifest_path, json.dumps(manifest, indent=2))
        write_atomic(bundle_dir / SIGNATURE_FILE, json.dumps(sig, indent=2) + "\n")
    except OSError as exc:
        raise BundleError(f"cannot write the signed manifest into {bundle_dir}: {exc.strerror or exc}") from None
    return {"bundle": str(bundle_dir), "bundle_sha256": bundle_sha256(bundle_dir), "key_id": sig["key_id"], **release}


def verify_bundle(bundle_dir: Path, pubkeys: Sequence[Path], *, now: float | None = None) -> dict[str, Any]:
    """What a device checks, on the host: the signature with one of `pubkeys`, then every file's sha256,
    then expiry (`now`: unix time, default the clock). BundleError with one line naming the file or reason.
    Returns {bundle, bundle_sha256, key_id, channel, version, expires, files, manifest}."""
    if not pubkeys:
        raise ConfigError("no public key to verify with; pass --pubkey edgeft.pub (the pair's public half)")
    trusted = dict(load_public_key(path) for path in pubkeys)
    try:
        manifest = verify_signed_bundle(Path(bundle_dir), trusted, now)
        key_id = read_signature_file(Path(bundle_dir))["key_id"]
    except RunnerError as exc:
        raise BundleError(str(exc)) from None
    return {"bundle": str(bundle_dir), "bundle_sha256": bundle_sha256(bundle_dir), "key_id": key_id, **manifest["release"],
            "files": len(manifest["files"]), "manifest": manifest}


def signature_state(bundle_dir: Path, pubkeys: Sequence[Path] | None = None, *, now: float | None = None) -> dict[str, Any]:
    """For reports and warnings: {signed, key_id, channel, version, expires, valid, problem}. valid is None
    when no public key was given (nothing checked), else whether verify_bundle accepts the bundle."""
    bundle_dir = Path(bundle_dir)
    state: dict[str, Any] = {"signed": (bundle_dir / SIGNATURE_FILE).is_file(), "key_id": None, "channel": None,
                             "version": None, "expires": None, "valid": None, "problem": None}
    try:
        state["key_id"] = read_signature_file(bundle_dir)["key_id"]
    except RunnerError as exc:
        state["problem"] = str(exc)
    try:
        release = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8")).get("release")
        if isinstance(release, dict):
            state.update({k: release.get(k) for k in ("channel", "version", "expires")})
    except (OSError, ValueError, AttributeError):
        pass
    if pubkeys:
        try:
            verify_bundle(bundle_dir, pubkeys, now=now)
            state["valid"], state["problem"] = True, None
        except BundleError as exc:
            state["valid"], state["problem"] = False, str(exc)
    return state
