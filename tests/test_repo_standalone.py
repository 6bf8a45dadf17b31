"""The repository stands alone: its Markdown links stay inside it, and what the README tells users to run
from it works (the offline Hub stand-in from the command line)."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from load_file import load_file

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


@functools.cache
def _docs_contents():
    """scripts/docs_contents.py as a module (scripts/ is not a package)."""
    return load_file(ROOT / "scripts" / "docs_contents.py", register=None)


# a section named by its title: `docs/robustness.md, "The meta objective"` (also `robustness.md), 'Probes'`)
_SECTION_REF = re.compile(r"([\w/]*?(\w+\.md))\)?,\s*((?:[\"'][^\"'\n]+[\"'](?:,\s*(?:and\s+)?)?)+)")


def section_problems(md: Path, text: str, docs: Path = ROOT / "docs") -> list[str]:
    """Links to ``#anchor`` (in ``md`` or another page) that no heading gives, and sections of docs/ named by a
    quoted title that no heading of that page starts with."""
    dc = _docs_contents()
    problems, pages = [], {}
    where = md.relative_to(ROOT) if _inside(md) else md.name

    def page(path: Path) -> tuple[set[str], list[str]]:
        if path not in pages:
            lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
            found = dc.headings(lines)
            pages[path] = ({a for *_, a, _ in found}, [title.replace("`", "") for _, title, _, _ in found])
        return pages[path]

    for target in _INLINE.findall(text):
        if "#" not in target or _SCHEME.match(target):
            continue
        rel, anchor = target.split("#", 1)
        path = md if not rel else md.parent / rel
        if path.suffix == ".md" and path.exists() and anchor not in page(path)[0]:
            problems.append(f"{where}: link {target!r}: no heading of {path.name} has the anchor #{anchor}")
    for m in _SECTION_REF.finditer(text):
        path = docs / m.group(2)
        if not path.exists():
            continue
        titles = page(path)[1]
        for title in re.findall(r"[\"']([^\"'\n]+)[\"']", m.group(3)):
            title = title.strip().rstrip(".").replace("`", "")
            if not any(h.startswith(title) for h in titles):
                problems.append(f"{where}: names the section {title!r} of docs/{path.name}, which has no such heading")
    return problems


def _text_files() -> list[Path]:
    """The Markdown pages and the Python sources that name sections of docs/ (help strings, docstrings)."""
    py = [p for d in ("src", "benchmarks", "examples", "scripts") for p in (ROOT / d).rglob("*.py")]
    return markdown_files() + sorted(py)


def test_every_link_to_a_section_and_every_section_named_exists():
    problems = [p for f in _text_files() for p in section_problems(f, f.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)


def test_the_section_check_catches_a_missing_heading(tmp_path):
    """Negative control: a page whose heading was renamed breaks the anchor and the quoted title that named it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "page.md").write_text("# Page\n\n## The meta objective: bounded\n\n```\n## not a heading\n```\n")
    md = tmp_path / "README.md"
    ok = '[a](docs/page.md#the-meta-objective-bounded), docs/page.md, "The meta objective"'
    assert section_problems(md, ok, docs) == []
    bad = {
        "[a](docs/page.md#the-meta-objective)": "no heading of page.md has the anchor",
        "[b](docs/page.md#not-a-heading)": "no heading of page.md has the anchor",
        'see docs/page.md, "The meta objective", "Probes"': "'Probes' of docs/page.md",
        "(page.md), 'A renamed section'": "'A renamed section'",
    }
    for text, expected in bad.items():
        found = section_problems(md, text, docs)
        assert any(expected in p for p in found), (text, found)


def test_docs_contents_are_current():
    """A page with a contents block lists every section (scripts/docs_contents.py rewrites it)."""
    dc = _docs_contents()
    pages = [f for f in markdown_files() if dc.START in f.read_text(encoding="utf-8")]
    assert ROOT / "docs" / "robustness.md" in pages
    texts = {f: f.read_text(encoding="utf-8") for f in pages}
    stale = [str(f.relative_to(ROOT)) for f, text in texts.items() if dc.contents(text) != text]
    assert not stale, f"out of date: run python scripts/docs_contents.py {' '.join(stale)}"


def test_docs_contents_lists_every_section_with_githubs_anchors(tmp_path):
    dc = _docs_contents()
    page = "\n".join([
        "# Title", "", dc.START, "- [stale](#stale)", dc.END, "",
        "## Instance × group rates: the `lr_level` (2026-12-05)", "### Seeds 3–5", "#### Plain SGD too",
        "##### too deep", "```", "## in a fence", "```", "## Seeds 3–5", "",
    ])
    out = dc.contents(page)
    block = out.split(dc.START)[1].split(dc.END)[0].strip().splitlines()
    assert block == [
        "- [Instance × group rates: the `lr_level` (2026-12-05)](#instance--group-rates-the-lr_level-2026-12-05)",
        "  - [Seeds 3–5](#seeds-35)",
        "    - [Plain SGD too](#plain-sgd-too)",
        "- [Seeds 3–5](#seeds-35-1)",
    ]
    assert dc.contents(out) == out  # rewriting a current block changes nothing
    f = tmp_path / "page.md"
    f.write_text(page)
    assert dc.main(["--check", str(f)]) == 1 and f.read_text() == page  # --check reports, does not write
    assert dc.main([str(f)]) == 0 and dc.main(["--check", str(f)]) == 0


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
