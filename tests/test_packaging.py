"""What ``pip install`` gives a user: the wheel built from the repository's files holds every module and data
file of the package (the model-card template that ``push_to_hub`` fills, the PEP 561 marker that lets type checkers
read the hints), the console script and the extras, and nothing from tests/ or benchmarks/."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _repository_files() -> list[str]:
    """The files a clone holds (tracked, or new and not ignored): what a build from a checkout sees."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                         text=True, check=True).stdout.split()
    return [f for f in out if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know the repository's files")
    src = tmp_path_factory.mktemp("checkout")
    for f in _repository_files():
        if f in ("pyproject.toml", "README.md", "LICENSE") or f.startswith("src/"):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    dist = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(dist)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-4000:]
    (whl,) = dist.glob("hf_ddlr-*.whl")
    return zipfile.ZipFile(whl)


def test_the_wheel_holds_every_file_of_the_package_and_nothing_else(wheel):
    names = set(wheel.namelist())
    package = {f.removeprefix("src/") for f in _repository_files() if f.startswith("src/hf_ddlr/")}
    assert "hf_ddlr/model_cards/metalr_card.md" in package and "hf_ddlr/py.typed" in package
    assert package - names == set(), f"in the package but not in the wheel: {sorted(package - names)}"
    stray = {n for n in names if not n.startswith(("hf_ddlr/", "hf_ddlr-"))}
    assert stray == set(), f"outside the package: {sorted(stray)}"


def test_the_wheel_declares_the_console_script_and_the_extras(wheel):
    (info,) = {n.split("/")[0] for n in wheel.namelist() if n.endswith(".dist-info/METADATA")}
    metadata = wheel.read(f"{info}/METADATA").decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.startswith("transformers") and "<6" in r for r in requires)
    assert 'trl>=1.0; extra == "trl"' in requires and 'peft>=0.13; extra == "peft"' in requires
    assert not any(r.startswith(("trl", "peft", "pytest")) and "extra" not in r for r in requires)  # optional only
    assert "hf-ddlr = hf_ddlr.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()
