"""The field kit: a folder an engineer copies onto a gateway with no host connection and installs with one command.

    DIR/bundle/        the signed bundle: manifest.json, manifest.sig and the files the manifest lists
    DIR/edgeft.pub     the public key the bundle was verified with (the device is told to trust it)
    DIR/runner.pyz     the runner (edgeft.runner_app), which installs: verify, smoke test, switch, roll back
    DIR/install.sh     `sh install.sh`: trust the key, then `runner.pyz install --root ROOT --bundle bundle`
    DIR/SHA256SUMS     every file of the kit, for a copy damaged on the way (USB stick, scp)
    DIR/README.txt     what the kit holds and how to install it

The bundle is verified on the host before anything is written, and the device verifies it again (signature,
every hash) before installing: the kit adds no trust of its own. DIR appears whole or not at all.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from edgeft_runner.signature import SIGNATURE_FILE

from ..artifact import atomic_dir, sha256_file, write_atomic
from ..errors import BundleError, ConfigError
from ..runner_app import build_runner_zipapp
from .signing import verify_bundle

__all__ = ["DEFAULT_ROOT", "KIT_BUNDLE_DIR", "install_script", "write_kit"]

DEFAULT_ROOT = "/var/lib/edgeft"
KIT_BUNDLE_DIR = "bundle"
KIT_PUBKEY = "edgeft.pub"
KIT_RUNNER = "runner.pyz"
KIT_INSTALL = "install.sh"
KIT_SUMS = "SHA256SUMS"
KIT_README = "README.txt"

# One file, run by `sh install.sh` from anywhere (it works in its own folder). Exit status: the runner's
# (0 installed or already current, 1 the smoke test or health check failed and the previous version runs,
# 2 refused: nothing installed).
INSTALL_SH = """\
#!/bin/sh
# edgeft field kit: installs {bundle_name} (channel {channel}, version {version}) into {root}.
# Usage: sh install.sh [--allow-downgrade]   (EDGEFT_ROOT / EDGEFT_PYTHON override the root and python)
set -u
ROOT={root_q}
PYTHON={python_q}
[ -n "${{EDGEFT_ROOT:-}}" ] && ROOT=$EDGEFT_ROOT
[ -n "${{EDGEFT_PYTHON:-}}" ] && PYTHON=$EDGEFT_PYTHON
cd "$(dirname "$0")" || exit 2
# A kit damaged on the way fails here, naming the file; the runner checks the signature and hashes anyway.
if command -v sha256sum >/dev/null 2>&1; then
    if ! sums=$(sha256sum -c {sums_q} 2>&1); then
        printf '%s\\n' "$sums" | grep -v ': OK$' >&2
        echo "install.sh: the kit is damaged (SHA256SUMS); copy it again. Nothing was installed." >&2
        exit 2
    fi
else
    echo "install.sh: no sha256sum here to check the copy; the runner still checks the signature and every hash." >&2
fi
"$PYTHON" {runner_q} trust-key --root "$ROOT" {pubkey_q} || {{ echo "install.sh: could not trust {pubkey_name} under $ROOT; nothing was installed." >&2; exit 2; }}
"$PYTHON" {runner_q} install --root "$ROOT" --bundle {bundle_q} "$@"
status=$?
case $status in
    0) echo "install.sh: done: $ROOT/current holds the bundle (see: $PYTHON {runner_name} status --root $ROOT)." >&2 ;;
    1) echo "install.sh: the new bundle failed its smoke test or health check; the previous version still runs." >&2 ;;
    *) echo "install.sh: refused (exit $status); nothing was installed." >&2 ;;
esac
exit $status
"""


def install_script(root: str, python: str, release: dict[str, Any], bundle_sha: str) -> str:
    """The kit's install.sh: every value single-quoted for sh (shlex.quote), so any root or python path works."""
    return INSTALL_SH.format(
        bundle_name=bundle_sha[:16], channel=release.get("channel"), version=release.get("version"),
        root=root.replace("\n", " "), root_q=shlex.quote(root), python_q=shlex.quote(python),
        sums_q=shlex.quote(KIT_SUMS), runner_q=shlex.quote(KIT_RUNNER), runner_name=KIT_RUNNER,
        pubkey_q=shlex.quote(KIT_PUBKEY), pubkey_name=KIT_PUBKEY, bundle_q=shlex.quote(KIT_BUNDLE_DIR))


def _readme(verified: dict[str, Any], root: str, kit_bytes: int) -> str:
    expires = verified["expires"] or "never"
    lines = [
        f"edgeft field kit: model bundle {verified['bundle_sha256'][:16]}, channel {verified['channel']}, "
        f"version {verified['version']}, expires {expires}",
        f"Signed with key {verified['key_id']} (edgeft.pub here); {verified['files']} bundle files, {kit_bytes / 1e6:.1f} MB in all.",
        "Install: copy this whole folder onto the gateway, then run as the user that owns the install root:",
        "    sh install.sh",
        f"It trusts edgeft.pub, then verifies the signature and every hash, smoke-tests the model in the spare slot,"
        f" and switches {root}/current.",
        "Exit 0: installed (or already current). 1: the smoke test failed, the previous version still runs."
        " 2: refused, nothing installed.",
        "Older version than the one installed on this channel? It is refused; `sh install.sh --allow-downgrade` forces it.",
        "Another root or python: EDGEFT_ROOT=/data/edgeft EDGEFT_PYTHON=/opt/venv/bin/python sh install.sh",
        f"Status: python3 runner.pyz status --root {shlex.quote(root)}; back to the previous version: "
        f"python3 runner.pyz rollback --root {shlex.quote(root)}",
        "Check the copy by hand: sha256sum -c SHA256SUMS   (install.sh does this first when sha256sum exists).",
    ]
    return "\n".join(lines) + "\n"


def _looks_like_kit(path: Path) -> bool:
    return (path / KIT_SUMS).is_file() and (path / KIT_INSTALL).is_file()


def _copy_synced(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())  # the kit's rename into place must not point at bytes still in the page cache


def write_kit(bundle_dir: Path, out_dir: Path, pubkey: Path, *, root: str = DEFAULT_ROOT, python: str = "python3",
              progress: Any = None) -> dict[str, Any]:
    """Verify `bundle_dir` with `pubkey`, then write the field kit to `out_dir` (complete, or absent on any
    error; an earlier kit there is replaced, any other existing folder is refused). `root`: the install root on
    the gateway (absolute); `python`: the interpreter install.sh runs the runner with (needs numpy and the
    bundle's runtime). `progress`: a rich Progress, optional. Returns {kit, bundle_sha256, channel, version,
    expires, key_id, root, python, files, bytes, runner_sha256}."""
    bundle_dir, out_dir, pubkey = Path(bundle_dir), Path(out_dir), Path(pubkey)
    if not root.startswith("/"):
        raise ConfigError(f"--root {root!r} must be an absolute path on the gateway (e.g. {DEFAULT_ROOT})")
    if not python.strip():
        raise ConfigError("--python must name the gateway's interpreter (e.g. python3 or /opt/venv/bin/python)")
    if out_dir.exists() and not (out_dir.is_dir() and (_looks_like_kit(out_dir) or not any(out_dir.iterdir()))):
        raise ConfigError(f"{out_dir} exists and is not an edgeft field kit; choose another -o (a kit there is replaced whole)")
    if out_dir.resolve() == bundle_dir.resolve() or bundle_dir.resolve() in out_dir.resolve().parents:
        raise ConfigError(f"-o {out_dir} is inside the bundle {bundle_dir}; write the kit somewhere else")
    verified = verify_bundle(bundle_dir, [pubkey])  # first: a refused bundle never becomes a kit
    manifest = verified.pop("manifest")
    names = sorted(manifest["files"]) + ["manifest.json", SIGNATURE_FILE]
    for rel in names:
        if any(c in rel for c in "\n\r\\"):  # SHA256SUMS lines could not name it unambiguously
            raise BundleError(f"{bundle_dir}: file name {rel!r} has a newline or backslash; rename it and rebuild the bundle")
    task = progress.add_task("writing the field kit", total=len(names) + 2) if progress is not None else None
    with atomic_dir(out_dir) as tmp:
        for rel in names:
            _copy_synced(bundle_dir / rel, tmp / KIT_BUNDLE_DIR / rel)
            if task is not None:
                progress.advance(task)
        # The bundle was verified above; check the copies too, so a file changed meanwhile never ships.
        for rel, sha in manifest["files"].items():
            if sha256_file(tmp / KIT_BUNDLE_DIR / rel) != sha:
                raise BundleError(f"{bundle_dir / rel} changed while the kit was written; run `edgeft kit` again")
        shutil.copyfile(pubkey, tmp / KIT_PUBKEY)
        runner_sha = build_runner_zipapp(tmp / KIT_RUNNER)
        install = tmp / KIT_INSTALL
        write_atomic(install, install_script(root, python, verified, verified["bundle_sha256"]))
        install.chmod(0o755)
        if task is not None:
            progress.advance(task)
        kit_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        write_atomic(tmp / KIT_README, _readme(verified, root, kit_bytes))
        sums = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_atomic(tmp / KIT_SUMS, "".join(f"{sha}  {rel}\n" for rel, sha in sums.items()))
        if task is not None:
            progress.advance(task)
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return {"kit": str(out_dir), **{k: verified[k] for k in ("bundle_sha256", "channel", "version", "expires", "key_id")},
            "root": root, "python": python, "files": len(sums) + 1, "bytes": total, "runner_sha256": runner_sha}
