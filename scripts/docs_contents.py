"""Keep a Markdown page's table of contents in step with its headings.

A page that wants one holds a ``<!-- contents -->`` line and a ``<!-- /contents -->`` line; what lies between them
is rewritten as a nested list of links to every ``##``–``####`` heading below the block (outside code fences),
with the anchors GitHub gives headings. A long page such as docs/robustness.md gains a section every few days, and
a hand-kept list had fallen eight sections behind.

    python scripts/docs_contents.py docs/robustness.md           # rewrite the block in place
    python scripts/docs_contents.py --check docs/robustness.md   # exit 1 if it is out of date (the tests run this)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

START, END = "<!-- contents -->", "<!-- /contents -->"
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, hyphens and spaces kept),
    each space a hyphen — so ``Instance × group rates`` is ``instance--group-rates``."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def headings(lines: list[str]) -> list[tuple[int, str, str, int]]:
    """(level, title, anchor, line index) of every heading outside code fences; a repeated anchor gets GitHub's
    ``-1``, ``-2`` suffixes."""
    out, seen, fence = [], {}, None
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith(("```", "~~~")):
            marker = stripped[:3]
            fence = None if fence == marker else (fence or marker)
            continue
        m = _HEADING.match(line) if fence is None else None
        if m:
            title = m.group(2)
            base = slug(title)
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.append((len(m.group(1)), title, base if n == 0 else f"{base}-{n}", i))
    return out


def contents(text: str) -> str:
    """``text`` with the block between the markers rewritten (unchanged when the page has no markers)."""
    lines = text.splitlines()
    try:
        start, end = lines.index(START), lines.index(END)
    except ValueError:
        return text
    if end < start:
        raise ValueError(f"{END!r} comes before {START!r}: put the closing marker after the opening one.")
    entries = [
        f"{'  ' * (level - 2)}- [{title}](#{anchor})"
        for level, title, anchor, i in headings(lines)
        if 2 <= level <= 4 and i > end
    ]
    new = lines[: start + 1] + ["", *entries, ""] + lines[end:]
    return "\n".join(new) + ("\n" if text.endswith("\n") else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--check", action="store_true", help="Report out-of-date contents instead of rewriting them.")
    a = p.parse_args(argv)
    stale = []
    for f in a.files:
        text = f.read_text(encoding="utf-8")
        new = contents(text)
        if new != text:
            stale.append(f)
            if not a.check:
                f.write_text(new, encoding="utf-8")
    if a.check and stale:
        print("out of date: " + ", ".join(map(str, stale)) + f"; run: python {sys.argv[0]} " + " ".join(map(str, stale)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
