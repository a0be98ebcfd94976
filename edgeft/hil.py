"""`edgeft hil run`: a suite of bundles × lab devices, measured in parallel (every device reserved first),
gated, and reported three ways: a summary table, JSON, and JUnit XML for CI.

    suite = load_suite(Path("hil/suites/smoke.yaml"))
    plan = plan_suite(suite, lab_path, results_dir, log)      # bundles built/verified, jobs listed
    result = run_suite(plan, parallel=None, wait_s=None, ...)  # {suite, started, finished, jobs: [...]}
    write_atomic(Path("junit.xml"), junit_xml(result))

Jobs on one device run one after another (one "lane" per device name, or per tag selector); lanes
run side by side in a thread pool. A job whose device is unreachable, unhealthy or held past the wait
is recorded as an error and the suite goes on with the others.
"""

from __future__ import annotations

import json
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Iterator

from pydantic import BeforeValidator, Field, ValidationError, model_validator

from edgeft_runner import RunnerError
from edgeft_runner.bundle import verify_bundle

from .artifact import write_atomic
from .build import BuildOptions, build, measure_bundle
from .config import Budgets, Lab, LabDevice, Strict, load_lab, load_yaml
from .device import LOCAL_DEVICE, RunResult, push_verified
from .device.reserve import Reservation, check_target, reserve
from .errors import BundleError, ConfigError, DeviceError, EdgeftError
from .gate import describe, evaluate
from .report_html import render_report, render_suite

RESULTS_FORMAT = "edgeft-hil/1"
DEFAULT_RESULTS_DIR = Path("hil-results")
# Suite exit status: the same numbers as `edgeft build/measure` (PASS 0, FAIL 1, INVALID 3), 2 when nothing ran.
EXIT_PASS, EXIT_FAIL, EXIT_NOTHING_RAN, EXIT_INVALID = 0, 1, 2, 3


# ------------------------------------------------------------------------------------- the suite
class BundleSpec(Strict):
    """A finished bundle dir (`path`), or a build recipe (`target`, optional profile/model/data) built
    once per suite run without measuring, as `edgeft build --no-measure` does."""

    name: str | None = None  # the JUnit classname; default: the dir's name, or target[-profile]
    path: Path | None = None
    target: str | None = None
    profile: str | None = None
    model: Path | None = None
    data: Path | None = None
    budgets: Budgets | None = None  # this bundle's overrides, on top of the suite's

    @model_validator(mode="after")
    def _path_or_recipe(self) -> BundleSpec:
        if (self.path is None) == (self.target is None):
            raise ValueError("give either 'path: BUNDLE_DIR' or a build recipe 'target: NAME' (with optional profile, model, data)")
        if self.path is not None and (self.profile or self.model or self.data):
            raise ValueError("profile/model/data belong to a build recipe (target: ...), not to a bundle 'path'")
        if self.name is None:
            self.name = self.path.name if self.path is not None else "-".join(filter(None, (self.target, self.profile)))
        return self


def _selector(value: Any) -> Any:
    """`dev-1` is short for {name: dev-1}."""
    return {"name": value} if isinstance(value, str) else value


class DeviceSelector(Strict):
    """A device by name, or by tags: one job on any healthy free device carrying every tag (each: true:
    one job on every device carrying them)."""

    name: str | None = None
    tags: list[str] = []
    each: bool = False

    @model_validator(mode="after")
    def _name_or_tags(self) -> DeviceSelector:
        if (self.name is None) == (not self.tags):
            raise ValueError("give a device name (a plain string) or tags (a mapping with a tags list), not both")
        if self.each and not self.tags:
            raise ValueError("each: true goes with tags (every device carrying them)")
        return self

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "tags:" + ",".join(self.tags)


class SuiteMeasure(Strict):
    """Measurement overrides passed to the device runner (the bundle's own measure settings are hashed
    into its manifest, so they are not edited)."""

    threads: int | None = Field(None, ge=1, le=256)  # runner --threads: intra-op threads on the device
    sustained_s: float | None = Field(None, ge=0)  # runner --sustained-s: the soak's length (0: none)

    def runner_args(self) -> list[str]:
        args = ["--threads", str(self.threads)] if self.threads is not None else []
        return args + (["--sustained-s", f"{self.sustained_s:g}"] if self.sustained_s is not None else [])


class Suite(Strict):
    name: str
    description: str = ""
    bundles: list[BundleSpec] = Field(min_length=1)
    devices: list[Annotated[DeviceSelector, BeforeValidator(_selector)]] = Field(min_length=1)
    budgets: Budgets | None = None  # overrides of every bundle's own budgets; `null` on a field turns it off
    wait_s: float = Field(0.0, ge=0, le=86400)  # how long a job waits for a held device (CI: minutes)
    measure: SuiteMeasure = SuiteMeasure()
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique_bundle_names(self) -> Suite:
        names = [b.name for b in self.bundles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"bundle names must be unique; repeated: {', '.join(dupes)} (set 'name:' on each)")
        return self


def load_suite(path: Path) -> Suite:
    path = Path(path)
    return load_yaml(path, Suite, {"name": path.stem})


def budget_overrides(*layers: Budgets | dict | None) -> dict[str, Any]:
    """The budget fields set in `layers` (later ones win); a field set to null removes that budget."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        if isinstance(layer, dict):
            try:
                layer = Budgets.model_validate(layer)
            except ValidationError as exc:
                err = exc.errors()[0]
                raise ConfigError(f"budgets: field '{'.'.join(map(str, err['loc']))}': {err['msg']}") from exc
        merged.update(layer.model_dump(exclude_unset=True))
    return merged


# ------------------------------------------------------------------------------------- planning
@dataclass
class Job:
    bundle: str  # bundle name (JUnit classname)
    bundle_dir: Path
    manifest: dict[str, Any]
    selector: DeviceSelector  # a named selector here names one device (each: true is expanded)
    overrides: dict[str, Any]  # budget fields replacing the bundle's own

    @property
    def lane(self) -> str:
        """Jobs of one lane run one after another: one lane per device (or per tag selector)."""
        return self.selector.label


@dataclass
class Plan:
    suite: Suite
    lab_path: Path | None
    results_dir: Path
    jobs: list[Job]


def _bundle_manifest(path: Path, where: str) -> dict[str, Any]:
    """Check every file of the bundle against its manifest now, so a modified bundle fails the suite
    before any device is reserved."""
    try:
        return verify_bundle(path)
    except RunnerError as exc:
        raise BundleError(f"{where}: bundle {path}: {exc}; pass a dir written by `edgeft build`") from exc


def plan_suite(suite: Suite, lab_path: Path | None, results_dir: Path, log: Callable[[str], None] = print,
               threads: int = 2, progress=None) -> Plan:
    """Resolve the suite against the lab and build the recipes: every mistake (unknown device, no device
    with those tags, a device of another target, a modified bundle) fails here, before any long work
    and before any device is reserved."""
    where = str(suite.source)
    lab = load_lab(lab_path) if any(s.name != LOCAL_DEVICE for s in suite.devices) else None
    for i, selector in enumerate(suite.devices):
        if selector.name not in (None, LOCAL_DEVICE) and selector.name not in {d.name for d in lab.devices}:
            known = ", ".join(d.name for d in lab.devices) or "none"
            raise ConfigError(f"{where}: field 'devices.{i}': no device {selector.name!r} in {lab.source} (known: {known}); add it there or fix the name")
        if selector.tags and not any(set(selector.tags) <= set(d.tags) for d in lab.devices):
            raise ConfigError(f"{where}: field 'devices.{i}': no device in {lab.source} carries every tag of {', '.join(selector.tags)}")
    # Bundles on disk are verified before any recipe is built; a recipe's target is known before its build.
    manifests = {i: _bundle_manifest(spec.path, f"{where}: field 'bundles.{i}'") for i, spec in enumerate(suite.bundles) if spec.path is not None}
    selectors = {i: _bundle_selectors(suite, lab, spec, manifests.get(i), f"{where}: field 'bundles.{i}'") for i, spec in enumerate(suite.bundles)}
    jobs: list[Job] = []
    for i, spec in enumerate(suite.bundles):
        bundle_dir = spec.path
        if bundle_dir is None:
            bundle_dir = results_dir / "bundles" / spec.name
            log(f"bundle {spec.name}: building {spec.target} (profile {spec.profile or 'default'}) into {bundle_dir}, not measuring")
            build(BuildOptions(target=spec.target, profile=spec.profile, model=spec.model, data=spec.data, out=bundle_dir,
                               measure=False, threads=threads), progress=progress, log=log)
            manifests[i] = _bundle_manifest(bundle_dir, f"{where}: field 'bundles.{i}'")
        overrides = budget_overrides(suite.budgets, spec.budgets)
        jobs.extend(Job(spec.name, bundle_dir, manifests[i], selector, overrides) for selector in selectors[i])
    return Plan(suite, lab_path, results_dir, jobs)


def _bundle_selectors(suite: Suite, lab: Lab | None, spec: BundleSpec, manifest: dict[str, Any] | None, where: str) -> list[DeviceSelector]:
    """The bundle's jobs: a named device must be of the bundle's target (or its arch and runtime);
    `each: true` expands to every device with the tags that can run the bundle."""
    target, arch, runtime = (manifest["target"], manifest.get("arch"), manifest.get("runtime")) if manifest else (spec.target, None, None)
    what = f"bundle {spec.name!r} was built" if manifest else f"bundle {spec.name!r} builds"
    selectors: list[DeviceSelector] = []
    for selector in suite.devices:
        if selector.name == LOCAL_DEVICE:
            selectors.append(selector)
        elif selector.name is not None:
            try:
                check_target(lab.device(selector.name), target, arch, runtime, what)
            except DeviceError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
            selectors.append(selector)
        elif selector.each:
            fits = [d.name for d in lab.devices if set(selector.tags) <= set(d.tags) and _runs(d, target, arch, runtime, what)]
            if not fits:
                raise ConfigError(f"{where}: no device with tags {', '.join(selector.tags)} can run bundle {spec.name!r} (built for {target})")
            selectors.extend(DeviceSelector(name=name) for name in fits)
        else:
            selectors.append(selector)  # reserve() picks a free device of the bundle's target among them
    return selectors


def _runs(device: LabDevice, target: str, arch: str | None, runtime: str | None, what: str) -> bool:
    try:
        check_target(device, target, arch, runtime, what)
    except DeviceError:
        return False
    return True


# -------------------------------------------------------------------------------------- running
def measure_reserved_bundle(reservation: Reservation, bundle_dir: Path, overrides: dict[str, Any], log: Callable[[str], None],
                            samples_to: Path | None = None, lab_path: Path | None = None,
                            runner_args: Sequence[str] = (), baseline: Path | None = None) -> dict[str, Any]:
    """Measure a bundle on a held device and gate it on its own budgets with `overrides` applied (and, with
    `baseline`, on regression against the last good report of the same device and lineage)."""
    options = BuildOptions(target="", device=reservation.name, lab=lab_path, baseline=baseline)
    report = measure_bundle(bundle_dir, options, log, samples_to, reservation=reservation, runner_args=runner_args)
    if overrides:
        manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
        budgets = Budgets.model_validate({**manifest["profile"]["budgets"], **overrides})
        report["gate"] = evaluate(report, budgets)
        report["budget_overrides"] = overrides
    return report


def _file_part(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def run_job(job: Job, plan: Plan, wait_s: float, trust_new_host_key: bool, log: Callable[[str], None],
            baseline: Path | None = None) -> dict[str, Any]:
    """Reserve, push, measure and gate one bundle on one device; any failure becomes this job's error."""
    started = time.time()
    device = job.selector.label
    record: dict[str, Any] = {"bundle": job.bundle, "device": device, "selector": job.selector.model_dump(exclude_defaults=True)}
    say = lambda message: log(f"{job.bundle} @ {device}: {message}")  # noqa: E731
    try:
        with reserve(job.selector.name, tags=job.selector.tags, lab_path=plan.lab_path, wait_s=wait_s,
                     trust_new_host_key=trust_new_host_key, bundle_manifest=job.manifest, log=say) as reservation:
            device = record["device"] = reservation.name
            stem = plan.results_dir / plan.suite.name / f"{_file_part(job.bundle)}@{_file_part(device)}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            samples_tmp = stem.with_name(f".{stem.name}.telemetry.jsonl.{os.getpid()}.tmp")
            try:
                report = measure_reserved_bundle(reservation, job.bundle_dir, job.overrides, say, samples_tmp, plan.lab_path,
                                                 plan.suite.measure.runner_args(), baseline)
                samples = stem.with_name(f"{stem.name}.telemetry.jsonl")
                if samples_tmp.exists():
                    os.replace(samples_tmp, samples)
                    record["samples_path"] = str(samples)
            finally:
                samples_tmp.unlink(missing_ok=True)
        report_path = stem.with_name(f"{stem.name}.json")
        write_atomic(report_path, json.dumps(report, indent=2))
        html_path = stem.with_name(f"{stem.name}.html")
        samples_path = record.get("samples_path")
        write_atomic(html_path, render_report(report, job.bundle_dir, telemetry_path=Path(samples_path) if samples_path else None))
        record.update(verdict=report["gate"]["verdict"], report=report, report_path=str(report_path), html_path=str(html_path))
        say(f"{report['gate']['verdict']}")
    except (EdgeftError, RunnerError) as exc:
        record.update(verdict="ERROR", error=str(exc))
        say(f"error: {exc}")
    except Exception as exc:  # noqa: BLE001  (an unexpected failure on one device must not stop the others)
        record.update(verdict="ERROR", error=f"{type(exc).__name__}: {exc}")
        say(f"error: {type(exc).__name__}: {exc}")
    finished = time.time()
    record.update(started=round(started, 3), finished=round(finished, 3), wall_s=round(finished - started, 3))
    return record


def run_suite(plan: Plan, parallel: int | None = None, wait_s: float | None = None, trust_new_host_key: bool = False,
              log: Callable[[str], None] = print, baseline: Path | None = None) -> dict[str, Any]:
    """Run every job (lanes in parallel, bounded by `parallel`; default one thread per lane); returns the
    suite result with one record per job, in plan order."""
    wait = plan.suite.wait_s if wait_s is None else wait_s
    lanes: dict[str, list[int]] = {}
    for index, job in enumerate(plan.jobs):
        lanes.setdefault(job.lane, []).append(index)
    records: list[dict[str, Any] | None] = [None] * len(plan.jobs)
    stopping = threading.Event()  # Ctrl-C/SIGTERM: finish (and release) the jobs running, start no more

    def run_lane(indices: list[int]) -> None:
        for index in indices:
            if stopping.is_set():
                return
            records[index] = run_job(plan.jobs[index], plan, wait, trust_new_host_key, log, baseline)

    started = time.time()
    workers = max(1, min(parallel or len(lanes), len(lanes)))
    log(f"suite {plan.suite.name}: {len(plan.jobs)} job(s) on {len(lanes)} device lane(s), {workers} at a time")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgeft-hil") as pool:
        futures = [pool.submit(run_lane, indices) for indices in lanes.values()]
        try:
            for future in futures:
                future.result()
        except BaseException:
            stopping.set()
            raise
    finished = time.time()
    return {"format": RESULTS_FORMAT, "suite": plan.suite.name, "source": str(plan.suite.source),
            "lab": str(plan.lab_path) if plan.lab_path else None, "started": round(started, 3), "finished": round(finished, 3),
            "wall_s": round(finished - started, 3), "jobs": records}


def suite_exit_code(result: dict[str, Any]) -> int:
    """0 every job passed; 2 no job ran; 1 a budget failed or a job could not run; otherwise 3 when a result
    is INVALID (re-run it)."""
    verdicts = [job["verdict"] for job in result["jobs"]]
    if not verdicts or all(v == "ERROR" for v in verdicts):
        return EXIT_NOTHING_RAN
    if "FAIL" in verdicts or "ERROR" in verdicts:
        return EXIT_FAIL
    if "INVALID" in verdicts:
        return EXIT_INVALID
    return EXIT_PASS


# ---------------------------------------------------------------------------------------- JUnit
def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def junit_xml(result: dict[str, Any]) -> str:
    """One <testsuite> named after the suite, one <testcase> per bundle × device (classname = bundle,
    name = device): <failure> lists the failed checks, INVALID and could-not-run are <error>; every
    check line (SKIP ones with their reason) goes to <system-out>."""
    jobs = result["jobs"]
    counts = {"tests": len(jobs), "failures": sum(j["verdict"] == "FAIL" for j in jobs),
              "errors": sum(j["verdict"] in ("ERROR", "INVALID") for j in jobs), "skipped": 0}
    attrs = {k: str(v) for k, v in counts.items()}
    root = ET.Element("testsuites", name=result["suite"], time=f"{result['wall_s']:.3f}", **{k: attrs[k] for k in ("tests", "failures", "errors")})
    suite = ET.SubElement(root, "testsuite", name=result["suite"], timestamp=_iso(result["started"]), time=f"{result['wall_s']:.3f}", **attrs)
    for job in jobs:
        case = ET.SubElement(suite, "testcase", classname=job["bundle"], name=job["device"], time=f"{job['wall_s']:.3f}")
        if job["verdict"] == "ERROR":
            ET.SubElement(case, "error", message=job["error"], type="could-not-run").text = job["error"]
            continue
        gate = job["report"]["gate"]
        lines = [describe(check) for check in gate["checks"]]
        if job["verdict"] == "INVALID":
            reasons = list(gate.get("invalid_reasons", [])) + [c.get("reason", "") for c in gate["checks"] if c["status"] == "invalid"]
            message = "INVALID: " + ("; ".join(r for r in reasons if r) or "the measurement cannot be trusted")
            ET.SubElement(case, "error", message=message, type="INVALID").text = "\n".join([message, *lines])
        elif job["verdict"] == "FAIL":
            failed = [c for c in gate["checks"] if c["status"] == "fail"]
            message = f"{len(failed)} budget(s) failed: " + ", ".join(c["budget"] for c in failed)
            ET.SubElement(case, "failure", message=message, type="budget").text = "\n".join(describe(c) for c in failed)
        ET.SubElement(case, "system-out").text = "\n".join([f"report: {job['report_path']}", *lines])
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# ---------------------------------------------------------------------------------- summary rows
def summary_row(job: dict[str, Any]) -> dict[str, Any]:
    """The figures of the summary table (None where not measured or the job did not run)."""
    report = job.get("report") or {}
    latency = report.get("latency_ms") or {}
    return {
        "bundle": job["bundle"], "device": job["device"], "verdict": job["verdict"],
        "failed": [c["budget"] for c in (report.get("gate") or {}).get("checks", []) if c["status"] == "fail"],
        "p50_ms": latency.get("p50"), "p99_ms": latency.get("p99"), "first_token_ms": report.get("first_token_ms"),
        "tokens_per_s": report.get("decode_tokens_per_s"), "peak_rss_mb": report.get("peak_rss_mb"),
        "max_temp_c": (report.get("thermal") or {}).get("max_c"), "accuracy": (report.get("accuracy") or {}).get("device"),
        "error": job.get("error"), "wall_s": job["wall_s"],
    }


# ------------------------------------------------------------------------------ a held device (pytest)
class DeviceHandle:
    """A reserved lab device for a test: push a bundle, measure it, run a command there."""

    def __init__(self, reservation: Reservation, lab_path: Path | None, log: Callable[[str], None]):
        self.reservation = reservation
        self.lab_path = lab_path
        self.log = log
        self._pushes = 0

    @property
    def name(self) -> str:
        return self.reservation.name

    @property
    def lab_device(self):
        return self.reservation.device

    @property
    def transport(self):
        return self.reservation.transport

    def push(self, bundle: Path | str) -> str:
        """Push a file or dir into this reservation's run dir (sha256 checked there); returns its remote
        path, relative to the device's workdir (what run() argv can name)."""
        self._pushes += 1
        remote = f"{self.reservation.run_dir}/push-{self._pushes}-{_file_part(Path(bundle).name)}"
        push_verified(self.transport, Path(bundle), remote)
        return remote

    def measure(self, bundle: Path | str, budgets: Budgets | dict | None = None) -> dict[str, Any]:
        """Measure a bundle here and gate it (its own budgets, with `budgets` fields replacing them)."""
        return measure_reserved_bundle(self.reservation, Path(bundle), budget_overrides(budgets), self.log, lab_path=self.lab_path)

    def run(self, argv: Sequence[str], timeout: float | None = 600) -> RunResult:
        """Run argv in the device's workdir (every argument quoted)."""
        return self.transport.run([str(a) for a in argv], timeout=timeout)


@contextmanager
def held_device(name: str | None = None, *, tags: Sequence[str] = (), lab_path: Path | None = None, wait_s: float = 0.0,
                trust_new_host_key: bool = False, log: Callable[[str], None] = print) -> Iterator[DeviceHandle]:
    """Reserve a device by name or tags for the block and yield a DeviceHandle; released after it."""
    with reserve(name, tags=tags, lab_path=lab_path, wait_s=wait_s, trust_new_host_key=trust_new_host_key, log=log) as reservation:
        yield DeviceHandle(reservation, lab_path, log)


def write_results(result: dict[str, Any], json_path: Path | None, junit_path: Path | None) -> None:
    if json_path is not None:
        write_atomic(json_path, json.dumps(result, indent=2))
        write_atomic(json_path.with_suffix(".html"), render_suite(result, json_path.parent))  # links to each job's page
    if junit_path is not None:
        write_atomic(junit_path, junit_xml(result))


def default_results_dir(json_path: Path | None) -> Path:
    """Per-device reports go beside --json (in hil-results/ there), else into ./hil-results/."""
    return Path(json_path).parent / DEFAULT_RESULTS_DIR if json_path is not None else DEFAULT_RESULTS_DIR

