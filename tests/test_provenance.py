"""Results know the code they came from (docs/provenance.py): every recorded folder's manifest matches
the code that decides its numbers, and the hash sees code changes, not docstrings or comments."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_spec = importlib.util.spec_from_file_location("provenance", ROOT / "docs" / "provenance.py")
prov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prov)

_TREE = prov.Tree(ROOT)


@pytest.mark.parametrize("entry", prov.entries())
def test_recorded_result_matches_the_current_code(entry):
    """Red for an entry recorded before the code that decides its numbers changed: re-record it
    with the command the message names (docs/results.md lists them), or, where the change cannot
    move its numbers, accept it with a reason (``--accept ENTRY --why TEXT``; ``--check --strict``
    lists the accepted ones)."""
    s = prov.status(entry, ROOT, _TREE)
    assert s["state"] in ("current", "accepted"), prov.describe(s)


def test_every_result_folder_is_an_entry():
    found = prov.entries()
    assert "docs/results/boundary_smoke" in found and "docs/calibration/cpu_runs.json" in found
    assert not any(e.endswith(prov.MANIFEST) for e in found)
    for e in found:  # each entry has a known scope: its manifest's or the default table's
        assert prov.settings(e, ROOT)["commands"], e


def test_a_docstring_only_change_of_the_history_keeps_the_hash():
    """d7d2e14 -> 5f8979a changed only docstrings of workloads/divergence.py (one of them an
    attribute docstring): the bytes differ, the hash does not."""
    old, new = "d7d2e14", "5f8979a"
    if any(subprocess.run(["git", "cat-file", "-e", f"{c}^{{commit}}"], cwd=ROOT).returncode for c in (old, new)):
        pytest.skip("this checkout lacks the commits (shallow clone)")
    path = ["workloads/divergence.py"]
    a, b = prov.Tree(ROOT, old), prov.Tree(ROOT, new)
    assert a.read(path[0]) != b.read(path[0])
    assert a.file_hashes(path) == b.file_hashes(path)
    # while 7df0111 (before issue 17 changed what stops a run) hashes otherwise
    assert prov.Tree(ROOT, "7df0111").file_hashes(path) != b.file_hashes(path)


# --- a repository of our own -------------------------------------------------------------------

MODEL = '''"""The model."""


class Config:
    """A config."""
    lr: float = 0.1
    """The learning rate."""


def step(x):
    """One step."""
    return x * 2  # doubled
'''

SPEC = "# a sweep\nname: s\nfixed: {depth: 2, width: 64}\n"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=root,
                          check=True, capture_output=True, text=True).stdout


def _commit(root: Path, msg: str) -> str:
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", msg)
    return _git(root, "rev-parse", "HEAD").strip()


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "docs" / "provenance.py"), *args], cwd=root,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def repo(tmp_path):
    """docs/provenance.py in a fresh repository: workloads/model.py and a spec in the scope of
    docs/results/r, benchmarks/other.py outside it, and a loose docs/calibration/runs.json."""
    root = tmp_path / "repo"
    for rel, text in {"workloads/model.py": MODEL, "workloads/__init__.py": "",
                      "search_spaces/s.yaml": SPEC, "benchmarks/other.py": "def f():\n    return 1\n",
                      "docs/results/r/table.md": "| a |\n", "docs/calibration/runs.json": "[]\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    shutil.copy(ROOT / "docs" / "provenance.py", root / "docs" / "provenance.py")
    _git(root, "init", "-q")
    _commit(root, "first")
    return root


SCOPE = ["workloads/", "search_spaces/s.yaml"]


def _edit(root: Path, rel: str, old: str, new: str) -> None:
    f = root / rel
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new))


def test_a_code_change_changes_the_hash_docstrings_and_comments_do_not(repo):
    m = prov.record("docs/results/r", ["ablate sweep search_spaces/s.yaml"], SCOPE, root=repo)
    assert m["commit_full"] == _git(repo, "rev-parse", "HEAD").strip() and "backfilled" not in m
    assert sorted(m["files"]) == ["search_spaces/s.yaml", "workloads/__init__.py", "workloads/model.py"]
    assert [s["entry"] for s in prov.check(repo)] == ["docs/calibration/runs.json"]  # no manifest yet

    # docstrings (module, class, attribute, function), comments, blank lines; the spec's comment
    # and its key order: nothing that decides a number
    _edit(repo, "workloads/model.py", '"""The model."""', '"""The model, documented at length."""\n# a note')
    _edit(repo, "workloads/model.py", '"""The learning rate."""', '"""The peak learning rate."""')
    _edit(repo, "workloads/model.py", '"""One step."""', "'''One step, redone.'''\n\n")
    _edit(repo, "workloads/model.py", "# doubled", "# twice x")
    (repo / "search_spaces/s.yaml").write_text("# the sweep, re-commented\nfixed: {width: 64, depth: 2}\nname: s\n")
    s = prov.status("docs/results/r", repo)
    assert s["state"] == "current" and s["changed"] == []
    assert s["docs_only"] == ["search_spaces/s.yaml", "workloads/model.py"]

    _edit(repo, "workloads/model.py", "return x * 2", "return x * 3")
    s = prov.status("docs/results/r", repo)
    assert s["state"] == "stale" and s["changed"] == ["workloads/model.py"]
    _edit(repo, "workloads/model.py", "return x * 3", "return x * 2")
    _edit(repo, "workloads/model.py", "lr: float = 0.1", "lr: float = 0.2")  # a default, not a docstring
    assert prov.status("docs/results/r", repo)["changed"] == ["workloads/model.py"]
    _edit(repo, "workloads/model.py", "lr: float = 0.2", "lr: float = 0.1")
    _edit(repo, "search_spaces/s.yaml", "depth: 2", "depth: 4")  # the spec's content
    assert prov.status("docs/results/r", repo)["changed"] == ["search_spaces/s.yaml"]
    _edit(repo, "search_spaces/s.yaml", "depth: 4", "depth: 2")
    assert prov.status("docs/results/r", repo)["state"] == "current"
    (repo / "workloads/new.py").write_text("X = 1\n")  # a new file under a scope folder counts
    assert prov.status("docs/results/r", repo)["changed"] == ["workloads/new.py"]


def test_a_file_outside_the_scope_does_not_count(repo):
    prov.record("docs/results/r", ["ablate sweep search_spaces/s.yaml"], SCOPE, root=repo)
    before = prov.read_manifest("docs/results/r", repo)["code_hash"]
    _edit(repo, "benchmarks/other.py", "return 1", "return 2")
    (repo / "search_spaces/t.yaml").write_text("name: t\n")
    _commit(repo, "outside the scope")
    assert prov.status("docs/results/r", repo)["state"] == "current"
    # and recording again (at the new HEAD) gives the same hash
    assert prov.record("docs/results/r", root=repo)["code_hash"] == before


def test_record_refuses_a_dirty_scope_and_check_names_the_command(repo):
    _edit(repo, "workloads/model.py", "return x * 2", "return x * 5")
    res = _cli(repo, "--record", "docs/results/r", "--command", "ablate sweep search_spaces/s.yaml",
               "--scope", *SCOPE)
    assert res.returncode == 2 and "workloads/model.py" in res.stderr and "refusing" in res.stderr, res.stderr
    assert not (repo / "docs/results/r/provenance.json").exists()
    _git(repo, "checkout", "--", "workloads/model.py")
    # a scope path that HEAD lacks (a typo) is refused too
    res = _cli(repo, "--record", "docs/results/r", "--command", "c", "--scope", "workloads/", "search_spaces/typo.yaml")
    assert res.returncode == 2 and "search_spaces/typo.yaml" in res.stderr, res.stderr
    assert not (repo / "docs/results/r/provenance.json").exists()
    _edit(repo, "benchmarks/other.py", "return 1", "return 2")  # dirty, but outside the scope
    res = _cli(repo, "--record", "docs/results/r", "--command", "ablate sweep search_spaces/s.yaml",
               "--scope", *SCOPE)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((repo / "docs/results/r/provenance.json").read_text())
    assert manifest["commands"] == ["ablate sweep search_spaces/s.yaml"] and manifest["scope"] == SCOPE

    res = _cli(repo, "--record", "docs/calibration/runs.json", "--command", "python benchmarks/other.py",
               "--scope", "benchmarks/other.py", "--at", "HEAD")  # --at: from the commit's tree
    assert res.returncode == 0, res.stderr
    loose = json.loads((repo / "docs/calibration/provenance.json").read_text())
    assert list(loose) == ["runs.json"] and loose["runs.json"]["backfilled"] is True
    assert prov.entries(repo) == ["docs/results/r", "docs/calibration/runs.json"]
    res = _cli(repo, "--check")
    assert res.returncode == 1 and "docs/calibration/runs.json" in res.stderr  # other.py differs from HEAD
    _git(repo, "checkout", "--", "benchmarks/other.py")
    assert _cli(repo, "--check").returncode == 0

    _edit(repo, "workloads/model.py", "return x * 2", "return x * 5")
    _commit(repo, "a code change")
    res = _cli(repo, "--check")
    assert res.returncode == 1
    assert "docs/results/r" in res.stderr and "workloads/model.py" in res.stderr
    assert "ablate sweep search_spaces/s.yaml && python docs/provenance.py --record docs/results/r" in res.stderr
    # keeping the manifest's scope and commands, recording again makes it current
    assert _cli(repo, "--record", "docs/results/r").returncode == 0
    assert _cli(repo, "--check").returncode == 0


def test_at_last_backfills_from_the_commit_that_last_changed_the_folder(repo):
    recorded = _git(repo, "rev-parse", "HEAD").strip()
    _edit(repo, "workloads/model.py", "return x * 2", "return x * 7")
    _commit(repo, "code changed after the recording")
    m = prov.record("docs/results/r", ["ablate sweep search_spaces/s.yaml"], SCOPE, at="last", root=repo)
    assert m["commit_full"] == recorded and m["backfilled"] is True
    assert m["code_hash"] == prov.code_hash(prov.Tree(repo, recorded).file_hashes(SCOPE))
    assert m["code_hash"] != prov.code_hash(prov.Tree(repo, "HEAD").file_hashes(SCOPE))
    s = prov.status("docs/results/r", repo)
    assert s["state"] == "stale" and s["changed"] == ["workloads/model.py"]
    _commit(repo, "the manifest")  # committing the manifest is not a change of the folder's results
    assert prov.last_commit("docs/results/r", repo) == recorded


# --- accepting a code change without re-recording ---------------------------------------------


def test_accept_then_a_further_change_is_stale_again_and_record_clears_it(repo):
    prov.record("docs/results/r", ["ablate sweep search_spaces/s.yaml"], SCOPE, root=repo)
    prov.record("docs/calibration/runs.json", ["python benchmarks/other.py"], ["benchmarks/other.py"], root=repo)
    _commit(repo, "the manifests")
    recorded = prov.read_manifest("docs/results/r", repo)
    _edit(repo, "workloads/model.py", "return x * 2", "return x + x")  # the same value, another syntax tree
    (repo / "workloads/helpers.py").write_text("def unused():\n    return 0\n")
    head = _commit(repo, "a refactor")
    assert prov.status("docs/results/r", repo)["state"] == "stale"
    res = _cli(repo, "--check")
    assert res.returncode == 1 and "docs/results/r" in res.stderr, res.stderr

    res = _cli(repo, "--accept", "docs/results/r/", "--why", "a refactor:\n  the same\tvalues")
    assert res.returncode == 0, res.stderr
    m = prov.read_manifest("docs/results/r", repo)
    acc = m.pop("accepted")
    assert m == recorded  # the recording itself is kept as it was
    assert acc["commit"] == head[:7] and acc["why"] == "a refactor: the same values"  # one line
    assert acc["changed"] == ["workloads/helpers.py", "workloads/model.py"]
    assert acc["files"] == prov.Tree(repo, head).file_hashes(SCOPE) and acc["code_hash"] == prov.code_hash(acc["files"])
    s = prov.status("docs/results/r", repo)
    assert s["state"] == "accepted" and s["changed"] == ["workloads/helpers.py", "workloads/model.py"]
    assert "accepted at " + head[:7] in prov.describe(s) and "a refactor: the same values" in prov.describe(s)
    # the note under a synced table says what changed, when it was accepted and why
    assert prov.table_note("docs/results/r/table.md", repo) == (
        "_Recorded at commit {} (`ablate sweep search_spaces/s.yaml`); the code of `workloads/` (2 files) changed "
        "since (commit {}: a refactor: the same values); not re-recorded._".format(recorded["commit"], head[:7]))
    # --check passes with a warning line for it; --strict fails on it
    res = _cli(repo, "--check")
    assert res.returncode == 0, res.stderr
    warn = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warn) == 1 and "docs/results/r" in warn[0] and "a refactor" in warn[0], res.stderr
    assert "1 accepted" in res.stdout
    res = _cli(repo, "--check", "--strict")
    assert res.returncode == 1 and "docs/results/r" in res.stderr and "--record docs/results/r" in res.stderr
    assert "--strict" in res.stderr
    listing = _cli(repo).stdout
    assert "docs/results/r: recorded at " + recorded["commit"] in listing and ", accepted" in listing
    assert "docs/calibration/runs.json: recorded at " in listing and ", current" in listing

    # a change after the acceptance: stale again, naming what changed since the acceptance
    _edit(repo, "workloads/helpers.py", "return 0", "return 1")
    _commit(repo, "a real change")
    s = prov.status("docs/results/r", repo)
    assert s["state"] == "stale" and s["changed_since_accepted"] == ["workloads/helpers.py"]
    res = _cli(repo, "--check")
    assert res.returncode == 1 and "code changed since the acceptance: workloads/helpers.py" in res.stderr, res.stderr
    # accepting again replaces the block
    assert _cli(repo, "--accept", "docs/results/r", "--why", "helpers is not called").returncode == 0
    assert prov.read_manifest("docs/results/r", repo)["accepted"]["why"] == "helpers is not called"
    assert prov.status("docs/results/r", repo)["state"] == "accepted"

    # re-recording writes a manifest without the block: current, and the note is the plain one
    _commit(repo, "accepted")
    assert _cli(repo, "--record", "docs/results/r").returncode == 0
    assert "accepted" not in prov.read_manifest("docs/results/r", repo)
    assert prov.status("docs/results/r", repo)["state"] == "current"
    assert prov.table_note("docs/results/r/table.md", repo).endswith("(`ablate sweep search_spaces/s.yaml`)._")
    assert _cli(repo, "--check", "--strict").returncode == 0


def test_accept_refuses_a_current_entry_no_reason_and_a_dirty_scope(repo):
    prov.record("docs/results/r", ["ablate sweep search_spaces/s.yaml"], SCOPE, root=repo)
    _commit(repo, "the manifest")
    manifest = (repo / "docs/results/r/provenance.json").read_text()

    def refused(*args: str, says: str) -> None:
        res = _cli(repo, "--accept", *args)
        assert res.returncode == 2 and says in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert (repo / "docs/results/r/provenance.json").read_text() == manifest  # nothing written

    refused("docs/results/r", "--why", "nothing changed", says="nothing to accept")
    _edit(repo, "workloads/model.py", "return x * 2", "return x * 2 + 0")
    _commit(repo, "a change")
    refused("docs/results/r", says="--why")
    refused("docs/results/r", "--why", " \n ", says="--why")
    refused("docs/calibration/runs.json", "--why", "w", says="record it first")  # no manifest
    refused("docs/results/r", "docs/calibration/runs.json", "--why", "w", says="record it first")  # all or none
    _edit(repo, "workloads/model.py", "return x * 2 + 0", "return x * 2 + 1")  # not committed
    refused("docs/results/r", "--why", "w", says="workloads/model.py")
    _git(repo, "checkout", "--", "workloads/model.py")
    _edit(repo, "benchmarks/other.py", "return 1", "return 2")  # dirty, but outside the scope
    assert _cli(repo, "--accept", "docs/results/r", "--why", "w").returncode == 0
    assert prov.status("docs/results/r", repo)["state"] == "accepted"
