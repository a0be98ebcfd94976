"""What flashing's transfer costs against `scp -r`, over real sshds on loopback (tests/sshd.py).

A bundle-like directory (one big model file, a tokenizer, small JSON files; ~200 MB by default) goes
to the device, round-robin so a shared machine's load hits every method alike:
  scp -r        OpenSSH's scp of the directory (same user key, same sshd, its default cipher)
  scp+verify    the same, then `sha256sum` + `sync` of the files on the device (what store/* also do)
  store/sftp    edgeft.flash.transfer.send_to_store into a fresh root: SFTP writes, then sha256 + rename
                of every file on the device (scp does not verify anything)
  store/exec    the same against an sshd without an sftp subsystem (the exec-channel path)
and prints throughput ratios vs scp (median, min-max over the rounds), the bytes a re-send of the
unchanged set puts on the wire (goal 0) and its time. --ablation adds store/sftp with paramiko's
defaults (aes128-ctr + HMAC, 32 KiB SFTP writes) to show what the cipher and request size buy.

Usage: .venv/bin/python bench/bench_flash.py [--mb 200] [--rounds 3] [--ablation]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sshd import SshdInfo, start_sshd  # noqa: E402  (a real sshd on loopback, as in the tests)

from edgeft.device import ssh as ssh_module  # noqa: E402
from edgeft.device.ssh import SshTransport  # noqa: E402
from edgeft.flash.transfer import send_to_store  # noqa: E402

MB = 1_000_000


def make_bundle(folder: Path, total_mb: int) -> list[tuple[str, Path]]:
    """A directory shaped like a bundle: the model is nearly all of it. Returns (sha256, path) per file."""
    folder.mkdir(parents=True)
    sizes = {"model.onnx": total_mb * MB - 2_100_000, "tokenizer.json": 2_000_000, "config.json": 2_000,
             "generation_config.json": 300, "golden.json": 90_000, "manifest.json": 7_700}
    files = []
    for name, size in sizes.items():
        path = folder / name
        digest = hashlib.sha256()
        with open(path, "wb") as f:
            left = size
            while left:
                block = os.urandom(min(left, 8 << 20))
                f.write(block)
                digest.update(block)
                left -= len(block)
        files.append((digest.hexdigest(), path))
    return files


def scp_cipher(info: SshdInfo) -> str:
    """The cipher OpenSSH's client negotiates with this sshd (what scp uses)."""
    out = subprocess.run(
        ["ssh", "-v", "-i", str(info.user_key), "-o", f"UserKnownHostsFile={info.known_hosts}", "-o", "BatchMode=yes",
         "-p", str(info.port), f"{info.user}@{info.host}", "true"], capture_output=True, text=True,
    ).stderr
    line = next((ln for ln in out.splitlines() if "kex: client->server cipher:" in ln), "")
    return line.split("cipher:")[1].split()[0] if line else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200, help="size of the bundle-like directory (MB)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--ablation", action="store_true", help="also time store/sftp with paramiko's defaults")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgeft-bench-flash-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        files = make_bundle(tmp / "bundle", args.mb)
        payload = sum(p.stat().st_size for _, p in files)
        with_sftp = stack.enter_context(start_sshd(tmp / "sshd"))
        without_sftp = stack.enter_context(start_sshd(tmp / "sshd-nosftp", sftp=False))
        sftp_t = stack.enter_context(SshTransport(with_sftp.device(workdir=str(tmp / "wd")), lab_file=with_sftp.lab_path))
        exec_t = stack.enter_context(SshTransport(without_sftp.device(workdir=str(tmp / "wd-x")), lab_file=without_sftp.lab_path))
        print(f"payload {payload / MB:.0f} MB in {len(files)} files; scp cipher {scp_cipher(with_sftp)}, "
              f"edgeft cipher {sftp_t._client.get_transport().remote_cipher}")  # type: ignore[union-attr]

        dest = tmp / "dest"

        def fresh() -> Path:
            shutil.rmtree(dest, ignore_errors=True)
            return dest

        def scp() -> None:
            subprocess.run(
                ["scp", "-q", "-r", "-i", str(with_sftp.user_key), "-o", f"UserKnownHostsFile={with_sftp.known_hosts}",
                 "-o", "BatchMode=yes", "-P", str(with_sftp.port), str(tmp / "bundle"),
                 f"{with_sftp.user}@{with_sftp.host}:{fresh()}"], check=True,
            )

        def scp_verify() -> None:
            scp()
            subprocess.run(
                ["ssh", "-i", str(with_sftp.user_key), "-o", f"UserKnownHostsFile={with_sftp.known_hosts}",
                 "-o", "BatchMode=yes", "-p", str(with_sftp.port), f"{with_sftp.user}@{with_sftp.host}",
                 f"cd {shlex.quote(str(dest))} && sha256sum -- * > /dev/null && sync -- *"], check=True,
            )

        def store(transport: SshTransport) -> Callable[[], None]:
            def run() -> None:
                stats = send_to_store(transport, str(fresh()), files)
                assert stats.bytes_sent == payload and stats.files_sent == len(files), stats
            return run

        def store_paramiko_defaults() -> None:
            saved = ssh_module.FAST_CIPHERS, ssh_module.SFTP_WRITE_MAX
            ssh_module.FAST_CIPHERS, ssh_module.SFTP_WRITE_MAX = (), ssh_module.SFTP_WRITE_DEFAULT
            try:
                with SshTransport(with_sftp.device(workdir=str(tmp / "wd")), lab_file=with_sftp.lab_path) as t:
                    store(t)()
            finally:
                ssh_module.FAST_CIPHERS, ssh_module.SFTP_WRITE_MAX = saved

        methods: dict[str, Callable[[], None]] = {"scp -r": scp, "scp+verify": scp_verify, "store/sftp": store(sftp_t),
                                                  "store/exec": store(exec_t)}
        if args.ablation:
            methods["store/sftp paramiko defaults"] = store_paramiko_defaults
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, fn in methods.items():
                started = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - started)
        print(f"{'method':30s} {'MB/s median':>12s} {'min-max':>14s}   vs scp (median, min-max)")
        scp_rates = [payload / MB / s for s in seconds["scp -r"]]
        for name, times in seconds.items():
            rates = [payload / MB / s for s in times]
            ratios = [r / q for r, q in zip(rates, scp_rates)]
            print(f"{name:30s} {statistics.median(rates):12.0f} {min(rates):6.0f}-{max(rates):<7.0f}   "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")

        # The re-send of an unchanged set: into the same root, twice (one to fill it, one to measure).
        root = str(tmp / "kept")
        send_to_store(sftp_t, root, files)
        started = time.perf_counter()
        again = send_to_store(sftp_t, root, files)
        took = time.perf_counter() - started
        print(f"re-send of the unchanged set: {again.bytes_sent} payload bytes sent (goal 0), "
              f"{again.files_present}/{again.files_total} files already there, {took:.2f} s")


if __name__ == "__main__":
    main()
