"""Signed bundles on the device: trusted keys, the manifest signature (Ed25519), release fields, expiry.

Stdlib only. Ed25519 verification is written from RFC 8032 section 5.1.7 so a gateway with nothing but
python3 can check a signature; where the `cryptography` package imports, its (OpenSSL) verifier is
used instead (~0.1 ms a verify against ~3-4 ms on an x86 host core). Both give the same answers
(tests/test_signing.py). One signature is verified per install, so either is fast enough.

Formats (shared with edgeft/flash/signing.py, which signs):
  key file   one line `ed25519 <base64 of the raw 32-byte key> <key_id>`, key_id = sha256(raw)[:16 hex]
  manifest.sig  {"format": "edgeft-signature/1", "alg": "ed25519", "key_id": ..., "signature": <base64, 64 bytes>}
  message    canonical_manifest(json.loads(manifest.json)): sorted keys, no whitespace, UTF-8
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from . import RunnerError
from .bundle import verify_bundle

try:  # optional: OpenSSL's Ed25519, when the device (or the host) has it
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
except ImportError:  # pragma: no cover - exercised on devices without cryptography
    Ed25519PublicKey = None

SIGNATURE_FORMAT = "edgeft-signature/1"
SIGNATURE_FILE = "manifest.sig"
PUBLIC_KEY_SUFFIX = ".pub"
EXPIRES_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
CHANNEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# EDGEFT_ED25519_PURE=1 forces the stdlib verifier even where cryptography imports (tests, benchmarks).
FORCE_PURE = os.environ.get("EDGEFT_ED25519_PURE") == "1"

# --- Ed25519 verification, RFC 8032 section 5.1 -------------------------------------------------------
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # the order of the base point
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)  # a square root of -1


def _add(p1, p2):
    """Point addition in extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, x*y = T/Z (RFC 8032 5.1.4)."""
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * D % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _double(p1):
    """Point doubling (RFC 8032 5.1.4, dbl-2008-hwcd): cheaper than _add(p, p)."""
    x1, y1, z1, _ = p1
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1)
    g = a - b
    f = c + g
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _negate(p1):
    x1, y1, z1, t1 = p1
    return (-x1 % P, y1, z1, -t1 % P)


def _equal(p1, p2) -> bool:
    """Projective equality: x1/z1 == x2/z2 and y1/z1 == y2/z2, without inversions."""
    return (p1[0] * p2[2] - p2[0] * p1[2]) % P == 0 and (p1[1] * p2[2] - p2[1] * p1[2]) % P == 0


def _recover_x(y: int, sign: int) -> int | None:
    """RFC 8032 5.1.3 steps 2-4: x from y and x's low bit; None when no such point exists."""
    if y >= P:
        return None  # non-canonical encoding of y
    u = (y * y - 1) % P
    v = (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    vxx = v * x * x % P
    if vxx == (-u) % P:
        x = x * SQRT_M1 % P
    elif vxx != u:
        return None  # x^2 = u/v has no root: not a curve point
    if x == 0 and sign == 1:
        return None  # -0 is a non-canonical encoding of x = 0
    if x & 1 != sign:
        x = P - x
    return x


def _decode_point(data: bytes):
    """A 32-byte encoded point, or None when it is not a canonical encoding of a curve point."""
    if len(data) != 32:
        return None
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % P)


BASE = _decode_point((4 * pow(5, P - 2, P) % P).to_bytes(32, "little"))  # B: y = 4/5, x even
IDENTITY = (0, 1, 1, 0)


def _double_scalar_mult(s: int, base, k: int, point):
    """[s]base + [k]point in one pass of doublings (Straus/Shamir): about 253 doublings and 190 additions."""
    both = _add(base, point)
    result = IDENTITY
    for i in range(max(s.bit_length(), k.bit_length()) - 1, -1, -1):
        result = _double(result)
        bits = ((s >> i) & 1, (k >> i) & 1)
        if bits == (1, 1):
            result = _add(result, both)
        elif bits[0]:
            result = _add(result, base)
        elif bits[1]:
            result = _add(result, point)
    return result


def ed25519_verify_pure(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """RFC 8032 5.1.7, in Python: decode A and R (canonical encodings only), refuse S >= L,
    k = SHA-512(R || A || M), accept iff [S]B == R + [k]A (the cofactorless check, as OpenSSL does)."""
    if len(signature) != 64 or len(public_key) != 32:
        return False
    a_point = _decode_point(public_key)
    r_point = _decode_point(signature[:32])
    if a_point is None or r_point is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= L:
        return False  # a malleable (non-reduced) S
    k = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % L
    # [S]B - [k]A == R  <=>  [S]B == R + [k]A
    return _equal(_double_scalar_mult(s, BASE, k, _negate(a_point)), r_point)


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes, *, pure: bool | None = None) -> bool:
    """True iff `signature` is a valid Ed25519 signature of `message` by `public_key` (raw 32 bytes).
    Uses cryptography when it imports, unless pure=True (or FORCE_PURE with pure=None)."""
    use_pure = FORCE_PURE if pure is None else pure
    if use_pure or Ed25519PublicKey is None:
        return ed25519_verify_pure(public_key, message, signature)
    if len(signature) != 64 or len(public_key) != 32:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# --- key files, the signature file, release fields ---------------------------------------------------

def key_id_of(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_line(raw: bytes) -> str:
    """The one-line public key file format (what `edgeft keys new` writes as edgeft.pub)."""
    return f"ed25519 {base64.b64encode(raw).decode('ascii')} {key_id_of(raw)}\n"


def parse_public_key(text: str, where: str) -> tuple[str, bytes]:
    """(key_id, raw 32 bytes) from a public key file's text; RunnerError naming `where` when malformed."""
    fields = text.split()
    hint = "expected one line `ed25519 <base64 key> <key id>` as written by `edgeft keys new` (edgeft.pub)"
    if len(fields) != 3 or fields[0] != "ed25519":
        raise RunnerError(f"{where}: not an edgeft public key; {hint}")
    try:
        raw = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise RunnerError(f"{where}: the key is not 32 bytes of base64; {hint}")
    if fields[2] != key_id_of(raw):
        raise RunnerError(f"{where}: key id {fields[2]} does not match the key (expected {key_id_of(raw)}); the file was edited or damaged")
    return fields[2], raw


def read_public_key(path: Path) -> tuple[str, bytes]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunnerError(f"public key not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunnerError(f"cannot read public key {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_public_key(text, str(path))


def load_trusted_keys(keys_dir: Path) -> dict[str, bytes]:
    """{key_id: raw key} of every *.pub in keys_dir (none when it does not exist). A malformed file is
    an error, not skipped: a device must never silently trust fewer (or other) keys than installed."""
    keys_dir = Path(keys_dir)
    if not keys_dir.is_dir():
        return {}
    trusted = {}
    for path in sorted(keys_dir.glob(f"*{PUBLIC_KEY_SUFFIX}")):
        key_id, raw = read_public_key(path)
        trusted[key_id] = raw
    return trusted


def canonical_manifest(manifest: dict) -> bytes:
    """The signed message: the manifest object with sorted keys and no whitespace, UTF-8."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def read_signature_file(bundle_dir: Path) -> dict:
    """manifest.sig, checked for its format: {"format", "alg", "key_id", "signature"} (signature decoded to bytes)."""
    path = Path(bundle_dir) / SIGNATURE_FILE
    if not path.is_file():
        raise RunnerError(f"{bundle_dir}: unsigned bundle (no {SIGNATURE_FILE}); sign it with `edgeft sign BUNDLE --key KEY`")
    try:
        sig = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunnerError(f"{path}: unreadable signature file ({exc}); sign the bundle again") from None
    if not isinstance(sig, dict) or sig.get("format") != SIGNATURE_FORMAT or sig.get("alg") != "ed25519":
        raise RunnerError(f"{path}: not an {SIGNATURE_FORMAT} ed25519 signature file; sign the bundle again")
    if not isinstance(sig.get("key_id"), str) or not KEY_ID_RE.fullmatch(sig["key_id"]):
        raise RunnerError(f"{path}: key_id must be 16 lowercase hex characters; sign the bundle again")
    try:
        raw = base64.b64decode(sig.get("signature") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raw = b""
    if len(raw) != 64:
        raise RunnerError(f"{path}: signature must be 64 bytes of base64; sign the bundle again")
    return {**sig, "signature": raw}


def parse_expires(text: str) -> float:
    """Unix time of a release's `expires` ("YYYY-MM-DDTHH:MM:SSZ")."""
    return datetime.strptime(text, EXPIRES_FORMAT).replace(tzinfo=timezone.utc).timestamp()


def check_release(release, where: str) -> dict:
    """The signed `release` block: {"channel": str, "version": int >= 1, "expires": str | None}."""
    if not isinstance(release, dict):
        raise RunnerError(f"{where}: signed manifest has no 'release' block; sign it with `edgeft sign`")
    channel, version, expires = release.get("channel"), release.get("version"), release.get("expires")
    if not isinstance(channel, str) or not CHANNEL_RE.fullmatch(channel):
        raise RunnerError(f"{where}: release.channel {channel!r} must be 1-64 characters of letters, digits, '.', '_', '-'")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunnerError(f"{where}: release.version {version!r} must be an integer >= 1")
    if expires is not None:
        try:
            parse_expires(expires)
        except (TypeError, ValueError):
            raise RunnerError(f"{where}: release.expires {expires!r} must be null or YYYY-MM-DDTHH:MM:SSZ") from None
    return release


def verify_manifest_signature(bundle_dir: Path, trusted: dict[str, bytes]) -> dict:
    """Check manifest.sig against manifest.json with a trusted key; returns the signed manifest object.
    Raises RunnerError (one line): unsigned, untrusted key, signature mismatch, malformed files."""
    bundle_dir = Path(bundle_dir)
    sig = read_signature_file(bundle_dir)
    if sig["key_id"] not in trusted:
        known = ", ".join(sorted(trusted)) or "none"
        raise RunnerError(f"{bundle_dir}: signed by key {sig['key_id']} which is not trusted (trusted: {known})")
    manifest_path = bundle_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise RunnerError(f"{bundle_dir}: bundle has no manifest.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunnerError(f"{manifest_path}: unreadable ({exc}); edited or damaged after signing: copy the bundle again") from None
    if not isinstance(manifest, dict) or not ed25519_verify(trusted[sig["key_id"]], canonical_manifest(manifest), sig["signature"]):
        raise RunnerError(f"{bundle_dir}: signature does not match manifest.json (edited after signing?)")
    check_release(manifest.get("release"), str(manifest_path))
    return manifest


def check_expiry(manifest: dict, where: str, now: float | None = None) -> None:
    expires = manifest["release"]["expires"]
    if expires is not None and (time.time() if now is None else now) >= parse_expires(expires):
        raise RunnerError(f"{where}: release expired on {expires} (channel {manifest['release']['channel']} "
                          f"version {manifest['release']['version']}); sign a new release")


def _same_manifest(loaded: dict, signed: dict) -> bool:
    """bundle.load_manifest's result matches the signed object (it fills in measure defaults, nothing else)."""
    if set(loaded) != set(signed) | {"measure"}:
        return False
    measure = signed.get("measure") or {}
    return all(loaded[k] == v for k, v in signed.items() if k != "measure") and all(loaded["measure"].get(k) == v for k, v in measure.items())


def verify_signed_bundle(bundle_dir: Path, trusted: dict[str, bytes], now: float | None = None) -> dict:
    """Signature with a trusted key, then every file's sha256 (bundle.verify_bundle), then expiry.
    Returns the manifest as bundle.load_manifest reads it (measure defaults filled in)."""
    signed = verify_manifest_signature(bundle_dir, trusted)
    loaded = verify_bundle(bundle_dir)
    if not _same_manifest(loaded, signed):  # manifest.json was replaced between the two reads
        raise RunnerError(f"{bundle_dir}: manifest.json changed while it was being verified; verify again")
    check_expiry(signed, str(Path(bundle_dir) / "manifest.json"), now)
    return loaded
