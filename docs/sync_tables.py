"""Keep the README's result tables equal to the files ``ablate export`` wrote.

The README marks each table it shows with the export file it comes from:

    <!-- export: docs/results/smoke/final_loss.md -->
    ...the table...
    <!-- /export -->

``python docs/sync_tables.py`` rewrites every marked block from its file (the table's caption line
included); ``--check`` exits 1 and names the blocks that differ (a test runs it), so a table in the
README cannot drift from what ``ablate export`` produced. Refresh the files with
``ablate export SPEC --out docs/results/<sweep>``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- export: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /export -->)", re.S)


def sync(readme: Path = ROOT / "README.md", check: bool = False) -> list[str]:
    text = readme.read_text()
    stale: list[str] = []

    def repl(m: re.Match) -> str:
        src = ROOT / m["path"]
        if not src.is_file():
            stale.append(f"{m['path']} (missing)")
            return m.group(0)
        body = src.read_text()
        if not body.endswith("\n"):
            body += "\n"
        if body != m["body"]:
            stale.append(m["path"])
        return m.group(1) + body + m.group(4)

    new = BLOCK.sub(repl, text)
    if not check and new != text:
        readme.write_text(new)
    return stale


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = sync(check=check)
    if check and stale:
        print("README tables differ from their export files: " + ", ".join(stale)
              + "\nrun: python docs/sync_tables.py", file=sys.stderr)
        return 1
    for s in stale:
        print(("stale: " if check else "updated: ") + s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
