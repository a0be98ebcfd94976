"""`edgeft doctor` on real machine states: this venv, a venv without an optional package, lab devices
that answer and one that does not."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import onnxruntime
import yaml

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"python", "torch", "numpy", "transformers", "peft", "bitsandbytes", "onnx", "onnxruntime", "paramiko", "cache"}


def _doctor(python: str, *args, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict | None]:
    result = subprocess.run([python, "-m", "edgeft.cli", "doctor", *map(str, args)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env={**os.environ, **(env or {})})
    try:
        return result, json.loads(result.stdout)
    except ValueError:
        return result, None


def _by_name(result: dict) -> dict[str, dict]:
    return {c["name"]: c for c in result["checks"]}


def test_this_venv_has_everything_required():
    result, report = _doctor(sys.executable, "--json")
    assert result.returncode == 0, result.stderr
    checks = _by_name(report)
    assert report["ok"] is True
    assert REQUIRED <= set(checks)
    for name in REQUIRED:
        assert checks[name]["required"] and checks[name]["status"] in ("ok", "warn"), checks[name]
    import torch

    assert checks["torch"]["detail"].startswith(torch.__version__)
    assert ("CUDA" in checks["torch"]["detail"]) == (torch.version.cuda is not None)
    for name in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert", "tensorrt"):
        assert checks[name]["required"] is False  # the LiteRT extra and TensorRT are optional
    assert checks["ai-edge-litert"]["status"] == "ok"  # this venv has the tflite extra


def test_venv_without_an_optional_package(tmp_path):
    """A real venv whose site-packages has everything of this one's except ai-edge-litert."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    source = Path(sysconfig.get_paths()["purelib"])
    python = venv / "bin" / "python"
    target = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    for entry in source.iterdir():
        if entry.name == "ai_edge_litert" or entry.name.startswith("ai_edge_litert-"):
            continue
        (target / entry.name).symlink_to(entry)
    result, report = _doctor(str(python), "--json")
    assert result.returncode == 0, result.stderr  # optional: still fine to build ONNX targets
    checks = _by_name(report)
    litert = checks["ai-edge-litert"]
    assert litert["status"] == "missing" and litert["required"] is False
    assert litert["fix"].startswith('pip install -e ".[tflite]" torch==')
    assert checks["litert-torch"]["status"] == "ok" and checks["onnxruntime"]["status"] == "ok"
    text = subprocess.run([python, "-m", "edgeft.cli", "doctor"], capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "COLUMNS": "200"})
    line = next(line for line in text.stderr.splitlines() if "ai-edge-litert" in line)
    assert line.startswith("missing") and "(optional)" in line
    assert 'fix: pip install -e ".[tflite]"' in text.stderr


def test_unreachable_device_fails(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump({"devices": [{"name": "gone-1", "host": "127.0.0.1", "port": port, "user": "nobody", "target": "rpi5"}]}))
    result, report = _doctor(sys.executable, "--device", "gone-1", "--lab", lab, "--json")
    assert result.returncode == 1, result.stderr
    assert report["ok"] is False
    device = _by_name(report)["device gone-1"]
    assert device["status"] == "missing" and device["required"] is True
    assert str(port) in device["detail"] and "edgeft lab check gone-1" in device["fix"]
    assert all(c["status"] != "missing" or not c["required"] for c in report["checks"] if c["name"] != "device gone-1")


def test_reachable_device_and_its_key(sshd, tmp_path):
    """The sshd loopback device, once as a target of this machine's arch (healthy), once as an rpi5 (wrong arch)."""
    host_target = tmp_path / "host.yaml"
    host_target.write_text(yaml.safe_dump({"arch": platform.machine(), "runtime": "onnxruntime", "default_profile": "arm-int8"}))
    data = yaml.safe_load(sshd.lab_path.read_text())
    data["devices"].append({**data["devices"][0], "name": "host-0", "target": str(host_target)})
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump(data))

    result, report = _doctor(sys.executable, "--device", "host-0", "--lab", lab, "--json")
    assert result.returncode == 0, result.stdout
    checks = _by_name(report)
    device = checks["device host-0"]
    assert device["status"] in ("ok", "warn") and f"onnxruntime {onnxruntime.__version__}" in device["detail"], device
    assert checks["ssh key"]["status"] == "ok" and str(sshd.user_key) in checks["ssh key"]["detail"]

    result, report = _doctor(sys.executable, "--device", sshd.device_name, "--lab", lab, "--json")
    assert result.returncode == 1
    device = _by_name(report)[f"device {sshd.device_name}"]
    assert device["status"] == "missing" and f"arch {platform.machine()} is not target rpi5's aarch64" in device["detail"]


def test_unknown_device_is_bad_input(sshd):
    result, _ = _doctor(sys.executable, "--device", "no-such-board", "--lab", sshd.lab_path)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")][0].count("no-such-board") == 1
