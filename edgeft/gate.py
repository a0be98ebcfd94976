"""Budgets -> checks -> verdict: PASS, FAIL, or INVALID when the numbers cannot be trusted.

A budget the profile does not set is not checked. A budget whose measurement is missing (e.g. no
thermal sensors) is skipped with the reason, never silently passed. A budget on a percentile the runner
nulled for too few samples is `invalid` (with the runner's reason), and so is the verdict, unless another
budget failed outright. A throttled device makes the whole verdict INVALID. On an emulated device timings
are reported but their budgets are skipped; the rest (accuracy, size, memory) still gates."""

from __future__ import annotations

from typing import Any

from .config import Budgets
from .regression import compare

# budget field -> (what it reads from the report, "max" if the value must stay at or under the budget, unit)
CHECKS = {
    "latency_ms_p99": ("latency_ms.p99", "max", "ms"),
    "first_token_ms": ("first_token_ms", "max", "ms"),
    "min_decode_tokens_per_s": ("decode_tokens_per_s", "min", "tok/s"),
    "peak_rss_mb": ("peak_rss_mb", "max", "MB"),
    "max_model_mb": ("model.size_mb", "max", "MB"),
    "max_accuracy_drop": ("accuracy.drop", "max", ""),
    "min_accuracy": ("accuracy.device", "min", ""),
    "max_temp_c": ("thermal.max_c", "max", "°C"),
    "max_general_ppl_increase": ("forgetting.general_ppl_increase", "max", ""),  # measured on the host, per stage
}
# Where each phase of a latency budget reads its percentile (the warm block stays `latency_ms`, as before phases).
LATENCY_PHASES = {"warm": "latency_ms", "sustained": "sustained.latency_ms"}
TIMING_BUDGETS = {"latency_ms_p99", "first_token_ms", "min_decode_tokens_per_s", "max_regression"}
EMULATED_REASON = "emulated device: timings are not gated"


def _lookup(report: dict[str, Any], dotted: str) -> Any:
    value: Any = report
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _planned(budgets: Budgets) -> list[tuple[str, str | None, str, float]]:
    """(budget, phase, report field, limit) for every budget the profile sets."""
    planned = []
    for budget_name, (path, _, _) in CHECKS.items():
        budget = getattr(budgets, budget_name)
        if budget is None:
            continue
        if budget_name == "latency_ms_p99":
            for phase, block in LATENCY_PHASES.items():
                limit = getattr(budget, phase)
                if limit is not None:
                    planned.append((budget_name, phase, f"{block}.p99", limit))
        else:
            planned.append((budget_name, None, path, budget))
    return planned


def _missing_reason(report: dict[str, Any], path: str) -> tuple[str, str]:
    """(status, reason) for a budget whose measurement is null: too few samples is invalid, absent is skipped."""
    block, _, field = path.rpartition(".")
    reason = (_lookup(report, f"{block}.reasons") or {}).get(field) if block else None
    if reason:
        return "invalid", f"{path} not reported: {reason}"
    if path.startswith("sustained.") and not report.get("sustained"):
        return "skipped", "no sustained run (measure.sustained_s is 0)"
    return "skipped", f"{path} was not measured on this device"


def _regression_check(report: dict[str, Any], limit: float) -> dict[str, Any]:
    """max_regression: fail when the 95% CI of the p50 or the p99 change lies wholly above the limit."""
    check = {"budget": "max_regression", "phase": "warm", "measured_field": "regression", "measured": None,
             "limit": limit, "unit": "", "direction": "max"}
    regression = report.get("regression")
    if not regression:
        return {**check, "status": "skipped", "reason": "no baseline to compare with (pass --baseline REPORT_OR_DIR)"}
    if regression.get("baseline") is None:
        return {**check, "status": "skipped", "reason": regression["reasons"].get("baseline", "no baseline")}
    compared = {name: regression[name] for name in ("p50", "p99") if regression.get(name)}
    if len(compared) < 2:
        missing = [f"{name}: {regression['reasons'][name]}" for name in ("p50", "p99") if name in regression.get("reasons", {})]
        return {**check, "status": "invalid", "reason": "cannot compare with the baseline: " + "; ".join(missing)}
    # The lowest change still within the 95% CI: above the limit means slower with confidence.
    lower = max(compared[name]["ci95"][0] for name in compared)
    check.update(measured=lower, detail={name: compared[name] for name in compared})
    check["status"] = "fail" if lower > limit else "pass"
    return check


def evaluate(report: dict[str, Any], budgets: Budgets, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gate `report` on `budgets`. `baseline` (a baseline report, see edgeft.regression) adds the
    regression block to compare against when the report has none yet."""
    if baseline is not None and "regression" not in report:
        report = {**report, "regression": compare(report, baseline, None, "given")}
    emulated = bool((report.get("device") or {}).get("emulated"))
    checks = []
    for budget_name, phase, path, limit in _planned(budgets):
        _, direction, unit = CHECKS[budget_name]
        measured = _lookup(report, path)
        check = {"budget": budget_name, "measured_field": path, "measured": measured, "limit": limit, "unit": unit, "direction": direction}
        if phase is not None:
            check["phase"] = phase
        if emulated and budget_name in TIMING_BUDGETS:
            check.update(status="skipped", reason=EMULATED_REASON)
        elif measured is None:
            status, reason = _missing_reason(report, path)
            check.update(status=status, reason=reason)
        else:
            ok = measured <= limit if direction == "max" else measured >= limit
            check["status"] = "pass" if ok else "fail"
        checks.append(check)
    if budgets.max_regression is not None:
        check = _regression_check(report, budgets.max_regression)
        if emulated:
            check.update(status="skipped", reason=EMULATED_REASON)
        checks.append(check)
    failed = [c for c in checks if c["status"] == "fail"]
    invalid = [c for c in checks if c["status"] == "invalid"]
    throttle = report.get("throttle") or {}
    if throttle.get("throttled") and not emulated:
        # The device ran slower than the one budgeted for: neither a pass nor a fail can be trusted.
        return {"passed": False, "verdict": "INVALID", "invalid_reasons": throttle.get("reasons", []), "checks": checks}
    if failed:  # a budget missed outright fails, whatever else could not be judged
        return {"passed": False, "verdict": "FAIL", "checks": checks}
    if invalid:
        return {"passed": False, "verdict": "INVALID", "checks": checks}
    return {"passed": True, "verdict": "PASS", "checks": checks}


def _name(check: dict[str, Any]) -> str:
    phase = check.get("phase")
    return f"{check['budget']} ({phase})" if phase and check["budget"] != "max_regression" and phase != "warm" else check["budget"]


def describe(check: dict[str, Any]) -> str:
    """One line per check: measured vs budget."""
    sign = "<=" if check["direction"] == "max" else ">="
    unit = f" {check['unit']}" if check["unit"] else ""
    if check["status"] == "skipped":
        return f"SKIP {_name(check)}: {check['reason']}"
    if check["status"] == "invalid":
        return f"INVALID {_name(check)}: {check['reason']}"
    if check["budget"] == "max_regression":
        parts = ", ".join(f"{name} {d['delta']:+.1%} (95% CI {d['ci95'][0]:+.1%}..{d['ci95'][1]:+.1%})" for name, d in check["detail"].items())
        return f"{check['status'].upper():4} max_regression: vs baseline {parts}; fails when a whole CI is above {check['limit']:+.1%}"
    return f"{check['status'].upper():4} {_name(check)}: measured {check['measured']:g}{unit}, budget {sign} {check['limit']:g}{unit}"
