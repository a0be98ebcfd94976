"""Budgets -> checks -> verdict (PASS, FAIL, or INVALID when the device throttled during the run).

A budget the profile does not set is not checked; a budget whose
measurement is missing (e.g. no thermal sensors) is skipped with the reason, never silently passed."""

from __future__ import annotations

from typing import Any

from .config import Budgets

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


def _lookup(report: dict[str, Any], dotted: str) -> Any:
    value: Any = report
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def evaluate(report: dict[str, Any], budgets: Budgets) -> dict[str, Any]:
    checks = []
    for budget_name, (path, direction, unit) in CHECKS.items():
        budget = getattr(budgets, budget_name)
        if budget is None:
            continue
        measured = _lookup(report, path)
        check = {"budget": budget_name, "measured_field": path, "measured": measured, "limit": budget, "unit": unit, "direction": direction}
        if measured is None:
            check.update(status="skipped", reason=f"{path} was not measured on this device")
        else:
            ok = measured <= budget if direction == "max" else measured >= budget
            check["status"] = "pass" if ok else "fail"
        checks.append(check)
    failed = [c for c in checks if c["status"] == "fail"]
    throttle = report.get("throttle") or {}
    if throttle.get("throttled"):
        # The device ran slower than the one budgeted for: neither a pass nor a fail can be trusted.
        return {"passed": False, "verdict": "INVALID", "invalid_reasons": throttle.get("reasons", []), "checks": checks}
    return {"passed": not failed, "verdict": "PASS" if not failed else "FAIL", "checks": checks}


def describe(check: dict[str, Any]) -> str:
    """One line per check: measured vs budget."""
    sign = "<=" if check["direction"] == "max" else ">="
    unit = f" {check['unit']}" if check["unit"] else ""
    if check["status"] == "skipped":
        return f"SKIP {check['budget']}: {check['reason']}"
    return f"{check['status'].upper():4} {check['budget']}: measured {check['measured']:g}{unit}, budget {sign} {check['limit']:g}{unit}"
