"""The docs hold together: the result tables of README.md and docs/*.md are the files `ablate export`
wrote (docs/sync_tables.py), and every relative link and #anchor in them resolves."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent

_spec = importlib.util.spec_from_file_location("sync_tables", ROOT / "docs" / "sync_tables.py")
sync_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_tables)


def test_readme_tables_equal_their_export_files():
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "sync_tables.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    readme = (ROOT / "README.md").read_text()
    assert readme.count("<!-- export: ") >= 1  # the headline boundary map
    blocks = [m["path"] for page in sync_tables.pages() for m in sync_tables.BLOCK.finditer(page.read_text())]
    assert len(blocks) >= 9 and all((ROOT / b).is_file() for b in blocks), blocks
    # every page the sync covers, README.md first, then docs/*.md
    assert sync_tables.pages()[0] == ROOT / "README.md"
    assert ROOT / "docs" / "results.md" in sync_tables.pages()


def test_sync_names_a_stale_or_missing_block_of_a_page(tmp_path):
    src = "docs/results/smoke/final_loss.md"
    page = tmp_path / "page.md"
    body = sync_tables.block_body(src)  # the file, then the commit and command that recorded it
    assert body.startswith((ROOT / src).read_text()) and "_Recorded at commit " in body
    good = f"text\n<!-- export: {src} -->\n{body}<!-- /export -->\n"
    page.write_text(good)
    assert sync_tables.sync(page, check=True) == []
    page.write_text(good.replace("| mlra |", "| mlra (edited) |", 1)
                    + "<!-- export: docs/results/nowhere.md -->\nold\n<!-- /export -->\n")
    assert sync_tables.sync(page, check=True) == [src, "docs/results/nowhere.md (missing)"]
    assert "(edited)" in page.read_text()  # --check writes nothing
    sync_tables.sync(page)  # without it, the block is rewritten from its file
    assert page.read_text().startswith(good)


# Links: GitHub's rules for Markdown pages. A heading's anchor is its text lower-cased, with every
# character that is not a letter, digit, space, '-' or '_' dropped and spaces turned into '-'; the
# second heading with the same anchor gets '-1', the third '-2', ...
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(pages: list[Path]) -> list[str]:
    """Every relative link or #anchor of these pages that does not resolve, as 'page: target (why)'."""
    bad = []
    for page in pages:
        text = CODE.sub("", FENCE.sub("", page.read_text()))
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked offline
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{page.name}: {target} (no such heading in {dest.name})")
    return bad


def test_every_link_and_anchor_of_the_readme_and_docs_resolves():
    pages = sync_tables.pages()
    assert {p.name for p in pages} >= {"README.md", "sweeps.md", "boundary.md", "classes.md", "forensics.md",
                                       "cluster.md", "workloads.md", "benchmarks.md", "results.md", "spec.md"}
    assert broken_links(pages) == []
    # each docs page is reachable from the README
    readme = (ROOT / "README.md").read_text()
    for p in pages[1:]:
        assert f"](docs/{p.name})" in readme, p.name


def test_the_link_check_finds_a_broken_file_anchor_or_duplicate(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Run: on a cluster (GPU)\n\n## Same\n\n## Same\n\n"
                                   "```\n# not a heading\n```\n")
    (tmp_path / "b.md").write_text(
        "[ok](a.md#run-on-a-cluster-gpu) [dup](a.md#same-1) [self](#top) [file](a.md) [web](https://x.org/#y)\n"
        "[gone](c.md) [anchor](a.md#run-on-a-cluster) [third](a.md#same-2) [code](a.md#not-a-heading)\n"
        "`[in code](nowhere.md)`\n\n# Top\n")
    assert broken_links([tmp_path / "b.md"]) == [
        "b.md: c.md (no such file)",
        "b.md: a.md#run-on-a-cluster (no such heading in a.md)",
        "b.md: a.md#same-2 (no such heading in a.md)",
        "b.md: a.md#not-a-heading (no such heading in a.md)",
    ]


# The rule the shipped results were recorded under: issue 31's (each cell judged against its own
# reference), the default of workloads.outcome; a change of the default makes this fail until the
# results are recorded again (docs/results.md names the commands).
def recorded_under() -> str:
    from workloads.outcome import DEFAULT_CRASH, DEFAULT_KAPPA, criterion_label

    return criterion_label(DEFAULT_CRASH, DEFAULT_KAPPA)


def test_shipped_results_carry_their_crash_criterion_and_trial_counts():
    for name, n in (("smoke", 25), ("smoke_seeds", 75)):  # recorded with their measurements
        smoke = pq.read_table(ROOT / f"docs/results/{name}/trials.parquet").to_pylist()
        assert len(smoke) == n and {r["crash_criterion"] for r in smoke} == {recorded_under()}
        assert all(r["eval_baseline"] is not None and r["final_loss_se"] is not None for r in smoke)
        assert all(r["crashed"] == (r["outcome"] in ("diverged", "collapsed")) for r in smoke)
    table = (ROOT / "docs/results/boundary_smoke/max_stable_lr_warmup0.md").read_text()
    assert "LR50 [90 % interval]" in table and "crash = diverged" in table
    lines = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    col = lines[0].index("trials (seeds)")
    trials = pq.read_table(ROOT / "docs/results/boundary_smoke/trials.parquet").num_rows
    assert sum(int(row[col].split()[0]) for row in lines[2:]) == trials
    for row in lines[2:]:  # every row says how its search ended
        assert row[lines[0].index("search")].split(": ")[1] in ("interval", "budget", "range_edge")
