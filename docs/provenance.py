"""Each recorded result knows the code it came from (issue 29 item 4).

Every folder under ``docs/results/`` and ``docs/calibration/`` (and each loose file there, such as
``docs/calibration/cpu_runs.json``) is an *entry*. An entry carries a manifest:

* a folder: ``FOLDER/provenance.json``;
* a loose file: one key in ``provenance.json`` of its parent folder, named by the file (e.g.
  ``docs/calibration/provenance.json`` holds ``"cpu_runs.json": {...}``).

A manifest holds ``commit`` (short) and ``commit_full``: the commit whose code recorded the entry;
``date``; ``scope``: the code paths that decide its numbers (a path ending in ``/`` is every file git
tracks under it; a spec YAML or an input file counts too); ``files``: the hash of each file of the
scope and ``code_hash``: the hash of them all; ``commands``: what re-records the entry, in order;
``backfilled``: true where the manifest was written afterwards from the git history (the commit is
then the last one that changed the entry's files).

The hash ignores what cannot change a number: a ``.py`` file is hashed as its syntax tree (a
canonical dump of ``ast`` that leaves out empty fields, so that it reads the same on Python 3.10 to
3.13) with every docstring and every other bare string statement removed, so comments, docstrings
and formatting do not count; a ``.yaml``/``.json`` file as its parsed content (comments and key order
do not count); anything else as its bytes. What is *not* in a scope is the transport (MLflow,
Ray, the recorder): it carries the numbers, it does not decide them.

    python docs/provenance.py                 # every entry: recorded at, current, accepted or stale, what changed
    python docs/provenance.py --check         # exit 1 naming each stale or unrecorded entry and its command
                                              # (an accepted one: a warning line; --strict: exit 1 on it too)
    python docs/provenance.py --record docs/results/calibration docs/results/directions
                                              # after re-recording them: manifests at HEAD
    python docs/provenance.py --record ENTRY --command "CMD" [--command "CMD2"] [--scope PATH ...]
    python docs/provenance.py --record ENTRY --at COMMIT   # back-fill: the hash of COMMIT's tree
    python docs/provenance.py --record ENTRY --at last     # ... of the last commit that changed ENTRY
    python docs/provenance.py --accept ENTRY [ENTRY ...] --why "TEXT"
                                              # a code change looked at and said not to (or not yet) matter

Several entries at once take each one's own scope and commands. ``--record`` without ``--at`` refuses, naming them, when in-scope files differ from HEAD in the
working tree (the manifest would name a commit whose code did not record the result), or when a
scope path is not in HEAD (a typo; with ``--at`` an absent file is hashed as missing: code moves). Without
``--command``/``--scope`` it keeps the entry's manifest's, else takes :data:`DEFAULTS`'.

An entry is *current* when the code hashes as recorded, *stale* when it does not. A change that
cannot move the numbers (a refactor) still makes it stale, and re-recording may take a long CPU run:
``--accept`` says, with a reason, that the change was looked at and does not (or not yet) matter. It
writes an ``accepted`` block into the manifest: ``code_hash`` and ``files`` as the code hashes now,
``changed`` (the in-scope files whose hash differs from the recording), ``commit`` (HEAD, short),
``date`` and ``why``. While the code hashes as accepted the entry is *accepted*; a further change
makes it stale again, and ``--record`` writes a manifest without the block. ``--accept`` refuses a
current entry (nothing to accept), an empty or missing ``--why`` and, as ``--record`` does, in-scope
files that differ from HEAD; accepting an accepted entry again replaces its block.

``tests/test_provenance.py`` fails for every entry whose manifest is missing or whose hash is neither
the recorded nor the accepted one, naming the command that re-records it; ``docs/sync_tables.py`` ends
each synced table with the commit and command of its entry and, for an accepted one, which code
changed since, at which commit it was accepted and why (:func:`table_note`).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ROOTS = ("docs/results", "docs/calibration")
MANIFEST = "provenance.json"

# What decides the numbers of a sweep's export: the training code (workloads/: model, data, the
# stabilizers, the loop, and the run's class in workloads/outcome.py), the grid the spec expands to
# (orchestrator/spec.py), the trial's config as the worker builds it (orchestrator/trainable.py), the
# runs read back and judged against their cell's reference (orchestrator/runs.py), the tables and the
# LR50 fit (orchestrator/tables.py, orchestrator/psychometric.py), their number format
# (orchestrator/writers.py) and the export itself (orchestrator/report.py).
EXPORT = ["workloads/", "orchestrator/spec.py", "orchestrator/trainable.py", "orchestrator/runs.py",
          "orchestrator/tables.py", "orchestrator/psychometric.py", "orchestrator/writers.py",
          "orchestrator/report.py"]
# A boundary search also decides which LRs are run and when a cell stops.
BOUNDARY = EXPORT + ["orchestrator/boundary.py", "orchestrator/boundary_config.py"]


def _sweep(name: str, folder: str, verb: str = "sweep", scope: list[str] | None = None) -> dict:
    spec = f"search_spaces/{name}.yaml"
    return {"scope": (scope or EXPORT) + [spec],
            "commands": [f"ablate {verb} {spec}", f"ablate export {spec} --out {folder}"]}


DEFAULTS: dict[str, dict] = {
    "docs/results/smoke": _sweep("smoke", "docs/results/smoke"),
    "docs/results/smoke_seeds": _sweep("smoke_seeds", "docs/results/smoke_seeds"),
    "docs/calibration/dense_grid_smoke": _sweep("dense_grid_smoke", "docs/calibration/dense_grid_smoke"),
    **{f"docs/results/{n}": _sweep(n, f"docs/results/{n}", "boundary", BOUNDARY)
       for n in ("boundary_smoke", "boundary_smoke_seed100", "boundary_smoke_seed200")},
    # the search, then the contrast table that docs/directions.py reads from its export
    "docs/results/directions": {
        "scope": BOUNDARY + ["search_spaces/directions.yaml", "docs/directions.py", "docs/compare_boundaries.py"],
        "commands": ["ablate boundary search_spaces/directions.yaml",
                     "ablate export search_spaces/directions.yaml --out docs/results/directions",
                     "python docs/directions.py docs/results/directions --out docs/results/directions/contrasts.md"]},
    # the three searches and the dense grid side by side: their exported fits are its inputs
    "docs/results/boundary_smoke_offsets.md": {
        "scope": ["docs/compare_boundaries.py", "docs/results/boundary_smoke/max_stable_lr.json",
                  "docs/results/boundary_smoke_seed100/max_stable_lr.json",
                  "docs/results/boundary_smoke_seed200/max_stable_lr.json",
                  "docs/calibration/dense_grid_smoke/max_stable_lr.json"],
        "commands": ['python docs/compare_boundaries.py docs/results/boundary_smoke{,_seed100,_seed200}/max_stable_lr.json '
                     '--labels "offset 0" "offset 100" "offset 200" --check docs/calibration/dense_grid_smoke/max_stable_lr.json '
                     '--out docs/results/boundary_smoke_offsets.md --figure docs/figures/boundary_smoke_offsets.png']},
    "docs/results/calibration": {
        "scope": EXPORT + ["orchestrator/forensics.py", "search_spaces/calibration_gpt.yaml",
                           "search_spaces/calibration_vit.yaml"],
        "commands": ["ablate sweep search_spaces/calibration_gpt.yaml",
                     "ablate sweep search_spaces/calibration_vit.yaml",
                     "ablate forensics --experiment ablate-calibration --out docs/results/calibration",
                     "ablate export --experiment ablate-calibration --out docs/results/calibration"]},
    # synthetic cells with a known boundary: no training; the search, its fit and the crash rule
    # that judges each drawn outcome (workloads/outcome.py) decide the figures
    "docs/results/boundary_efficiency": {
        "scope": ["benchmarks/boundary_efficiency.py", "orchestrator/boundary.py", "orchestrator/boundary_config.py",
                  "orchestrator/psychometric.py", "workloads/outcome.py"],
        "commands": ["python benchmarks/boundary_efficiency.py --out docs/results/boundary_efficiency/sequential.md"]},
    "docs/calibration/class_stability.json": {
        "scope": ["benchmarks/class_stability.py", "workloads/"],
        "commands": ["python benchmarks/class_stability.py --out docs/calibration/class_stability.json"]},
    "docs/calibration/cpu_runs.json": {
        "scope": ["benchmarks/detector_calibration.py", "workloads/"],
        "commands": ["python benchmarks/detector_calibration.py --size cpu --out docs/calibration/cpu_runs.json"]},
    "docs/calibration/cpu_runs_heldout.json": {
        "scope": ["benchmarks/detector_calibration.py", "workloads/"],
        "commands": ["python benchmarks/detector_calibration.py --size boundary,lengths "
                     "--out docs/calibration/cpu_runs_heldout.json"]},
    "docs/calibration/cpu_runs_replicates.json": {
        "scope": ["benchmarks/detector_calibration.py", "workloads/"],
        "commands": ["python benchmarks/detector_calibration.py --size cpu,boundary,lengths --seed-offset 2 "
                     "--out docs/calibration/cpu_runs_replicates.json"]},
}


class ProvenanceError(Exception):
    """A request that cannot be honoured (a dirty scope, an unknown entry or commit): one line."""


# ---------------------------------------------------------------------------------------------
# git


def git(root: Path, *args: str, binary: bool = False, check: bool = True):
    res = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=60)
    if check and res.returncode != 0:
        raise ProvenanceError(f"git {' '.join(args)}: {res.stderr.decode(errors='replace').strip()}")
    return res.stdout if binary else res.stdout.decode()


def resolve(root: Path, commit: str) -> str:
    return git(root, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}").strip()


def last_commit(entry: str, root: Path = ROOT) -> str:
    """The last commit that changed the entry's files (its manifests not counted)."""
    excl = [f":(exclude){entry}/{MANIFEST}"] if (root / entry).is_dir() else []
    sha = git(root, "log", "-1", "--format=%H", "--", entry, *excl).strip()
    if not sha:
        raise ProvenanceError(f"{entry}: no commit changed it (is it committed?)")
    return sha


# ---------------------------------------------------------------------------------------------
# the code hash


def _strip_docs(tree: ast.AST) -> ast.AST:
    """Drop every statement that is a bare string: docstrings (module, class, function) and the
    attribute docstrings after assignments. They do nothing when the code runs."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list):
                setattr(node, field, [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                              and isinstance(s.value.value, str))])
    return tree


def _canon(node) -> str:
    """``ast.dump`` without the fields a Python version adds empty (3.12's ``type_params``) or
    leaves out (3.13 omits empty fields): the same text on every Python this project supports."""
    if isinstance(node, ast.AST):
        parts = []
        for name in node._fields:
            v = getattr(node, name, None)
            if v is None or (isinstance(v, list) and not v):
                continue
            parts.append(f"{name}={_canon(v)}")
        return f"{type(node).__name__}({', '.join(parts)})"
    if isinstance(node, list):
        return "[" + ", ".join(_canon(x) for x in node) + "]"
    return repr(node)


def normalise(path: str, data: bytes) -> bytes:
    """What of a file's content decides numbers (see the module's docstring); an unparsable file: its bytes."""
    try:
        if path.endswith(".py"):
            return _canon(_strip_docs(ast.parse(data))).encode()
        if path.endswith((".yaml", ".yml")):
            return json.dumps(yaml.safe_load(data), sort_keys=True, default=str).encode()
        if path.endswith(".json"):
            return json.dumps(json.loads(data), sort_keys=True).encode()
    except (SyntaxError, ValueError, UnicodeDecodeError, yaml.YAMLError):
        pass
    return data


class Tree:
    """The files of one source: a commit's tree (``git show``) or the working tree (``commit=None``)."""

    def __init__(self, root: Path = ROOT, commit: str | None = None):
        self.root, self.commit = root, commit
        self._hashes: dict[str, str] = {}

    def expand(self, scope: list[str]) -> list[str]:
        """The scope as files: a path ending in '/' is every file git has (or would add) under it."""
        out: set[str] = set()
        for p in scope:
            if not p.endswith("/"):
                out.add(p)
            elif self.commit:
                out.update(git(self.root, "ls-tree", "-r", "--name-only", self.commit, "--", p).split())
            else:
                listed = git(self.root, "ls-files", "--cached", "--others", "--exclude-standard", "--", p).split()
                out.update(f for f in listed if (self.root / f).is_file())
        return sorted(out)

    def read(self, path: str) -> bytes | None:
        if self.commit:
            res = subprocess.run(["git", "show", f"{self.commit}:{path}"], cwd=self.root, capture_output=True, timeout=60)
            return res.stdout if res.returncode == 0 else None
        f = self.root / path
        return f.read_bytes() if f.is_file() else None

    def file_hashes(self, scope: list[str]) -> dict[str, str]:
        """Each file of the scope -> the hash of what decides numbers in it ('missing' if absent)."""
        for path in self.expand(scope):
            if path not in self._hashes:
                data = self.read(path)
                self._hashes[path] = "missing" if data is None else hashlib.sha256(normalise(path, data)).hexdigest()[:16]
        return {path: self._hashes[path] for path in self.expand(scope)}


def code_hash(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{p} {h}\n" for p, h in sorted(files.items())).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# entries and manifests


def entries(root: Path = ROOT) -> list[str]:
    """Every recorded entry: each folder, and each loose file, under docs/results/ and docs/calibration/."""
    out = []
    for base in ROOTS:
        d = root / base
        if d.is_dir():
            out += [f"{base}/{c.name}" for c in sorted(d.iterdir())
                    if c.name != MANIFEST and not c.name.startswith(".") and c.name != "__pycache__"]
    return out


def entry_of(path: str, root: Path = ROOT) -> str | None:
    """The entry that holds a file (``docs/results/smoke/final_loss.md`` -> ``docs/results/smoke``)."""
    parts = Path(path).parts
    for base in ROOTS:
        b = Path(base).parts
        if parts[:len(b)] == b and len(parts) > len(b):
            return "/".join(parts[:len(b) + 1])
    return None


def _manifest_file(entry: str, root: Path) -> tuple[Path, str | None]:
    """Where the entry's manifest lives, and its key there (None: the whole file)."""
    p = root / entry
    if p.is_dir():
        return p / MANIFEST, None
    return p.parent / MANIFEST, p.name


def read_manifest(entry: str, root: Path = ROOT) -> dict | None:
    f, key = _manifest_file(entry, root)
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    return data if key is None else data.get(key)


def write_manifest(entry: str, manifest: dict, root: Path = ROOT) -> Path:
    f, key = _manifest_file(entry, root)
    if key is not None:
        data = json.loads(f.read_text()) if f.is_file() else {}
        data[key] = manifest
        manifest = dict(sorted(data.items()))
    f.write_text(json.dumps(manifest, indent=1) + "\n")
    return f


def settings(entry: str, root: Path = ROOT) -> dict:
    """The entry's scope and commands: its manifest's, else the default table's."""
    m = read_manifest(entry, root) or DEFAULTS.get(entry)
    if not m:
        raise ProvenanceError(f"{entry}: no manifest and no default scope: give --scope PATH ... and --command CMD")
    return {"scope": list(m["scope"]), "commands": list(m["commands"])}


def dirty(scope: list[str], root: Path = ROOT) -> list[str]:
    """In-scope files that differ from HEAD in the working tree (modified, staged, new or deleted)."""
    out = git(root, "status", "--porcelain", "--untracked-files=all", "--", *scope)
    return sorted({line[3:].split(" -> ")[-1] for line in out.splitlines() if line.strip()})


def record(entry: str, commands: list[str] | None = None, scope: list[str] | None = None,
           at: str | None = None, root: Path = ROOT) -> dict:
    """Write the entry's manifest: at HEAD (refused if in-scope files are dirty), or ``at`` a commit
    (``"last"``: the last one that changed the entry) for back-filling. Returns the manifest."""
    entry = entry.rstrip("/")
    if not (root / entry).exists():
        raise ProvenanceError(f"{entry}: no such folder or file")
    if entry_of(entry, root) != entry:
        raise ProvenanceError(f"{entry}: not a folder or file directly under {' or '.join(ROOTS)}")
    base = settings(entry, root) if not (commands and scope) else {}
    scope = list(scope or base["scope"])
    commands = list(commands or base["commands"])
    if at is None:
        bad = dirty(scope, root)
        if bad:
            raise ProvenanceError(f"refusing to record {entry} at HEAD: in-scope files differ from HEAD in the working "
                                  f"tree: {', '.join(bad)} (commit or stash them, then record again)")
        sha = resolve(root, "HEAD")
        date = datetime.date.today().isoformat()
    else:
        sha = last_commit(entry, root) if at == "last" else resolve(root, at)
        if not sha:
            raise ProvenanceError(f"--at {at}: no such commit")
        date = git(root, "show", "-s", "--format=%cs", sha).strip()
    files = Tree(root, sha).file_hashes(scope)
    absent = [p for p, h in files.items() if h == "missing"] + [p for p in scope if p.endswith("/") and not
                                                                 any(f.startswith(p) for f in files)]
    if absent and at is None:
        raise ProvenanceError(f"refusing to record {entry}: scope paths not in HEAD: {', '.join(absent)}")
    manifest = {"commit": sha[:7], "commit_full": sha, "date": date, "code_hash": code_hash(files),
                "scope": scope, "files": files, "commands": commands}
    if at is not None:
        manifest["backfilled"] = True
    write_manifest(entry, manifest, root)
    return manifest


def _changed(now: dict[str, str], then: dict[str, str]) -> list[str]:
    return sorted(p for p in set(now) | set(then) if now.get(p, "missing") != then.get(p, "missing"))


def status(entry: str, root: Path = ROOT, tree: Tree | None = None) -> dict:
    """The entry against the current code: ``state``, the manifest, the files whose code changed
    since the recording (``changed``), since its acceptance (``changed_since_accepted``: empty unless
    it was accepted), and the in-scope files git sees changed whose code did not (``docs_only``:
    docstrings, comments, formatting). ``state`` is one of ``current`` (the code hashes as recorded),
    ``accepted`` (as when its change was accepted: see :func:`accept`), ``stale`` (anything else, a
    change after an acceptance too) and ``unrecorded`` (no manifest)."""
    m = read_manifest(entry, root)
    if m is None:
        return {"entry": entry, "state": "unrecorded", "manifest": None,
                "commands": (DEFAULTS.get(entry) or {}).get("commands", []), "changed": [],
                "changed_since_accepted": [], "docs_only": []}
    now = (tree or Tree(root)).file_hashes(m["scope"])
    changed = _changed(now, m["files"])
    acc = m.get("accepted")
    if code_hash(now) == m["code_hash"]:
        state = "current"
    elif acc and code_hash(now) == acc["code_hash"]:
        state = "accepted"
    else:
        state = "stale"
    since_acc = _changed(now, acc["files"]) if acc and state == "stale" else []
    diff = git(root, "diff", "--name-only", m["commit_full"], "--", *m["scope"], check=False).split()
    untracked = git(root, "ls-files", "--others", "--exclude-standard", "--", *m["scope"], check=False).split()
    docs_only = sorted(set(diff + untracked) - set(changed))
    return {"entry": entry, "state": state, "manifest": m, "commands": m["commands"],
            "changed": changed, "changed_since_accepted": since_acc, "docs_only": docs_only}


def accept(names: list[str], why: str | None, root: Path = ROOT) -> list[dict]:
    """Say that each entry's code change since its recording was looked at and does not (or not yet)
    change its numbers, without re-recording it: writes an ``accepted`` block into its manifest
    (``code_hash`` and ``files`` as the code hashes now, ``changed``: the in-scope files whose hash
    differs from the recording, ``commit`` (HEAD, short), ``date``, ``why``). The entry then reads
    ``accepted`` until its code changes again (then ``stale``) or it is recorded again (``--record``
    writes a manifest without the block). Refused, before anything is written, for an entry that is
    current (nothing to accept) or has no manifest, without a reason, or while in-scope files differ
    from HEAD in the working tree. Returns the blocks written, in order."""
    why = " ".join((why or "").split())  # one line: it ends up in a table's note
    if not why:
        raise ProvenanceError('--accept needs --why "TEXT": why the code change does not (or not yet) matter to the numbers')
    tree, plans = Tree(root), []
    for entry in names:
        entry = entry.rstrip("/")
        if entry_of(entry, root) != entry or not (root / entry).exists():
            raise ProvenanceError(f"{entry}: not a folder or file directly under {' or '.join(ROOTS)}")
        s = status(entry, root, tree)
        if s["state"] == "unrecorded":
            raise ProvenanceError(f"{entry}: no manifest to accept a change against: record it first (--record)")
        if s["state"] == "current":
            raise ProvenanceError(f"refusing to accept {entry}: its code is as recorded at {s['manifest']['commit']} "
                                  f"(current, nothing to accept)")
        bad = dirty(s["manifest"]["scope"], root)
        if bad:
            raise ProvenanceError(f"refusing to accept {entry}: in-scope files differ from HEAD in the working tree: "
                                  f"{', '.join(bad)} (commit or stash them, then accept again)")
        plans.append((entry, s))
    sha, out = resolve(root, "HEAD"), []
    for entry, s in plans:
        files = tree.file_hashes(s["manifest"]["scope"])
        block = {"code_hash": code_hash(files), "files": files, "changed": s["changed"], "commit": sha[:7],
                 "date": datetime.date.today().isoformat(), "why": why}
        write_manifest(entry, {**s["manifest"], "accepted": block}, root)
        out.append(block)
    return out


def check(root: Path = ROOT) -> list[dict]:
    """The entries that are not current (stale, unrecorded or accepted), each as :func:`status` gives it."""
    tree = Tree(root)
    return [s for s in (status(e, root, tree) for e in entries(root)) if s["state"] != "current"]


def describe(s: dict) -> str:
    """One entry's status in a few lines, with the command that re-records it."""
    m = s["manifest"]
    head = (f"{s['entry']}: no manifest ({MANIFEST})" if m is None
            else f"{s['entry']}: recorded at {m['commit']} ({m['date']}), {s['state']}")
    lines = [head]
    if s["changed"]:
        lines.append("  code changed since: " + ", ".join(s["changed"]))
    acc = (m or {}).get("accepted")
    if acc and s["state"] != "current":
        lines.append(f"  accepted at {acc['commit']} ({acc['date']}): {acc['why']}")
        if s["changed_since_accepted"]:
            lines.append("  code changed since the acceptance: " + ", ".join(s["changed_since_accepted"]))
    if s["docs_only"]:
        lines.append("  docstrings/comments only: " + ", ".join(s["docs_only"]))
    if s["state"] != "current":
        cmds = " && ".join(s["commands"]) or "(no known command: see docs/results.md)"
        lines.append(f"  re-record: {cmds} && python docs/provenance.py --record {s['entry']}")
    return "\n".join(lines)


def warning(s: dict) -> str:
    """One line for an accepted entry (``--check`` prints it and passes; ``--check --strict`` fails)."""
    m, acc = s["manifest"], s["manifest"]["accepted"]
    return (f"warning: {s['entry']}: recorded at {m['commit']}, code changed since ({', '.join(acc['changed'])}); "
            f"accepted at {acc['commit']}: {acc['why']}")


def _files_phrase(changed: list[str], scope: list[str]) -> str:
    """The changed files, short: those under a folder of the scope as the folder and a count when
    there are several (``workloads/ (19 files)``), the others by name."""
    groups: dict[str, list[str]] = {}
    for f in changed:
        folder = next((d for d in scope if d.endswith("/") and f.startswith(d)), None)
        groups.setdefault(folder or f, []).append(f)
    return ", ".join(f"`{k}` ({len(v)} files)" if len(v) > 1 else f"`{v[0]}`" for k, v in sorted(groups.items()))


def table_note(path: str, root: Path = ROOT) -> str | None:
    """The line docs/sync_tables.py ends a synced table with: the commit and the command of the
    entry holding ``path`` and, for an accepted entry, which code changed since, when the change was
    accepted and why; None when the entry has no manifest."""
    entry = entry_of(path, root)
    m = read_manifest(entry, root) if entry else None
    if not m:
        return None
    note = f"_Recorded at commit {m['commit']} (`{' && '.join(m['commands'])}`)"
    acc = m.get("accepted")
    if acc:
        note += (f"; the code of {_files_phrase(acc['changed'], m['scope'])} changed since "
                 f"(commit {acc['commit']}: {acc['why'].rstrip('.')}); not re-recorded")
    return note + "._"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python docs/provenance.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 naming every stale or unrecorded entry; accepted ones: a warning line each")
    ap.add_argument("--strict", action="store_true", help="with --check: exit 1 on accepted entries too")
    ap.add_argument("--record", nargs="+", metavar="ENTRY", help="write these entries' manifests")
    ap.add_argument("--command", action="append", metavar="CMD", help="a command that re-records the entry (repeat, in order)")
    ap.add_argument("--scope", nargs="+", metavar="PATH", help="the code paths that decide its numbers (dir/ = all under it)")
    ap.add_argument("--at", metavar="COMMIT", help="hash this commit's tree (back-fill); 'last': the last commit that changed the entry")
    ap.add_argument("--accept", nargs="+", metavar="ENTRY",
                    help="accept these entries' code change since their recording without re-recording them (needs --why)")
    ap.add_argument("--why", metavar="TEXT", help="with --accept: why the change does not (or not yet) matter to the numbers")
    args = ap.parse_args(argv)
    try:
        if args.record and args.accept:
            ap.error("--record and --accept: one at a time")
        if args.record:
            if len(args.record) > 1 and (args.command or args.scope):
                ap.error("--command and --scope name one entry's: record the entries one at a time")
            for entry in args.record:
                m = record(entry, args.command, args.scope, args.at)
                absent = [p for p, h in m["files"].items() if h == "missing"]
                print(f"{entry}: recorded at {m['commit']}, code hash {m['code_hash']} ({len(m['files'])} files)"
                      + (f"; not in that commit: {', '.join(absent)}" if absent else ""))
            return 0
        if args.command or args.scope or args.at:
            ap.error("--command, --scope and --at go with --record")
        if args.why is not None and not args.accept:
            ap.error("--why goes with --accept")
        if args.strict and not args.check:
            ap.error("--strict goes with --check")
        if args.accept:
            for entry, block in zip(args.accept, accept(args.accept, args.why)):
                print(f"{entry.rstrip('/')}: accepted at {block['commit']}, code hash {block['code_hash']}; "
                      f"changed since the recording: {', '.join(block['changed'])}")
            return 0
        if args.check:
            found = check()
            failing = [s for s in found if s["state"] != "accepted" or args.strict]
            for s in found:
                if s not in failing:
                    print(warning(s), file=sys.stderr)
            if failing:
                print("results whose code changed since they were recorded"
                      + (" (accepted ones included: --strict)" if args.strict else "")
                      + ", or that have no manifest:\n" + "\n".join(describe(s) for s in failing), file=sys.stderr)
                return 1
            n_acc = len(found)
            print(f"{len(entries())} entries, all current" if not n_acc else
                  f"{len(entries())} entries: {len(entries()) - n_acc} current, {n_acc} accepted "
                  f"(code changed since the recording; --check --strict fails on them)")
            return 0
        tree = Tree()
        for e in entries():
            print(describe(status(e, ROOT, tree)))
        return 0
    except ProvenanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
