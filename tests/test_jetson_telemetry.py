"""Jetson telemetry in the device runner: tegrastats lines and a real (fake) tegrastats process,
nvpmodel, jetson_clocks detection and throttling from sysfs trees written like a real Orin's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "runner") not in sys.path:
    sys.path.insert(0, str(REPO / "runner"))

from edgeft_runner.telemetry import jetson  # noqa: E402
from edgeft_runner.telemetry.jetson import (  # noqa: E402
    jetson_clocks_applied, nvpmodel_mode, snapshot_counters, throttle_state)
from edgeft_runner.telemetry.tegrastats import TegrastatsSampler, parse_tegrastats_line  # noqa: E402

# Orin Nano, JetPack 6, idle.
ORIN_JP6 = ("11-25-2026 10:00:01 RAM 2448/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
            "CPU [12%@1190,8%@1190,off,off,5%@729,3%@729] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305,305] "
            "NVENC off NVDEC off VIC_FREQ 0%@115 APE 200 cpu@45.5C soc2@43.968C soc0@44.5C gpu@44.1C "
            "tj@45.5C soc1@44.2C VDD_IN 4830mW/4830mW VDD_CPU_GPU_CV 596mW/596mW VDD_SOC 1391mW/1391mW")
# Jetson Nano, JetPack 4: no timestamp, IRAM, rails without a unit.
NANO_JP4 = ("RAM 1903/3964MB (lfb 166x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
            "CPU [2%@102,1%@102,0%@102,0%@102] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@27C CPU@29.5C "
            "PMIC@100C GPU@27.5C AO@35.5C thermal@28.5C POM_5V_IN 1077/1077 POM_5V_GPU 0/0 POM_5V_CPU 123/123")
# AGX Xavier, JetPack 4, not root: EMC without a clock, GR3D without brackets, cores off,
# and rails named GPU/CPU next to the GPU@/CPU@ sensors.
XAVIER_JP4 = ("RAM 5123/31919MB (lfb 6542x4MB) SWAP 0/15959MB (cached 0MB) "
              "CPU [3%@1190,2%@1190,off,off,off,off,off,off] EMC_FREQ 3% GR3D_FREQ 12%@1300 APE 150 "
              "MTS fg 0% bg 1% AO@37.5C GPU@38C Tdiode@40.25C PMIC@100C AUX@37.5C CPU@39C thermal@38.05C "
              "Tboard@38C GPU 465/465 CPU 310/310 SOC 1396/1396 CV 0/0 VDDRQ 310/310 SYS5V 2216/2216")
# AGX Orin, JetPack 5, under load: offline CV sensors at -256C, VIC without a load.
AGX_ORIN_JP5 = ("04-01-2025 12:00:00 RAM 10223/30536MB (lfb 4x4MB) SWAP 0/15268MB (cached 0MB) "
                "CPU [45%@2201,40%@2201,38%@2201,41%@2201,off,off,off,off,off,off,off,off] EMC_FREQ 12%@3199 "
                "GR3D_FREQ 99%@[1300,1236] VIC_FREQ 729 APE 174 CV0@-256C CPU@58.5C SOC2@55.1C SOC0@56.7C "
                "CV1@-256C GPU@57.9C tj@58.5C SOC1@55.8C CV2@-256C VDD_GPU_SOC 12345mW/11000mW "
                "VDD_CPU_CV 3210mW/3000mW VIN_SYS_5V0 5000mW/4900mW")


def test_parse_orin_jetpack6_line():
    assert parse_tegrastats_line(ORIN_JP6) == {
        "t": "2026-11-25T10:00:01",
        "ram_used_mb": 2448, "ram_total_mb": 7620, "swap_used_mb": 0, "swap_total_mb": 3810,
        "cpu": [{"load_pct": 12, "freq_mhz": 1190}, {"load_pct": 8, "freq_mhz": 1190}, None, None,
                {"load_pct": 5, "freq_mhz": 729}, {"load_pct": 3, "freq_mhz": 729}],
        "emc": {"load_pct": 0, "freq_mhz": 2133},
        "gr3d": {"load_pct": 0, "freq_mhz": 305},
        "temps_c": {"cpu": 45.5, "soc2": 43.968, "soc0": 44.5, "gpu": 44.1, "tj": 45.5, "soc1": 44.2},
        "power_mw": {"VDD_IN": {"current_mw": 4830, "average_mw": 4830},
                     "VDD_CPU_GPU_CV": {"current_mw": 596, "average_mw": 596},
                     "VDD_SOC": {"current_mw": 1391, "average_mw": 1391}},
    }


def test_parse_nano_jetpack4_line():
    parsed = parse_tegrastats_line(NANO_JP4)
    assert parsed["t"] is None
    assert (parsed["ram_used_mb"], parsed["ram_total_mb"], parsed["swap_used_mb"], parsed["swap_total_mb"]) \
        == (1903, 3964, 0, 1982)
    assert parsed["cpu"] == [{"load_pct": 2, "freq_mhz": 102}, {"load_pct": 1, "freq_mhz": 102},
                             {"load_pct": 0, "freq_mhz": 102}, {"load_pct": 0, "freq_mhz": 102}]
    assert parsed["emc"] == {"load_pct": 0, "freq_mhz": 1600}
    assert parsed["gr3d"] == {"load_pct": 0, "freq_mhz": 76}
    # PMIC@100C is kept as reported (a fixed placeholder on these boards).
    assert parsed["temps_c"] == {"PLL": 27.0, "CPU": 29.5, "PMIC": 100.0, "GPU": 27.5, "AO": 35.5, "thermal": 28.5}
    assert parsed["power_mw"] == {"POM_5V_IN": {"current_mw": 1077, "average_mw": 1077},
                                  "POM_5V_GPU": {"current_mw": 0, "average_mw": 0},
                                  "POM_5V_CPU": {"current_mw": 123, "average_mw": 123}}


def test_parse_xavier_line_without_emc_clock_and_rails_named_like_sensors():
    parsed = parse_tegrastats_line(XAVIER_JP4)
    assert parsed["cpu"] == [{"load_pct": 3, "freq_mhz": 1190}, {"load_pct": 2, "freq_mhz": 1190}] + [None] * 6
    assert parsed["emc"] == {"load_pct": 3, "freq_mhz": None}
    assert parsed["gr3d"] == {"load_pct": 12, "freq_mhz": 1300}
    assert parsed["temps_c"] == {"AO": 37.5, "GPU": 38.0, "Tdiode": 40.25, "PMIC": 100.0, "AUX": 37.5,
                                 "CPU": 39.0, "thermal": 38.05, "Tboard": 38.0}
    assert parsed["power_mw"] == {name: {"current_mw": mw, "average_mw": mw} for name, mw in
                                  [("GPU", 465), ("CPU", 310), ("SOC", 1396), ("CV", 0), ("VDDRQ", 310),
                                   ("SYS5V", 2216)]}


def test_parse_agx_orin_line_takes_slowest_gpc_clock():
    parsed = parse_tegrastats_line(AGX_ORIN_JP5)
    assert parsed["t"] == "2025-04-01T12:00:00"
    assert parsed["gr3d"] == {"load_pct": 99, "freq_mhz": 1236}
    assert parsed["emc"] == {"load_pct": 12, "freq_mhz": 3199}
    assert len(parsed["cpu"]) == 12 and parsed["cpu"][4:] == [None] * 8
    assert parsed["temps_c"]["CV0"] == -256.0 and parsed["temps_c"]["tj"] == 58.5
    assert parsed["power_mw"]["VDD_GPU_SOC"] == {"current_mw": 12345, "average_mw": 11000}
    assert set(parsed["power_mw"]) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"}


@pytest.mark.parametrize("line", ["", "\n", "garbage 12%@ @@ CPU [", "RAM abc/7620MB GR3D_FREQ x%@[,]",
                                  "NvPModel: could not open /etc/nvpmodel.conf", "EMC_FREQ GR3D_FREQ CPU []"])
def test_parse_never_raises_on_unknown_tokens(line):
    parsed = parse_tegrastats_line(line)
    assert parsed["ram_used_mb"] is None and parsed["emc"] is None and parsed["gr3d"] is None
    assert parsed["temps_c"] == {} and parsed["power_mw"] == {}


def test_parse_partial_line_keeps_what_it_can():
    parsed = parse_tegrastats_line("RAM 100/200MB CPU [abc,5%@100,off,7%] GR3D_FREQ 0% unknown@x FOO 1/2/3")
    assert parsed["ram_used_mb"] == 100
    assert parsed["cpu"] == [None, {"load_pct": 5, "freq_mhz": 100}, None, {"load_pct": 7, "freq_mhz": None}]
    assert parsed["gr3d"] == {"load_pct": 0, "freq_mhz": None}
    assert parsed["temps_c"] == {} and parsed["power_mw"] == {}


# --- a real tegrastats process (a script that prints like one) ------------------------------------

SAMPLER_LINES = [
    ORIN_JP6,
    ("11-25-2026 10:00:02 RAM 2601/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
     "CPU [98%@1510,97%@1510,off,off,95%@1510,99%@1510] EMC_FREQ 45%@2133 GR3D_FREQ 99%@[624,624] "
     "NVENC off NVDEC off VIC_FREQ 0%@115 APE 200 cpu@52C soc2@50.1C soc0@51.2C gpu@55.25C "
     "tj@55.25C soc1@50.9C VDD_IN 7210mW/6020mW VDD_CPU_GPU_CV 2384mW/1490mW VDD_SOC 1790mW/1590mW"),
    ("11-25-2026 10:00:03 RAM 2590/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
     "CPU [97%@1510,98%@1510,off,off,96%@1510,97%@1510] EMC_FREQ 44%@2133 GR3D_FREQ 97%@[510,510] "
     "NVENC off NVDEC off VIC_FREQ 0%@115 APE 200 cpu@51.5C soc2@50.3C soc0@51.0C gpu@53C "
     "tj@53C soc1@50.7C VDD_IN 7000mW/6353mW VDD_CPU_GPU_CV 2200mW/1727mW VDD_SOC 1750mW/1644mW"),
]


def write_fake_tegrastats(bin_dir: Path, lines: list[str], then: str = "while :; do sleep 1; done") -> Path:
    """An executable that prints `lines` at the requested interval, then runs `then`
    (by default it keeps running, like tegrastats, until it is signalled)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "tegrastats"
    body = "\n".join(f"echo '{line}'\nsleep \"$delay\"" for line in lines)
    script.write_text(
        "#!/bin/sh\n"
        "[ \"$1\" = --interval ] || { echo \"usage: tegrastats --interval MS\" >&2; exit 2; }\n"
        f"echo \"$@\" > '{bin_dir / 'args'}'\n"
        "delay=$(awk \"BEGIN { print $2 / 1000 }\")\n"
        f"{body}\n{then}\n")
    script.chmod(0o755)
    return script


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    # a member may linger a moment as a zombie until its new parent reaps it
    return all(_is_zombie(p) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == pgid)


def _pgid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def _is_zombie(proc_dir: Path) -> bool:
    try:
        return (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def test_sampler_runs_tegrastats_and_summarizes(tmp_path):
    script = write_fake_tegrastats(tmp_path / "bin", SAMPLER_LINES)
    sampler = TegrastatsSampler(interval_ms=50, executable=str(script))
    assert sampler.available and sampler.reason is None
    with sampler:
        wait_until(lambda: len(sampler.samples) == 3)
        assert sampler.running
        pid = sampler._proc.pid
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 1.5  # SIGTERM was enough; no wait for the SIGKILL fallback
    assert not sampler.running
    wait_until(lambda: group_gone(pid), timeout_s=2)  # the script's `sleep` child too, not just the script
    assert (tmp_path / "bin" / "args").read_text() == "--interval 50\n"
    assert [s["t"] for s in sampler.samples] == ["2026-11-25T10:00:01", "2026-11-25T10:00:02", "2026-11-25T10:00:03"]
    assert sampler.summary() == {
        "available": True,
        "reason": None,
        "samples": 3,
        "ram_used_mb_max": 2601,
        "temps_c_max": {"cpu": 52.0, "soc2": 50.3, "soc0": 51.2, "gpu": 55.25, "tj": 55.25, "soc1": 50.9},
        "power_mw_avg": {"VDD_IN": 6346.7, "VDD_CPU_GPU_CV": 1726.7, "VDD_SOC": 1643.7},
        "gr3d_freq_mhz_min": 305,
        "emc_freq_mhz_min": 2133,
    }


def test_sampler_reports_tegrastats_that_exits_on_its_own(tmp_path):
    error = "tegrastats: cannot open /dev/nvhost-ctrl: Permission denied"
    script = write_fake_tegrastats(tmp_path / "bin", SAMPLER_LINES[:1], then=f"echo '{error}' >&2; exit 1")
    sampler = TegrastatsSampler(interval_ms=20, executable=str(script)).start()
    wait_until(lambda: not sampler.running)
    sampler.stop()
    summary = sampler.summary()
    assert summary["samples"] == 1 and summary["ram_used_mb_max"] == 2448
    assert summary["reason"] == f"tegrastats exited with code 1: {error}"


def test_sampler_without_tegrastats_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(jetson, "_EXTRA_TOOL_DIRS", ())
    with TegrastatsSampler() as sampler:
        pass
    assert sampler.available is False
    assert sampler.summary() == {
        "available": False, "reason": "tegrastats not installed (not a Jetson, or not on PATH)", "samples": 0,
        "ram_used_mb_max": None, "temps_c_max": {}, "power_mw_avg": {}, "gr3d_freq_mhz_min": None,
        "emc_freq_mhz_min": None,
    }
    missing = TegrastatsSampler(executable=str(tmp_path / "nope")).start()
    missing.stop()
    assert (missing.available, missing.reason) == (False, f"tegrastats not executable at {tmp_path / 'nope'}")
    not_a_program = TegrastatsSampler(executable=str(tmp_path)).start()  # a directory: exec fails
    not_a_program.stop()
    assert (not_a_program.available, not_a_program.reason) == (False, f"cannot start {tmp_path}: Permission denied")


def test_sampler_finds_tegrastats_on_path(tmp_path, monkeypatch):
    script = write_fake_tegrastats(tmp_path / "bin", SAMPLER_LINES[:1])
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert TegrastatsSampler().executable == str(script)


# --- nvpmodel -------------------------------------------------------------------------------------

def fake_run(stdout: str = "", stderr: str = "", returncode: int = 0, calls: list | None = None):
    def run(cmd, **kwargs):
        if calls is not None:
            calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)
    return run


def test_nvpmodel_mode_parses_query():
    calls = []
    assert nvpmodel_mode(fake_run("NV Power Mode: MAXN\n0\n", calls=calls), executable="/usr/sbin/nvpmodel") \
        == {"name": "MAXN", "id": 0, "reason": None}
    assert calls == [["/usr/sbin/nvpmodel", "-q"]]
    assert nvpmodel_mode(fake_run("NV Fan Mode:quiet\nNV Power Mode: 15W\n2\n"), executable="nvpmodel") \
        == {"name": "15W", "id": 2, "reason": None}


def test_nvpmodel_mode_when_missing_or_failing(tmp_path, monkeypatch):
    def not_found(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    assert nvpmodel_mode(not_found, executable="nvpmodel") == \
        {"name": None, "id": None, "reason": "nvpmodel not installed (nvpmodel not found)"}
    assert nvpmodel_mode(fake_run(stderr="NVPM ERROR: failed to read PARAM CPU_ONLINE\n", returncode=255),
                         executable="nvpmodel") == \
        {"name": None, "id": None, "reason": "nvpmodel -q exited 255: NVPM ERROR: failed to read PARAM CPU_ONLINE"}
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(jetson, "_EXTRA_TOOL_DIRS", ())
    assert nvpmodel_mode() == {"name": None, "id": None, "reason": "nvpmodel not installed (not a Jetson)"}


# --- sysfs: clocks and throttling -----------------------------------------------------------------

GPU = "class/devfreq/17000000.ga10b"


def write_tree(root: Path, files: dict[str, str | int]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{content}\n")
    return root


def orin_sysfs(root: Path, **overrides: str | int) -> Path:
    """An Orin Nano at rest, nvpmodel 15W without jetson_clocks, as its sysfs reads."""
    files = {
        "class/thermal/thermal_zone0/type": "cpu-thermal", "class/thermal/thermal_zone0/temp": 48500,
        "class/thermal/thermal_zone0/trip_point_0_type": "passive",
        "class/thermal/thermal_zone0/trip_point_0_temp": 99000,
        "class/thermal/thermal_zone0/trip_point_1_type": "critical",
        "class/thermal/thermal_zone0/trip_point_1_temp": 102500,
        "class/thermal/thermal_zone1/type": "gpu-thermal", "class/thermal/thermal_zone1/temp": 47900,
        "class/thermal/thermal_zone1/trip_point_0_type": "passive",
        "class/thermal/thermal_zone1/trip_point_0_temp": 99000,
        "class/thermal/thermal_zone1/trip_point_1_type": "critical",
        "class/thermal/thermal_zone1/trip_point_1_temp": 102500,
        # a disabled passive trip (0) must not mark every reading as hot
        "class/thermal/thermal_zone8/type": "tj-thermal", "class/thermal/thermal_zone8/temp": 48750,
        "class/thermal/thermal_zone8/trip_point_0_type": "passive",
        "class/thermal/thermal_zone8/trip_point_0_temp": 0,
        "class/thermal/thermal_zone8/trip_point_1_type": "passive",
        "class/thermal/thermal_zone8/trip_point_1_temp": 95500,
        "devices/system/cpu/cpufreq/policy0/scaling_min_freq": 729600,
        "devices/system/cpu/cpufreq/policy0/scaling_max_freq": 1510400,
        "devices/system/cpu/cpufreq/policy0/cpuinfo_max_freq": 1510400,
        "devices/system/cpu/cpufreq/policy4/scaling_min_freq": 729600,
        "devices/system/cpu/cpufreq/policy4/scaling_max_freq": 1510400,
        "devices/system/cpu/cpufreq/policy4/cpuinfo_max_freq": 1510400,
        f"{GPU}/governor": "nvhost_podgov", f"{GPU}/cur_freq": 306000000,
        f"{GPU}/min_freq": 306000000, f"{GPU}/max_freq": 625000000,
        # a video engine the userspace governor holds without a set_freq: not a lock
        "class/devfreq/15340000.vic/governor": "userspace", "class/devfreq/15340000.vic/cur_freq": 115200000,
        "class/devfreq/15340000.vic/min_freq": 115200000, "class/devfreq/15340000.vic/max_freq": 729600000,
        "class/devfreq/15340000.vic/userspace/set_freq": "undefined",
        "class/hwmon/hwmon1/name": "ina3221", "class/hwmon/hwmon1/in1_input": 5008,
        "class/hwmon/hwmon3/name": "soctherm_oc", "class/hwmon/hwmon3/oc1_throt_en": 1,
        "class/hwmon/hwmon3/oc1_event_cnt": 0, "class/hwmon/hwmon3/oc2_event_cnt": 0,
        "class/hwmon/hwmon3/oc3_event_cnt": 4,
    }
    files.update({k.replace("GPU", GPU): v for k, v in overrides.items()})
    return write_tree(root, files)


def lock_clocks(root: Path, cpu_khz: int = 1510400, gpu_hz: int = 625000000) -> None:
    """What jetson_clocks writes: every min up to its max."""
    for policy in ("policy0", "policy4"):
        write_tree(root, {f"devices/system/cpu/cpufreq/{policy}/scaling_min_freq": cpu_khz,
                          f"devices/system/cpu/cpufreq/{policy}/scaling_max_freq": cpu_khz})
    write_tree(root, {f"{GPU}/min_freq": gpu_hz, f"{GPU}/max_freq": gpu_hz, f"{GPU}/cur_freq": gpu_hz})


def test_not_throttled_and_clocks_not_locked(tmp_path):
    root = orin_sysfs(tmp_path / "sys")
    before = snapshot_counters(root)
    assert before == {"hwmon3/oc1_event_cnt": 0, "hwmon3/oc2_event_cnt": 0, "hwmon3/oc3_event_cnt": 4}
    assert throttle_state(root, before) == {"throttled": False, "reasons": [], "oc_event_deltas": {}}
    assert jetson_clocks_applied(root) == {"applied": False, "reason": (
        "policy0: scaling_min_freq 729.6 MHz < scaling_max_freq 1510.4 MHz; "
        "policy4: scaling_min_freq 729.6 MHz < scaling_max_freq 1510.4 MHz; "
        "17000000.ga10b: min_freq 306 MHz < max_freq 625 MHz")}


def test_jetson_clocks_applied_at_the_power_mode_maximum(tmp_path):
    root = orin_sysfs(tmp_path / "sys")
    lock_clocks(root)
    assert jetson_clocks_applied(root) == {"applied": True, "reason": (
        "policy0: locked at 1510.4 MHz; policy4: locked at 1510.4 MHz; 17000000.ga10b: locked at 625 MHz")}
    assert throttle_state(root, snapshot_counters(root))["throttled"] is False
    # A lower nvpmodel mode caps scaling_max_freq under the hardware maximum; jetson_clocks locks there.
    lock_clocks(root, cpu_khz=1113600)
    assert jetson_clocks_applied(root) == {"applied": True, "reason": (
        "policy0: locked at 1113.6 MHz, below cpuinfo_max_freq 1510.4 MHz; "
        "policy4: locked at 1113.6 MHz, below cpuinfo_max_freq 1510.4 MHz; 17000000.ga10b: locked at 625 MHz")}


def test_no_jetson_sysfs(tmp_path):
    root = tmp_path / "sys"
    assert jetson_clocks_applied(root) == {
        "applied": None, "reason": f"no readable cpufreq policy or GPU devfreq under {root}"}
    assert throttle_state(root, snapshot_counters(root)) == {"throttled": False, "reasons": [], "oc_event_deltas": {}}


def test_hot_zone_above_passive_trip(tmp_path):
    root = orin_sysfs(tmp_path / "sys", **{"class/thermal/thermal_zone1/temp": 99250,
                                          "class/thermal/thermal_zone8/temp": 96000})
    assert throttle_state(root, snapshot_counters(root)) == {"throttled": True, "reasons": [
        "thermal_zone1 (gpu-thermal) at 99.25 C, passive trip 99 C",
        "thermal_zone8 (tj-thermal) at 96 C, passive trip 95.5 C",
    ], "oc_event_deltas": {}}


def test_hot_during_run_but_cool_at_the_check(tmp_path):
    root = orin_sysfs(tmp_path / "sys")
    state = throttle_state(root, None, zone_max_c={"thermal_zone0": 99.0, "thermal_zone1": 60.0})
    assert state == {"throttled": True, "reasons": ["thermal_zone0 (cpu-thermal) at 99 C, passive trip 99 C"],
                     "oc_event_deltas": {}}


def test_gpu_locked_but_running_below_its_lock(tmp_path):
    root = orin_sysfs(tmp_path / "sys")
    lock_clocks(root)
    write_tree(root, {f"{GPU}/cur_freq": 408000000})
    assert jetson_clocks_applied(root)["applied"] is True
    assert throttle_state(root, snapshot_counters(root)) == {
        "throttled": True, "reasons": ["17000000.ga10b at 408 MHz, locked at 625 MHz"], "oc_event_deltas": {}}
    # within clock rounding of the lock: not a throttle
    write_tree(root, {f"{GPU}/cur_freq": 624750000})
    assert throttle_state(root, None)["throttled"] is False


def test_userspace_and_performance_governors_hold_their_clock(tmp_path):
    root = orin_sysfs(tmp_path / "sys", **{"class/devfreq/15340000.vic/userspace/set_freq": 729600000,
                                          "GPU/governor": "performance"})
    assert throttle_state(root, None)["reasons"] == ["15340000.vic at 115.2 MHz, locked at 729.6 MHz",
                                                     "17000000.ga10b at 306 MHz, locked at 625 MHz"]


def test_over_current_events_during_the_run(tmp_path):
    root = orin_sysfs(tmp_path / "sys")
    before = snapshot_counters(root)
    write_tree(root, {"class/hwmon/hwmon3/oc3_event_cnt": 9, "class/hwmon/hwmon3/oc1_event_cnt": 0})
    assert throttle_state(root, before) == {
        "throttled": True, "reasons": ["hwmon3/oc3_event_cnt +5 over-current events"],
        "oc_event_deltas": {"hwmon3/oc3_event_cnt": 5}}
    # without a snapshot from the start there is nothing to compare against
    assert throttle_state(root, None) == {"throttled": False, "reasons": [], "oc_event_deltas": {}}
