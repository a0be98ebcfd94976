"""Targets, profiles and the lab inventory: YAML files validated at load.

Every error names the file, the line and the field, and says what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .data import DataConfig
from .errors import ConfigError

# A user's own targets, profiles and lab live in ./targets, ./profiles, ./hil of the current directory, or
# under $EDGEFT_HOME; the shipped targets and profiles are package data (edgeft._shipped, see pyproject.toml).
HOME_ENV = "EDGEFT_HOME"


def edgeft_home() -> Path | None:
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser() if value else None

RUNTIMES = ("onnxruntime", "tensorrt", "tflite")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------- targets
class TelemetryConfig(Strict):
    thermal_zones: bool = True
    cpufreq: bool = False
    tegrastats: bool = False


class TensorRTShapes(Strict):
    """The engine's optimization profile (tokens per call and cache length), built on the device."""

    min_tokens: int = Field(1, ge=1)
    opt_tokens: int = Field(64, ge=1)  # what TensorRT tunes its kernels for: the usual prompt length
    max_tokens: int = Field(256, ge=1)
    max_context: int = Field(512, ge=2)  # prompt + generated tokens held in the KV cache
    static: bool = False  # kept so old files load; true is refused (see _not_static)
    workspace_mb: int = Field(1024, ge=64)

    @field_validator("static")
    @classmethod
    def _not_static(cls, value: bool) -> bool:
        if value:  # the runner refuses it too (edgeft_runner.backends.tensorrt.STATIC_REFUSED), for older bundles
            raise ValueError("a static engine fixes the KV cache's length, so it can run the prefill or the decode "
                             "steps, never both: remove static (or set false); opt_tokens is what TensorRT tunes for")
        return value


class Target(Strict):
    name: str
    description: str = ""
    arch: Literal["aarch64", "x86_64", "armv7l"]
    runtime: Literal["onnxruntime", "tensorrt", "tflite"]
    threads: int = Field(1, ge=1, le=256)
    default_profile: str
    telemetry: TelemetryConfig = TelemetryConfig()
    tensorrt: TensorRTShapes = TensorRTShapes()  # runtime tensorrt only: the engine's shapes
    source: Path | None = Field(None, exclude=True)


# -------------------------------------------------------------------------------------- profiles
class MeasureConfig(Strict):
    warmup_s: float = Field(0.2, ge=0)
    min_s: float = Field(1.0, ge=0)
    min_iters: int = Field(100, ge=1)  # p99 is only reported from >= 100 samples (edgeft_runner.measure.MIN_SAMPLES)
    prompt_tokens: int = Field(32, ge=1)
    decode_tokens: int = Field(16, ge=1)
    first_token_runs: int = Field(5, ge=1)
    sustained_s: float = Field(0.0, ge=0)  # a soak after the warm loop, reported per window so drift shows; 0: off


class LatencyBudget(Strict):
    """A latency budget per phase of the measurement: warm (the timed loop) and/or sustained (the soak)."""

    warm: float | None = Field(None, gt=0)
    sustained: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some_phase(self) -> LatencyBudget:
        if self.warm is None and self.sustained is None:
            raise ValueError("set warm and/or sustained, e.g. {warm: 5, sustained: 8} (a plain number means warm)")
        return self


def _phases(value: Any) -> Any:
    """A plain number is the warm budget, as before phases existed."""
    return {"warm": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class Budgets(Strict):
    """Every budget is optional; an absent one is not checked."""

    latency_ms_p99: Annotated[LatencyBudget | None, BeforeValidator(_phases)] = None
    first_token_ms: float | None = Field(None, gt=0)
    min_decode_tokens_per_s: float | None = Field(None, gt=0)
    peak_rss_mb: float | None = Field(None, gt=0)
    max_model_mb: float | None = Field(None, gt=0)  # the model files' size: what has to fit and be flashed
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    min_accuracy: float | None = Field(None, ge=0, le=1)
    max_temp_c: float | None = Field(None, gt=0)
    # forgetting: general-text perplexity of the final model vs the base, relative (0.2 = at most +20%)
    max_general_ppl_increase: float | None = Field(None, ge=0)
    # vs --baseline: fail when the bootstrap 95% CI of the p50 or p99 change lies wholly above this (0.05 = +5%)
    max_regression: float | None = Field(None, gt=0, le=10)


class EvalConfig(Strict):
    """A profile's `eval:` section: what every model-producing stage reports (edgeft.evaluate)."""

    metrics: list[str] = ["exact_match", "perplexity"]  # of edgeft.metrics.METRICS; exact_match is always measured
    general_text: Path | None = None  # plain text, one document a line, for the forgetting check; None: the shipped one
    context_tokens: int = Field(128, ge=2)  # general text is scored in chunks of this many tokens (at most the model's positions)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, metrics: list[str]) -> list[str]:
        from .metrics import METRICS

        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
        return list(dict.fromkeys(metrics))

    @field_validator("general_text")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path}: file not found (a plain text file, one document a line; null: the shipped general text)")
        return path


def _stage_list(value: Any) -> Any:
    """A plain list of one-key mappings, stage name -> its config (validated later by edgeft.stages)."""
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list like [{finetune: {...}}, {merge: {}}]")
    for item in value:
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(f"each stage must be a one-key mapping like {{merge: {{}}}}, got {item!r}")
        (config,) = item.values()
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"the config of stage {next(iter(item))!r} must be a mapping")
    return [{name: (config or {}) for name, config in item.items()} for item in value]


StageList = Annotated[list[dict[str, dict[str, Any]]], BeforeValidator(_stage_list)]


class SearchConfig(Strict):
    """Candidates for `edgeft build --search`: each is the stage list that follows the profile's
    shared prefix (its stages up to and including merge)."""

    candidates: dict[str, StageList] = Field(min_length=1)


class Profile(Strict):
    name: str
    description: str = ""
    stages: StageList
    measure: MeasureConfig = MeasureConfig()
    budgets: Budgets = Budgets()
    search: SearchConfig | None = None
    data: DataConfig = DataConfig()  # dataset format, columns, splits, dedupe, max_length, sensitive, loss_on (edgeft.data)
    eval: EvalConfig = EvalConfig()  # metrics every stage reports, and the general text of the forgetting check
    source: Path | None = Field(None, exclude=True)

    @field_validator("budgets")
    @classmethod
    def _soak_for_sustained_budget(cls, budgets: Budgets, info: ValidationInfo) -> Budgets:
        measure = info.data.get("measure")  # validated before budgets (declared first); absent if it failed
        latency = budgets.latency_ms_p99
        if measure is not None and latency is not None and latency.sustained is not None and not measure.sustained_s:
            raise ValueError("latency_ms_p99.sustained needs a soak: set measure.sustained_s (seconds) > 0")
        return budgets


# ------------------------------------------------------------------------------------------- lab
class InstallConfig(Strict):
    """Where and how `edgeft flash` installs bundles on a device (A/B slots under `root`)."""

    root: str = "edgeft-install"  # relative to the device's workdir unless absolute
    post_install: str | None = None  # shell command run after the switch (e.g. restart the app's unit)
    health_check: str | None = None  # shell command repeated until it exits 0 or grace_s ends; else roll back
    grace_s: float = Field(30.0, ge=0, le=86400)

    @field_validator("root")
    @classmethod
    def _root_named(cls, value: str) -> str:
        if not value.strip() or value.strip() in (".", "/"):
            raise ValueError("name a directory for the install root, e.g. 'edgeft-install' or '/opt/edgeft'")
        return value


class LabDevice(Strict):
    name: str
    host: str
    port: int = Field(22, ge=1, le=65535)
    user: str
    key_file: Path | None = None  # private key; None: the SSH agent / default keys
    known_hosts: Path | None = None  # extra known_hosts file; the user's ~/.ssh/known_hosts is always read
    target: str
    python: str = "python3"  # the device's interpreter that has numpy and the runtime
    workdir: str = ".edgeft"  # relative paths are relative to the login's home
    tags: list[str] = []
    emulated: bool = False  # an emulated board (qemu): its timings are reported, never gated
    install: InstallConfig = InstallConfig()  # edgeft flash: install root, post_install, health_check


class Lab(Strict):
    devices: list[LabDevice]
    # How a run reserves a device: "device" keeps a lock dir with a lease in the device's workdir (no
    # server); "labgrid" also locks the labgrid place of the device's name on `coordinator`.
    lock: Literal["device", "labgrid"] = "device"
    coordinator: str | None = None  # labgrid coordinator HOST:PORT, for lock: labgrid
    lease_s: float = Field(120.0, ge=2, le=86400)  # a holder's lease lasts this long after its last renewal
    source: Path | None = Field(None, exclude=True)

    @field_validator("coordinator")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected HOST:PORT of the labgrid coordinator, got {value!r}")
        return value

    @model_validator(mode="after")
    def _labgrid_needs_coordinator(self) -> Lab:
        if self.lock == "labgrid" and not self.coordinator:
            raise ValueError("lock: labgrid needs 'coordinator: HOST:PORT' (the labgrid coordinator's address)")
        names = [d.name for d in self.devices]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device names must be unique; repeated: {', '.join(dupes)}")
        return self

    def device(self, name: str) -> LabDevice:
        for device in self.devices:
            if device.name == name:
                return device
        known = ", ".join(d.name for d in self.devices) or "none"
        raise ConfigError(f"{self.source}: no device named {name!r} (known: {known}); add it under 'devices:'")


# ---------------------------------------------------------------------------------------- loading
def _node_at(node: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """Walk a composed YAML node along a pydantic error location; stop where it can't go further."""
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == str(key)]
            if not match:
                return node
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return node
    return node


def load_yaml(path: Path, model: type[BaseModel], defaults: dict[str, Any] | None = None) -> Any:
    """Load `path` as `model`; any problem becomes a ConfigError naming file:line and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of fields at the top level")
    data = {**(defaults or {}), **data}
    try:
        obj = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        target = _node_at(node, loc)
        line = target.start_mark.line + 1 if target is not None else 1
        field = ".".join(str(part) for part in loc) or "(top level)"
        more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"{path}:{line}: field '{field}': {err['msg']}{more}") from exc
    object.__setattr__(obj, "source", path)
    return obj


@dataclass(frozen=True)
class Named:
    """The file a bare target or profile name resolves to, where it came from, and what it hides."""

    name: str
    path: Path
    origin: str  # "./targets" (or "./profiles"), "$EDGEFT_HOME" or "shipped"
    shadows: tuple[str, ...] = ()  # origins further down the search order that have a file of this name too


def search_dirs(kind: str) -> list[tuple[str, Path]]:
    """Where a bare name of `kind` ("targets" or "profiles") is looked for, first match wins: ./KIND of the
    current directory, $EDGEFT_HOME/KIND, then the shipped ones. A folder is listed once: the source
    checkout's own targets/ is the shipped one, and $EDGEFT_HOME may be the current directory."""
    # Installs are on a file system (editable, `pip install .`, a wheel), so files() is a real directory.
    shipped = Path(resources.files(f"edgeft._shipped.{kind}"))
    user_dirs = [(f"./{kind}", Path.cwd() / kind)]
    if edgeft_home():
        user_dirs.append((f"${HOME_ENV}", edgeft_home() / kind))
    seen = {shipped.resolve()}
    dirs = []
    for origin, folder in user_dirs:
        if folder.resolve() not in seen:
            seen.add(folder.resolve())
            dirs.append((origin, folder))
    return [*dirs, ("shipped", shipped)]


def find_named(kind: str) -> list[Named]:
    """Every name of `kind` that resolves, sorted, each with the file that wins and the origins it shadows."""
    hits: dict[str, list[tuple[str, Path]]] = {}
    for origin, folder in search_dirs(kind):
        for path in sorted(folder.glob("*.yaml")):
            hits.setdefault(path.stem, []).append((origin, path))
    return [Named(name, found[0][1], found[0][0], tuple(origin for origin, _ in found[1:])) for name, found in sorted(hits.items())]


def _named(kind: str, name_or_path: str) -> Path:
    """A bare name is looked for along search_dirs(kind); a path (has '/' or '.yaml') is used as is."""
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return Path(name_or_path)
    dirs = search_dirs(kind)
    for _origin, folder in dirs:
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    searched = ", ".join(f"{folder} ({origin})" for origin, folder in dirs)
    known = ", ".join(list_names(kind)) or "none"
    raise ConfigError(f"unknown {kind.rstrip('s')} {name_or_path!r}: no {name_or_path}.yaml in {searched}; "
                      f"known: {known} (see `edgeft {kind}`), or pass a path to a YAML file")


def list_names(kind: str) -> list[str]:
    return [named.name for named in find_named(kind)]


def load_target(name_or_path: str) -> Target:
    path = _named("targets", name_or_path)
    return load_yaml(path, Target, {"name": path.stem})


def load_profile(name_or_path: str) -> Profile:
    path = _named("profiles", name_or_path)
    return load_yaml(path, Profile, {"name": path.stem})


def lab_candidates() -> list[Path]:
    """Where the lab file is looked for when none is given: ./hil/lab.yaml, then $EDGEFT_HOME/hil/lab.yaml."""
    candidates = [Path.cwd() / "hil" / "lab.yaml"]
    if edgeft_home():
        candidates.append(edgeft_home() / "hil" / "lab.yaml")
    return candidates


def default_lab_path() -> Path:
    """The first lab candidate that exists, else the first (where `edgeft lab emulate` writes a new one)."""
    candidates = lab_candidates()
    return next((path for path in candidates if path.is_file()), candidates[0])


def load_lab(path: Path | None = None) -> Lab:
    if path is None:
        path = default_lab_path()
        if not path.is_file():
            searched = " and ".join(str(p) for p in lab_candidates())
            raise ConfigError(f"no lab file: looked for {searched}; pass --lab FILE, or write hil/lab.yaml "
                              f"(or ${HOME_ENV}/hil/lab.yaml) listing your devices")
    path = Path(path)
    lab = load_yaml(path, Lab)
    # Key files and known_hosts are relative to the lab file, so a lab dir can be moved as a whole.
    for device in lab.devices:
        for attr in ("key_file", "known_hosts"):
            value = getattr(device, attr)
            if value is not None:
                value = Path(os.path.expanduser(value))
                setattr(device, attr, value if value.is_absolute() else path.parent / value)
    return lab
