"""`edgeft build --search`: build each candidate, measure it on the chosen device, keep the most
accurate one that meets every budget.

A candidate is judged by its measurement, never by its precision: int8 can be slower than float on
some hardware. Every measurement is cached by (model hash, device, measure settings), so a re-run
measures nothing twice; shared stages (fine-tune, merge, export) come from the stage cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import pipeline
from .artifact import write_atomic
from .build import BuildOptions, check_plan, compile_model, package_and_measure, prepare, write_bundle
from .errors import ConfigError, QualityCheckFailed
from .report_html import render_search

# When the profile has no `search:` section; those the target's runtime cannot run are left out. Pruned candidates
# are recovered by distillation. int8-dynamic has the fastest prefill on CPU, the weight-only ones the fastest
# decode; blocks of 128 weights decode ~1.1-1.25x faster than 32 and cost accuracy, an int8 lm_head gives some back.
DEFAULT_CANDIDATES: dict[str, list[dict[str, dict[str, Any]]]] = {
    "fp32": [{"export": {}}],
    "fp16": [{"export": {}}, {"quantize": {"mode": "fp16"}}],
    "int8-dynamic": [{"export": {}}, {"quantize": {"mode": "int8-dynamic"}}],
    "int8-static": [{"export": {}}, {"quantize": {"mode": "int8-static"}}],
    "int8-weight": [{"export": {}}, {"quantize": {"mode": "int8-weight"}}],
    "int4": [{"export": {}}, {"quantize": {"mode": "int4-weight"}}],
    "int4-b128": [{"export": {}}, {"quantize": {"mode": "int4-weight", "block_size": 128}}],
    "int4-b128+int8-head": [{"export": {}}, {"quantize": {"mode": "int4-weight", "block_size": 128, "lm_head": "int8"}}],
    "pruned25+kd-int8": [{"prune": {"mlp_ratio": 0.25}}, {"distill": {}}, {"export": {}}, {"quantize": {"mode": "int8-dynamic"}}],
    "pruned50+kd-int8": [{"prune": {"mlp_ratio": 0.5}}, {"distill": {}}, {"export": {}}, {"quantize": {"mode": "int8-dynamic"}}],
}


def quality_failure_report(exc: QualityCheckFailed) -> dict[str, Any]:
    """A candidate whose stage failed its own quality check: nothing measured, its gate failed on that check."""
    check = {"budget": exc.check, "measured": exc.value, "limit": exc.limit, "status": "fail",
             "direction": "min" if exc.value < exc.limit else "max", "setting": exc.setting}
    return {"model": {"precision": None, "size_bytes": None}, "accuracy": {"device": None}, "latency_ms": {"p50": None, "p99": None},
            "first_token_ms": None, "decode_tokens_per_s": None, "peak_rss_mb": None, "measurement_cached": False,
            "gate": {"passed": False, "verdict": "FAIL", "checks": [check]}, "error": str(exc)}


@dataclass
class Candidate:
    name: str
    stages: list[pipeline.PlannedStage]
    report: dict[str, Any] = field(default_factory=dict)
    final: Any = None
    outcomes: list = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        r = self.report
        return {
            "candidate": self.name,
            "stages": [s.name for s in self.stages],
            "precision": r["model"]["precision"],
            "size_bytes": r["model"]["size_bytes"],
            "accuracy": r["accuracy"]["device"],
            "latency_ms_p50": r["latency_ms"]["p50"],
            "latency_ms_p99": r["latency_ms"]["p99"],
            "first_token_ms": r["first_token_ms"],
            "decode_tokens_per_s": r["decode_tokens_per_s"],
            "peak_rss_mb": r["peak_rss_mb"],
            "measurement_cached": r["measurement_cached"],
            "verdict": r["gate"]["verdict"],
            "failed": [c["budget"] for c in r["gate"]["checks"] if c["status"] == "fail"],
            "checks": r["gate"]["checks"],
            "error": r.get("error"),  # a stage's own quality check that failed: nothing was measured
        }


def shared_prefix(profile) -> list[dict[str, dict[str, Any]]]:
    names = [next(iter(item)) for item in profile.stages]
    if "merge" not in names:
        raise ConfigError(f"{profile.source}: --search needs a profile whose stages include merge (candidates branch off after it)")
    return profile.stages[: len(names) - names[::-1].index("merge")]


def _miss(check: dict[str, Any]) -> float:
    """How far a failed check missed, relative to its budget."""
    measured, limit = check["measured"], check["limit"]
    gap = measured - limit if check["direction"] == "max" else limit - measured
    return gap / abs(limit) if limit else float("inf")


def default_candidates(profile, prefix: list[dict[str, dict[str, Any]]], target, log: Callable[[str], None]) -> list[Candidate]:
    """DEFAULT_CANDIDATES after the profile's shared stages, less those the target's runtime cannot run (int4 on
    TensorRT, an ONNX model for TFLite): each left out is logged with why."""
    candidates = []
    for name, stages in DEFAULT_CANDIDATES.items():
        planned = pipeline.plan(profile, prefix + stages, where=f"search.candidates.{name}")
        try:
            check_plan(planned, target, f"on {target.name}")
        except ConfigError as exc:
            log(f"candidate {name}: left out: {exc}")
            continue
        candidates.append(Candidate(name, planned))
    if not candidates:
        raise ConfigError(f"{profile.source}: none of the default search candidates runs on target {target.name} "
                          f"({target.runtime}); declare search.candidates in the profile (see README, Budget search)")
    return candidates


def search(options: BuildOptions, progress=None, log: Callable[[str], None] = print,
           reports: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build and measure every candidate; choose the most accurate one within the budgets. `reports`, when given,
    receives each candidate's full report by name (for --prometheus)."""
    prep = prepare(options, progress, log)
    profile = prep.profile
    prefix = shared_prefix(profile)
    if profile.search:
        candidates = [Candidate(name, pipeline.plan(profile, prefix + stages, where=f"search.candidates.{name}"))
                      for name, stages in profile.search.candidates.items()]
    else:
        candidates = default_candidates(profile, prefix, prep.target, log)

    for candidate in candidates:
        log(f"candidate {candidate.name}: {' → '.join(s.name for s in candidate.stages)}")
        try:
            candidate.final, candidate.outcomes = compile_model(prep, candidate.stages, f"{profile.source}: search.candidates.{candidate.name}")
        except QualityCheckFailed as exc:  # e.g. int8 too far from fp32: a failed candidate, not a failed search
            log(f"candidate {candidate.name}: failed its own check: {exc}")
            candidate.report = quality_failure_report(exc)
            continue
        with tempfile.TemporaryDirectory(prefix="edgeft-candidate-") as tmp:
            candidate.report = package_and_measure(prep, candidate.final, candidate.outcomes, Path(tmp), use_measure_cache=not options.force)
        if reports is not None:
            reports[candidate.name] = candidate.report

    rows = [c.row() for c in candidates]
    passing = [c for c in candidates if c.report["gate"]["passed"]]
    result: dict[str, Any] = {"format": "edgeft-search/1", "target": prep.target.name, "profile": profile.name, "device": options.device,
                              "budgets": profile.budgets.model_dump(exclude_none=True), "candidates": rows}
    if passing:
        # Most accurate first; among equals, the faster (lower p50) one.
        chosen = max(passing, key=lambda c: (c.report["accuracy"]["device"], -c.report["latency_ms"]["p50"]))
        others = sorted(passing, key=lambda c: -c.report["accuracy"]["device"])
        result["chosen"] = chosen.name
        result["why"] = (
            f"{chosen.name} meets every budget with the highest on-device accuracy ({chosen.report['accuracy']['device']:.3f}) "
            f"of the {len(passing)} candidate(s) that do"
            + ("" if len(others) < 2 else f"; ties broken by p50 latency ({chosen.report['latency_ms']['p50']} ms)")
        )
        report = write_bundle(prep, chosen.final, chosen.outcomes, use_measure_cache=True, extra={"search": {"chosen": chosen.name, "candidates": len(rows)}})
        result["bundle"] = report["bundle"]["path"]
    else:
        failed = [(c.name, check) for c in candidates for check in c.report["gate"]["checks"] if check["status"] == "fail"]
        if not failed:  # every candidate's measurement was invalid (throttled device)
            result.update(chosen=None, closest=None, why="no valid measurement: the device throttled during every candidate's run; cool it down and re-run")
            return _save(prep, result)
        name, check = min(failed, key=lambda item: _miss(item[1]))
        result["chosen"] = None
        result["closest"] = {"candidate": name, "budget": check["budget"], "measured": check["measured"], "limit": check["limit"], "miss": round(_miss(check), 4)}
        result["why"] = (
            f"no candidate meets every budget; closest: {name} missed {check['budget']} by {_miss(check):.1%} "
            f"(measured {check['measured']:g}, budget {'<=' if check['direction'] == 'max' else '>='} {check['limit']:g})"
        )
    return _save(prep, result)


def _save(prep, result: dict[str, Any]) -> dict[str, Any]:
    """All of it, as JSON beside the bundle (written whole or not at all)."""
    path = prep.out.parent / f"{prep.out.name}.search.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp_path.write_text(json.dumps(result, indent=2))
    tmp_path.replace(path)
    write_atomic(path.with_suffix(".html"), render_search(result))  # <out>.search.html: the trade-off, plotted
    result["search_json"] = str(path)
    return result
