"""The build cache never lies: keys cover code, libraries and what `auto` resolved to; two builds of one
entry share it (one builds, one waits); a killed builder leaves no half entry and no stuck lock; the
measurement key covers the device's runtime and the runner; TensorRT engines key on every model file;
`edgeft cache list|prune`."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgeft import pipeline
from edgeft.artifact import Artifact, cache_root

sys.path.insert(0, str(Path(__file__).parent))
import cache_worker  # noqa: E402
from tiny_models import task_rows, write_data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = [sys.executable, str(Path(__file__).parent / "cache_worker.py")]
EDGEFT = [sys.executable, "-m", "edgeft.cli"]


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    """A private cache, a 'base model' dir and a data file for the toy stage."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEFT_CACHE", str(cache))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "toy"}')
    data, _ = write_data("prompt_completion", tmp_path / "data", task_rows(24))
    markers = tmp_path / "markers"
    markers.mkdir()
    return SimpleNamespace(cache=cache, base=base, data=data, markers=markers, tmp=tmp_path)


def _worker(toy, sleep_s: float, out: Path) -> subprocess.Popen:
    env = {**os.environ, "EDGEFT_CACHE": str(toy.cache), "TOY_MARKER_DIR": str(toy.markers), "TOY_SLEEP_S": str(sleep_s),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([*WORKER, toy.base, toy.data], stdout=out.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait_for(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _outcome(log: Path) -> dict:
    return json.loads(log.read_text().strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ the key
def _toy_stage(words: int = 1000) -> pipeline.PlannedStage:
    return pipeline.PlannedStage("toy", cache_worker, cache_worker.ToyConfig(words=words))


def test_source_hash_changes_with_any_edit_of_the_package(tmp_path):
    copy = tmp_path / "edgeft"
    shutil.copytree(pipeline.SOURCE_DIRS[0], copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = pipeline.source_sha256([copy])
    assert len(before) == 64 and before == pipeline.source_sha256([copy])  # stable
    helper = copy / "data.py"  # a helper every stage runs (loading, encoding), not a stage module
    original = helper.read_text()
    helper.write_text(original + "# a comment\n")
    edited = pipeline.source_sha256([copy])
    assert edited != before
    helper.write_text(original)
    assert pipeline.source_sha256([copy]) == before
    (copy / "new_helper.py").write_text("X = 1\n")  # a new module counts too
    assert pipeline.source_sha256([copy]) != before


def test_stage_key_covers_code_libraries_device_and_resolved_auto(tmp_path):
    source = Artifact(path=tmp_path, kind="hf-model", stage="base", key="k", files={"config.json": "a" * 64})
    libraries = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "onnxruntime": "1.32.0"}
    key = lambda **changes: pipeline.stage_key(**{"stage": _toy_stage(), "source": source, "data_sha256": "d" * 64,  # noqa: E731
                                                   "code": "c" * 64, "libraries": libraries, "device": "cpu", **changes})
    same = key()
    assert same == key()
    variants = {
        "code": key(code="e" * 64),  # an edited helper
        "torch": key(libraries={**libraries, "torch": "2.14.0+cpu"}),  # a library upgrade
        "onnxruntime": key(libraries={**libraries, "onnxruntime": None}),  # a library gone
        "device": key(device="cuda:NVIDIA H200"),
        "data": key(data_sha256="f" * 64),
        "config": key(stage=_toy_stage(words=7)),
    }
    assert same not in variants.values() and len(set(variants.values())) == len(variants)
    # The defaults are this installation's: the real package source, versions and device.
    assert pipeline.stage_key(_toy_stage(), source, "d" * 64, libraries=libraries, device="cpu") != same


def test_library_versions_and_resolved_auto_settings():
    import torch

    from edgeft.stages.finetune import FinetuneConfig

    versions = pipeline.library_versions()
    assert versions["torch"] == torch.__version__ and versions["onnxruntime"] == importlib.metadata.version("onnxruntime")
    assert pipeline.library_versions(("no-such-distribution-edgeft",)) == {"no-such-distribution-edgeft": None}
    expected_device = "cpu" if not torch.cuda.is_available() else f"cuda:{torch.cuda.get_device_name(0)}"
    assert pipeline.compute_device() == expected_device
    auto = "bfloat16" if torch.cuda.is_available() else "float32"
    assert pipeline.resolved_settings(FinetuneConfig(), None) == {"compute_dtype": auto}
    assert pipeline.resolved_settings(FinetuneConfig(compute_dtype="float32"), None) == {"compute_dtype": "float32"}


# ------------------------------------------------------------------------------------ two builds, one entry
def test_second_build_waits_for_the_first_and_reuses_its_entry(toy):
    first_log, second_log = toy.tmp / "first.log", toy.tmp / "second.log"
    first = _worker(toy, sleep_s=4, out=first_log)
    _wait_for(lambda: (toy.markers / f"started-{first.pid}").exists(), what="the first build to start its stage")
    second = _worker(toy, sleep_s=0, out=second_log)
    assert first.wait(timeout=120) == 0, first_log.read_text()
    assert second.wait(timeout=120) == 0, second_log.read_text()
    a, b = _outcome(first_log), _outcome(second_log)
    assert "waiting for another build of toy" in second_log.read_text()
    assert (a["cached"], b["cached"]) == (False, True)
    assert a["path"] == b["path"] and a["sha256"] == b["sha256"]
    assert a["builder_pid"] == b["builder_pid"] == first.pid  # the second reused the first's result
    assert sorted(p.name for p in toy.markers.iterdir()) == [f"started-{first.pid}"]  # the stage ran once
    entry = Path(a["path"])
    assert (entry / "part1.txt").stat().st_size == (entry / "part2.txt").stat().st_size == 1000
    assert pipeline.leftovers(entry) == []


def test_killed_builder_leaves_no_half_entry_and_no_stuck_lock(toy):
    first_log, second_log = toy.tmp / "first.log", toy.tmp / "second.log"
    first = _worker(toy, sleep_s=120, out=first_log)
    marker = toy.markers / f"started-{first.pid}"
    _wait_for(marker.exists, what="the first build to start its stage")
    half = Path(marker.read_text())  # the killed builder's temp dir: part1 written, part2 not
    assert (half / "part1.txt").is_file() and not (half / "part2.txt").exists()
    second = _worker(toy, sleep_s=0, out=second_log)
    _wait_for(lambda: "waiting for another build of toy" in second_log.read_text(), what="the second build to wait")
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL
    assert second.wait(timeout=120) == 0, second_log.read_text()  # the dead builder's lock went with it
    b = _outcome(second_log)
    entry = Path(b["path"])
    assert b["cached"] is False and b["builder_pid"] == second.pid  # built afresh, not from the half entry
    assert not half.exists() and pipeline.leftovers(entry) == []  # the half temp dir was removed
    assert (entry / "part1.txt").stat().st_size == (entry / "part2.txt").stat().st_size == 1000
    meta = json.loads((entry / "artifact.json").read_text())
    assert meta["files"] == {name: hashlib.sha256((entry / name).read_bytes()).hexdigest() for name in ("part1.txt", "part2.txt")}
    lock = pipeline.entry_lock(entry)
    lock.acquire(timeout=0)  # free: nobody holds it any more
    lock.release()


# ------------------------------------------------------------------------------------ cache list / prune
def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEFT, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "EDGEFT_CACHE": str(cache), "COLUMNS": "200"})


def test_cache_list_and_prune(toy):
    days = 86400
    entries = {}
    for words, idle_days in ((1000, 10), (2000, 3), (3000, 0)):
        final, _ = cache_worker.build(toy.base, toy.data, words, log=lambda line: None)
        used = time.time() - idle_days * days
        os.utime(final.path, (used, used))
        entries[words] = final.path
    measurement = cache_root() / "measurements" / ("a" * 32 + ".json")
    measurement.parent.mkdir(parents=True)
    measurement.write_text("{}")
    old = time.time() - 30 * days
    os.utime(measurement, (old, old))
    leftover = entries[1000].parent / f".{entries[2000].name}.tmp-dead"  # what a killed builder leaves
    leftover.mkdir()
    (leftover / "part1.txt").write_text("x" * 500)

    listed = _cli("cache", "list", "--json", cache=toy.cache)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    by_path = {row["path"]: row for row in rows}
    for words, path in entries.items():
        row = by_path[str(path)]
        meta_size = (path / "artifact.json").stat().st_size
        assert (row["kind"], row["stage"], row["size_bytes"]) == ("artifact", "toy", 2 * words + meta_size)
        assert row["key"] == json.loads((path / "artifact.json").read_text())["key"]
    assert [row["kind"] for row in rows if row["kind"] != "artifact"] == ["incomplete", "measurement"]  # most recent first
    assert round(by_path[str(entries[1000])]["idle_s"] / days) == 10 and round(by_path[str(entries[2000])]["idle_s"] / days) == 3
    table = _cli("cache", "list", cache=toy.cache)
    assert "toy" in table.stderr and "incomplete" in table.stderr and "measure" in table.stderr

    dry = json.loads(_cli("cache", "prune", "--older-than", "7d", "--dry-run", "--json", cache=toy.cache).stdout)
    assert {row["path"] for row in dry["removed"]} == {str(entries[1000]), str(leftover), str(measurement)}
    assert entries[1000].exists() and leftover.exists()

    pruned = _cli("cache", "prune", "--older-than", "7d", "--json", cache=toy.cache)
    result = json.loads(pruned.stdout)
    assert {row["path"] for row in result["removed"]} == {str(entries[1000]), str(leftover), str(measurement)}
    assert result["freed_bytes"] == sum(row["size_bytes"] for row in dry["removed"]) and result["kept"] == 2
    assert not entries[1000].exists() and not leftover.exists() and not measurement.exists()
    assert entries[2000].exists() and entries[3000].exists()

    lock = pipeline.entry_lock(entries[2000])  # a build holds this one: never pruned
    lock.acquire(timeout=0)
    try:
        held = json.loads(_cli("cache", "prune", "--keep-last", "0", "--json", cache=toy.cache).stdout)
    finally:
        lock.release()
    assert [row["path"] for row in held["in_use"]] == [str(entries[2000])]
    assert [row["path"] for row in held["removed"]] == [str(entries[3000])]
    assert entries[2000].exists() and not entries[3000].exists()
    assert [p.name for p in entries[2000].parent.iterdir()] == [entries[2000].name]  # no half entry left aside

    refused = _cli("cache", "prune", cache=toy.cache)
    assert refused.returncode == 2 and "--older-than" in refused.stderr
    bad = _cli("cache", "prune", "--older-than", "7 days", cache=toy.cache)
    assert bad.returncode == 2 and "duration '7 days'" in bad.stderr


# ------------------------------------------------------------------------------------ measurements, engines
def test_measurement_key_covers_the_device_runtime_and_the_runner(tmp_path):
    from edgeft.build import BuildOptions, device_runtime, measurement_key
    from edgeft.config import load_profile, load_target
    from edgeft.runner_app import build_runner_zipapp, runner_sha256

    target = load_target("rpi5")
    prep = SimpleNamespace(options=BuildOptions(target="rpi5"), target=target, profile=load_profile("arm-int8"),
                           splits=SimpleNamespace(sha256="d" * 64), device_runtime=None)
    final = Artifact(path=tmp_path, kind="onnx", stage="quantize", key="k", files={"model.onnx": "a" * 64})
    runtime = device_runtime(prep)  # probed on the device (here: this machine's python, as the runner would run)
    assert runtime == {"module": "onnxruntime", "version": importlib.metadata.version("onnxruntime")}
    runner = runner_sha256()
    assert runner == build_runner_zipapp(tmp_path / "runner.pyz")  # the sha256 of what is shipped
    key = measurement_key(prep, final, runtime, runner)
    assert key == measurement_key(prep, final, dict(runtime), runner)
    assert measurement_key(prep, final, {**runtime, "version": "1.33.0"}, runner) != key  # runtime upgraded on the device
    assert measurement_key(prep, final, runtime, "b" * 64) != key  # another runner


def test_tensorrt_engine_key_hashes_the_external_data_too(tmp_path):
    from edgeft_runner.backends.tensorrt import model_files_sha256

    def model(name: str, weights: bytes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"same graph")
        (folder / "model.onnx.data").write_bytes(weights)
        (folder / "tokenizer.json").write_text(name)  # not part of the model
        return folder / "model.onnx"

    one, other, again = model("one", b"weights of fine-tune 1"), model("other", b"weights of fine-tune 2"), model("again", b"weights of fine-tune 1")
    assert model_files_sha256(one) != model_files_sha256(other)  # one architecture, two fine-tunes: two engines
    assert model_files_sha256(one) == model_files_sha256(again)
    known = {"model.onnx": hashlib.sha256(b"same graph").hexdigest(), "model.onnx.data": hashlib.sha256(b"weights of fine-tune 1").hexdigest()}
    assert model_files_sha256(other, known) == model_files_sha256(one)  # the manifest's verified hashes are used as given
