"""What ``pip install`` gives a user: the wheel built from the repository's files holds every module and data
file of the package (the model-card template that ``push_to_hub`` fills, the PEP 561 marker that lets type checkers
read the hints), the console script and the extras, and nothing from tests/ or benchmarks/."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from load_file import load_file
from packaging.requirements import Requirement

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
    bounds = _lower_bounds()
    assert f'trl>={bounds["trl"]}; extra == "trl"' in requires and f'peft>={bounds["peft"]}; extra == "peft"' in requires
    assert not any(r.startswith(("trl", "peft", "pytest")) and "extra" not in r for r in requires)  # optional only
    assert "hf-ddlr = hf_ddlr.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()


# ---------------------------------------------------------------- the dependencies' lower bounds
LOWER_BOUNDS_RUN = ROOT / "benchmarks" / "results" / "dependency_versions" / "lower_bounds.md"
LOWER_BOUNDS_SELF = "tests/test_packaging.py::test_each_lower_bound_is_a_release_the_whole_suite_passed_on"


def _script():
    return load_file(ROOT / "scripts" / "dependency_versions.py", register=None)


def _lower_bounds() -> dict[str, str]:
    """pyproject's ``>=`` bounds of the packages hf_ddlr builds on closely: torch, transformers, TRL, PEFT (each
    requirement string of the file; no tomllib, which Python 3.10 lacks)."""
    bounds: dict[str, str] = {}
    for text in re.findall(r'"((?:torch|transformers|trl|peft)\b[^"]*)"', (ROOT / "pyproject.toml").read_text()):
        req = Requirement(text)
        for spec in req.specifier:
            if spec.operator == ">=":
                assert bounds.setdefault(req.name, spec.version) == spec.version, f"two lower bounds for {req.name}"
    return bounds


def test_each_lower_bound_is_a_release_the_whole_suite_passed_on():
    """The recorded run of scripts/dependency_versions.py pinned every bound at once and the suite passed: lowering
    a bound in pyproject.toml without rerunning it fails here. That run leaves out this test only (the file it
    reads is what the run writes)."""
    bounds = _lower_bounds()
    assert set(bounds) == {"torch", "transformers", "trl", "peft"}
    rows = [line for line in LOWER_BOUNDS_RUN.read_text().splitlines() if line.startswith("| `")]
    passed = [r for r in rows if re.search(r"\| \d+ passed(?:, \d+ deselected)?(?:, \d+ warnings?)? in ", r)
              and " failed" not in r and " error" not in r]
    pins = {p for r in passed for p in r.split("`")[1].split()}
    for name, version in bounds.items():
        assert any(re.fullmatch(rf"{name}==({re.escape(version)}(\.0)*)", p) for p in pins), (
            f"{name}>={version} in pyproject.toml, but no passing run pinned it in {LOWER_BOUNDS_RUN.name}: run "
            f"scripts/dependency_versions.py with that pin")
    command = LOWER_BOUNDS_RUN.read_text().splitlines()[0]
    args = re.search(r"--pytest_args ('[^']*'|\S+)", command)
    assert args and args.group(1).strip("'") == f"tests --deselect {LOWER_BOUNDS_SELF}", command  # the whole suite


def test_the_trl_check_at_import_asks_for_the_extras_bound():
    from hf_ddlr._trl_version import MIN_TRL

    assert MIN_TRL == _lower_bounds()["trl"]


def test_the_version_script_pins_in_place_of_the_projects_requirements():
    mod = _script()
    reqs = mod.requirements_with(mod.parse_set("transformers==5.24.0 trl==1.16.0"))
    names = [Requirement(r).name for r in reqs]
    assert names.count("transformers") == 1 and names.count("trl") == 1 and "peft" in names and "torch" in names
    assert "transformers==5.24.0" in reqs and "trl==1.16.0" in reqs
    assert not any(r.startswith("transformers>=") for r in reqs)
    with pytest.raises(SystemExit, match="give each package once"):
        mod.parse_set("trl==1.0 trl==1.1")
    with pytest.raises(SystemExit, match="transformers==5.19.0"):
        mod.parse_set("transformers=5.19")
    table = mod.to_markdown([{"set": "trl==1.16.0", "installed": {"trl": "1.16.0"}, "result": "3 passed in 1.0s",
                              "failed": [], "seconds": 4}], "cmd")
    assert "| `trl==1.16.0` |" in table and "| 3 passed in 1.0s | – | 4 |" in table
    last = "===== 1 failed, 2 skipped, 9 passed, 2 deselected in 84.65s (0:01:24) ====="
    assert mod.SUMMARY.match(last).group(1) == "1 failed, 2 skipped, 9 passed, 2 deselected in 84.65s (0:01:24)"
    assert mod.SUMMARY.match("FAILED tests/test_x.py::test_y - 2 passed in 1s") is None
