"""Bad input fails before any work: one line naming the file or setting, exit 2, in seconds, no cache entry
made. A stage's own quality check failing is exit 1, naming the check, the value and the setting. Library
noise stays out of the terminal; --debug shows every error's cause."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build as build_tiny_model  # noqa: E402
from tiny_models import task_rows, write_data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EDGEFT = [sys.executable, "-m", "edgeft.cli"]
FAST_S = 20  # a bad input fails in ~1 s (nothing heavy is imported); training would take minutes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real tiny Llama (128 positions) with its tokenizer, and task data for it."""
    root = tmp_path_factory.mktemp("inputs")
    model = build_tiny_model("llama", root / "llama")
    data, _ = write_data("prompt_completion", root / "data", task_rows(48))
    return {"model": model, "data": data, "root": root}


def _edgeft(*args, cache: Path, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run([*EDGEFT, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={**os.environ, "EDGEFT_CACHE": str(cache), "COLUMNS": "300"})
    return result, time.perf_counter() - started


def _refused(tmp_path, *args, needles: tuple[str, ...], exit_code: int = 2) -> str:
    """Run edgeft with a bad input: one error line holding every needle, the exit code, fast, no cache entry."""
    cache = tmp_path / "cache"
    result, seconds = _edgeft(*args, cache=cache)
    assert result.returncode == exit_code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert seconds < FAST_S, f"took {seconds:.1f} s: the check ran after real work"
    assert not (cache / "artifacts").exists() or not any((cache / "artifacts").iterdir())
    return errors[0]


def _build(tiny, *args):
    return ("build", "-t", "rpi5", "--model", tiny["model"], "--data", tiny["data"], *args)


def test_out_under_a_file(tiny, tmp_path):
    a_file = tmp_path / "report.txt"
    a_file.write_text("not a directory")
    _refused(tmp_path, *_build(tiny, "--out", a_file / "bundle"), needles=(f"--out {a_file / 'bundle'}", f"{a_file} is a file, not a directory"))
    _refused(tmp_path, *_build(tiny, "--out", a_file), needles=(f"--out {a_file}", "exists and is not a directory"))
    assert a_file.read_text() == "not a directory"


def test_out_that_cannot_be_created(tiny, tmp_path):
    # /proc refuses new directories even to root (a chmod'ed dir would not stop root)
    _refused(tmp_path, *_build(tiny, "--out", "/proc/edgeft-test/bundle"), needles=("--out /proc/edgeft-test/bundle", "cannot create or write /proc/edgeft-test"))


def test_out_holding_other_files_is_not_replaced(tiny, tmp_path):
    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _refused(tmp_path, *_build(tiny, "--out", mine), needles=(f"--out {mine}", "not an edgeft bundle"))
    assert (mine / "notes.txt").read_text() == "keep me"


def test_config_json_missing_or_corrupt_is_named_as_such(tiny, tmp_path):
    missing = tmp_path / "missing"
    shutil.copytree(tiny["model"], missing)
    (missing / "config.json").unlink()
    _refused(tmp_path, *_build(tiny, "--model", missing, "--out", tmp_path / "b"), needles=(f"{missing / 'config.json'}: missing",))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny["model"], corrupt)
    (corrupt / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    line = _refused(tmp_path, *_build(tiny, "--model", corrupt, "--out", tmp_path / "b"),
                    needles=(f"{corrupt / 'config.json'}: corrupt, not valid JSON",))
    assert "tokenizer" not in line
    no_type = tmp_path / "no-type"
    shutil.copytree(tiny["model"], no_type)
    (no_type / "config.json").write_text("[1, 2]")
    _refused(tmp_path, *_build(tiny, "--model", no_type, "--out", tmp_path / "b"), needles=(f"{no_type / 'config.json'}: corrupt", "model_type"))


def test_model_dir_without_tokenizer(tiny, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny["model"], bare)
    for path in bare.glob("tokenizer*"):
        path.unlink()
    _refused(tmp_path, *_build(tiny, "--model", bare, "--out", tmp_path / "b"), needles=(f"{bare}: no tokenizer", "tokenizer.json"))


def test_unknown_architecture_is_refused_before_training(tiny, tmp_path):
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny["model"], unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no-such-arch"}))
    _refused(tmp_path, *_build(tiny, "--model", unknown, "--out", tmp_path / "b"),
             needles=(f"{unknown / 'config.json'}: transformers cannot read it", "no-such-arch"))


def test_threads_zero(tiny, tmp_path):
    _refused(tmp_path, *_build(tiny, "--threads", "0", "--out", tmp_path / "b"), needles=("--threads 0", "at least 1"))
    _refused(tmp_path, "finetune", "--model", tiny["model"], "--data", tiny["data"], "--threads", "0", "--out", tmp_path / "a",
             needles=("--threads 0", "at least 1"))


def test_explicit_max_length_beyond_the_model_is_refused(tiny, tmp_path):
    profile = tmp_path / "long.yaml"
    profile.write_text("stages:\n  - finetune: {max_length: 512}\n  - merge: {}\n  - export: {}\n")
    _refused(tmp_path, *_build(tiny, "-p", profile, "--out", tmp_path / "b"),
             needles=(str(profile), "finetune.max_length 512 exceeds the model's 128 positions", "leave it unset"))


def test_max_length_default_is_capped_at_the_models_positions():
    from edgeft.errors import ConfigError
    from edgeft.stages.distill import DistillConfig
    from edgeft.stages.finetune import FinetuneConfig, check_max_length, effective_max_length
    from edgeft.stages.prune import PruneConfig

    said = []
    for config_type, stage in ((FinetuneConfig, "finetune"), (PruneConfig, "prune"), (DistillConfig, "distill")):
        assert effective_max_length(config_type(), 128, said.append, stage) == 128  # the default 256, capped
        assert said[-1].startswith(f"{stage}: max_length 128, the model's positions") and f"set {stage}.max_length" in said[-1]
        assert effective_max_length(config_type(), None) == 256 and effective_max_length(config_type(), 4096) == 256
        assert effective_max_length(config_type(max_length=96), 128) == 96
        check_max_length(config_type(), 128, "m", stage=stage)  # the default is never refused
        with pytest.raises(ConfigError, match=f"{stage}.max_length 512 exceeds the model's 128 positions"):
            check_max_length(config_type(max_length=512), 128, "m", stage=stage)
    assert len(said) == 3


def test_debug_shows_the_cause(tiny, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny["model"], corrupt)
    (corrupt / "config.json").write_text("{oops")
    result, _ = _edgeft("--debug", *_build(tiny, "--model", corrupt, "--out", tmp_path / "b"), cache=tmp_path / "cache")
    assert result.returncode == 1 and "Traceback" in result.stderr  # an uncaught exception under --debug
    assert "json.decoder.JSONDecodeError" in result.stderr
    assert "The above exception was the direct cause of the following exception" in result.stderr
    assert "edgeft.errors.ModelError" in result.stderr


def test_int4_quantize_logs_no_line_per_node(tmp_path):
    """ONNX Runtime's int4 quantizer module sets the root logger to INFO when imported, then logs every node
    (hundreds on a 1B model), and every library's INFO line would follow: quantize undoes that."""
    script = f"""
import logging
import numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
from edgeft.stages.quantize import QuantizeConfig, quantize
w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
nodes = [helper.make_node("MatMul", [a, "w"], [b], name=f"mm{{i}}") for i, (a, b) in enumerate([("x", "h"), ("h", "y")])]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), "{tmp_path / 'src.onnx'}")
quantize("{tmp_path / 'src.onnx'}", "{tmp_path / 'int4.onnx'}", QuantizeConfig(mode="int4-weight"))
print(sorted({{n.op_type for n in onnx.load("{tmp_path / 'int4.onnx'}").graph.node}}))
logging.info("an INFO line of the root logger")  # what ONNX Runtime's quantize_dynamic does per tensor
logging.getLogger("some.library").info("an INFO line of a library")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['MatMulNBits']"  # it did quantize both nodes
    assert "INFO" not in result.stderr and "quantize mm0" not in result.stderr, result.stderr


def test_quality_check_failure_exits_1_naming_check_value_and_setting(tiny, tmp_path):
    """Also: the default max_length is capped with a note, max_steps stops training, no torchao noise."""
    profile = tmp_path / "strict.yaml"
    profile.write_text("stages:\n"
                       "  - finetune: {max_steps: 2, batch_size: 8, lr: 0.01, eval_task_examples: 2, warmup_ratio: 0.0}\n"
                       "  - merge: {atol: 1.0e-12}\n"  # an fp32 merge differs by ~1e-7: the check must fail
                       "  - export: {}\n"
                       "eval: {metrics: []}\n")
    cache = tmp_path / "cache"
    result, _ = _edgeft(*_build(tiny, "-p", profile, "--out", tmp_path / "b"), cache=cache)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "merge check max_abs_diff failed" in errors[0] and "above merge.atol 1e-12" in errors[0]
    assert "max_length 128, the model's positions (the default 256 is capped" in result.stderr
    (finetune,) = (cache / "artifacts").glob("finetune-*")
    assert json.loads((finetune / "artifact.json").read_text())["metrics"]["train_steps"] == 2  # max_steps
    assert not list((cache / "artifacts").glob("merge-*"))
    assert not (tmp_path / "b").exists()
    for noise in ("Failed to load", "torchao", "[INFO]", "is an Enum subclass"):
        assert noise not in result.stderr, result.stderr


def test_search_lists_a_candidate_that_failed_its_own_check(capsys):
    from edgeft.cli import _search_table
    from edgeft.errors import QualityCheckFailed
    from edgeft.report_html import render_search
    from edgeft.search import Candidate, quality_failure_report

    exc = QualityCheckFailed("quantize check top1_agreement failed: the int8-dynamic model picks the fp32 model's next token at 92.4% ...",
                             check="quantize.top1_agreement", value=0.924, limit=0.95, setting="quantize.min_top1_agreement")
    assert exc.exit_code == 1
    failed = Candidate("int8-dynamic", [], report=quality_failure_report(exc)).row()
    assert (failed["verdict"], failed["failed"], failed["accuracy"], failed["size_bytes"]) == ("FAIL", ["quantize.top1_agreement"], None, None)
    assert failed["checks"] == [{"budget": "quantize.top1_agreement", "measured": 0.924, "limit": 0.95, "status": "fail",
                                 "direction": "min", "setting": "quantize.min_top1_agreement"}]
    measured = {**failed, "candidate": "fp32", "verdict": "PASS", "failed": [], "checks": [], "error": None, "precision": "fp32",
                "size_bytes": 3_000_000, "accuracy": 0.9, "latency_ms_p50": 2.0, "latency_ms_p99": 3.0, "first_token_ms": 2.5,
                "decode_tokens_per_s": 400.0, "peak_rss_mb": 80.0}
    result = {"format": "edgeft-search/1", "target": "rpi5", "profile": "arm-int8", "device": "local", "budgets": {"latency_ms_p99": 10},
              "candidates": [failed, measured], "chosen": "fp32", "why": "fp32 meets every budget", "search_json": "x.json"}
    html = render_search(result)
    assert "int8-dynamic" in html and "quantize.top1_agreement" in html and "92.4%" in html and "<svg" in html
    _search_table(result)
    err = capsys.readouterr().err
    assert "int8-dynamic: quantize check top1_agreement failed" in err and "→ fp32" in err
