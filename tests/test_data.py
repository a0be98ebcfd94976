"""Datasets: every format loads to the same examples, chat goes through the chat template, splits are
stable, and `edgeft data check` finds duplicates, leakage and sensitive data (with file:line, masked)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from edgeft.config import load_profile
from edgeft.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    DEMO_DATA,
    DataConfig,
    Example,
    Splits,
    check_data,
    dedupe,
    encode,
    fit_length,
    leakage,
    load_examples,
    load_splits,
    scan_sensitive,
    training_rows,
)
from edgeft.errors import ConfigError

ROWS = [{"prompt": f"sensor s{i} reads {i * 7 % 50}\n", "completion": f"level {i % 3}"} for i in range(12)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _csv(path: Path, rows, delimiter=",") -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _one_line_error(result, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _pairs(examples):
    return [(e.prompt, e.completion) for e in examples]


# ----------------------------------------------------------------------------------------- formats
def test_every_file_type_loads_to_the_same_examples(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = [(r["prompt"], r["completion"]) for r in ROWS]
    jsonl = _jsonl(tmp_path / "d.jsonl", ROWS)
    array = tmp_path / "d.json"
    array.write_text(json.dumps(ROWS))
    csv_file = _csv(tmp_path / "d.csv", ROWS)
    tsv_file = _csv(tmp_path / "d.tsv", ROWS, delimiter="\t")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))

    for path in (jsonl, array, csv_file, tsv_file, parquet, saved):
        examples, fmt = load_examples(path)
        assert fmt == "prompt_completion", path
        assert _pairs(examples) == expected, path
    # where: JSONL/CSV name the line (a CSV's prompt spans two lines here), Parquet/datasets the row
    assert [e.where for e in load_examples(jsonl)[0][:2]] == [f"{jsonl}:1", f"{jsonl}:2"]
    assert [e.where for e in load_examples(csv_file)[0][:2]] == [f"{csv_file}:2", f"{csv_file}:4"]
    assert load_examples(parquet)[0][3].where == f"{parquet}:row 3"


def test_alpaca_chat_and_column_mapping_normalise(tmp_path):
    alpaca = _jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Classify the reading.", "input": "temp=91", "output": "hot"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say bye.", "output": "bye"},
    ])
    examples, fmt = load_examples(alpaca)
    assert fmt == "alpaca"
    assert _pairs(examples) == [
        ("### Instruction:\nClassify the reading.\n\n### Input:\ntemp=91\n\n### Response:\n", "hot"),
        (ALPACA_PROMPT.format(instruction="Say hi."), "hi"),
        (ALPACA_PROMPT.format(instruction="Say bye."), "bye"),
    ]
    assert ALPACA_PROMPT_WITH_INPUT.format(instruction="Classify the reading.", input="temp=91") == examples[0].prompt

    # the same rows under other column names, mapped by the profile's data.columns
    renamed = _csv(tmp_path / "a.csv", [{"task": "Classify the reading.", "ctx": "temp=91", "label": "hot"}])
    config = DataConfig(columns={"instruction": "task", "input": "ctx", "output": "label"})
    assert load_examples(renamed, config) == (examples[:1], "alpaca")
    qa = _csv(tmp_path / "qa.csv", [{"question": r["prompt"], "answer": r["completion"]} for r in ROWS])
    assert _pairs(load_examples(qa, DataConfig(columns={"prompt": "question", "completion": "answer"}))[0]) == _pairs(load_examples(_jsonl(tmp_path / "d.jsonl", ROWS))[0])

    chat = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}])
    (example,), fmt = load_examples(chat)
    assert fmt == "chat"
    assert example.messages == (("system", "Be terse."), ("user", "hi"), ("assistant", "ok"))
    assert (example.prompt, example.completion) == ("system: Be terse.\nuser: hi\n", "ok")


@pytest.fixture(scope="module")
def tokenizer():
    """A real (small) BPE tokenizer built the way the demo builds its own: BOS <s>, EOS </s>."""
    from edgeft.demo.base import train_tokenizer

    corpus = "".join(f"sensor s{i} reads {i} level {i % 3} user assistant system hi ok Be terse.\n" for i in range(200))
    return train_tokenizer(corpus)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_is_rendered_through_the_chat_template(tokenizer, tmp_path):
    turns = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "sensor s7?"}, {"role": "assistant", "content": "level 1"}]
    (example,), _ = load_examples(_jsonl(tmp_path / "c.jsonl", [{"messages": turns}]))

    with pytest.raises(ConfigError, match=rf"{tmp_path}/c\.jsonl: chat-format data .* has none; use a model whose tokenizer_config\.json has a chat_template, or convert the data to .*prompt"):
        encode(tokenizer, example)

    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        prompt_ids, completion_ids = encode(tokenizer, example)
    finally:
        tokenizer.chat_template = None
    # every turn before the last assistant turn, with the generation prompt; BOS once, from the template
    rendered = "<s><|system|>Be terse.\n<|user|>hi\n<|assistant|>ok\n<|user|>sensor s7?\n<|assistant|>"
    assert prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(tokenizer.bos_token_id) == 1
    assert completion_ids == tokenizer("level 1", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(prompt_ids + completion_ids) == rendered + "level 1</s>"


def test_training_rows_loss_on_and_max_length(tokenizer):
    examples = [Example("sensor s1 reads 1\n", "level 1"), Example("sensor s2 reads 2 " * 8 + "\n", "level 2")]
    encoded = [encode(tokenizer, e) for e in examples]
    short_len = sum(map(len, encoded[0]))
    rows, truncated = training_rows(tokenizer, examples, DataConfig(max_length=short_len))
    assert truncated == 1
    (p0, c0), (p1, c1) = encoded
    assert rows[0] == {"input_ids": p0 + c0, "labels": [-100] * len(p0) + c0}
    # the long prompt loses its oldest tokens, keeps BOS, and the completion stays whole
    assert rows[1]["input_ids"] == [tokenizer.bos_token_id] + p1[len(p1) - (short_len - 1 - len(c1)) :] + c1
    assert len(rows[1]["input_ids"]) == short_len and rows[1]["labels"][-len(c1) :] == c1
    rows, truncated = training_rows(tokenizer, examples, DataConfig(loss_on="all"))
    assert truncated == 0 and rows[1]["labels"] == rows[1]["input_ids"] == p1 + c1
    assert fit_length([1, 5, 6], [7, 8, 9, 2], 3, bos_token_id=1) == ([1], [7, 8])


# ------------------------------------------------------------------------------------------ splits
def test_demo_split_is_unchanged():
    splits = load_splits(None)
    # Changes only when the shipped demo data does (last: fixed-width batt=07 readings, edgeft/demo/generate.py)
    assert splits.sha256 == "a2d141e9f49783d7c50f8ef4fcb2d27427575606fd8fe2c0f035905b38f45596"
    content = {name: [list(p) for p in _pairs(getattr(splits, name))] for name in ("train", "val", "test")}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    assert digest == "b095dad21dd86a02403b36ad7aeebe7a7b3d759b3661b893ee1048e41890f107"
    assert (len(splits.train), len(splits.val), len(splits.test), splits.duplicates) == (1920, 240, 240, 0)
    assert load_splits(DEMO_DATA, DataConfig()).sha256 == splits.sha256


def test_dedupe_fractions_and_validation_file(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    data = _jsonl(tmp_path / "d.jsonl", rows + [rows[3], {"prompt": "  p5 ", "completion": "c5"}, rows[7]])
    assert dedupe([Example("a  b", "c"), Example("a b", "c"), Example("a b", "C")])[1] == 1
    splits = load_splits(data)
    assert splits.duplicates == 3 and len(splits.train) + len(splits.val) + len(splits.test) == 20
    assert len(load_splits(data, DataConfig(dedupe=False)).train) == 23 - 2 - 2
    assert load_splits(data, DataConfig(dedupe=False)).sha256 != splits.sha256 == hashlib.sha256(data.read_bytes()).hexdigest()
    carved = load_splits(data, DataConfig(val_fraction=0.25, test_fraction=0.25))
    assert (len(carved.train), len(carved.val), len(carved.test)) == (10, 5, 5)

    val = _jsonl(tmp_path / "v.jsonl", [{"prompt": f"v{i}", "completion": "x"} for i in range(4)])
    given = load_splits(data, DataConfig(validation=val))
    assert _pairs(given.val) == [(f"v{i}", "x") for i in range(4)]
    assert (len(given.train), len(given.test)) == (18, 2)


def test_leakage_exact_and_near(tmp_path):
    long = ("gateway gw-17 reported temperature 71 battery 56 rssi -78 and errors 1 during the night shift "
            "while the backup link was down and the operator was away from the console")
    train = [Example(long, "ok", where="t:1"), Example("what is the capital of france", "paris", where="t:2"),
             Example("completely different text here", "x", where="t:3")]
    test = [Example("what is the capital of france", "Paris", where="q:1"),  # identical prompt
            Example("What  is the CAPITAL of France ", "paris", where="q:2"),  # case / whitespace
            Example(long.replace("night", "nigth"), "ok", where="q:3"),  # one typo: 5-gram Jaccard >= 0.9
            Example("gateway gw-99 reported temperature 10 battery 99", "ok", where="q:4")]  # related, not the same
    result = leakage(train, test)
    assert (result["exact"], result["near"]) == (1, 2)
    assert {(p["example"], p["train"]) for p in result["examples"]} == {("q:1", "t:2"), ("q:2", "t:2"), ("q:3", "t:1")}
    splits = Splits(train=train, val=[], test=test, source=Path("x.jsonl"), sha256="")
    report = check_data(splits)
    assert report.leakage["test"]["exact"] == 1 and any("test prompts also in train" in w for w in report.warnings)


# ------------------------------------------------------------------------------------ sensitive data
SECRETS = [
    (2, "email", "mail me at alice.smith@example.com", "alic***"),
    (3, "phone number", "call +1 415 555 0100 tonight", "+1 4***"),
    (4, "ipv4 address", "host 192.168.10.20 is down", "192.***"),
    (5, "ipv6 address", "host fe80::1ff:fe23:4567:890a is down", "fe80***"),
    (6, "aws access key", "key AKIAIOSFODNN7EXAMPLE", "AKIA***"),
    (7, "github token", "use ghp_" + "a1B2c3D4" * 5, "ghp_***"),
    (8, "api key", "OPENAI=sk-proj-abcdefghijklmnopqrstuvwx", "sk-p***"),
    (9, "secret", "api_key=3f9a8b7c6d5e4f3a2b1c0d9e8f7a", "3f9a***"),
    (10, "private key", "-----BEGIN RSA PRIVATE KEY-----", "----***"),
]


def _secret_data(tmp_path) -> Path:
    rows = [{"prompt": "gw-91 temp=70 batt=57 rssi=-76 errs=2\n", "completion": "ok 2024-01-15 v1.2.3.4 12:30:45"}]
    rows += [{"prompt": text, "completion": "noted"} for _, _, text, _ in SECRETS]
    rows += [{"prompt": f"reading {i} at 10.5 C, 3.14159, 1200 3400 5600", "completion": f"fine {i}"} for i in range(10)]
    return _jsonl(tmp_path / "secrets.jsonl", rows)


def test_sensitive_data_found_with_line_and_masked(tmp_path):
    data = _secret_data(tmp_path)
    report = check_data(load_splits(data))
    found = [(f.where, f.kind, f.masked) for f in report.sensitive]
    assert found == [(f"{data}:{line}", kind, masked) for line, kind, _, masked in SECRETS]
    assert report.ok and any("9 likely sensitive values" in w for w in report.warnings)
    assert scan_sensitive("gw-91 temp=70 batt=57 rssi=-76 errs=2 ok 2024-01-15 v1.2.3.4 12:30:45 std::map 1200 3400 5600") == []
    with pytest.raises(ConfigError, match=rf"{data}:2: likely email \(alic\*\*\*\) .*sensitive: fail \(\+8 more"):
        check_data(load_splits(data), DataConfig(sensitive="fail"))
    assert check_data(load_splits(data), DataConfig(sensitive="off")).sensitive_total == 0


def test_data_check_cli_sensitive_warn_and_fail(run_edgeft, tmp_path):
    data = _secret_data(tmp_path)
    result = run_edgeft("data", "check", "--data", data, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sensitive"]["count"] == 9 and report["sensitive"]["findings"][0] == {"kind": "email", "where": f"{data}:2", "masked": "alic***"}
    table = run_edgeft("data", "check", "--data", data)
    assert table.returncode == 0 and f"{data}:6: aws access key AKIA***" in table.stderr, table.stderr
    for output in (result.stdout + result.stderr, table.stdout + table.stderr):
        for secret in ("alice.smith@example.com", "AKIAIOSFODNN7EXAMPLE", "sk-proj-abcdefghijklmnopqrstuvwx", "3f9a8b7c6d5e4f3a2b1c0d9e8f7a"):
            assert secret not in output

    profile = tmp_path / "strict.yaml"
    profile.write_text((Path(__file__).parent.parent / "profiles" / "arm-int8.yaml").read_text() + "data:\n  sensitive: fail\n")
    error = _one_line_error(run_edgeft("data", "check", "--data", data, "-p", profile), f"{data}:2:", "email", "sensitive: fail")
    assert "alice.smith" not in error
    # the build checks the data first: it stops in prepare, before any model is touched
    _one_line_error(run_edgeft("build", "-t", "rpi5", "-p", profile, "--data", data, "--out", tmp_path / "b"), f"{data}:2:", "sensitive: fail")
    assert not (tmp_path / "b").exists()


def test_demo_data_is_clean(run_edgeft):
    result = run_edgeft("data", "check", "--data", DEMO_DATA, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "prompt_completion" and report["counts"] == {"train": 1920, "val": 240, "test": 240, "total": 2400}
    assert report["warnings"] == [] and report["sensitive"]["count"] == 0 and report["duplicates_removed"] == 0
    assert all(v["exact"] == v["near"] == 0 for v in report["leakage"].values())
    assert report["lengths"]["unit"] in ("tokens", "words") and report["lengths"]["min"] > 0


# ----------------------------------------------------------------------------------------- errors
def test_bad_data_is_one_line_with_file_and_line(run_edgeft, tmp_path):
    check = lambda path, *extra: run_edgeft("data", "check", "--data", path, *extra)  # noqa: E731
    missing = _jsonl(tmp_path / "m.jsonl", [ROWS[0], ROWS[1], {"prompt": "x", "answer": "y"}])
    _one_line_error(check(missing), f"{missing}:3:", "missing string field(s) completion", "accepted:")
    no_column = _csv(tmp_path / "m.csv", [{"instruction": "a", "input": "b", "out": "c"}])
    _one_line_error(check(no_column), f"{no_column}:2:", "cannot tell the dataset format", "'out'", '"messages"', '"instruction"', "columns")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _one_line_error(check(empty), f"{empty}:", "empty")
    chat = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}])
    _one_line_error(check(chat), f"{chat}:1:", "assistant")

    profile = tmp_path / "p.yaml"
    profile.write_text("stages:\n  - finetune: {}\n  - merge: {}\ndata:\n  format: xml\n")
    _one_line_error(check(missing, "-p", profile), f"{profile}:5:", "'data.format'", "prompt_completion")
    profile.write_text("stages:\n  - finetune: {}\n  - merge: {}\ndata:\n  columns: {prompt: q, answer: a}\n")
    _one_line_error(check(missing, "-p", profile), f"{profile}:5:", "'data.columns'", "unknown field 'answer'", "completion")


def test_profile_data_section_validates(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("stages:\n  - merge: {}\ndata:\n  format: alpaca\n  val_fraction: 0.2\n  max_length: 128\n  loss_on: all\n")
    data = load_profile(str(profile)).data
    assert (data.format, data.val_fraction, data.max_length, data.loss_on, data.sensitive, data.dedupe) == ("alpaca", 0.2, 128, "all", "warn", True)
    assert load_profile("arm-int8").data == DataConfig()
    profile.write_text("stages:\n  - merge: {}\ndata:\n  val_fraction: 0.6\n  test_fraction: 0.5\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:4: field 'data': .*val_fraction \+ test_fraction"):
        load_profile(str(profile))
    profile.write_text("stages:\n  - merge: {}\ndata:\n  format: chat\n  columns: {prompt: q}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:4: field 'data': .*columns map prompt_completion fields but format is chat"):
        load_profile(str(profile))
