"""`edgeft flash`, `status`, `rollback` and fleet rollouts against real sshds (tests/sshd.py start_lab) with
tiny real ONNX bundles (tests/tiny_bundle.py), signed with real Ed25519 keys; the device side is the real
runner, sent over SSH into each device's store.

Imports torch (the tiny bundle's export): run under `flock /tmp/edgeft-heavy.lock`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from edgeft.errors import DeviceError
from edgeft.flash.flash import FlashOptions
from edgeft.flash.rollout import HALTED, plan_devices, rollout, rollout_exit_code
from sshd import start_lab
from tiny_bundle import CHANNEL, bundle_template, make_release, new_key, sha256, sign

FLEET_TAG = "fleet"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with start_lab(tmp_path_factory.mktemp("flash-lab"), 3) as info:
        configure(info)
        yield info


def configure(lab, **installs: dict) -> None:
    """Every device is a test-cpu target tagged `fleet`; installs[name] is that device's `install:` block."""
    data = yaml.safe_load(lab.lab_path.read_text())
    for entry in data["devices"]:
        entry.update(target=CHANNEL, tags=sorted({*entry["tags"], FLEET_TAG}),
                     install={"grace_s": 0, **installs.get(entry["name"].replace("-", "_"), {})})
    lab.lab_path.write_text(yaml.safe_dump(data, sort_keys=False))


def install_root(lab, index: int, root: str = "edgeft-install") -> Path:
    return lab.devices[index].workdir / root


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    key, pub = new_key(directory / "ours")
    foreign_key, foreign_pub = new_key(directory / "foreign")
    return {"key": key, "pub": pub, "foreign_key": foreign_key, "foreign_pub": foreign_pub}


def _new_model_bytes(bundle: Path, manifest: dict) -> None:
    """The same network with other bytes (a doc string): a new model file, same golden logits and task."""
    import onnx

    model = onnx.load(str(bundle / "model.onnx"))
    model.doc_string = "retrained"
    onnx.save(model, str(bundle / "model.onnx"))


@pytest.fixture(scope="module")
def releases(tmp_path_factory, keys):
    """v1, v2 (another task.json, same model), v3 (v2's task.json with a new model file), signed; an unsigned
    copy and one signed by a foreign key."""
    template = bundle_template(tmp_path_factory)
    out = tmp_path_factory.mktemp("releases")
    v1 = make_release(template, out / "v1", note="v1")
    v2 = make_release(template, out / "v2", note="v2")
    v3 = make_release(template, out / "v3", note="v2", edit=_new_model_bytes)
    for version, bundle in enumerate((v1, v2, v3), start=1):
        sign(bundle, keys["key"], version=version)
    unsigned = make_release(template, out / "unsigned", note="unsigned")
    foreign = make_release(template, out / "foreign", note="foreign")
    sign(foreign, keys["foreign_key"], version=1)
    return {"v1": v1, "v2": v2, "v3": v3, "unsigned": unsigned, "foreign": foreign}


def flash_cli(run_edgeft, lab, bundle: Path, *args: str):
    result = run_edgeft("flash", bundle, "--lab", lab.lab_path, "--json", "--quiet", *args, timeout=300)
    answer = json.loads(result.stdout) if result.stdout.strip() else None
    return result, answer


def by_device(result: dict) -> dict[str, dict]:
    return {r["device"]: r for r in result["devices"]}


def device_status(run_edgeft, lab, name: str) -> dict:
    result = run_edgeft("status", "--device", name, "--lab", lab.lab_path, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------------- fleets
def test_canary_failing_its_health_check_halts_the_rollout(run_edgeft, lab, keys, releases, tmp_path):
    configure(lab, dev_0={"health_check": "false"})
    out = tmp_path / "rollout.json"
    result, answer = flash_cli(run_edgeft, lab, releases["v1"], "--devices", FLEET_TAG, "--canary", "1",
                               "--install-pubkey", keys["pub"], "-o", out)
    assert result.returncode == 1, result.stderr
    assert json.loads(out.read_text()) == answer
    devices = by_device(answer)
    assert devices["dev-0"]["result"] == "rolled-back"
    assert "health check failed" in devices["dev-0"]["reason"]
    for name in ("dev-1", "dev-2"):
        assert devices[name]["result"] == "skipped" and devices[name]["reason"].startswith(HALTED)
        assert devices[name]["bytes_sent"] == 0
    assert answer["halted"].startswith("canary dev-0 rolled-back")
    assert not install_root(lab, 1).exists() and not install_root(lab, 2).exists()  # untouched
    state = json.loads((install_root(lab, 0) / "state.json").read_text())
    assert state["active"] is None and state["slots"]["a"]["status"] == "failed"  # nothing to go back to: none
    assert "rollout halted" in result.stderr and "dev-0" in result.stderr  # the table went to stderr
    # the fleet page beside the JSON, drawn by a real browser: one row per device with its result
    page = out.with_suffix(".html")
    html = page.read_text()
    assert html.count('<tr class="device">') == 3 and "halted: canary dev-0 rolled-back" in html
    assert '<td class="FAIL">rolled-back</td>' in html and html.count('<td class="SKIP">skipped</td>') == 2
    if shutil.which("chromium"):
        from test_report_html import _chromium

        dom = _chromium(tmp_path / "profile", "--dump-dom", page.as_uri())
        assert dom.returncode == 0 and dom.stdout.count('<tr class="device">') == 3, dom.stderr[-2000:]


def test_max_failures_stops_the_rollout(lab, keys, releases):
    configure(lab, dev_0={"health_check": "false"}, dev_1={"health_check": "exit 3"})
    result = rollout(releases["v1"], tags=[FLEET_TAG], lab_path=lab.lab_path, options=FlashOptions(install_pubkey=keys["pub"]),
                     max_failures=2, parallel=1, log=lambda message: None)
    devices = by_device(result)
    assert [devices[n]["result"] for n in ("dev-0", "dev-1", "dev-2")] == ["rolled-back", "rolled-back", "skipped"]
    assert "exit 3" in devices["dev-1"]["reason"]
    assert result["halted"] == "2 device(s) failed, --max-failures 2"
    assert rollout_exit_code(result) == 1
    assert not install_root(lab, 2).exists()


def test_fleet_rollout_installs_everywhere_and_a_rerun_sends_nothing(lab, keys, releases):
    configure(lab)
    options = FlashOptions(install_pubkey=keys["pub"])
    first = rollout(releases["v1"], tags=[FLEET_TAG], lab_path=lab.lab_path, options=options, canary=1,
                    log=lambda message: None)
    assert rollout_exit_code(first) == 0 and first["halted"] is None
    assert first["counts"] == {"installed": 3}
    for i in range(3):
        assert (install_root(lab, i) / "current" / "manifest.json").read_bytes() == (releases["v1"] / "manifest.json").read_bytes()
    # dev-0 already had the payload in its store from the failed attempts: only its manifest moved
    assert by_device(first)["dev-2"]["bytes_sent"] == sum(p.stat().st_size for p in releases["v1"].iterdir())

    again = rollout(releases["v1"], tags=[FLEET_TAG], lab_path=lab.lab_path, options=options, canary=1,
                    log=lambda message: None)
    assert rollout_exit_code(again) == 0
    assert {r["result"] for r in again["devices"]} == {"already-current"}
    assert [r["bytes_sent"] for r in again["devices"]] == [0, 0, 0]


# ------------------------------------------------------------------------------------ one device
def test_upgrade_keeps_the_previous_version_in_the_other_slot(run_edgeft, lab, keys, releases):
    result, answer = flash_cli(run_edgeft, lab, releases["v2"], "--device", "dev-0", "--pubkey", keys["pub"])
    assert result.returncode == 0, result.stderr
    r = answer["devices"][0]
    assert (r["result"], r["version"], r["previous"]["version"]) == ("installed", 2, 1)
    status = device_status(run_edgeft, lab, "dev-0")
    slots = status["slots"]
    active, other = slots[status["active"]], slots["a" if status["active"] == "b" else "b"]
    assert (active["version"], active["status"], active["bundle"]) == (2, "good", sha256(releases["v2"] / "manifest.json"))
    assert (other["version"], other["status"], other["bundle"]) == (1, "good", sha256(releases["v1"] / "manifest.json"))
    assert status["pending"] is None and status["state"]["highest_version"] == {CHANNEL: 2}
    assert any(line["step"] == "install" and line["result"] == "installed" and line["version"] == 2 for line in status["log"])

    human = run_edgeft("status", "--device", "dev-0", "--lab", lab.lab_path, timeout=120)  # the table
    assert human.returncode == 0 and "good" in human.stderr and CHANNEL in human.stderr


def test_reflash_of_the_current_bundle_sends_nothing(run_edgeft, lab, keys, releases):
    result, answer = flash_cli(run_edgeft, lab, releases["v2"], "--device", "dev-0", "--pubkey", keys["pub"])
    assert result.returncode == 0, result.stderr
    r = answer["devices"][0]
    assert (r["result"], r["bytes_sent"], r["files_sent"]) == ("already-current", 0, 0)


def test_a_new_model_sends_only_the_changed_files(run_edgeft, lab, keys, releases):
    v2, v3 = releases["v2"], releases["v3"]
    changed = [p for p in sorted(v3.iterdir()) if not (v2 / p.name).exists() or sha256(p) != sha256(v2 / p.name)]
    assert sorted(p.name for p in changed) == ["manifest.json", "manifest.sig", "model.onnx"]  # task.json, golden.npz kept
    result, answer = flash_cli(run_edgeft, lab, v3, "--device", "dev-0", "--pubkey", keys["pub"])
    assert result.returncode == 0, result.stderr
    r = answer["devices"][0]
    assert r["result"] == "installed" and r["version"] == 3
    assert r["files_sent"] == 3 and r["bytes_sent"] == sum(p.stat().st_size for p in changed)


def test_rollback_by_hand_goes_back_to_the_other_slot(run_edgeft, lab, releases):
    result = run_edgeft("rollback", "--device", "dev-0", "--lab", lab.lab_path, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["result"] == "rolled-back"
    manifest = install_root(lab, 0) / "current" / "manifest.json"
    assert manifest.read_bytes() == (releases["v2"] / "manifest.json").read_bytes()


def test_an_older_version_needs_allow_downgrade(run_edgeft, lab, keys, releases):
    result, answer = flash_cli(run_edgeft, lab, releases["v1"], "--device", "dev-0", "--pubkey", keys["pub"])
    assert result.returncode == 2
    r = answer["devices"][0]
    assert r["result"] == "refused" and "older than version 3" in r["reason"]
    result, answer = flash_cli(run_edgeft, lab, releases["v1"], "--device", "dev-0", "--pubkey", keys["pub"], "--allow-downgrade")
    assert result.returncode == 0, result.stderr
    assert answer["devices"][0]["result"] == "installed"


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("bundle, pubkey, says", [
    ("unsigned", "pub", "manifest.sig"),
    ("foreign", "pub", "not trusted"),
])
def test_unsigned_or_foreign_bundles_are_refused_before_any_byte_is_sent(run_edgeft, lab, keys, releases, bundle, pubkey, says):
    result, answer = flash_cli(run_edgeft, lab, releases[bundle], "--device", "dev-1", "--pubkey", keys[pubkey],
                               "--root", "fresh-root")
    assert result.returncode == 2 and answer is None
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and says in error[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not install_root(lab, 1, "fresh-root").exists()  # not even the install root was made


def test_the_device_refuses_a_key_it_does_not_trust(run_edgeft, lab, keys, releases):
    """The host accepts the foreign key it is given; the device, which trusts only ours, refuses."""
    before = (install_root(lab, 1) / "state.json").read_bytes()
    result, answer = flash_cli(run_edgeft, lab, releases["foreign"], "--device", "dev-1", "--pubkey", keys["foreign_pub"])
    assert result.returncode == 2
    r = answer["devices"][0]
    assert r["result"] == "refused" and "trusted" in r["reason"]
    assert json.loads((install_root(lab, 1) / "state.json").read_text())["active"] == json.loads(before)["active"]
    assert (install_root(lab, 1) / "current" / "manifest.json").read_bytes() == (releases["v1"] / "manifest.json").read_bytes()


def test_bad_selection_is_one_line_exit_2(run_edgeft, lab, keys, releases):
    result, _ = flash_cli(run_edgeft, lab, releases["v1"], "--devices", "no-such-tag", "--pubkey", keys["pub"])
    assert result.returncode == 2 and "no device carries all tags no-such-tag" in result.stderr
    result, _ = flash_cli(run_edgeft, lab, releases["v1"], "--device", "dev-0", "--devices", FLEET_TAG, "--pubkey", keys["pub"])
    assert result.returncode == 2 and "not both" in result.stderr


def test_devices_of_another_target_are_skipped_by_tag_and_refused_by_name(lab, releases, tmp_path):
    data = yaml.safe_load(lab.lab_path.read_text())
    data["devices"][1]["target"] = "rpi5"  # aarch64: this x86_64 test-cpu bundle cannot run there
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(yaml.safe_dump(data, sort_keys=False))
    manifest = json.loads((releases["v1"] / "manifest.json").read_text())
    names, skipped = plan_devices(mixed, (), [FLEET_TAG], manifest)
    assert names == ["dev-0", "dev-2"] and [name for name, _ in skipped] == ["dev-1"]
    assert "is a rpi5" in skipped[0][1]
    with pytest.raises(DeviceError, match="dev-1"):
        plan_devices(mixed, ("dev-0", "dev-1"), (), manifest)
