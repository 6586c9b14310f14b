"""Keep the result tables of README.md and docs/*.md equal to the files ``ablate export`` wrote.

A page marks each table it shows with the export file it comes from (a path from the repository's
root, whichever page holds it):

    <!-- export: docs/results/smoke/final_loss.md -->
    ...the table...
    <!-- /export -->

``python docs/sync_tables.py`` rewrites every marked block of README.md and of every ``docs/*.md``
page from its file (the table's caption line included); ``--check`` exits 1 and names the blocks
that differ, with their page (a test runs it), so a table cannot drift from what ``ablate export``
produced. Refresh the files with ``ablate export SPEC --out docs/results/<sweep>`` (docs/results.md
lists every recording and the command that re-records it).

Each block ends with the commit and the command that recorded its file, read from the manifest of
the results folder holding it (``docs/provenance.py``):

    _Recorded at commit abc1234 (`ablate boundary ... && ablate export ... --out ...`)._

A folder whose code change was accepted without re-recording (``docs/provenance.py --accept``) says
so on the same line:

    _Recorded at commit abc1234 (`...`); the code of `orchestrator/boundary.py` changed since (commit def5678: why); not re-recorded._

A folder without a manifest gets no such line (``tests/test_provenance.py`` fails for it).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- export: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /export -->)", re.S)


def _provenance():
    spec = importlib.util.spec_from_file_location("provenance", ROOT / "docs" / "provenance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


provenance = _provenance()


def block_body(path: str) -> str:
    """What a block marked with this export file holds: the file, then (after a blank line) the
    commit and command that recorded it, when its folder has a manifest."""
    body = (ROOT / path).read_text()
    if not body.endswith("\n"):
        body += "\n"
    note = provenance.table_note(path, ROOT)
    return body + (f"\n{note}\n" if note else "")


def sync(readme: Path = ROOT / "README.md", check: bool = False) -> list[str]:
    text = readme.read_text()
    stale: list[str] = []

    def repl(m: re.Match) -> str:
        src = ROOT / m["path"]
        if not src.is_file():
            stale.append(f"{m['path']} (missing)")
            return m.group(0)
        body = block_body(m["path"])
        if body != m["body"]:
            stale.append(m["path"])
        return m.group(1) + body + m.group(4)

    new = BLOCK.sub(repl, text)
    if not check and new != text:
        readme.write_text(new)
    return stale


def pages() -> list[Path]:
    """README.md and every Markdown page of docs/ (not its subfolders: results/ holds the exports)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def sync_all(check: bool = False) -> list[str]:
    """:func:`sync` on every page; the stale blocks as ``page: export path``."""
    return [f"{page.relative_to(ROOT)}: {s}" for page in pages() for s in sync(page, check=check)]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = sync_all(check=check)
    if check and stale:
        print("tables differ from their export files: " + ", ".join(stale)
              + "\nrun: python docs/sync_tables.py", file=sys.stderr)
        return 1
    for s in stale:
        print(("stale: " if check else "updated: ") + s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
