"""Thermal zones from sysfs: <sysfs_root>/class/thermal/thermal_zone*/{type,temp} (temp in millidegrees C)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def default_sysfs_root() -> str:
    return os.environ.get("EDGEFT_SYSFS_ROOT") or "/sys"


def zone_dirs(sysfs_root: str | Path) -> list[Path]:
    base = Path(sysfs_root) / "class" / "thermal"
    zones = [p for p in base.glob("thermal_zone*") if re.fullmatch(r"thermal_zone\d+", p.name)]
    return sorted(zones, key=lambda p: int(p.name[len("thermal_zone"):]))


def read_zones(sysfs_root: str | Path) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """One reading: ({zone: temp_c}, {zone: type}, {zone: why it was skipped})."""
    temps, types, skipped = {}, {}, {}
    for zone in zone_dirs(sysfs_root):
        try:
            # Some zones (e.g. disabled or powered-down sensors) fail on read with EINVAL/ENODATA.
            temps[zone.name] = int((zone / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError) as exc:
            skipped[zone.name] = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0]
            continue
        try:
            types[zone.name] = (zone / "type").read_text().strip()
        except OSError:
            types[zone.name] = "unknown"
    return temps, types, skipped


class ThermalTracker:
    """Keeps each zone's first and highest reading across repeated samples."""

    def __init__(self, sysfs_root: str | Path):
        self.sysfs_root = Path(sysfs_root)
        self.zones: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}

    def sample(self) -> dict[str, float]:
        temps, types, skipped = read_zones(self.sysfs_root)
        for name, reason in skipped.items():
            self.skipped.setdefault(name, reason)
        for name, temp_c in temps.items():
            zone = self.zones.setdefault(name, {"name": name, "type": types[name], "start_c": temp_c, "max_c": temp_c})
            zone["max_c"] = max(zone["max_c"], temp_c)
        return temps

    def summary(self) -> dict:
        source = str(self.sysfs_root / "class" / "thermal")
        zones = [self.zones[name] for name in sorted(self.zones, key=lambda n: int(n[len("thermal_zone"):]))]
        reasons = []
        if not zones:
            reasons.append(f"no {'readable ' if self.skipped else ''}thermal zones under {source}")
        never_read = {n: r for n, r in self.skipped.items() if n not in self.zones}
        if never_read:
            reasons.append("skipped unreadable: " + ", ".join(f"{n} ({r})" for n, r in sorted(never_read.items())))
        return {
            "max_c": max((z["max_c"] for z in zones), default=None),
            "zones": zones,
            "source": source,
            "reason": "; ".join(reasons) or None,
        }
