"""Package the device runner (runner/edgeft_runner) into one self-contained `runner.pyz`.

The archive must be byte-for-byte reproducible so its sha256 can pin what ran on a device: entries are
written in sorted order with a fixed timestamp and mode, and __pycache__ or other non-source files are left out.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipapp
import zipfile
from importlib import resources
from pathlib import Path

# The installed edgeft_runner package (runner/edgeft_runner in the repository, see pyproject.toml), so a
# wheel install zips the same sources as a checkout.
RUNNER_PACKAGE_DIR = Path(resources.files("edgeft_runner"))
INTERPRETER = "/usr/bin/env python3"
TOP_LEVEL_MAIN = (
    "import sys\n"
    "from edgeft_runner.__main__ import main\n"
    "sys.exit(main())\n"
)
ZIP_DATE_TIME = (2020, 1, 1, 0, 0, 0)  # fixed, so builds do not depend on checkout mtimes or time zone


def _zip_entry(z: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE_TIME)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    z.writestr(info, data)


def _runner_zip_bytes(package_dir: Path) -> bytes:
    sources = sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)
    if not (package_dir / "__main__.py").is_file():
        raise FileNotFoundError(f"runner package not found or incomplete: {package_dir}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        _zip_entry(z, "__main__.py", TOP_LEVEL_MAIN.encode())
        for path in sources:
            arcname = f"{package_dir.name}/{path.relative_to(package_dir).as_posix()}"
            _zip_entry(z, arcname, path.read_bytes())
    return buffer.getvalue()


def runner_sha256() -> str:
    """The sha256 of the runner.pyz build_runner_zipapp writes, computed in memory (it is reproducible)."""
    archive = io.BytesIO()
    zipapp.create_archive(io.BytesIO(_runner_zip_bytes(RUNNER_PACKAGE_DIR)), archive, interpreter=INTERPRETER)
    return hashlib.sha256(archive.getvalue()).hexdigest()


def build_runner_zipapp(out_path: Path) -> str:
    """Write runner.pyz to out_path atomically and return its sha256.

    zipapp.create_archive(directory) walks the tree in filesystem order and stamps file mtimes, which is not
    reproducible; so the zip is built here deterministically and create_archive only adds the shebang.
    """
    out_path = Path(out_path)
    source = io.BytesIO(_runner_zip_bytes(RUNNER_PACKAGE_DIR))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            zipapp.create_archive(source, tmp, interpreter=INTERPRETER)
        os.chmod(tmp_name, 0o755)
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return hashlib.sha256(out_path.read_bytes()).hexdigest()
