"""Evaluation metrics: known values on hand-made strings, perplexity's definition, the demo's models
(base vs fine-tuned, PyTorch vs ONNX Runtime), the report's per-stage metrics and the forgetting budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgeft import metrics as M
from edgeft.build import forgetting
from edgeft.config import Budgets, load_profile
from edgeft.errors import ConfigError
from edgeft.gate import evaluate

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ pure metrics
def test_token_f1_known_values():
    assert M.f1("a b c", "a b d") == pytest.approx(2 / 3)
    assert M.f1("a a b", "a b b") == pytest.approx(2 / 3)  # shared tokens counted with multiplicity: a once, b once
    assert M.f1("a b", "a b c d") == pytest.approx(2 * 1 * 0.5 / 1.5)  # P 1, R 1/2
    assert M.f1("x y", "a b") == 0.0
    assert M.f1('{"alert":"Low_Battery"}', "alert: low battery") == 1.0  # case and punctuation only separate words
    assert M.f1("", "") == 1.0 and M.f1("...", "") == 1.0  # nothing left on either side
    assert M.f1("a", "") == 0.0 and M.f1("", "a") == 0.0
    assert M.token_f1(["a b c", "x"], ["a b d", "x"]) == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        M.token_f1(["a", "b"], ["a"])


def test_rouge_l_known_values():
    assert M.rouge_l(["a b c"], ["a b d"]) == pytest.approx(2 / 3)
    assert M.rouge_l(["a c b"], ["a b c"]) == pytest.approx(2 / 3)  # LCS "a b" (or "a c"), not a bag of words
    assert M.rouge_l(["a x b"], ["a b c d"]) == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))  # P 2/3, R 1/2
    assert M.rouge_l(["Hello, World!"], ["hello world"]) == 1.0  # rouge-score: lowercase alphanumerics only
    assert M.rouge_l(["日本語"], ["中文"]) == 0.0  # ... so other scripts have no tokens
    assert M.rouge_l(["日本語"], ["日本語"]) == 1.0  # identical text scores 1 all the same
    assert M.rouge_l(["a b c", "x y"], ["a b d", "x y"]) == pytest.approx((2 / 3 + 1) / 2)


def test_exact_match_on_texts_and_token_ids():
    assert M.exact_match(["a", "b"], ["a", "c"]) == 0.5
    assert M.exact_match(["A"], ["a"]) == 0.0  # no normalisation
    assert M.exact_match([[5, 6, 2], [5, 2]], [[5, 6, 2], [5, 6, 2]]) == 0.5


def test_perplexity_of_a_uniform_distribution_is_the_vocab_size():
    vocab = 384
    logits = np.zeros((50, vocab))
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # log_softmax: -log(vocab) everywhere
    assert M.perplexity(logprobs[np.arange(50), np.arange(50) % vocab]) == pytest.approx(vocab)
    assert M.perplexity([0.0, 0.0]) == 1.0  # certain of every token
    assert M.perplexity([math.log(0.5), math.log(0.125)]) == pytest.approx(4.0)  # geometric mean of 1/p
    assert M.perplexity_from_nll(3 * math.log(7), 3) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="at least one"):
        M.perplexity([])


# ------------------------------------------------------------------------------------ config and gate
def test_unknown_metric_and_missing_general_text_name_the_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - merge: {}\neval:\n  metrics: [exact_match, bleu]\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:4: field 'eval\.metrics': .*unknown metric 'bleu'; known: exact_match, token_f1, rouge_l, perplexity"):
        load_profile(str(path))
    path.write_text(f"stages:\n  - merge: {{}}\neval:\n  general_text: {tmp_path / 'nope.txt'}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:4: field 'eval\.general_text': .*nope\.txt: file not found"):
        load_profile(str(path))
    path.write_text("stages:\n  - merge: {}\n")
    assert load_profile(str(path)).eval.metrics == ["exact_match", "perplexity"]


def test_unknown_metric_is_a_one_line_exit_2(run_edgeft, tmp_path):
    path = tmp_path / "bad-eval.yaml"
    profile = yaml.safe_load((ROOT / "profiles" / "arm-int8.yaml").read_text())
    path.write_text(yaml.safe_dump({**profile, "eval": {"metrics": ["exact_match", "bleu"]}}))
    result = run_edgeft("build", "--target", "rpi5", "--profile", path, "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "eval.metrics" in lines[0] and "bleu" in lines[0] and "bad-eval.yaml" in lines[0], lines
    assert "Traceback" not in result.stderr


def test_forgetting_and_its_budget():
    evals = {"base": {"general_perplexity": 2.0}, "finetune": {"general_perplexity": 2.2},
             "merge": {"general_perplexity": 2.3}, "export": {"exact_match": 1.0}, "quantize": {"general_perplexity": 2.5}}
    got = forgetting(evals)
    assert got == {"base_ppl": 2.0, "finetuned_ppl": 2.2, "final_ppl": 2.5, "final_stage": "quantize", "general_ppl_increase": 0.25}
    gate = evaluate({"forgetting": got}, Budgets(max_general_ppl_increase=0.2))
    assert [(c["budget"], c["status"], c["measured"]) for c in gate["checks"]] == [("max_general_ppl_increase", "fail", 0.25)]
    assert evaluate({"forgetting": got}, Budgets(max_general_ppl_increase=0.25))["passed"] is True
    missing = forgetting({"merge": {"general_perplexity": 2.3}})  # no base measured: skipped, never a silent pass
    assert missing["general_ppl_increase"] is None
    (check,) = evaluate({"forgetting": missing}, Budgets(max_general_ppl_increase=0.2))["checks"]
    assert check["status"] == "skipped"


# ------------------------------------------------------------------------------------ the demo's models
def _stage_dir(cache: Path, name: str, build) -> Path:
    stages = json.loads((build["out"] / "manifest.json").read_text())["provenance"]["stages"]
    (key,) = [s["key"] for s in stages if s["name"] == name]
    return cache / "artifacts" / f"{name}-{key[:24]}"


@pytest.fixture(scope="module")
def demo_models(demo_build, cache_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.data import load_splits
    from edgeft.stages.finetune import load_tokenizer

    manifest = json.loads((demo_build["out"] / "manifest.json").read_text())
    base_dir = Path(manifest["provenance"]["base_model"]["path"])
    merged_dir = _stage_dir(cache_dir, "merge", demo_build)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    return {"base": load(base_dir), "merged": load(merged_dir), "tokenizer": load_tokenizer(merged_dir),
            "splits": load_splits(None), "export": _stage_dir(cache_dir, "export", demo_build), "merge_dir": merged_dir}


def test_text_rows_score_every_text_token_once(demo_models):
    from edgeft.evaluate import text_rows

    tokenizer = demo_models["tokenizer"]
    texts = ["gw-10 temp=20 batt=50 rssi=-60 errs=0\n", "x" * 150 + "\n", "ok\n"]
    rows = text_rows(tokenizer, texts, 32)
    n_text = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert all(len(ids) <= 32 and len(ids) == len(scored) and not scored[0] for ids, scored in rows)
    assert sum(sum(scored) for _, scored in rows) == n_text  # BOS is context; a split document overlaps by one token
    assert not any(s for ids, scored in rows for t, s in zip(ids, scored) if t == tokenizer.bos_token_id)


def test_evaluate_model_finetuned_beats_base_and_reports_general_perplexity(demo_models):
    from edgeft.evaluate import evaluate_model, load_general_text

    splits, tokenizer, general = demo_models["splits"], demo_models["tokenizer"], load_general_text()
    wanted = ("exact_match", "token_f1", "rouge_l", "perplexity")
    base = evaluate_model(demo_models["base"], tokenizer, splits.test, wanted, general, perplexity_examples=splits.val)
    tuned = evaluate_model(demo_models["merged"], tokenizer, splits.test, wanted, general, perplexity_examples=splits.val)
    assert list(tuned) == [*wanted, "general_perplexity"]
    # the task was learned ... (the base already knows the JSON shape and where a record ends: ~2.1)
    assert tuned["perplexity"] < base["perplexity"] / 1.6, (base, tuned)
    assert 1 < tuned["perplexity"] < 2 and 1 < base["perplexity"]
    assert tuned["exact_match"] > base["exact_match"] + 0.7 and tuned["token_f1"] >= tuned["exact_match"]
    assert tuned["rouge_l"] >= tuned["exact_match"] and base["token_f1"] > base["exact_match"]  # partial credit
    for values in (base, tuned):
        assert math.isfinite(values["general_perplexity"]) and values["general_perplexity"] > 1
    # token exact match is the stage's accuracy, computed the same way it always was
    meta = json.loads((demo_models["merge_dir"] / "artifact.json").read_text())
    assert tuned["exact_match"] == meta["metrics"]["accuracy"] == meta["metrics"]["eval"]["exact_match"]


def test_exact_match_is_unbatched_greedy_decoding(demo_models):
    """The batched, left-padded generation scores exactly as one-at-a-time greedy decoding does."""
    import torch

    from edgeft.data import encode
    from edgeft.evaluate import exact_match, max_new_tokens_for

    model, tokenizer, examples = demo_models["merged"], demo_models["tokenizer"], demo_models["splits"].test[:48]
    max_new = max_new_tokens_for(tokenizer, examples)
    correct = 0
    with torch.no_grad():
        for example in examples:
            prompt, completion = encode(tokenizer, example)
            ids = list(prompt)
            for _ in range(max_new):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == tokenizer.eos_token_id:
                    break
            correct += ids[len(prompt) :] == completion
    assert exact_match(model, tokenizer, examples, batch_size=16) == correct / len(examples)


def test_onnx_runtime_evaluation_matches_pytorch(demo_models):
    from edgeft import lm
    from edgeft.evaluate import evaluate_model, load_general_text

    splits, tokenizer, general = demo_models["splits"], demo_models["tokenizer"], load_general_text()
    test, val = splits.test[:40], splits.val[:40]
    wanted = ("exact_match", "token_f1", "perplexity")
    torch_values = evaluate_model(demo_models["merged"], tokenizer, test, wanted, general, perplexity_examples=val)
    backend = lm.load(demo_models["export"] / "model.onnx")
    onnx_values = lm.evaluate_backend(backend, tokenizer, test, wanted, general, perplexity_examples=val, max_positions=256)
    assert onnx_values.keys() == torch_values.keys()
    assert onnx_values["exact_match"] == torch_values["exact_match"]
    for name in ("perplexity", "general_perplexity"):
        assert onnx_values[name] == pytest.approx(torch_values[name], rel=1e-4), name


# ------------------------------------------------------------------------------------ the build report
# These read what finetune reports: its `eval_base` and `eval` (edgeft.evaluate.stage_eval).
def test_report_has_metrics_per_stage_and_forgetting(demo_build):
    report = demo_build["report"]
    metrics, acc = report["metrics"], report["accuracy"]
    assert list(metrics) == ["base", "finetune", "merge", "export", "quantize"]
    for stage, values in metrics.items():
        assert set(values) == {"exact_match", "perplexity", "general_perplexity"}, stage  # the default eval.metrics
        assert math.isfinite(values["general_perplexity"]) and values["perplexity"] >= 1, stage
    assert metrics["base"]["exact_match"] == acc["base"] and metrics["finetune"]["exact_match"] == acc["finetuned"]
    assert metrics["merge"]["exact_match"] == acc["merged"] and metrics["quantize"]["exact_match"] == acc["quantized"]
    assert metrics["merge"]["perplexity"] < metrics["base"]["perplexity"]
    assert metrics["export"]["perplexity"] == pytest.approx(metrics["merge"]["perplexity"], rel=1e-3)  # fp32 ONNX == PyTorch
    fg = report["forgetting"]
    assert fg["base_ppl"] == metrics["base"]["general_perplexity"] and fg["finetuned_ppl"] == metrics["finetune"]["general_perplexity"]
    assert fg["final_stage"] == "quantize" and fg["final_ppl"] == metrics["quantize"]["general_perplexity"]
    assert fg["general_ppl_increase"] == round(fg["final_ppl"] / fg["base_ppl"] - 1, 4)


def test_general_ppl_budget_fails_the_gate(demo_build, run_edgeft, tmp_path):
    profile = yaml.safe_load((ROOT / "profiles" / "arm-int8.yaml").read_text())
    profile["budgets"]["max_general_ppl_increase"] = 0.0001
    path = tmp_path / "forgetful.yaml"
    path.write_text(yaml.safe_dump(profile))
    result = run_edgeft("build", "--target", "rpi5", "--profile", path, "--out", tmp_path / "out", "--json")
    assert result.returncode == 1, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert result.stderr.count("cached, inputs and config unchanged") == 4  # same stages, same eval: all cached
    (check,) = [c for c in report["gate"]["checks"] if c["budget"] == "max_general_ppl_increase"]
    assert check["status"] == "fail" and check["measured"] == report["forgetting"]["general_ppl_increase"] > 0.0001
    assert check["measured_field"] == "forgetting.general_ppl_increase"
    assert report["gate"]["verdict"] == "FAIL"
