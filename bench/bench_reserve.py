"""What reserving a device costs a run, over a real loopback sshd (tests/sshd.py).

Median of N round trips each:
  bare exec      a bare paramiko exec of `true` on an open connection (the floor of any device command)
  connect+exec   a fresh paramiko connection + exec of `true` (what even an unreserved run pays)
  reserve        `with reserve(...)`: connect, take the device lock (one run of the lock script with the
                 device's python), start the renewer, release (a second script run), close
and the ratios. Reservation overhead = reserve - connect+exec: what reservation adds per run.

Usage: .venv/bin/python bench/bench_reserve.py [-n 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import paramiko

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sshd import start_lab  # noqa: E402  (a real sshd on loopback, as in the tests)

from edgeft.config import load_lab  # noqa: E402
from edgeft.device.reserve import reserve  # noqa: E402


def _connect(device) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_system_host_keys(str(device.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(device.host, port=device.port, username=device.user, key_filename=str(device.key_file),
                   allow_agent=False, look_for_keys=False)
    return client


def _exec_true(client: paramiko.SSHClient) -> None:
    _, stdout, _ = client.exec_command("true")
    assert stdout.channel.recv_exit_status() == 0


def _interleaved_medians_ms(fns: dict, n: int) -> dict[str, float]:
    """Median ms of each function, run round-robin so a shared machine's load hits them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20, help="round trips per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, start_lab(Path(tmp), 1) as lab:
        device = load_lab(lab.lab_path).device("dev-0")
        client = _connect(device)

        def connect_exec() -> None:
            c = _connect(device)
            try:
                _exec_true(c)
            finally:
                c.close()

        def reserve_release() -> None:
            with reserve("dev-0", lab_path=lab.lab_path, log=lambda m: None):
                pass

        try:
            ms = _interleaved_medians_ms({"bare": lambda: _exec_true(client), "fresh": connect_exec,
                                          "reserved": reserve_release}, args.n)
        finally:
            client.close()
    bare, fresh, reserved = ms["bare"], ms["fresh"], ms["reserved"]
    print(f"loopback sshd, median of {args.n} round trips each, interleaved")
    print(f"  bare paramiko exec of `true`      {bare:8.1f} ms")
    print(f"  connect + exec of `true`          {fresh:8.1f} ms")
    print(f"  reserve + release (with connect)  {reserved:8.1f} ms")
    print(f"  reserve / bare exec               {reserved / bare:8.1f}x")
    print(f"  reserve / connect + exec          {reserved / fresh:8.1f}x")
    print(f"  reservation overhead per run      {reserved - fresh:8.1f} ms")


if __name__ == "__main__":
    main()
