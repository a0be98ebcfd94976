"""Installs that are not the source checkout: a wheel from `python -m build` and `pip install .` (of the
unpacked sdist), each in a fresh venv, used from a directory outside the checkout.

The fresh venvs reuse .venv's dependencies through a .pth file (torch and friends are not reinstalled),
but never the checkout: the source tree a wheel was built from is deleted before it is used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from edgeft.runner_app import build_runner_zipapp

ROOT = Path(__file__).resolve().parent.parent
DEPS = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})  # .venv's dependencies, not edgeft


def _fresh_venv(path: Path) -> Path:
    """A venv with no edgeft, whose python sees .venv's dependencies; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_edgeft_test_deps.pth").write_text("".join(f"{d}\n" for d in DEPS))
    return python


def _pip_install(python: Path, *what: str | Path) -> None:
    # --ignore-installed: .venv's editable edgeft is visible through the .pth; install beside it, never over it.
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                             "--no-index", "--no-build-isolation", "--ignore-installed", *map(str, what)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


class Install:
    def __init__(self, venv: Path, user_dir: Path):
        self.venv, self.user_dir = venv, user_dir
        self.python = venv / "bin" / "python"

    def run(self, *argv: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if k not in ("EDGEFT_HOME", "PYTHONPATH")}
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120,
                              cwd=cwd or self.user_dir, env={**clean, "COLUMNS": "200", **(env or {})})

    def edgeft(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return self.run(self.venv / "bin" / "edgeft", *args, env=env, cwd=cwd)

    def listing(self, kind: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, dict]:
        result = self.edgeft(kind, "--json", env=env, cwd=cwd)
        assert result.returncode == 0, result.stderr
        return {row["name"]: row for row in json.loads(result.stdout)}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """One `python -m build` of the checkout: the sdist, and the wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return {"wheel": next(out.glob("edgeft-*.whl")), "sdist": next(out.glob("edgeft-*.tar.gz"))}


@pytest.fixture(scope="module")
def wheel_install(dist, tmp_path_factory) -> Install:
    base = tmp_path_factory.mktemp("wheel-install")
    wheel = shutil.copy(dist["wheel"], base / dist["wheel"].name)
    python = _fresh_venv(base / "venv")
    _pip_install(python, wheel)
    Path(wheel).unlink()  # nothing but the venv is left to read from
    (base / "work").mkdir()
    return Install(base / "venv", base / "work")


@pytest.fixture(scope="module")
def source_install(dist, tmp_path_factory) -> Install:
    """`pip install .` in a clean source tree: the unpacked sdist, deleted once installed."""
    base = tmp_path_factory.mktemp("source-install")
    with tarfile.open(dist["sdist"]) as tar:
        tar.extractall(base, filter="data")
    src = next(base.glob("edgeft-*"))
    python = _fresh_venv(base / "venv")
    _pip_install(python, src)
    shutil.rmtree(src)
    (base / "work").mkdir()
    return Install(base / "venv", base / "work")


def _checkout_files(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob(pattern) if "__pycache__" not in p.parts}


def test_wheel_holds_every_module_and_shipped_file(dist):
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    expected = {f"edgeft/{p}" for p in _checkout_files("edgeft", "*.py")}
    expected |= {f"edgeft_runner/{p}" for p in _checkout_files("runner/edgeft_runner", "*.py")}
    expected |= {f"edgeft/demo/{p}" for p in _checkout_files("edgeft/demo", "*.txt") | _checkout_files("edgeft/demo", "*.jsonl")}
    for kind in ("targets", "profiles"):
        expected |= {f"edgeft/_shipped/{kind}/{p}" for p in _checkout_files(kind, "*.yaml")}
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}: list new packages and data in pyproject.toml [tool.setuptools]"
    assert len([n for n in names if n.startswith("edgeft/_shipped/targets/") and n.endswith(".yaml")]) >= 3


@pytest.mark.parametrize("install", ["wheel_install", "source_install"])
def test_shipped_targets_and_profiles_listed_from_the_install(install, request):
    installed: Install = request.getfixturevalue(install)
    site = installed.venv.resolve()
    for kind in ("targets", "profiles"):
        rows = installed.listing(kind)
        assert set(rows) == {p.stem for p in (ROOT / kind).glob("*.yaml")}
        for row in rows.values():
            assert row["origin"] == "shipped" and row["shadows"] == [] and "error" not in row, row
            assert Path(row["path"]).resolve().is_relative_to(site), row["path"]
    rows = installed.listing("targets")
    assert (rows["rpi5"]["runtime"], rows["rpi5"]["default_profile"]) == ("onnxruntime", "arm-int8")
    assert installed.listing("profiles")["arm-int8"]["stages"] == ["finetune", "merge", "export", "quantize"]


def test_user_targets_and_profiles_found_by_name_and_shadowing_shown(wheel_install, tmp_path):
    shipped = wheel_install.listing("targets")["rpi5"]
    shipped_rpi5 = Path(shipped["path"]).read_text()
    work = tmp_path / "project"
    (work / "targets").mkdir(parents=True)
    (work / "targets" / "mine.yaml").write_text(shipped_rpi5.replace("Raspberry Pi 5", "My board"))
    (work / "targets" / "rpi5.yaml").write_text(shipped_rpi5.replace("Raspberry Pi 5", "Our own Pi 5"))
    home = tmp_path / "home"
    (home / "profiles").mkdir(parents=True)
    shipped_int8 = Path(wheel_install.listing("profiles")["arm-int8"]["path"]).read_text()
    (home / "profiles" / "team-int8.yaml").write_text(shipped_int8.replace("QLoRA fine-tune", "Team QLoRA"))
    env = {"EDGEFT_HOME": str(home)}

    targets = wheel_install.listing("targets", env=env, cwd=work)
    assert (targets["mine"]["origin"], targets["mine"]["description"]) == ("./targets", shipped["description"].replace("Raspberry Pi 5", "My board"))
    assert (targets["rpi5"]["origin"], targets["rpi5"]["shadows"]) == ("./targets", ["shipped"])
    assert targets["rpi5"]["description"].startswith("Our own Pi 5")
    assert targets["jetson-orin"]["origin"] == "shipped"
    profiles = wheel_install.listing("profiles", env=env, cwd=work)
    assert (profiles["team-int8"]["origin"], profiles["team-int8"]["path"]) == ("$EDGEFT_HOME", str(home / "profiles" / "team-int8.yaml"))
    text = wheel_install.edgeft("targets", env=env, cwd=work)
    line = next(line for line in text.stdout.splitlines() if line.startswith("rpi5 "))
    assert "./targets" in line and line.endswith("(shadows shipped)"), line

    # By name through the library, as `edgeft build --target mine` resolves it.
    probe = ("from edgeft.config import load_profile, load_target\n"
             "t = load_target('mine'); p = load_profile('team-int8')\n"
             "print(t.source, t.default_profile, p.source, sep='\\n')")
    result = wheel_install.run(wheel_install.python, "-c", probe, env=env, cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(work / "targets" / "mine.yaml"), "arm-int8", str(home / "profiles" / "team-int8.yaml")]

    # An unknown name: one line, exit 2, naming every folder searched.
    result = wheel_install.edgeft("build", "--target", "nosuch", env=env, cwd=work)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    shipped_dir = Path(targets["jetson-orin"]["path"]).parent
    for folder in (work / "targets", home / "targets", shipped_dir):
        assert str(folder) in errors[0], errors[0]
    assert "Traceback" not in result.stderr


def test_runner_zipapp_from_the_wheel_is_the_checkouts_and_runs(wheel_install, tmp_path):
    result = wheel_install.run(wheel_install.python, "-c", "import sys; from pathlib import Path\n"
                               "from edgeft.runner_app import RUNNER_PACKAGE_DIR, build_runner_zipapp\n"
                               "print(RUNNER_PACKAGE_DIR); print(build_runner_zipapp(Path(sys.argv[1])))", tmp_path / "runner.pyz")
    assert result.returncode == 0, result.stderr
    package_dir, sha = result.stdout.split()
    assert Path(package_dir).resolve().is_relative_to(wheel_install.venv.resolve())
    # Reproducible archive: the wheel's runner sources are byte for byte the checkout's.
    assert sha == build_runner_zipapp(tmp_path / "checkout-runner.pyz")
    info = wheel_install.run(wheel_install.python, tmp_path / "runner.pyz", "info")
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["device"]["arch"] == os.uname().machine
    assert described["runtimes"]["onnxruntime"] == version("onnxruntime")


def test_installed_package_has_no_path_into_the_checkout(wheel_install):
    probe = ("import json, edgeft, edgeft_runner\n"
             "from edgeft.config import search_dirs\n"
             "from edgeft.data import DEMO_DATA\n"
             "from edgeft.evaluate import GENERAL_TEXT\n"
             "from edgeft.runner_app import RUNNER_PACKAGE_DIR\n"
             "print(json.dumps([edgeft.__file__, edgeft_runner.__file__, str(DEMO_DATA), str(GENERAL_TEXT), str(RUNNER_PACKAGE_DIR),"
             " *[str(folder) for kind in ('targets', 'profiles') for origin, folder in search_dirs(kind) if origin == 'shipped']]))")
    result = wheel_install.run(wheel_install.python, "-c", probe)
    assert result.returncode == 0, result.stderr
    paths = [Path(p).resolve() for p in json.loads(result.stdout)]
    assert len(paths) == 7 and all(p.exists() and p.is_relative_to(wheel_install.venv.resolve()) for p in paths), paths
    site = next(wheel_install.venv.glob("lib/python*/site-packages"))
    record = next(site.glob("edgeft-*.dist-info")) / "RECORD"
    installed = [site / line.split(",")[0] for line in record.read_text().splitlines() if line]
    assert len(installed) > 50
    # METADATA holds the README, whose example output may name a checkout; it is text for people.
    leaks = [str(p) for p in installed if p.is_file() and p.name != "METADATA" and str(ROOT).encode() in p.read_bytes()]
    assert not leaks, f"installed files name the checkout {ROOT}: {leaks}"
