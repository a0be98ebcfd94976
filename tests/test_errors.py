"""Every user mistake: one clear line on stderr, exit 2, no traceback, no bundle left behind."""

from __future__ import annotations

import shutil
import socket

import pytest


def _one_line_error(result, *needles: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _write(path, text):
    path.write_text(text)
    return path


def test_unknown_target_lists_known(run_edgeft, tmp_path):
    result = run_edgeft("build", "--target", "nope", "--out", tmp_path / "b")
    _one_line_error(result, "unknown target 'nope'", "rpi5", "jetson-orin")
    assert not (tmp_path / "b").exists()


def test_malformed_yaml_names_file_and_line(run_edgeft, tmp_path):
    target = _write(tmp_path / "bad.yaml", "arch: aarch64\nruntime: onnxruntime\ndefault_profile: [arm-int8\nthreads: 2\n")
    _one_line_error(run_edgeft("build", "--target", target), f"{target}:", "malformed YAML")


def test_invalid_field_names_file_line_and_field(run_edgeft, tmp_path):
    target = _write(tmp_path / "t.yaml", "arch: aarch64\nruntime: onnxruntime\ndefault_profile: arm-int8\nthreads: -3\n")
    _one_line_error(run_edgeft("build", "--target", target), f"{target}:4:", "'threads'")
    target = _write(tmp_path / "t2.yaml", "arch: sparc\nruntime: onnxruntime\ndefault_profile: arm-int8\n")
    _one_line_error(run_edgeft("build", "--target", target), f"{target}:1:", "'arch'")


def test_bad_profile_stage_config_and_unknown_stage(run_edgeft, tmp_path):
    profile = _write(tmp_path / "p.yaml", "stages:\n  - finetune: {r: 0}\n  - merge: {}\n")
    _one_line_error(run_edgeft("build", "-t", "rpi5", "-p", profile), "stages[0]", "finetune", "'r'")
    profile = _write(tmp_path / "p2.yaml", "stages:\n  - finetune: {}\n  - squash: {}\n")
    _one_line_error(run_edgeft("build", "-t", "rpi5", "-p", profile), "unknown stage 'squash'", "finetune, merge, export, quantize")


def test_tensorrt_missing_on_the_measuring_device_is_one_line(run_edgeft):
    # The Jetson bundle builds here; measuring it on this machine (no TensorRT) stops in one line.
    _one_line_error(run_edgeft("build", "--target", "jetson-orin"), "tensorrt Python module not found", "python3-libnvinfer")


def test_missing_model_dir(run_edgeft, tmp_path):
    _one_line_error(run_edgeft("build", "-t", "rpi5", "--model", tmp_path / "no-such-model"), "no-such-model", "model directory not found")


def test_dataset_line_without_fields(run_edgeft, tmp_path):
    data = _write(tmp_path / "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    _one_line_error(run_edgeft("build", "-t", "rpi5", "--data", data), f"{data}:2:", "completion")
    data = _write(tmp_path / "e.jsonl", '{"prompt": "a", "completion": "b"}\nnot json\n')
    _one_line_error(run_edgeft("build", "-t", "rpi5", "--data", data), f"{data}:2:", "not valid JSON")


def test_unknown_device_in_lab(run_edgeft, sshd, tmp_path):
    _one_line_error(run_edgeft("build", "-t", "rpi5", "--device", "ghost", "--lab", sshd.lab_path), "no device named 'ghost'", sshd.device_name)


def _lab(sshd, tmp_path, **changes):
    import yaml

    lab = yaml.safe_load(sshd.lab_path.read_text())
    lab["devices"][0].update({k: str(v) if not isinstance(v, int) else v for k, v in changes.items()})
    for key in ("key_file", "known_hosts"):
        lab["devices"][0][key] = str((sshd.lab_path.parent / lab["devices"][0][key]).resolve())
    return _write(tmp_path / "lab.yaml", yaml.safe_dump(lab))


def test_unreachable_device(run_edgeft, sshd, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nobody listens there
    lab = _lab(sshd, tmp_path, port=port)
    _one_line_error(run_edgeft("build", "-t", "rpi5", "--device", sshd.device_name, "--lab", lab, "--out", tmp_path / "b"), "unreachable")
    assert not (tmp_path / "b").exists()


def test_auth_failure(run_edgeft, sshd, tmp_path):
    import subprocess

    other_key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    lab = _lab(sshd, tmp_path, key_file=other_key)
    _one_line_error(run_edgeft("build", "-t", "rpi5", "--device", sshd.device_name, "--lab", lab), "authentication failed")


def test_unknown_host_key_refused_unless_trusted(run_edgeft, sshd, tmp_path):
    empty = _write(tmp_path / "known_hosts", "")
    lab = _lab(sshd, tmp_path, known_hosts=empty)
    _one_line_error(run_edgeft("build", "-t", "rpi5", "--device", sshd.device_name, "--lab", lab), "known_hosts", "--trust-new-host-key")
    assert empty.read_text() == ""
