"""pytest plugin (entry point `pytest11: edgeft`): hardware-in-the-loop tests on the edgeft lab.

    import pytest

    @pytest.mark.edgeft_device("rpi5-lab-1")          # or @pytest.mark.edgeft_device(tags=["rpi5"])
    def test_latency(edgeft_device):
        report = edgeft_device.measure("build/rpi5", budgets={"latency_ms_p99": 50})
        assert report["gate"]["verdict"] == "PASS", report["gate"]["checks"]

    pytest --edgeft-lab hil/lab.yaml tests/hil/

The `edgeft_device` fixture reserves the device for the test (waiting up to --edgeft-wait seconds for
another run to release it) and releases it after; without --edgeft-lab such tests are skipped.
The device can also come from indirect parametrization: `parametrize("edgeft_device", ["dev-0",
{"tags": ["rpi5"]}], indirect=True)`.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

MARKER = "edgeft_device"
NO_LAB = "no lab: pass --edgeft-lab hil/lab.yaml"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("edgeft", "edgeft hardware-in-the-loop (edgeft_device fixture)")
    group.addoption("--edgeft-lab", metavar="PATH", help="Lab inventory YAML; tests using the edgeft_device fixture are skipped without it.")
    group.addoption("--edgeft-wait", type=float, default=0.0, metavar="SECONDS",
                    help="How long a test waits for a device another run holds (default 0: fail at once).")
    group.addoption("--edgeft-trust-new-host-key", action="store_true", help="Accept and record SSH host keys not yet in known_hosts.")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(name=None, tags=()): the lab device the edgeft_device fixture reserves, by name or by tags")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("edgeft_lab"):
        return
    skip = pytest.mark.skip(reason=NO_LAB)
    for item in items:
        if item.get_closest_marker(MARKER) is not None or MARKER in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def _selection(request: pytest.FixtureRequest) -> tuple[str | None, tuple[str, ...]]:
    """(name, tags) from indirect parametrization or the marker; one of them, never both."""
    where = request.node.nodeid
    if hasattr(request, "param"):
        param = request.param
        name, tags = (param, ()) if isinstance(param, str) else (param.get("name"), tuple(param.get("tags", ())))
    else:
        marker = request.node.get_closest_marker(MARKER)
        if marker is None:
            pytest.fail(f"{where}: the edgeft_device fixture needs a device: mark the test "
                        f'@pytest.mark.{MARKER}("NAME") or @pytest.mark.{MARKER}(tags=["TAG"])', pytrace=False)
        name = marker.args[0] if marker.args else marker.kwargs.get("name")
        tags = tuple(marker.kwargs.get("tags", ()))
    if isinstance(tags, str):
        tags = (tags,)
    if (name is None) == (not tags):
        pytest.fail(f"{where}: {MARKER}: give a device name or tags=[...], not both (got name={name!r}, tags={list(tags)})", pytrace=False)
    return name, tags


@pytest.fixture
def edgeft_device(request: pytest.FixtureRequest) -> Any:
    """A reserved lab device (edgeft.hil.DeviceHandle): .name, .lab_device, .push(path) -> remote path,
    .measure(bundle, budgets=None) -> gated report, .run(argv) -> RunResult. Released after the test."""
    # Imported here, not at the top: the plugin loads in every pytest run of an environment with edgeft.
    from edgeft_runner import RunnerError

    from edgeft.errors import EdgeftError
    from edgeft.hil import held_device

    config = request.config
    lab = config.getoption("edgeft_lab")
    if not lab:
        pytest.skip(NO_LAB)
    lab_path = Path(config.invocation_params.dir) / lab
    name, tags = _selection(request)
    stack = ExitStack()
    try:
        handle = stack.enter_context(held_device(
            name, tags=tags, lab_path=lab_path, wait_s=config.getoption("edgeft_wait"),
            trust_new_host_key=config.getoption("edgeft_trust_new_host_key"), log=lambda message: print(f"edgeft: {message}")))
    except (EdgeftError, RunnerError) as exc:
        pytest.fail(f"edgeft_device: {exc}", pytrace=False)
    with stack:
        yield handle
