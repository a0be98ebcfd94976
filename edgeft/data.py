"""Task datasets: loaded in one of three formats from JSONL, JSON, CSV/TSV, Parquet or a saved Hugging
Face `datasets` directory, normalised to `Example`, split with a fixed seed, and checked.

Formats (auto-detected from the first row's fields, or named by the profile's `data.format`):
  prompt_completion  {"prompt": ..., "completion": ...}
  alpaca             {"instruction": ..., "input": ... (optional), "output": ...}; the prompt is
                     ALPACA_PROMPT (or ALPACA_PROMPT_WITH_INPUT) filled in, the completion is `output`
  chat               {"messages": [{"role": ..., "content": ...}, ...]}; rendered through the
                     tokenizer's chat template at encode time (see `encode`)

The task metric is exact match of the completion, counted on tokens: greedy decoding from the prompt's
tokens must produce exactly the completion's tokens and then EOS. The same definition runs on the host
(PyTorch) and on the device (runner), so the two numbers are comparable.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .artifact import digest_of, hash_dir, sha256_file
from .errors import ConfigError

DEMO_DATA = Path(__file__).resolve().parent / "demo" / "alerts.jsonl"

FORMATS = ("prompt_completion", "alpaca", "chat")
# Every field of a format (canonical names; data.columns maps them to a file's own column names) ...
FIELDS = {"prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "input", "output"), "chat": ("messages",)}
# ... and the ones a row must have.
REQUIRED = {"prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "output"), "chat": ("messages",)}
ACCEPTED = 'accepted: {"prompt", "completion"}, Alpaca {"instruction", "input" (optional), "output"}, chat {"messages": [{"role", "content"}, ...]}'

# The Alpaca prompt template (fixed: changing it changes every Alpaca dataset's task).
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# ------------------------------------------------------------------------------------ the config
class DataConfig(BaseModel):
    """A profile's `data:` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["auto", "prompt_completion", "alpaca", "chat"] = "auto"
    columns: dict[str, str] = {}  # canonical field -> the file's column name, e.g. {prompt: question, completion: answer}
    validation: Path | None = None  # a validation file (same formats); None: carved from the data with the fixed seed
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    dedupe: bool = True  # drop exact duplicates (whitespace-normalised prompt + completion), counted
    max_length: int | None = Field(None, ge=8)  # tokens; longer training examples are truncated (training_rows)
    sensitive: Literal["warn", "fail", "off"] = "warn"
    loss_on: Literal["completion", "all"] = "completion"  # which tokens the fine-tuning loss counts

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        known = [name for names in FIELDS.values() for name in names]
        for key in columns:
            if key not in known:
                raise ValueError(f"unknown field {key!r}; accepted: {', '.join(known)}")
        formats = {fmt for fmt, names in FIELDS.items() if set(columns) & set(names)}
        if len(formats) > 1:
            raise ValueError(f"mixes fields of formats {', '.join(sorted(formats))}; map the fields of one format")
        return columns

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1, to leave training examples")
        implied = self.columns_format()
        if implied and self.format not in ("auto", implied):
            raise ValueError(f"columns map {implied} fields but format is {self.format}")
        return self

    def columns_format(self) -> str | None:
        for fmt, names in FIELDS.items():
            if set(self.columns) & set(names):
                return fmt
        return None

    def column(self, name: str) -> str:
        return self.columns.get(name, name)


# ------------------------------------------------------------------------------------ examples
@dataclass(frozen=True)
class Example:
    """One task example, whatever format it came in.

    `prompt` and `completion` are plain text. A chat example also carries its turns in `messages`
    ((role, content) pairs, the last one the assistant's reply); `encode` renders those through the
    tokenizer's chat template, and `prompt` is then only a readable rendering (for checks and logs).
    `where` is the example's origin, file:line (or file:row N for Parquet/datasets, from 0).
    """

    prompt: str
    completion: str
    messages: tuple[tuple[str, str], ...] | None = None
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    source: Path
    # The dataset's identity, used in stage cache keys: the file's sha256 under the default data
    # config; otherwise a digest of it, the validation file's and the config (see split_sha256).
    sha256: str
    format: str = "prompt_completion"
    duplicates: int = 0  # exact duplicates removed (data and validation file)
    config: DataConfig = field(default_factory=DataConfig)


# ------------------------------------------------------------------------------------ reading rows
def _rows(path: Path, role: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for every row of a JSONL/JSON/CSV/TSV/Parquet file or a saved `datasets` dir."""
    if path.is_dir():
        yield from _dataset_rows(path)
        return
    if not path.is_file():
        raise ConfigError(f"{path}: {role} not found; pass a JSONL, JSON, CSV, Parquet file or a saved `datasets` directory ({ACCEPTED})")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            yield from _csv_rows(path, "\t" if suffix == ".tsv" else ",")
        elif suffix in (".parquet", ".pq"):
            yield from _parquet_rows(path)
        else:
            yield from _json_rows(path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}); save the {role} as UTF-8") from exc


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if path.suffix.lower() == ".json" and head.startswith("["):  # one JSON array of objects
            try:
                records = json.load(f)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
            for index, record in enumerate(records):
                yield f"{path}:row {index}", record
            return
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{line_no}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
            yield f"{path}:{line_no}", record


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                yield f"{path}:{start}", dict(zip(header, row))
        except csv.Error as exc:
            raise ConfigError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from exc


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise ConfigError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from exc
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield f"{path}:row {index}", record
            index += 1


def _dataset_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ConfigError(
            f"{path}: a directory, but not a saved Hugging Face dataset ({str(exc).splitlines()[0]}); "
            "save one with Dataset.save_to_disk, or pass a JSONL/CSV/Parquet file"
        ) from exc
    if isinstance(dataset, datasets.DatasetDict):
        names = list(dataset)
        if "train" not in dataset and len(names) != 1:
            raise ConfigError(f"{path}: a DatasetDict with splits {', '.join(names)} and no 'train'; save the split to use on its own")
        dataset = dataset["train" if "train" in dataset else names[0]]
    index = 0
    for batch in dataset.iter(batch_size=4096):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield f"{path}:row {index}", dict(zip(keys, values))
            index += 1


# ------------------------------------------------------------------------------------ normalising
def detect_format(record: Any, config: DataConfig, where: str) -> str:
    """The format named by the config, implied by its columns, or detected from this (first) row."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected an object of named fields, got {type(record).__name__}; {ACCEPTED}")
    if config.format != "auto":
        return config.format
    implied = config.columns_format()
    if implied:
        return implied
    for fmt in FORMATS:
        if all(config.column(name) in record for name in REQUIRED[fmt]):
            return fmt
    fields = ", ".join(map(repr, record)) or "none"
    raise ConfigError(
        f"{where}: cannot tell the dataset format from the fields {fields}; {ACCEPTED}; "
        "or map your columns in the profile (data: {columns: {prompt: question, completion: answer}})"
    )


def _needs(fmt: str, config: DataConfig) -> str:
    return " and ".join(f'"{config.column(name)}"' for name in REQUIRED[fmt])


def normalise(record: Any, fmt: str, config: DataConfig, where: str) -> Example:
    """One row of a `fmt` dataset as an Example; any problem names the row and the field."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected an object with {_needs(fmt, config)}")
    if fmt == "chat":
        return _chat_example(record, config, where)
    missing = [config.column(name) for name in REQUIRED[fmt] if not isinstance(record.get(config.column(name)), str)]
    if missing:
        raise ConfigError(
            f"{where}: missing string field(s) {', '.join(missing)}; each row of this {fmt} dataset needs {_needs(fmt, config)} ({ACCEPTED})"
        )
    if fmt == "prompt_completion":
        prompt, completion = record[config.column("prompt")], record[config.column("completion")]
    else:
        extra = record.get(config.column("input"))
        if extra is not None and not isinstance(extra, str):
            raise ConfigError(f"{where}: field {config.column('input')!r} must be a string (or absent), got {type(extra).__name__}")
        instruction = record[config.column("instruction")]
        prompt = (ALPACA_PROMPT_WITH_INPUT if extra and extra.strip() else ALPACA_PROMPT).format(instruction=instruction, input=extra)
        completion = record[config.column("output")]
    if not completion.strip():
        name = config.column("completion" if fmt == "prompt_completion" else "output")
        raise ConfigError(f"{where}: empty \"{name}\"; every example needs a completion to learn")
    return Example(prompt, completion, where=where)


def _chat_example(record: dict, config: DataConfig, where: str) -> Example:
    name = config.column("messages")
    messages = record.get(name)
    if isinstance(messages, str):  # CSV cells hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            pass
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: field {name!r} must be a non-empty list of {{\"role\", \"content\"}} objects ({ACCEPTED})")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConfigError(f"{where}: {name}[{index}] must be an object with \"role\" and \"content\"")
        missing = [key for key in ("role", "content") if not isinstance(message.get(key), str)]
        if missing:
            raise ConfigError(f"{where}: {name}[{index}] is missing string field(s) {', '.join(missing)}; each message needs \"role\" and \"content\"")
        turns.append((message["role"], message["content"]))
    if turns[-1][0] != "assistant":
        raise ConfigError(f"{where}: the last message is from {turns[-1][0]!r}; the last message must be the assistant's reply (the completion to learn)")
    if not turns[-1][1].strip():
        raise ConfigError(f"{where}: the last assistant message is empty; every example needs a completion to learn")
    prompt = "".join(f"{role}: {content}\n" for role, content in turns[:-1])
    return Example(prompt, turns[-1][1], messages=tuple(turns), where=where)


def load_examples(path: Path, config: DataConfig | None = None, role: str = "dataset") -> tuple[list[Example], str]:
    """Every example of a data file or `datasets` dir, and the format it was read as."""
    config = config or DataConfig()
    path = Path(path)
    rows = _rows(path, role)
    first = next(rows, None)
    if first is None:
        raise ConfigError(f"{path}: {role} is empty (no rows); {ACCEPTED}")
    fmt = detect_format(first[1], config, first[0])
    examples = [normalise(first[1], fmt, config, first[0])]
    examples += [normalise(record, fmt, config, where) for where, record in rows]
    return examples, fmt


def _dedupe_key(example: Example) -> tuple[str, str]:
    norm = lambda text: " ".join(unicodedata.normalize("NFC", text).split())  # noqa: E731
    return norm(example.prompt), norm(example.completion)


def dedupe(examples: list[Example]) -> tuple[list[Example], int]:
    """Drop exact duplicates (whitespace-normalised prompt + completion), keeping the first; count them."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for example in examples:
        key = _dedupe_key(example)
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return kept, len(examples) - len(kept)


def _source_sha256(path: Path) -> str:
    return digest_of(hash_dir(path)) if path.is_dir() else sha256_file(path)


def split_sha256(path: Path, config: DataConfig) -> str:
    """The dataset's identity for cache keys: the file's sha256 when the data config is the default (so
    existing caches stay valid), else a digest of it with the validation file's and the config's fields
    that change what is trained on (all but `sensitive`)."""
    data_sha = _source_sha256(path)
    relevant = config.model_dump(mode="json", exclude={"sensitive"})
    if relevant == DataConfig().model_dump(mode="json", exclude={"sensitive"}):
        return data_sha
    validation = _source_sha256(Path(config.validation)) if config.validation else None
    return digest_of({"data": data_sha, "validation": validation, "config": relevant})


def load_splits(path: Path | None, config: DataConfig | None = None, seed: int = 0) -> Splits:
    """Load, dedupe, shuffle with a fixed seed and carve validation and test splits (at least one
    example each). A `validation` file in the config replaces the carved validation split."""
    config = config or DataConfig()
    path = Path(path) if path else DEMO_DATA
    examples, fmt = load_examples(path, config)
    duplicates = 0
    if config.dedupe:
        examples, duplicates = dedupe(examples)
    if len(examples) < 10:
        raise ConfigError(f"{path}: only {len(examples)} examples; need at least 10 to carve train/validation/test splits")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    n_test = max(1, int(len(examples) * config.test_fraction))
    if config.validation:
        val, _ = load_examples(Path(config.validation), config, role="validation file (data.validation)")
        if config.dedupe:
            val, dropped = dedupe(val)
            duplicates += dropped
        n_val = 0
    else:
        n_val = max(1, int(len(examples) * config.val_fraction))
        val = shuffled[:n_val]
    return Splits(
        train=shuffled[n_val + n_test :],
        val=val,
        test=shuffled[n_val : n_val + n_test],
        source=path,
        sha256=split_sha256(path, config),
        format=fmt,
        duplicates=duplicates,
        config=config,
    )


# ------------------------------------------------------------------------------------ encoding
def _chat_prompt_text(tokenizer, example: Example) -> str:
    if not getattr(tokenizer, "chat_template", None):
        source = example.where.rsplit(":", 1)[0] if example.where else "the dataset"
        raise ConfigError(
            f"{source}: chat-format data (\"messages\") is rendered with the tokenizer's chat template, and this "
            "model's tokenizer has none; use a model whose tokenizer_config.json has a chat_template, "
            "or convert the data to {\"prompt\", \"completion\"} lines"
        )
    turns = [{"role": role, "content": content} for role, content in example.messages[:-1]]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def encode_many(tokenizer, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids ending in EOS) per example. Prompt and completion are tokenized apart,
    always. A plain prompt gets BOS (when the tokenizer has one) in front; a chat prompt is every turn
    before the last assistant turn, rendered with the chat template and add_generation_prompt=True (the
    template adds BOS if it wants one). The completion is the text (the last assistant turn's content)
    plus EOS."""
    if not examples:
        return []
    prompts = [_chat_prompt_text(tokenizer, e) if e.messages is not None else e.prompt for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [
        ((list(p) if e.messages is not None else bos + list(p)), list(c) + [tokenizer.eos_token_id])
        for e, p, c in zip(examples, prompt_ids, completion_ids)
    ]


def encode(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids ending in EOS): see encode_many."""
    return encode_many(tokenizer, [example])[0]


def fit_length(prompt_ids: list[int], completion_ids: list[int], max_length: int, bos_token_id: int | None = None) -> tuple[list[int], list[int]]:
    """Truncate to max_length tokens: drop the prompt's oldest tokens first (keeping a leading BOS), so
    the completion stays whole; a completion too long on its own loses its end (and its EOS)."""
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids
    head = prompt_ids[:1] if prompt_ids and bos_token_id is not None and prompt_ids[0] == bos_token_id else []
    room = max_length - len(head) - len(completion_ids)
    if room >= 0:
        rest = prompt_ids[len(head) :]
        kept = rest[len(rest) - room :] if room else []
        return head + kept, completion_ids
    return head, completion_ids[: max_length - len(head)]


class TrainingRows(NamedTuple):
    rows: list[dict[str, list[int]]]  # {"input_ids", "labels"}; labels -100 where the loss does not count
    truncated: int  # examples cut to config.max_length


def training_rows(tokenizer, examples: list[Example], config: DataConfig) -> TrainingRows:
    """Training features per the data config: truncated to `max_length` (fit_length; counted) and
    labelled per `loss_on` (completion: -100 on the prompt; all: every token)."""
    rows, truncated = [], 0
    for prompt_ids, completion_ids in encode_many(tokenizer, examples):
        if config.max_length is not None and len(prompt_ids) + len(completion_ids) > config.max_length:
            truncated += 1
            prompt_ids, completion_ids = fit_length(prompt_ids, completion_ids, config.max_length, tokenizer.bos_token_id)
        ids = prompt_ids + completion_ids
        labels = [-100] * len(prompt_ids) + completion_ids if config.loss_on == "completion" else list(ids)
        rows.append({"input_ids": ids, "labels": labels})
    return TrainingRows(rows, truncated)


# ------------------------------------------------------------------------------------ checks
def _prefilter(*needles: str) -> re.Pattern[str]:
    return re.compile("|".join(map(re.escape, needles)))


SENSITIVE_PATTERNS: list[tuple[str, re.Pattern[str] | None, re.Pattern[str]]] = [
    # (kind, a cheap pre-filter a text must match to be searched at all, pattern).
    # Most specific first: a span claimed by one kind is not reported again by a later one.
    ("private key", _prefilter("PRIVATE KEY"), re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    ("aws access key", _prefilter("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA"), re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b")),
    ("github token", _prefilter("gh", "github_pat_"), re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b")),
    ("api key", _prefilter("sk-", "xox", "AIza"), re.compile(r"\b(?:sk-[A-Za-z0-9_-]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})")),
    ("jwt", _prefilter("eyJ"), re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")),
    # key=VALUE, "token": "VALUE": a long hex/base64-like value (group 1) after a secret-sounding name
    ("secret", re.compile(r"(?i)key|secret|token|pass|pwd|credential|auth"), re.compile(
        r"(?i)(?:api[_-]?key|secret|token|passw(?:or)?d|pwd|credential|access[_-]?key|private[_-]?key|auth)[\w.-]*"
        r"[\"']?[ \t]*[:=][ \t]*[\"']?([A-Za-z0-9+/_.~-]{16,}={0,2})"
    )),
    ("email", _prefilter("@"), re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
    ("ipv4 address", _prefilter("."), re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)")),
    ("ipv6 address", re.compile(r":[:0-9A-Fa-f]"), re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?![\w:])")),
    # Phone numbers: +country code and 8-15 digits, (area) 555-0100, or 555-555-0100 with one separator.
    ("phone number", None, re.compile(
        r"(?<![\w+.=/-])(?:\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}|\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}([.-])\d{3}\1\d{4})(?![\w.-]*\d)"
    )),
]


def mask(value: str) -> str:
    """Never show a secret whole: its first 4 characters and ***."""
    return value[:4] + "***"


def _plausible(kind: str, match: re.Match[str]) -> bool:
    text = match.group(0)
    if kind == "secret":
        value = match.group(1)
        return bool(re.search(r"\d", value) and re.search(r"[A-Za-z]", value))
    if kind == "ipv6 address":
        import ipaddress

        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return False
        return bool(re.search(r"\d", text)) and text.count(":") >= 2 and text.strip(":") != ""
    if kind == "phone number" and text.startswith("+"):
        return 8 <= sum(ch.isdigit() for ch in text) <= 15
    return True


@dataclass
class Finding:
    kind: str
    where: str  # file:line of the example
    masked: str  # the first 4 characters + ***


def scan_sensitive(text: str) -> list[tuple[str, str]]:
    """(kind, masked value) for every likely secret or personal datum in the text."""
    found, taken = [], []
    for kind, prefilter, pattern in SENSITIVE_PATTERNS:
        if prefilter is not None and not prefilter.search(text):
            continue
        for match in pattern.finditer(text):
            group = 1 if kind == "secret" else 0
            span = match.span(group)
            if any(start < span[1] and span[0] < end for start, end in taken) or not _plausible(kind, match):
                continue
            taken.append(span)
            found.append((kind, mask(match.group(group))))
    return found


# Near-duplicate prompts: character 5-gram Jaccard >= 0.9. The 5-grams are hashed with numpy (no
# Python object per shingle), summarised by MinHash (64 hashes) and bucketed by LSH (16 bands of 4), and
# each candidate pair is confirmed by its exact Jaccard: about linear in the number of examples.
NEAR_JACCARD = 0.9
_SHINGLE = 5
_MAX_CHARS = 2000  # the start of a long prompt stands for it
_NUM_HASHES, _BANDS = 64, 16
_MAX_CANDIDATES = 50  # per prompt: candidates confirmed (most shared bands first) before giving up
_MAX_BUCKET = 2000  # per band: members of one bucket looked at (keeps a crowded bucket linear)


def _normalise_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


class _ShingleIndex:
    """Hashed 5-grams of many normalised texts (one flat array + offsets) and their MinHash signatures."""

    def __init__(self, norms: list[str]):
        import numpy as np

        self.np = np
        texts = [t[:_MAX_CHARS].ljust(_SHINGLE, "\0") for t in norms]  # a short text is one shingle
        counts = np.array([len(t) - _SHINGLE + 1 for t in texts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
        starts = np.concatenate([[0], np.cumsum([len(t) for t in texts], dtype=np.int64)])[:-1].astype(np.int64)
        # window i covers codes[i : i + 5]; keep the windows that start and end inside one text
        positions = np.repeat(starts - self.offsets[:-1], counts) + np.arange(self.offsets[-1])
        h = np.zeros(len(positions), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(_SHINGLE):
                h = h * np.uint64(1_000_003) + codes[positions + j]
            h ^= h >> np.uint64(31)  # splitmix64 finaliser: spread the bits before MinHash
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(27)
        self.hashes = h
        self.signatures = self._minhash()

    def _minhash(self):
        np = self.np
        rng = np.random.default_rng(0)
        mult = rng.integers(1, 2**63, size=_NUM_HASHES, dtype=np.uint64) | np.uint64(1)
        add = rng.integers(0, 2**63, size=_NUM_HASHES, dtype=np.uint64)
        n = len(self.offsets) - 1
        out = np.empty((n, _NUM_HASHES), dtype=np.uint64)
        start = 0
        while start < n:  # chunks of about 64k shingles keep the (64, chunk) array small
            stop = int(np.searchsorted(self.offsets, self.offsets[start] + 65536, side="right")) - 1
            stop = min(n, max(stop, start + 1))
            lo, hi = self.offsets[start], self.offsets[stop]
            with np.errstate(over="ignore"):
                mixed = self.hashes[lo:hi][None, :] * mult[:, None] + add[:, None]  # a permutation per row
            out[start:stop] = np.minimum.reduceat(mixed, self.offsets[start:stop] - lo, axis=1).T
            start = stop
        return out

    def band_keys(self):
        """(texts, bands) uint64: one hash per LSH band of each signature; equal keys make candidates."""
        np = self.np
        rows = _NUM_HASHES // _BANDS
        grouped = self.signatures.reshape(len(self.signatures), _BANDS, rows)
        keys = np.zeros(grouped.shape[:2], dtype=np.uint64)
        with np.errstate(over="ignore"):
            for r in range(rows):
                keys = keys * np.uint64(0x100000001B3) + grouped[:, :, r]
            keys ^= np.arange(_BANDS, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return keys

    def unique(self, i: int):
        return self.np.unique(self.hashes[self.offsets[i] : self.offsets[i + 1]])


def _jaccard(a, b) -> float:
    import numpy as np

    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def _template_cut(prompts: list[str]) -> tuple[int, int]:
    """Lengths of the prefix and suffix every prompt shares (a template's fixed text, such as Alpaca's
    "### Instruction:" ... "### Response:"): left out of the near-duplicate comparison, so a long
    template does not make different examples look alike."""
    import os

    if len(prompts) < 2:
        return 0, 0
    prefix = len(os.path.commonprefix(prompts))
    suffix = len(os.path.commonprefix([p[prefix:][::-1] for p in prompts]))
    return prefix, suffix


class _TrainIndex:
    """The train prompts, indexed once for every split compared against them (all prompts given to
    `template_of` decide the shared template text that is left out)."""

    def __init__(self, train: list[Example], template_of: list[Example] | None = None):
        self.train = train
        self.by_prompt = {e.prompt: e for e in reversed(train)}
        self.cut = _template_cut([e.prompt for e in (template_of if template_of is not None else train)])
        norms = [self._norm(e.prompt) for e in train]
        self.by_norm = {norm: e for norm, e in zip(reversed(norms), reversed(train))}
        self.shingles = _ShingleIndex(norms)
        keys = self.shingles.band_keys().ravel()
        order = keys.argsort(kind="stable")
        self.sorted_keys, self.key_owner = keys[order], order // _BANDS

    def _norm(self, prompt: str) -> str:
        prefix, suffix = self.cut
        return _normalise_text(prompt[prefix : len(prompt) - suffix])

    def leakage(self, other: list[Example], max_examples: int = 5) -> dict[str, Any]:
        exact, near, pairs = 0, 0, []
        if not self.train or not other:
            return {"exact": 0, "near": 0, "examples": []}
        norms = [self._norm(e.prompt) for e in other]
        queries = _ShingleIndex(norms)
        keys = queries.band_keys()
        first = self.sorted_keys.searchsorted(keys, side="left")
        last = self.sorted_keys.searchsorted(keys, side="right")
        for j, (example, norm) in enumerate(zip(other, norms)):
            match, kind, similarity = self.by_prompt.get(example.prompt), "exact", 1.0
            if match is None:
                match, kind = self.by_norm.get(norm), "near"
            if match is None and (last[j] > first[j]).any():
                match, similarity = self._near(queries, j, first[j], last[j])
            if match is None:
                continue
            exact += kind == "exact"
            near += kind == "near"
            if len(pairs) < max_examples:
                pairs.append({"kind": kind, "example": example.where, "train": match.where, "similarity": similarity})
        return {"exact": exact, "near": near, "examples": pairs}

    def _near(self, queries: _ShingleIndex, j: int, first, last) -> tuple[Example | None, float]:
        """Confirm the candidates sharing the most LSH bands with prompt j (the likeliest near
        duplicates) first, up to _MAX_CANDIDATES of them."""
        np = queries.np
        owners = [self.key_owner[lo : min(hi, lo + _MAX_BUCKET)] for lo, hi in zip(first.tolist(), last.tolist()) if hi > lo]
        ids, hits = np.unique(np.concatenate(owners), return_counts=True)
        mine = queries.unique(j)
        for i in ids[np.argsort(-hits, kind="stable")][:_MAX_CANDIDATES].tolist():
            score = _jaccard(mine, self.shingles.unique(i))
            if score >= NEAR_JACCARD:
                return self.train[i], round(score, 3)
        return None, 0.0


def leakage(train: list[Example], other: list[Example], max_examples: int = 5) -> dict[str, Any]:
    """Prompts of `other` (test or validation) that also appear in train: identical, or near-identical
    (equal after lowercasing and whitespace normalisation, or 5-gram Jaccard >= NEAR_JACCARD), the
    text every prompt shares (a template's) left out. {"exact": n, "near": n, "examples": [{"kind", "example": where, "train": where, "similarity"}]}"""
    return _TrainIndex(train, train + other).leakage(other, max_examples)


def _percentile(ordered: list[int], q: float) -> int:
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _where_key(where: str) -> tuple[str, int]:
    match = re.search(r"^(.*):(?:row )?(\d+)$", where)
    return (match.group(1), int(match.group(2))) if match else (where, 0)


@dataclass
class DataReport:
    source: str
    format: str
    counts: dict[str, int]
    duplicates_removed: int
    lengths: dict[str, Any] | None  # {unit: tokens|words, measured_with, min, p50, p90, p99, max}
    max_length: int | None
    truncated: dict[str, int] | None  # per split, over max_length; None without a tokenizer or max_length
    leakage: dict[str, dict[str, Any]]  # {"test": {...}, "val": {...}} vs train, see leakage()
    sensitive_mode: str
    sensitive: list[Finding]
    sensitive_total: int
    warnings: list[str]
    validation_source: str | None = None

    @property
    def ok(self) -> bool:
        """False when the profile says sensitive: fail and something was found."""
        return not (self.sensitive_mode == "fail" and self.sensitive_total)

    def enforce(self) -> None:
        """Raise the one-line ConfigError for `sensitive: fail`, naming the first finding's file:line."""
        if self.ok:
            return
        first = self.sensitive[0]
        more = f" (+{self.sensitive_total - 1} more; see `edgeft data check`)" if self.sensitive_total > 1 else ""
        raise ConfigError(
            f"{first.where}: likely {first.kind} ({first.masked}) in the data, and the profile says data.sensitive: fail{more}; "
            "remove or redact it, or set data.sensitive: warn"
        )

    def to_dict(self) -> dict[str, Any]:
        by_kind = Counter(f.kind for f in self.sensitive)
        return {
            "source": self.source,
            "validation_source": self.validation_source,
            "format": self.format,
            "counts": self.counts,
            "duplicates_removed": self.duplicates_removed,
            "lengths": self.lengths,
            "max_length": self.max_length,
            "truncated": self.truncated,
            "leakage": self.leakage,
            "sensitive": {
                "mode": self.sensitive_mode,
                "count": self.sensitive_total,
                "by_kind": dict(by_kind),
                "findings": [vars(f) for f in self.sensitive],
            },
            "warnings": self.warnings,
            "ok": self.ok,
        }

    def summary(self) -> str:
        c = self.counts
        leaks = sum(v["exact"] + v["near"] for v in self.leakage.values())
        sensitive = "not scanned" if self.sensitive_mode == "off" else (f"{self.sensitive_total} likely sensitive values" if self.sensitive_total else "no sensitive data found")
        return (
            f"data: {Path(self.source).name} ({self.format}): {c['train']} train / {c['val']} val / {c['test']} test, "
            f"{self.duplicates_removed} duplicates removed, "
            f"{'no' if not leaks else leaks} prompts shared with train, {sensitive}"
        )


MAX_FINDINGS = 1000  # kept in the report; the total is counted


def check_data(splits: Splits, config: DataConfig | None = None, tokenizer=None, length_unit: str | None = None, enforce: bool = True) -> DataReport:
    """Counts, duplicates, length distribution (tokens with a tokenizer, else whitespace words), the
    truncated count at max_length, train/test and train/val leakage, and likely sensitive data.

    Raises ConfigError (via DataReport.enforce) when `sensitive: fail` finds something, unless
    enforce=False (the caller then decides). `length_unit` names the tokenizer in the report."""
    config = config or splits.config
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    everything = [e for part in parts.values() for e in part]
    warnings: list[str] = []

    if tokenizer is not None:
        encoded = encode_many(tokenizer, everything)
        lengths = [len(p) + len(c) for p, c in encoded]
        unit, measured_with = "tokens", length_unit or "the model's tokenizer"
    else:
        lengths = [len(e.prompt.split()) + len(e.completion.split()) for e in everything]
        unit, measured_with = "words", length_unit or "whitespace words (no tokenizer)"
    ordered = sorted(lengths)
    length_stats = {
        "unit": unit,
        "measured_with": measured_with,
        **{name: _percentile(ordered, q) for name, q in (("min", 0), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
    } if ordered else None

    truncated = None
    if config.max_length is not None and tokenizer is not None:
        truncated, start = {}, 0
        for name, part in parts.items():
            truncated[name] = sum(n > config.max_length for n in lengths[start : start + len(part)])
            start += len(part)
        if truncated["train"]:
            warnings.append(f"{truncated['train']} training examples are longer than max_length {config.max_length} tokens and will be truncated")

    train_index = _TrainIndex(splits.train, everything)
    leaks = {"test": train_index.leakage(splits.test), "val": train_index.leakage(splits.val)}
    for name, leak in leaks.items():
        if leak["exact"] or leak["near"]:
            first = leak["examples"][0]
            warnings.append(
                f"{leak['exact']} identical and {leak['near']} near-identical {name} prompts also in train "
                f"(e.g. {first['example']} ~ {first['train']}); {name} accuracy will be optimistic"
            )

    findings: list[Finding] = []
    total = 0
    if config.sensitive != "off":
        for example in sorted(everything, key=lambda e: _where_key(e.where)):
            text = example.prompt + "\n" + example.completion
            for kind, masked in scan_sensitive(text):
                total += 1
                if len(findings) < MAX_FINDINGS:
                    findings.append(Finding(kind, example.where, masked))
        if total and config.sensitive == "warn":
            first = findings[0]
            values = "value" if total == 1 else "values"
            warnings.append(f"{total} likely sensitive {values} (first: {first.kind} {first.masked} at {first.where}); run `edgeft data check` for the list")

    report = DataReport(
        source=str(splits.source),
        validation_source=str(config.validation) if config.validation else None,
        format=splits.format,
        counts={**{name: len(part) for name, part in parts.items()}, "total": len(everything)},
        duplicates_removed=splits.duplicates,
        lengths=length_stats,
        max_length=config.max_length,
        truncated=truncated,
        leakage=leaks,
        sensitive_mode=config.sensitive,
        sensitive=findings,
        sensitive_total=total,
        warnings=warnings,
    )
    if enforce:
        report.enforce()
    return report
