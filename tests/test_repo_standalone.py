"""The repository stands alone: its Markdown links stay inside it, and what the README tells users to run
from it works (the offline Hub stand-in from the command line)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "outputs", "build", "dist", ".pytest_cache", ".ruff_cache"}

_INLINE = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](target)
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)  # [label]: target
_HTML = re.compile(r"(?:href|src)\s*=\s*[\"']([^\"']+)[\"']")
_PARENT_PATH = re.compile(r"(?<![\w./-])((?:\.\./)+[^\s)\]`'\"<>|]*)")  # any ../path, also in `code`
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[Path]:
    """Every Markdown file of the working tree (tracked or not, outside virtual environments and outputs)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(dirpath) / f for f in filenames if f.lower().endswith(".md")]
    return sorted(out)


def _inside(path: Path) -> bool:
    try:
        path.resolve().relative_to(ROOT)
        return True
    except ValueError:
        return False


def link_problems(md: Path, text: str) -> list[str]:
    """What in ``text`` (the content of ``md``) points outside the repository, or to a missing file."""
    problems = []
    where = md.relative_to(ROOT) if _inside(md) else md
    if "shared/reference" in text:
        problems.append(f"{where}: mentions 'shared/reference', a folder outside the repository")
    links = _INLINE.findall(text) + _REFERENCE.findall(text) + _HTML.findall(text)
    for target in links + _PARENT_PATH.findall(text):
        if _SCHEME.match(target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same file
        rel = target.split("#", 1)[0].split("?", 1)[0]
        if not rel:
            continue
        resolved = ROOT / rel.lstrip("/") if rel.startswith("/") else md.parent / rel
        if not _inside(resolved):
            problems.append(f"{where}: {target!r} points outside the repository")
        elif target in links and not resolved.exists():
            problems.append(f"{where}: link {target!r} points to a missing file")
    return problems


def test_no_markdown_file_links_outside_the_repository():
    files = markdown_files()
    assert ROOT / "README.md" in files and ROOT / "docs" / "meta_lr_sensitivity.md" in files
    problems = [p for f in files for p in link_problems(f, f.read_text(encoding="utf-8"))]
    assert not problems, "Markdown that leaves the repository (users only get the repository):\n" + "\n".join(
        problems
    )


def test_the_link_check_catches_links_out_of_the_repository():
    """Negative control: the README line this check was written for, and other ways out, are reported."""
    readme = ROOT / "README.md"
    bad = {
        "`meta_lr` (`../shared/reference/meta_lr_sensitivity.md`: 10x too large ...)": "shared/reference",
        "see [the notes](../notes.md)": "'../notes.md' points outside",
        "[ref]: ../../elsewhere/file.md": "points outside",
        '<img src="../outside.png">': "points outside",
        "[missing](docs/no_such_file.md)": "missing file",
    }
    for text, expected in bad.items():
        found = link_problems(readme, text)
        assert any(expected in p for p in found), (text, found)
    ok = "[docs](docs/meta_lr_sensitivity.md), [web](https://huggingface.co), [anchor](#usage), `src/../README.md`"
    assert link_problems(readme, ok) == []


def test_hub_server_serves_from_the_command_line(tmp_path, offline_off):
    """`python tests/hub_server.py --root DIR` (the README's offline Hub): prints the endpoint to export,
    serves the Hub API (a repo created, a file uploaded and downloaded with huggingface_hub) and stops on
    Ctrl-C."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hub_server.py"), "--root", str(tmp_path / "hub")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        header = [proc.stdout.readline() for _ in range(4)]
        m = re.search(r"export HF_ENDPOINT=(http://127\.0\.0\.1:\d+) HF_TOKEN=", "".join(header))
        assert m, header
        from huggingface_hub import HfApi, hf_hub_download

        api = HfApi(endpoint=m.group(1), token="hf_test_token")
        api.create_repo("me/tiny")
        (tmp_path / "hello.txt").write_text("hello")
        api.upload_file(path_or_fileobj=str(tmp_path / "hello.txt"), path_in_repo="hello.txt", repo_id="me/tiny")
        assert "hello.txt" in api.list_repo_files("me/tiny")
        got = hf_hub_download("me/tiny", "hello.txt", endpoint=m.group(1), token="hf_test_token",
                              cache_dir=str(tmp_path / "cache"))
        assert Path(got).read_text() == "hello"
        assert (tmp_path / "hub" / "models" / "me" / "tiny").is_dir()  # stored under --root
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped" in out
