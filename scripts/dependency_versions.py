"""Run the test suite against other releases of hf_ddlr's dependencies, each in a fresh virtual environment.

``pyproject.toml``'s lower bounds (``torch>=...``, ``transformers>=...``, ``trl>=...``, ``peft>=...``) should be
releases the tests passed on, not guesses. For each pin set this makes a venv, installs torch (the set's torch pin,
else ``TORCH_SPEC`` as in the Makefile), the project's dependencies and its ``dev`` extra with the pins in place of
their requirements, hf_ddlr itself without dependencies (so a pin below a lower bound can be tried), runs pytest,
and writes one Markdown table::

    python scripts/dependency_versions.py --sets "transformers==5.19.0" "transformers==5.18.0" \\
        --pytest_args tests/test_transformers_contract.py                   # the contract only: ~1 min a set
    python scripts/dependency_versions.py --sets "transformers==5.19.0" --jobs 2   # the whole suite: ~20 min a set

A set is one or more requirements separated by spaces (``"trl==1.0.0 transformers==5.24.0"``); the installed
versions of the packages hf_ddlr builds on are read back from each venv, so the table says what pip resolved.
Needs Python 3.11+ (``tomllib``) and the package index pip uses (PyPI, or a mirror).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    sys.exit("scripts/dependency_versions.py needs Python 3.11+ (tomllib): run it with a newer python.")

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
REPORTED = ("torch", "transformers", "accelerate", "datasets", "huggingface-hub", "trl", "peft")
SUMMARY = re.compile(r"^=*\s*(\d+ [a-z]+\b.* in [\d.]+s\b.*?)\s*=*$")  # pytest's last line: "3 failed, 9 passed in 2.1s"


def parse_set(text: str) -> list[Requirement]:
    """A pin set from the command line: requirements separated by spaces, each naming one package once."""
    try:
        reqs = [Requirement(part) for part in text.split()]
    except InvalidRequirement as err:
        raise SystemExit(f"--sets {text!r}: {err}. Give requirements such as 'transformers==5.19.0'.") from None
    names = [canonicalize_name(r.name) for r in reqs]
    if not reqs or len(set(names)) != len(names):
        raise SystemExit(f"--sets {text!r}: give each package once, e.g. 'trl==1.0.0 transformers==5.24.0'.")
    return reqs


def requirements_with(pins: list[Requirement], pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The project's dependencies and ``dev`` extra, each requirement of a pinned package replaced by its pin."""
    project = tomllib.loads(pyproject.read_text())["project"]
    listed = [*project["dependencies"], *project.get("optional-dependencies", {}).get("dev", [])]
    pinned = {canonicalize_name(p.name) for p in pins}
    kept = [r for r in listed if canonicalize_name(Requirement(r).name) not in pinned]
    return [*dict.fromkeys(kept), *(str(p) for p in pins)]


def _run(cmd: list[str], log, env: dict | None = None) -> int:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def run_set(pins: list[Requirement], folder: Path, pytest_args: list[str], torch_spec: str) -> dict:
    """Make the venv (``folder/venv``), install, run pytest (log: ``folder/log.txt``); what was installed and what
    pytest said."""
    label = " ".join(str(p) for p in pins)
    torch_spec = next((str(p) for p in pins if canonicalize_name(p.name) == "torch"), torch_spec)  # a torch pin wins
    folder.mkdir(parents=True, exist_ok=True)
    venv, log_path = folder / "venv", folder / "log.txt"
    py = str(venv / "bin" / "python")
    print(f"[{label}] installing and testing; log {log_path}", flush=True)
    with open(log_path, "w") as log:
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [py, "-m", "pip", "install", "-q", torch_spec],
            [py, "-m", "pip", "install", "-q", *requirements_with(pins)],
            [py, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
        ]
        for cmd in steps:
            if _run(cmd, log):
                return {"set": label, "installed": {}, "result": f"install failed (`{log_path}`)", "seconds": 0}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        listed = subprocess.run([py, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True).stdout
        versions = {canonicalize_name(p["name"]): p["version"] for p in json.loads(listed or "[]")}
        test_start = time.time()
        rc = _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], log, env)
    tail = log_path.read_text().splitlines()
    summary = next((m.group(1) for line in reversed(tail) if (m := SUMMARY.match(line.strip()))), None)
    if summary is None:  # nothing ran (an import failed at collection): the first error line says why
        error = next((line[1:].strip() for line in tail if line.startswith("E ")), "")
        summary = f"pytest rc {rc}: {re.sub(r' [(]/[^)]*[)]', '', error)[:200]}".rstrip(": ")
    failed = [line.split("::", 1)[-1].split(" - ")[0] for line in tail if line.startswith(("FAILED ", "ERROR "))]
    return {"set": label, "installed": {n: versions.get(n, "–") for n in REPORTED}, "result": summary,
            "failed": failed, "seconds": round(time.time() - test_start), "log": str(log_path)}


def to_markdown(rows: list[dict], command: str) -> str:
    head = "| pins | " + " | ".join(REPORTED) + " | pytest | failed (first 5) | test time (s) |"
    lines = [f"`{command}`", "", head, "|" + "---|" * (len(REPORTED) + 4)]
    for r in rows:
        cells = [r["installed"].get(n, "–") for n in REPORTED]
        failed = ", ".join(f"`{f}`" for f in r.get("failed", [])[:5]) or "–"
        lines.append(f"| `{r['set']}` | " + " | ".join(cells) + f" | {r['result']} | {failed} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", required=True, help='pin sets, e.g. "transformers==5.19.0" "trl==1.0.0"')
    p.add_argument("--pytest_args", default="tests", help="what pytest runs, one string (default: the suite)")
    p.add_argument("--venv_dir", default=None, help="where the venvs go (default: a temporary folder, kept)")
    p.add_argument("--jobs", type=int, default=1, help="sets run at once (then each pytest on one thread)")
    p.add_argument("--output", default="benchmarks/results/dependency_versions/table.md",
                   help="the Markdown table")
    args = p.parse_args(argv)
    sets = [parse_set(s) for s in args.sets]
    root = Path(args.venv_dir or tempfile.mkdtemp(prefix="hf_ddlr_deps_"))
    torch_spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")
    if args.jobs > 1:  # the sets share the cores
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"{len(sets)} set(s), venvs in {root}, torch from {torch_spec!r} where a set pins none", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_set, pins, root / f"set{i}", shlex.split(args.pytest_args), torch_spec): i
                   for i, pins in enumerate(sets)}
        rows: list[dict | None] = [None] * len(sets)
        for fut in concurrent.futures.as_completed(futures):
            row = fut.result()
            rows[futures[fut]] = row
            print(f"[{row['set']}] {row['result']} ({row['seconds']} s; log {row.get('log', '-')})", flush=True)
    command = "python scripts/dependency_versions.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown([r for r in rows if r], command))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
