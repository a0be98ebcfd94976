"""Keys, signatures, verification: the host (edgeft.flash.signing, `edgeft keys/sign/verify`) and the
runner's stdlib Ed25519 (RFC 8032 5.1.7) against RFC vectors and OpenSSL. Light: no torch, a fake bundle."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeft.errors import BundleError, ConfigError
from edgeft.flash import signing
from edgeft_runner import RunnerError
from edgeft_runner import signature as runner_sig

REPO = Path(__file__).resolve().parent.parent
EDGEFT = REPO / ".venv" / "bin" / "edgeft"
if not EDGEFT.exists():  # an installed edgeft elsewhere (CI's own venv)
    EDGEFT = Path(sys.executable).with_name("edgeft")

# RFC 8032 section 7.1: (secret seed, public key, message, signature), hex.
RFC8032_TEST_1024_MESSAGE = (
    "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98fa6e264bf09efe12ee50f8f54e9f77b1"
    "e355f6c50544e23fb1433ddf73be84d879de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
    "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc1a858efcb8550ee3a5e1998bd177e93a"
    "7363c344fe6b199ee5d02e82d522c4feba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
    "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbefefd75499da96bd68a8a97b928a8bbc10"
    "3b6621fcde2beca1231d206be6cd9ec7aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
    "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2d17ba70eb6248e594e1a2297acbbb39d"
    "502f1a8c6eb6f1ce22b3de1a1f40cc24554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
    "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc2732e69485bbc9c90bfbd62481d9089b"
    "eccf80cfe2df16a2cf65bd92dd597b0707e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
    "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51addd3b75a2b1ae0784504df543af8969b"
    "e3ea7082ff7fc9888c144da2af58429ec96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
    "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c42f58c30c04aafdb038dda0847dd988d"
    "cda6f3bfd15c4b4c4525004aa06eeff8ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
    "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08d78ff4ef5d63653a65040cf9bfd4aca7"
    "984a74d37145986780fc0b16ac451649de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
    "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a32ef5b52a1ecc820e308aa342721aac09"
    "43bf6686b64b2579376504ccc493d97e6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
    "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b50d334ba77c225bc307ba537152f3f161"
    "0e4eafe595f6d9d90d11faa933a15ef1369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
    "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c0618983f8741c5ef68d3a101e8a3b8ca"
    "c60c905c15fc910840b94c00a0b9d0"
)
RFC8032_VECTORS = [
    ("TEST 1", "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("TEST 2", "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("TEST 3", "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    ("TEST 1024", "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
     "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e", RFC8032_TEST_1024_MESSAGE,
     "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03"),
]
L = 2**252 + 27742317777372353535851937790883648493
BUNDLE_FILES = ("model.onnx", "golden.npz", "task.json", "tokenizer/tokenizer.json")


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def crypto_verify(public: bytes, message: bytes, sig: bytes) -> bool:
    """OpenSSL's answer, straight from cryptography (the reference the stdlib verifier must agree with)."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(sig, message)
        return True
    except Exception:
        return False


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def make_bundle(path: Path, seed: int = 0) -> Path:
    """A small bundle in the runner's manifest format (bundle.load_manifest's required keys), with budgets."""
    rng = random.Random(seed)
    contents = {"model.onnx": rng.randbytes(6000), "golden.npz": rng.randbytes(300), "task.json": b'{"examples": []}',
                "tokenizer/tokenizer.json": b'{"model": {"vocab": {}}}'}
    for rel, data in contents.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    manifest = {
        "format": "edgeft-bundle/1", "target": "rpi5", "arch": "aarch64", "runtime": "onnxruntime", "threads": 4,
        "model": {"file": "model.onnx", "precision": "int8", "vocab_size": 340, "eos_token_id": 2},
        "golden": {"file": "golden.npz", "atol": 0.001}, "task": {"file": "task.json", "n": 0},
        "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(contents.items())},
        "profile": {"name": "arm-int8", "budgets": {"latency_ms_p99": 50, "peak_rss_mb": 512}},
        "measure": {"prompt_tokens": 8},
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs made by the library: `key`/`pub` signs, `foreign_pub` is some other key."""
    base = tmp_path_factory.mktemp("keys")
    key, pub = signing.new_keypair(base / "release")
    _, foreign_pub = signing.new_keypair(base / "foreign")
    return {"key": key, "pub": pub, "foreign_pub": foreign_pub, "dir": base / "release"}


@pytest.fixture(scope="module")
def signed_template(keys, tmp_path_factory) -> Path:
    """One bundle signed once (channel rpi5-test, version 3); tests copy it and damage the copy."""
    bundle = make_bundle(tmp_path_factory.mktemp("signed") / "bundle")
    signing.sign_bundle(bundle, keys["key"], channel="rpi5-test", version=3, expires="2099-01-01")
    return bundle


@pytest.fixture
def signed(signed_template, tmp_path) -> Path:
    return Path(shutil.copytree(signed_template, tmp_path / "bundle"))


def edgeft(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([str(EDGEFT), *map(str, args)], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --- the stdlib Ed25519 ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, seed, public, message, sig", RFC8032_VECTORS, ids=[v[0] for v in RFC8032_VECTORS])
def test_rfc8032_vectors(name, seed, public, message, sig):
    public, message, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(sig)
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed))
    assert raw_public(key) == public and key.sign(message) == sig  # the vector is transcribed right
    assert runner_sig.ed25519_verify_pure(public, message, sig) is True
    assert runner_sig.ed25519_verify(public, message, sig, pure=False) is True
    assert runner_sig.ed25519_verify_pure(public, message + b"\x00", sig) is False
    assert runner_sig.ed25519_verify_pure(public, message, flip(sig, 3)) is False


def test_pure_agrees_with_openssl_on_many_signatures_and_tamperings():
    """60 signatures of random messages by random keys, and 4 tamperings of each (a bit flipped in the
    message, R, S, the key): the stdlib verifier and OpenSSL give the same answer every time."""
    rng = random.Random(12)
    valid = tampered = nonempty = 0
    pure_s = 0.0
    for i in range(60):
        key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        public = raw_public(key)
        message = rng.randbytes(rng.choice([0, 1, 33, 200, 4096]))
        sig = key.sign(message)
        cases = [(public, message, sig, True)]
        if message:
            nonempty += 1
            cases.append((public, flip(message, rng.randrange(len(message) * 8)), sig, False))
        cases += [(public, message, flip(sig, rng.randrange(256)), False),  # R
                  (public, message, flip(sig, 256 + rng.randrange(256)), False),  # S
                  (flip(public, rng.randrange(256)), message, sig, False)]  # the key
        for pub, msg, s, expected in cases:
            started = time.perf_counter()
            pure = runner_sig.ed25519_verify(pub, msg, s, pure=True)
            pure_s += time.perf_counter() - started
            assert pure == crypto_verify(pub, msg, s) == expected, (i, pub.hex(), msg.hex(), s.hex())
            valid += expected
            tampered += not expected
    assert valid == 60 and tampered == 3 * 60 + nonempty and nonempty > 40
    print(f"\nstdlib Ed25519 verify: {pure_s / (valid + tampered) * 1000:.2f} ms per call over {valid + tampered} calls")


def test_pure_refuses_malleable_s_and_non_canonical_points():
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    public, message = raw_public(key), b"edgeft"
    sig = key.sign(message)
    s = int.from_bytes(sig[32:], "little")
    malleable = sig[:32] + (s + L).to_bytes(32, "little")  # [S+L]B == [S]B: the equation alone would accept it
    assert runner_sig.ed25519_verify_pure(public, message, malleable) is False
    assert crypto_verify(public, message, malleable) is False
    p = 2**255 - 19
    assert runner_sig._decode_point((1).to_bytes(32, "little")) is not None  # y = 1: the neutral point
    assert runner_sig._decode_point((p + 1).to_bytes(32, "little")) is None  # the same y, not reduced mod p
    assert runner_sig._decode_point((1 | 1 << 255).to_bytes(32, "little")) is None  # x = 0 with the sign bit: "-0"
    assert runner_sig._decode_point((2).to_bytes(32, "little")) is None  # y = 2 is on no point of the curve
    assert runner_sig.ed25519_verify_pure(public[:31], message, sig) is False
    assert runner_sig.ed25519_verify_pure(public, message, sig[:63]) is False


def test_runner_verifies_without_cryptography(signed, keys):
    """A device with only python3: cryptography blocked from importing, the runner's module still verifies
    a signed bundle (stdlib path) and refuses an edited one."""
    script = (
        "import sys; sys.modules['cryptography'] = None; sys.path.insert(0, sys.argv[1]);"
        "from edgeft_runner import signature as s, RunnerError; assert s.Ed25519PublicKey is None;"
        "trusted = s.load_trusted_keys(sys.argv[2]); m = s.verify_signed_bundle(sys.argv[3], trusted);"
        "print(m['release']['version'], 'edgeft' in sys.modules, 'numpy' in sys.modules)"
    )
    trust_dir = keys["dir"].parent / "trusted-only"
    trust_dir.mkdir(exist_ok=True)
    (trust_dir / "release.pub").write_text(keys["pub"].read_text())
    ok = subprocess.run([sys.executable, "-I", "-c", script, str(REPO / "runner"), str(trust_dir), str(signed)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.split() == ["3", "False", "False"], ok.stderr
    manifest = json.loads((signed / "manifest.json").read_text())
    manifest["profile"]["budgets"]["latency_ms_p99"] = 5000
    (signed / "manifest.json").write_text(json.dumps(manifest, indent=2))
    bad = subprocess.run([sys.executable, "-I", "-c", script, str(REPO / "runner"), str(trust_dir), str(signed)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "signature does not match manifest.json" in bad.stderr


# --- the runner's API ---------------------------------------------------------------------------

def test_runner_trusted_keys_and_signed_bundle(signed, keys, tmp_path, monkeypatch):
    calls = []
    pure = runner_sig.ed25519_verify_pure
    monkeypatch.setattr(runner_sig, "FORCE_PURE", True)  # the module's switch: stdlib path even with cryptography here
    monkeypatch.setattr(runner_sig, "ed25519_verify_pure", lambda *a: calls.append(1) or pure(*a))
    keys_dir = tmp_path / "keys"
    assert runner_sig.load_trusted_keys(keys_dir) == {}  # no keys dir yet: trusts nothing
    keys_dir.mkdir()
    (keys_dir / "a.pub").write_text(keys["pub"].read_text())
    (keys_dir / "b.pub").write_text(keys["foreign_pub"].read_text())
    (keys_dir / "notes.txt").write_text("not a key")
    trusted = runner_sig.load_trusted_keys(keys_dir)
    release_id = keys["pub"].read_text().split()[2]
    assert len(trusted) == 2 and release_id in trusted and trusted[release_id] == base64.b64decode(keys["pub"].read_text().split()[1])
    manifest = runner_sig.verify_signed_bundle(signed, trusted)
    assert manifest["release"] == {"channel": "rpi5-test", "version": 3, "expires": "2099-01-01T00:00:00Z"}
    assert manifest["measure"]["prompt_tokens"] == 8 and manifest["measure"]["min_iters"] == 100  # load_manifest's defaults
    assert calls == [1]
    with pytest.raises(RunnerError, match=r"expired on 2099-01-01T00:00:00Z"):
        runner_sig.verify_signed_bundle(signed, trusted, now=4102444800.0)  # 2100-01-01
    (keys_dir / "c.pub").write_text("ed25519 AAAA deadbeefdeadbeef\n")
    with pytest.raises(RunnerError, match=r"c\.pub: the key is not 32 bytes"):
        runner_sig.load_trusted_keys(keys_dir)


# --- host: keys, sign, verify ------------------------------------------------------------------

def test_keypair_files(keys):
    key_text = keys["key"].read_text()
    assert key_text.startswith("-----BEGIN PRIVATE KEY-----")
    assert keys["key"].stat().st_mode & 0o777 == 0o600
    algo, b64, key_id = keys["pub"].read_text().split()
    raw = base64.b64decode(b64)
    assert keys["pub"].read_text().endswith("\n") and keys["pub"].read_text().count("\n") == 1
    assert algo == "ed25519" and len(raw) == 32 and key_id == hashlib.sha256(raw).hexdigest()[:16]
    private = serialization.load_pem_private_key(key_text.encode(), password=None)
    assert raw_public(private) == raw
    assert signing.load_public_key(keys["pub"]) == (key_id, raw)
    with pytest.raises(ConfigError, match="already exists; refusing to overwrite"):
        signing.new_keypair(keys["dir"])
    assert keys["key"].read_text() == key_text


def test_sign_round_trip_versions_and_format(keys, tmp_path):
    bundle = make_bundle(tmp_path / "b")
    first = signing.sign_bundle(bundle, keys["key"])
    second = signing.sign_bundle(bundle, keys["key"])
    explicit = signing.sign_bundle(bundle, keys["key"], version=41, channel="beta", expires="2098-05-06T12:00:00+02:00")
    after = signing.sign_bundle(bundle, keys["key"], channel="beta")
    assert (first["channel"], first["version"], first["expires"]) == ("rpi5", 1, None)
    assert second["version"] == 2 and explicit["version"] == 41 and explicit["expires"] == "2098-05-06T10:00:00Z"
    assert after["version"] == 42 and after["channel"] == "beta" and after["expires"] is None
    counter = json.loads((keys["dir"] / "versions.json").read_text())
    assert counter["highest_version"]["rpi5"] >= 2 and counter["highest_version"]["beta"] == 42
    assert after["bundle_sha256"] == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()

    # The contract's formats, checked with cryptography directly: the signature covers the canonical manifest.
    sig = json.loads((bundle / "manifest.sig").read_text())
    assert set(sig) == {"format", "alg", "key_id", "signature"} and sig["format"] == "edgeft-signature/1" and sig["alg"] == "ed25519"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["release"] == {"channel": "beta", "version": 42, "expires": None}
    message = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    Ed25519PublicKey.from_public_bytes(signing.load_public_key(keys["pub"])[1]).verify(base64.b64decode(sig["signature"]), message)
    assert "manifest.sig" not in manifest["files"]

    result = signing.verify_bundle(bundle, [keys["foreign_pub"], keys["pub"]])
    assert (result["key_id"], result["channel"], result["version"], result["files"]) == (sig["key_id"], "beta", 42, 4)
    (bundle / "extra.log").write_text("not in the manifest: ignored")
    assert signing.verify_bundle(bundle, [keys["pub"]])["version"] == 42
    state = signing.signature_state(bundle, [keys["pub"]])
    assert state == {"signed": True, "key_id": sig["key_id"], "channel": "beta", "version": 42, "expires": None, "valid": True, "problem": None}


@pytest.mark.parametrize("rel", BUNDLE_FILES)
def test_flipped_byte_in_a_file_is_named(signed, keys, rel):
    data = bytearray((signed / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (signed / rel).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"sha256 mismatch for {rel}"):
        signing.verify_bundle(signed, [keys["pub"]])


def test_refusals_name_the_reason_in_order(signed, keys, tmp_path):
    pub = [keys["pub"]]
    in_2100 = 4102444800.0
    with pytest.raises(BundleError, match=r"expired on 2099-01-01T00:00:00Z"):
        signing.verify_bundle(signed, pub, now=in_2100)
    with pytest.raises(BundleError, match=r"signed by key [0-9a-f]{16} which is not trusted \(trusted: [0-9a-f]{16}\)"):
        signing.verify_bundle(signed, [keys["foreign_pub"]])
    unsigned = make_bundle(tmp_path / "unsigned")
    with pytest.raises(BundleError, match=r"unsigned bundle \(no manifest\.sig\)"):
        signing.verify_bundle(unsigned, pub)
    assert signing.signature_state(unsigned)["signed"] is False and signing.signature_state(unsigned)["valid"] is None

    # A byte flipped anywhere in manifest.json: refused, naming manifest.json (valid JSON afterwards or not).
    text = (signed / "manifest.json").read_bytes()
    for position in (text.index(b'"rpi5-test"') + 2, text.index(b'"latency_ms_p99": 50') + 18, len(text) // 3, 0):
        (signed / "manifest.json").write_bytes(flip(text, position * 8))
        with pytest.raises(BundleError, match=r"manifest\.json"):
            signing.verify_bundle(signed, pub)
    (signed / "manifest.json").write_bytes(text)
    sig_text = (signed / "manifest.sig").read_text()
    sig = json.loads(sig_text)
    sig["signature"] = base64.b64encode(flip(base64.b64decode(sig["signature"]), 77)).decode()
    (signed / "manifest.sig").write_text(json.dumps(sig))
    with pytest.raises(BundleError, match=r"signature does not match manifest\.json \(edited after signing\?\)"):
        signing.verify_bundle(signed, pub)
    (signed / "manifest.sig").write_text(sig_text)

    # Order: the signature first, then the files, then expiry.
    (signed / "task.json").write_bytes(b"{}")
    with pytest.raises(BundleError, match=r"not trusted"):
        signing.verify_bundle(signed, [keys["foreign_pub"]])
    with pytest.raises(BundleError, match=r"sha256 mismatch for task\.json"):
        signing.verify_bundle(signed, pub, now=in_2100)
    state = signing.signature_state(signed, pub)
    assert (state["signed"], state["valid"], state["version"]) == (True, False, 3) and "task.json" in state["problem"]
    with pytest.raises(BundleError, match=r"cannot sign: sha256 mismatch for task\.json"):
        signing.sign_bundle(signed, keys["key"])
    (signed / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"bundle file missing: model\.onnx"):
        signing.verify_bundle(signed, pub)


def test_bad_sign_inputs(keys, tmp_path):
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(ConfigError, match="already past"):
        signing.sign_bundle(bundle, keys["key"], expires="2001-02-03")
    with pytest.raises(ConfigError, match="release.channel"):
        signing.sign_bundle(bundle, keys["key"], channel="two words")
    with pytest.raises(ConfigError, match="is a public key"):
        signing.sign_bundle(bundle, keys["pub"])
    assert not (bundle / "manifest.sig").exists() and "release" not in json.loads((bundle / "manifest.json").read_text())


# --- the command line ---------------------------------------------------------------------------

def test_cli_keys_sign_verify_and_budget_tamper(tmp_path):
    made = edgeft("keys", "new", "--out", tmp_path / "k", "--json")
    assert made.returncode == 0, made.stderr
    key_id = json.loads(made.stdout)["key_id"]
    assert (tmp_path / "k" / "edgeft.pub").read_text().split()[2] == key_id
    one_line_error(edgeft("keys", "new", "--out", tmp_path / "k"), "edgeft.key already exists")

    bundle = make_bundle(tmp_path / "bundle")
    signed = edgeft("sign", bundle, "--key", tmp_path / "k" / "edgeft.key", "--expires", "2099-12-31", "--json")
    assert signed.returncode == 0, signed.stderr
    assert json.loads(signed.stdout) | {"bundle_sha256": None} == {
        "bundle": str(bundle), "bundle_sha256": None, "key_id": key_id, "channel": "rpi5", "version": 1, "expires": "2099-12-31T00:00:00Z"}
    ok = edgeft("verify", bundle, "--pubkey", tmp_path / "k" / "edgeft.pub", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True and json.loads(ok.stdout)["version"] == 1, ok.stderr

    # Raise a budget in the signed manifest: the edit the signature exists to catch.
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["profile"]["budgets"]["latency_ms_p99"] = 500
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    one_line_error(edgeft("verify", bundle, "--pubkey", tmp_path / "k" / "edgeft.pub"), "signature does not match manifest.json")
    refused = edgeft("verify", bundle, "--pubkey", tmp_path / "k" / "edgeft.pub", "--json")
    assert refused.returncode == 2 and json.loads(refused.stdout)["ok"] is False and "manifest.json" in json.loads(refused.stdout)["problem"]


def test_cli_malformed_key_and_signature_files(signed, keys, tmp_path):
    bad_pub = tmp_path / "bad.pub"
    bad_pub.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB user@host\n")
    one_line_error(edgeft("verify", signed, "--pubkey", bad_pub), "bad.pub: not an edgeft public key")
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    one_line_error(edgeft("sign", signed, "--key", bad_key), "bad.key: not a PEM private key")
    one_line_error(edgeft("sign", signed, "--key", tmp_path / "missing.key"), "signing key not found")
    for text, needle in (("{", "unreadable signature file"), ('{"format": "x"}', "not an edgeft-signature/1"),
                         ('{"format": "edgeft-signature/1", "alg": "ed25519", "key_id": "0123456789abcdef", "signature": "AAAA"}', "64 bytes")):
        (signed / "manifest.sig").write_text(text)
        one_line_error(edgeft("verify", signed, "--pubkey", keys["pub"]), "manifest.sig", needle)


def test_cli_measure_checks_the_signature_before_the_device(signed, keys, tmp_path):
    """--pubkey refuses a foreign-signed bundle before any device work; an unsigned bundle measured
    without --pubkey gets one warning line (here followed by the lab file error: no device is touched)."""
    one_line_error(edgeft("measure", signed, "--pubkey", keys["foreign_pub"], "--device", "nosuch", "--lab", tmp_path / "none.yaml"),
                   "which is not trusted")
    unsigned = make_bundle(tmp_path / "unsigned")
    result = edgeft("measure", unsigned, "--device", "nosuch", "--lab", tmp_path / "none.yaml")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 2, result.stderr
    assert lines[0].startswith("warning:") and "unsigned" in lines[0] and "not tamper-proof" in lines[0]
    assert lines[1].startswith("error:") and "none.yaml" in lines[1]
    quiet = edgeft("measure", signed, "--device", "nosuch", "--lab", tmp_path / "none.yaml")
    assert "warning" not in quiet.stderr and quiet.returncode == 2
