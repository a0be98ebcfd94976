"""`edgeft doctor`: is this host (and, with --device, a lab device) ready to build and measure?

One check per thing edgeft needs: the Python, the torch build (CPU or CUDA), the packages of the
pipeline, the optional LiteRT and TensorRT toolchains, an SSH key for lab devices, the build cache
and its free space. Each says ok, warn or missing, what is wrong and the command that fixes it.
Packages are looked up by their import spec and installed metadata, not imported (peft or
litert_torch take seconds to import); torch alone is imported, for its CUDA build and devices.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .artifact import cache_root

MIN_PYTHON = (3, 10)
MIN_CACHE_FREE_GB = 5.0  # a fine-tune of a ~1B model with its merged, exported and quantized stages
OK, WARN, MISSING = "ok", "warn", "missing"


@dataclass(frozen=True)
class Package:
    """A package edgeft imports: its import name, its distribution name, and why it is needed."""

    module: str
    dist: str
    role: str
    required: bool
    extra: str | None = None  # the pyproject extra that installs it


PACKAGES = (
    Package("numpy", "numpy", "tensors and the runner", True),
    Package("transformers", "transformers", "loading and fine-tuning the model", True),
    Package("peft", "peft", "LoRA/QLoRA adapters", True),
    Package("bitsandbytes", "bitsandbytes", "4-bit QLoRA fine-tuning", True),
    Package("onnx", "onnx", "ONNX export", True),
    Package("onnxruntime", "onnxruntime", "ONNX quantization and local measurement", True),
    Package("paramiko", "paramiko", "SSH to lab devices", True),
    Package("litert_torch", "litert-torch", "LiteRT (TFLite) conversion", False, "tflite"),
    Package("ai_edge_quantizer", "ai-edge-quantizer", "LiteRT quantization", False, "tflite"),
    Package("ai_edge_litert", "ai-edge-litert", "LiteRT runtime, to measure tflite bundles here", False, "tflite"),
    Package("tensorrt", "tensorrt", "TensorRT engines for Jetson targets measured on this host", False),
)


@dataclass
class Check:
    name: str
    status: str  # ok | warn | missing
    required: bool
    detail: str
    fix: str | None = None

    @property
    def blocking(self) -> bool:
        return self.required and self.status == MISSING


def host_checks(lab_path: Path | None = None) -> list[Check]:
    """Every check of this host, in the order they print."""
    torch_check, torch_version = _torch()
    checks = [_python(), torch_check]
    checks += [_package(p, torch_version) for p in PACKAGES]
    checks += [_ssh_key(lab_path), _cache()]
    return checks


def device_check(name: str, lab_path: Path | None, trust_new_host_key: bool = False) -> Check:
    """The device as `edgeft lab check` probes it (reachable, python with numpy and the runtime, disk, arch)."""
    from .config import load_lab
    from .lab import probe

    lab = load_lab(lab_path)
    result = probe(lab.device(name), lab, trust_new_host_key)
    if result["problems"]:
        return Check(f"device {name}", MISSING, True, "; ".join(result["problems"]),
                     f"fix the above, then: edgeft lab check {name}" + (f" --lab {lab_path}" if lab_path else ""))
    facts = result["facts"]
    runtime = facts.get("runtime") or {}
    detail = (f"{facts['arch']}, python {facts['python']}, numpy {facts.get('numpy')}, "
              f"{runtime.get('name')} {runtime.get('version', '-')}, {facts['free_mb']} MB free")
    if result["warnings"]:
        return Check(f"device {name}", WARN, True, f"{detail}; " + "; ".join(result["warnings"]))
    return Check(f"device {name}", OK, True, detail)


def doctor(device: str | None = None, lab_path: Path | None = None, trust_new_host_key: bool = False) -> dict[str, Any]:
    """{"ok": nothing required is missing, "checks": [...]}."""
    checks = host_checks(lab_path)
    if device:
        checks.append(device_check(device, lab_path, trust_new_host_key))
    return {"ok": not any(c.blocking for c in checks), "checks": [asdict(c) for c in checks]}


# ------------------------------------------------------------------------------------------ checks
def _python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("python", MISSING, True, f"{version} at {sys.executable}; edgeft needs >= {'.'.join(map(str, MIN_PYTHON))}",
                     "python3.11 -m venv .venv && .venv/bin/pip install -e .")
    return Check("python", OK, True, f"{version} ({sys.executable})")


def _torch() -> tuple[Check, str | None]:
    version = _version("torch")
    if importlib.util.find_spec("torch") is None or version is None:
        return Check("torch", MISSING, True, "not installed (fine-tuning, export)",
                     "pip install torch --index-url https://download.pytorch.org/whl/cpu  # or the CUDA build for your GPU"), None
    try:
        import torch
    except Exception as exc:  # a broken build (e.g. a CUDA library that does not load)
        return Check("torch", MISSING, True, f"{version} does not import: {_first_line(exc)}", f"pip install --force-reinstall torch=={version}"), version
    if torch.version.cuda is None:
        return Check("torch", OK, True, f"{version}, CPU build (training runs on the CPU)"), version
    if not torch.cuda.is_available():
        return Check("torch", WARN, True, f"{version}, CUDA {torch.version.cuda} build, but no usable GPU (driver or device missing): training runs on the CPU",
                     "nvidia-smi  # check the driver sees the GPU"), version
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return Check("torch", OK, True, f"{version}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {', '.join(names)}"), version


def _package(package: Package, torch_version: str | None) -> Check:
    version = _version(package.dist)
    if importlib.util.find_spec(package.module) is not None and version is not None:
        return Check(package.dist, OK, package.required, f"{version} ({package.role})")
    # Keeps pip from swapping the torch build; the public version (2.13.0 of 2.13.0+cpu) matches the local one.
    pin = f" torch=={torch_version.split('+')[0]}" if torch_version else ""
    if package.extra:
        fix = f'pip install -e ".[{package.extra}]"{pin}'
    elif package.required:
        fix = f"pip install -e .{pin}"
    else:
        fix = f"pip install {package.dist}{pin}  # needs an NVIDIA GPU host; Jetson bundles can be measured on the device instead"
    return Check(package.dist, MISSING, package.required, f"not installed ({package.role})", fix)


def _ssh_key(lab_path: Path | None) -> Check:
    keys = sorted(p for p in (Path.home() / ".ssh").glob("id_*") if p.suffix != ".pub")
    if lab_path is not None:
        from .config import load_lab

        configured = {d.key_file for d in load_lab(lab_path).devices if d.key_file is not None}
        absent = sorted(str(k) for k in configured if not Path(k).is_file())
        if absent:
            return Check("ssh key", MISSING, False, f"the lab's key_file does not exist: {', '.join(absent)}",
                         f"ssh-keygen -t ed25519 -N '' -f {absent[0]}  # then authorise its .pub on the device")
        keys += sorted(Path(k) for k in configured)
    if keys:
        return Check("ssh key", OK, False, ", ".join(map(str, keys)))
    agent = " (an ssh-agent is running: its keys are used)" if os.environ.get("SSH_AUTH_SOCK") else ""
    return Check("ssh key", WARN, False, f"no ~/.ssh/id_* key and no lab key_file{agent}; lab devices need one",
                 "ssh-keygen -t ed25519 -N '' -f ~/.ssh/id_ed25519 && ssh-copy-id -i ~/.ssh/id_ed25519 USER@DEVICE")


def _cache() -> Check:
    root = cache_root()
    existing = next(p for p in (root, *root.parents) if p.exists())  # the cache is created on first use
    if not os.access(existing, os.W_OK):
        return Check("cache", MISSING, True, f"{root}: {existing} is not writable",
                     f"export EDGEFT_CACHE=/a/writable/dir  # or: sudo chown -R $USER {existing}")
    free_gb = shutil.disk_usage(existing).free / 2**30
    detail = f"{root}, {free_gb:.1f} GB free"
    if free_gb < MIN_CACHE_FREE_GB:
        return Check("cache", WARN, True, f"{detail} (a real model's stages need ~{MIN_CACHE_FREE_GB:g} GB)",
                     "export EDGEFT_CACHE=/a/bigger/disk  # or free space there")
    return Check("cache", OK, True, detail)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
