"""The MLflow store: one experiment per spec, a parent run per sweep, a child run per trial, written
through :class:`Tracker` (retries, batched metrics); the store's checks.

All writes happen in one process (the sweep driver: :class:`orchestrator.recorder.TrialRecorder`,
driven by the Ray Tune callback :class:`orchestrator.tracking.TrackingCallback`), so an
embedded SQLite store is never written by several processes at once, and metrics go in batches,
never one call per scalar: into a SQL store (the embedded SQLite one) one transaction per batch
straight into MLflow's tables (:func:`sql_log_metrics`, several times ``log_batch``'s rate),
to a tracking server ``log_batch`` calls of up to 1000 values.

A trial attempt that restarts (Ray retry after a crash, or a resumed sweep re-running a trial that
was cut off) replaces its earlier partial run (soft-deleted), so every trial appears exactly once.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # MLflow is imported where it is used: the store's checks (check_store) need none of it
    from mlflow.entities import Metric

log = logging.getLogger("ablate")

# MLflow's HTTP client retries a refused connection 7 times with doubling backoff (minutes per
# call); Tracker._call below owns the retry policy, so the client's own is kept short.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# MLflow prints "View run <name> at: <url>" (and the experiment's URL) for every run it ends on a
# tracking server: one line per trial. The sweep's end prints the experiment's URL once instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

PATIENCE_ENV = "ABLATE_TRACKING_PATIENCE"
"""Seconds a tracking store may stay unreachable before the sweep stops (default 60)."""

TAG_SWEEP = "ablate.sweep"
TAG_TRIAL = "ablate.trial_id"
TAG_KIND = "ablate.kind"  # "sweep" | "trial"
TAG_REFERENCE = "ablate.reference"  # "true" on a boundary search's reference trials (orchestrator.boundary)
BATCH = 1000  # MLflow's limit of metrics per log_batch

# MLflow 3 records an experiment's kind in this tag ("genai_development" or
# "custom_model_development"; the UI's ExperimentKind enum, mlflow/server/js, and the tag its
# "experiment type" selector writes). ablate's experiments are model training. MLflow 3.17's UI
# still opens every experiment in its GenAI view until the sidebar's "Model training" switch is
# clicked (kept per browser) or the page is opened with ?workflowType=machine_learning: see
# Tracker.experiment_url and the README.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def default_tracking_uri(workdir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of a ``sqlite:///`` tracking URI; None for any other store."""
    return Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None


def local_artifact_root(tracking_uri: str) -> str | None:
    """Beside an embedded SQLite store, artifacts go to ``<store folder>/mlartifacts`` (MLflow's own
    default would be ``./mlruns`` under whatever folder the driver was started from). A server
    (http) chooses its own artifact root."""
    path = sqlite_path(tracking_uri)
    return (path.resolve().parent / "mlartifacts").as_uri() if path is not None else None


STORE_TEMPLATE_ENV = "ABLATE_STORE_TEMPLATES"


def store_template_path() -> Path | None:
    """Where the empty store of this MLflow version and set of schema migrations is kept
    (``$ABLATE_STORE_TEMPLATES``, else ``$XDG_CACHE_HOME/ablate`` or ``~/.cache/ablate``;
    ``ABLATE_STORE_TEMPLATES=off``: none)."""
    import hashlib

    import mlflow.store
    import mlflow.version

    root = os.environ.get(STORE_TEMPLATE_ENV)
    if root is not None and root.strip().lower() in ("", "0", "off", "no"):
        return None
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ablate")
    try:  # the migrations MLflow runs on a new store: a template made by another set is never used
        migrations = sorted(os.listdir(Path(mlflow.store.__file__).parent / "db_migrations" / "versions"))
    except OSError:
        return None
    key = hashlib.sha256("\n".join(migrations).encode()).hexdigest()[:12]
    return Path(root) / f"mlflow-{mlflow.version.VERSION}-{key}-empty.db"


def _sqlite_copy(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite file (its backup API), written beside ``dst`` and then moved."""
    import sqlite3
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with sqlite3.connect(src) as a, sqlite3.connect(tmp) as b:
            a.backup(b)
        a.close()
        b.close()
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def seed_sqlite_store(tracking_uri: str) -> str:
    """Before MLflow opens a SQLite store that does not exist yet: MLflow would create it by running
    its whole chain of schema migrations, 2 s of CPU on 2 cores (the fresh-workdir start of
    ``ablate sweep``, issue #32). Instead, copy the empty store that MLflow made the first time on
    this machine (one file per MLflow version and set of migrations, :func:`store_template_path`), with its ``Default``
    experiment's artifact location and times set as MLflow would set them now. Returns "copied",
    "made" (no template: MLflow makes the store, the caller calls :func:`keep_store_template`), or
    "" (not a new SQLite store, or no template place)."""
    path = sqlite_path(tracking_uri)
    if path is None or path.exists() or not path.parent.is_dir():
        return ""
    template = store_template_path()
    if template is None:
        return ""
    if not template.exists():
        return "made"
    import sqlite3

    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH

    tmp = path.with_name(f".{path.name}.seed.{os.getpid()}")
    try:
        _sqlite_copy(template, tmp)
        now = int(time.time() * 1000)
        default_root = Path(DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH).resolve() / "0"
        con = sqlite3.connect(tmp)
        try:
            with con:
                runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
                changed = con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                                      "last_update_time = ? WHERE experiment_id = 0",
                                      (str(default_root), now, now)).rowcount
        finally:
            con.close()
        if runs or changed != 1:
            raise sqlite3.DatabaseError(f"not an empty MLflow store ({runs} runs, Default experiment rows {changed})")
        try:
            os.link(tmp, path)  # never over a store another process made meanwhile
        except FileExistsError:
            pass
        return "copied"
    except sqlite3.Error as e:  # a template that is not an empty store: MLflow makes the store, and a new template
        log.warning("MLflow store template %s not used (%s): removed", template, e)
        try:
            template.unlink()
        except OSError:
            pass
        return "made" if not path.exists() else ""
    except OSError as e:  # this folder cannot take the copy (no hard links, ...): MLflow makes the store
        log.debug("MLflow store template %s not used: %s", template, e)
        return ""
    finally:
        if tmp.exists():
            tmp.unlink()


def keep_store_template(tracking_uri: str) -> None:
    """After MLflow made a new SQLite store (before anything is written to it): keep a copy as this
    machine's template for the next new store (:func:`seed_sqlite_store`). Best effort."""
    template = store_template_path()
    if template is None or template.exists():
        return
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        _sqlite_copy(sqlite_path(tracking_uri), template)
    except Exception as e:  # noqa: BLE001 - only a slower next start
        log.debug("store template %s not kept: %s", template, e)


def code_version() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    try:
        out["ablate.version"] = version("ablate")
    except PackageNotFoundError:
        pass
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if sha:
            out["mlflow.source.git.commit"] = sha
            out["ablate.git_dirty"] = str(bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def nonfinite_text(v: float) -> str:
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by the string "inf", "-inf" or "nan", so that it
    can be written as standard JSON (which has no Infinity or NaN tokens). ``float(s)`` reads such a
    string back."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return nonfinite_text(obj)
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_dumps_finite(obj: Any) -> str:
    """Standard JSON (``allow_nan=False``) of ``obj``, non-finite floats written as strings."""
    return json.dumps(finite_json(obj), indent=1, default=str, allow_nan=False)


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


# Store errors that no retry fixes (matched in the exception's text: MLflow wraps the OS / SQLite
# error in its own types): wrong requests, a read-only or unwritable store, a full disk.
_PERMANENT = ("resource_does_not_exist", "invalid_parameter", "readonly database", "read-only file system",
              "permission denied", "database or disk is full", "no space left on device",
              "unable to open database file", "[errno 13]", "[errno 28]", "[errno 30]")


_PERMANENT_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "PERMISSION_DENIED",
                              "UNAUTHENTICATED", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"})


def permanent_error(e: BaseException) -> bool:
    """True when retrying ``e`` cannot help (permission, read-only, disk full, bad request, a missing
    resource). MLflow's own exceptions carry an ``error_code`` that their message may not repeat
    (a missing artifact says only "Failed to download artifacts from path ..."): read it first."""
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        return True
    if getattr(e, "error_code", None) in _PERMANENT_CODES:
        return True
    text = str(e).lower()
    return any(p in text for p in _PERMANENT)


class StoreError(RuntimeError):
    """The tracking store cannot be used as asked; one line naming the URI or path and what to do."""


class StoreUnavailable(StoreError):
    """The tracking store did not answer for the tracker's whole patience (``seconds``, ``retries``
    retries; ``reason``: the last error in a few words). The sweep that meets it stops, saying what
    was saved (``orchestrator.sweep.Session.fit``)."""

    def __init__(self, uri: str, seconds: float, retries: int, reason: str):
        self.uri, self.seconds, self.retries, self.reason = uri, seconds, retries, reason
        super().__init__(f"the MLflow tracking store {uri} did not answer for {seconds:.0f} s ({retries} "
                         f"retries; last: {reason})")


def short_reason(e: BaseException) -> str:
    """A store error in a few words, at most 60 characters (MLflow's HTTP errors are hundreds of
    characters long, their cause often only in the chained exception)."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen and len(chain) < 5:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    low = " ".join(f"{type(c).__name__} {c}" for c in chain).lower()
    for key, words in (("connection refused", "connection refused"), ("timed out", "timed out"),
                       ("timeout", "timed out"),
                       ("name or service not known", "unknown host"), ("temporary failure in name", "unknown host"),
                       ("connection reset", "connection reset"), ("remote end closed", "connection closed"),
                       ("remotedisconnected", "connection closed"), ("connection aborted", "connection closed"),
                       ("incompleteread", "connection closed"), ("broken pipe", "connection closed"),
                       ("database is locked", "database is locked")):
        if key in low:
            return words
    status = re.search(r"(?:error code|status code|status|http|too many)\D{0,3}(5\d\d)\b", low)  # not a port's digits
    if status:
        return f"HTTP {status.group(1)}"
    if "max retries exceeded" in low:
        return "no answer"
    text = re.sub(r"API request to \S+ failed with (exception )?", "", str(chain[0]))
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    out = f"{type(chain[0]).__name__}: {first}" if first else type(chain[0]).__name__
    return out if len(out) <= 60 else out[:57] + "..."


MIN_FREE_BYTES = 32 * 2**20


def check_store(tracking_uri: str, write: bool = True, timeout: float = 5.0) -> None:
    """Fail at once, in one line, when the store cannot serve this command: a tracking server that
    refuses connections, a SQLite store that does not exist (read-only commands, which must not
    create one), is not writable, or sits on a full disk (commands that write). No retries: a
    sweep that loses the store later is retried by :meth:`Tracker._call`."""
    import shutil
    import urllib.error
    import urllib.request

    path = sqlite_path(tracking_uri)
    if path is not None:
        folder = path.parent
        if not path.exists():
            if not write:
                raise StoreError(f"no MLflow store at {path}: run a sweep first, or point --workdir / "
                                 "--tracking-uri at the sweep's store")
            if not folder.is_dir():
                raise StoreError(f"MLflow store {tracking_uri}: the folder {folder} does not exist")
        if write:
            if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise StoreError(f"MLflow store {path} is not writable by this user (SQLite writes the file and "
                                 f"its folder {folder}); fix the permissions, or choose another --workdir / "
                                 "--tracking-uri")
            free = shutil.disk_usage(folder).free
            if free < MIN_FREE_BYTES:
                raise StoreError(f"MLflow store {path}: only {free / 2**20:.1f} MiB free on its disk; free some "
                                 "space or choose another --workdir")
    elif tracking_uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # the server answered: reachable
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise StoreError(f"cannot reach the MLflow tracking server at {tracking_uri} ({reason}); start it, "
                             "or pass another --tracking-uri (or unset MLFLOW_TRACKING_URI)") from None


class Tracker:
    """A thin, batched writer over ``MlflowClient``: sweep runs, trial runs, metrics, tags."""

    def __init__(self, tracking_uri: str, experiment: str, retries: int | None = None,
                 patience: float | None = None, label: str = ""):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        seeded = seed_sqlite_store(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        self.retries = retries
        if patience is None:
            try:
                patience = float(os.environ.get(PATIENCE_ENV, 60))
            except ValueError:
                raise StoreError(f"{PATIENCE_ENV}: {os.environ[PATIENCE_ENV]!r} is not a number of seconds") from None
        self.patience = patience
        self.label = label  # the sweep's name, on its waiting lines
        self.down: StoreUnavailable | None = None  # set once the patience is spent: later calls try once
        exp = self._call(self.client.get_experiment_by_name, experiment)
        if seeded == "made":  # MLflow made the store just now, empty: the template of the next one
            keep_store_template(tracking_uri)
        if exp is None:
            try:
                self.experiment_id = self._call(self.client.create_experiment, experiment,
                                                artifact_location=local_artifact_root(tracking_uri),
                                                tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
                return
            except Exception as e:  # noqa: BLE001 - MLflow's own exception, read by its code
                if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                # another process (a second driver, a job's retry) made it since the lookup: use theirs
                exp = self._call(self.client.get_experiment_by_name, experiment)
                if exp is None:  # made and deleted meanwhile: nothing to read back
                    raise
        self.experiment_id = exp.experiment_id
        if TAG_EXPERIMENT_KIND not in exp.tags:  # made by an older ablate; a kind set by hand is kept
            self._call(self.client.set_experiment_tag, self.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)

    def experiment_url(self, ui: str = "http://127.0.0.1:5000") -> str:
        """The experiment's page in the MLflow UI at ``ui``, on its model-training view (runs, not
        traces): MLflow 3.17's UI reads the view from ``workflowType``, not from the experiment's tag."""
        return f"{ui.rstrip('/')}/#/experiments/{self.experiment_id}?workflowType=machine_learning"

    def _call(self, fn, *args, **kwargs):
        """Retry transient store errors (a restarting server, a busy SQLite file) with backoff, 0.5 s
        doubling to 10 s, for ``patience`` seconds (default 60, $ABLATE_TRACKING_PATIENCE; at most
        ``retries`` retries when set); each retry is one line, ``[sweep] waiting for the tracking
        store URI (retry k, n s): reason``, and a store that answers again says so. Then
        :class:`StoreUnavailable` (metrics are never dropped silently), and every later call tries
        once, without waiting. Errors no retry can fix (a read-only store, a full disk, a wrong
        request: :func:`permanent_error`) propagate at once."""
        if self.down is not None:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                if permanent_error(e):
                    raise
                raise self.down from e
        delay, t0, retry = 0.5, None, 0
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - MLflow raises many types for transport errors
                if permanent_error(e):
                    raise
                now = time.monotonic()
                t0 = now if t0 is None else t0
                if (self.retries is not None and retry >= self.retries) or now - t0 + delay > self.patience:
                    self.down = StoreUnavailable(self.uri, now - t0, retry, short_reason(e))
                    raise self.down from e
                retry += 1
                self._say(f"waiting for the tracking store {self.uri} (retry {retry}, {now - t0:.0f} s): "
                          f"{short_reason(e)}")
                time.sleep(delay)
                delay = min(delay * 2, 10)
                continue
            if retry:
                self._say(f"the tracking store answers again (after {retry} retries, "
                          f"{time.monotonic() - t0:.0f} s); nothing was lost")
            return result

    def _say(self, text: str) -> None:
        import sys

        print(f"[{self.label}] {text}" if self.label else text, file=sys.stderr, flush=True)

    # ---- runs
    def find_runs(self, filter_string: str, include_deleted: bool = False) -> list:
        from mlflow.entities import ViewType

        view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
        runs, token = [], None
        while True:
            page = self._call(self.client.search_runs, [self.experiment_id], filter_string,
                              run_view_type=view, max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def trial_runs(self, sweep: str, extra: str = "") -> list:
        """The active trial runs of a sweep (``extra``: more filter, e.g. "tags.status = 'running'")."""
        return self.find_runs(f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_KIND}` = 'trial'"
                              + (f" and {extra}" if extra else ""))

    def sweep_runs(self, sweep: str) -> list:
        """The sweep's parent run (a list: empty before the sweep first ran)."""
        return self.find_runs(f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_KIND}` = 'sweep'")

    def sweep_run(self, sweep: str, spec_raw: dict, spec_text: str) -> str:
        """The sweep's parent run: found by tag (a resumed sweep reuses it) or created."""
        found = self.sweep_runs(sweep)
        if found:
            run_id = found[0].info.run_id
            self._call(self.client.update_run, run_id, "RUNNING")
            return run_id
        tags = {TAG_SWEEP: sweep, TAG_KIND: "sweep", "mlflow.runName": sweep, **code_version()}
        run = self._call(self.client.create_run, self.experiment_id, tags=tags, run_name=sweep)
        run_id = run.info.run_id
        self.log_params(run_id, spec_raw)
        self._call(self.client.log_text, run_id, spec_text, "spec.yaml")
        return run_id

    def trial_run(self, sweep: str, parent_id: str, trial_id: str, name: str, config: dict,
                  replace: bool, tags: dict[str, str] | None = None) -> str:
        """A trial's child run (with ``tags`` besides ablate's own). With ``replace``, an earlier run
        of the same trial (a partial attempt) is soft-deleted first so that the trial is recorded once."""
        existing = self.trial_runs(sweep, f"tags.`{TAG_TRIAL}` = '{trial_id}'")
        if existing and not replace:
            return existing[0].info.run_id
        for r in existing:
            self.discard(r, "replaced by a new attempt of the trial")
        tags = {TAG_SWEEP: sweep, TAG_TRIAL: trial_id, TAG_KIND: "trial", "mlflow.parentRunId": parent_id,
                "mlflow.runName": name, "status": "running", **(tags or {})}
        run = self._call(self.client.create_run, self.experiment_id, tags=tags, run_name=name)
        run_id = run.info.run_id
        self.log_params(run_id, config)
        return run_id

    def metric_history(self, run_id: str, key: str) -> list:
        """The metric's recorded values (MLflow ``Metric``s) in the store's order, each value as it
        was logged: a SQL store's +-max float read back as +-inf (:func:`logged_value`)."""
        from mlflow.entities import Metric

        out = []
        for m in self._call(self.client.get_metric_history, run_id, key):
            v = logged_value(m.value)
            out.append(m if v == m.value or v != v else
                       Metric(m.key, v, m.timestamp, m.step, model_id=m.model_id, dataset_name=m.dataset_name,
                              dataset_digest=m.dataset_digest, run_id=m.run_id))
        return out

    def log_params(self, run_id: str, values: dict) -> None:
        """Nested dicts flattened to dotted keys; MLflow takes at most 100 params a batch."""
        from mlflow.entities import Param

        params = [Param(k[:250], v[:6000]) for k, v in _flatten(values).items()]
        for i in range(0, len(params), 100):
            self._call(self.client.log_batch, run_id, params=params[i:i + 100])

    def log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        """All of ``metrics`` for one run. Into a SQL store (the embedded SQLite one): one
        transaction of one multi-row INSERT and one ``latest_metrics`` write per key
        (:func:`sql_log_metrics`); elsewhere, or when that path declines, ``log_batch`` calls of
        up to 1000 values."""
        if not metrics:
            return
        store = self.sql_store()
        if store is not None and self._call(sql_log_metrics, store, run_id, metrics):
            return
        for i in range(0, len(metrics), BATCH):
            self._call(self.client.log_batch, run_id, metrics=metrics[i:i + BATCH])

    def sql_store(self):
        """The client's SQLAlchemy store (sqlite, postgresql, mysql URIs), else None (a server)."""
        if not hasattr(self, "_sql"):
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
            self._sql = store if isinstance(store, SqlAlchemyStore) else None
        return self._sql

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._call(self.client.log_batch, run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_batch(self, run_id: str, metrics: list[Metric], tags: dict[str, Any]) -> None:
        """Tags and a few metrics (a trial's results) in one call; more than 1000 metrics go apart."""
        from mlflow.entities import RunTag

        if len(metrics) > BATCH:
            self.log_metrics(run_id, metrics)
            metrics = []
        self._call(self.client.log_batch, run_id, metrics=metrics,
                   tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self._call(self.client.log_text, run_id, text, path)

    def log_texts(self, run_id: str, texts: dict[str, str]) -> None:
        """Several text artifacts (name -> text) in one ``log_artifacts`` call."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ablate-artifacts-") as tmp:
            for name, text in texts.items():
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
            self._call(self.client.log_artifacts, run_id, tmp)

    def log_artifact(self, run_id: str, path: str, folder: str) -> None:
        self._call(self.client.log_artifact, run_id, path, folder)

    def delete_run(self, run_id: str) -> None:
        self._call(self.client.delete_run, run_id)

    def discard(self, run, why: str = "replaced") -> None:
        """Soft-delete a run that another replaces (a trial's earlier attempt): closed first, KILLED
        with tag ``interrupted``, when it is still RUNNING (a deleted run kept RUNNING forever)."""
        if run.info.status == "RUNNING":
            self.close_cut_off(run, why)
        self.delete_run(run.info.run_id)

    def close_cut_off(self, run, why: str) -> None:
        """A trial run left RUNNING by an attempt that will not end it: KILLED, tag ``interrupted``."""
        self.set_tags(run.info.run_id, {"interrupted": why})
        self.finish(run.info.run_id, "KILLED")

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, run_id, status)

    def download_artifact(self, run_id: str, path: str, dst: str) -> str:
        """Download one artifact of a run into the folder ``dst``; returns its local path. A run
        without that artifact raises ``FileNotFoundError`` at once (MLflow's error, code
        RESOURCE_DOES_NOT_EXIST, is permanent: :func:`permanent_error`), never retried as an outage."""
        try:
            return self._call(self.client.download_artifacts, run_id, path, dst)
        except Exception as e:  # noqa: BLE001 - MLflow raises MlflowException (local) or RestException
            if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                raise FileNotFoundError(f"run {run_id} has no artifact {path!r}") from e
            raise

    def log_sweep_artifacts(self, sweep: str, files: list[Path], folder: str) -> None:
        """Log ``files`` as artifacts under ``folder`` of the sweep's parent run (nothing when the
        sweep has none): what ``ablate export``, ``report`` and ``forensics`` wrote."""
        parents = self.sweep_runs(sweep)
        if parents:
            for f in files:
                self.log_artifact(parents[0].info.run_id, str(f), folder)


_MAX_FLOAT = 1.7976931348623157e308


def logged_value(v: float | None) -> float | None:
    """A metric value read back from MLflow as it was logged: MLflow's SQL stores write +-inf as
    +-max float (:func:`sql_log_metrics` does the same), which ``math.isfinite`` would accept as a
    number; read back as +-inf. NaN and every other value unchanged."""
    if v is not None and abs(v) >= _MAX_FLOAT:
        return math.copysign(math.inf, v)
    return v


def sql_log_metrics(store, run_id: str, metrics: list[Metric]) -> bool:
    """Write ``metrics`` of one run straight into a SQLAlchemy store's ``metrics`` and
    ``latest_metrics`` tables, in one transaction: what ``log_batch`` stores (the same rows, NaN
    as value 0 with ``is_nan``, +-inf as +-max float, the latest value of a key by (step,
    timestamp, value)), without building one ORM object per value and without re-reading
    ``latest_metrics`` once per 1000 values. ``log_batch`` spends ~95 % of its time there: this
    path is several times faster (``benchmarks/orchestration_overhead.py`` prints both).

    False, with nothing written, when the run is not an active run of the store or a row of the
    batch is already stored (a batch sent again): the caller then goes through ``log_batch``,
    which raises MLflow's own error or skips the duplicates."""
    import sqlalchemy
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun
    from mlflow.utils.validation import _validate_metric

    rows: dict[tuple, None] = {}  # (key, value, timestamp, step, is_nan), in order, duplicates once
    latest: dict[str, tuple] = {}
    checked: set[str] = set()
    for m in metrics:
        if m.key not in checked:  # names and types as MLflow checks them, once per key
            _validate_metric(m.key, m.value, m.timestamp, m.step)
            checked.add(m.key)
        value = float(m.value)
        is_nan = value != value
        if is_nan:
            value = 0.0
        elif value in (math.inf, -math.inf):
            value = _MAX_FLOAT if value > 0 else -_MAX_FLOAT
        row = (m.key, value, int(m.timestamp), int(m.step), is_nan)
        rows[row] = None
        cur = latest.get(m.key)
        if cur is None or (row[3], row[2], row[1]) > (cur[3], cur[2], cur[1]):
            latest[m.key] = row
    cols = ("key", "value", "timestamp", "step", "is_nan")
    try:
        with store.ManagedSessionMaker(read_only=False) as session:
            stage = session.query(SqlRun.lifecycle_stage).filter(SqlRun.run_uuid == run_id).one_or_none()
            if stage is None or stage[0] != "active":
                return False
            session.execute(sqlalchemy.insert(SqlMetric.__table__),
                            [dict(zip(cols, r), run_uuid=run_id) for r in rows])
            stored = {r.key: r for r in session.query(SqlLatestMetric).filter(
                SqlLatestMetric.run_uuid == run_id, SqlLatestMetric.key.in_(list(latest)))}
            for key, row in latest.items():
                old = stored.get(key)
                if old is None:
                    session.add(SqlLatestMetric(run_uuid=run_id, **dict(zip(cols, row))))
                elif (row[3], row[2], row[1]) > (old.step, old.timestamp, old.value):
                    old.value, old.timestamp, old.step, old.is_nan = row[1], row[2], row[3], row[4]
    except MlflowException as e:  # the session maker rolled back and wrapped the SQL error
        if isinstance(e.__cause__, sqlalchemy.exc.IntegrityError):  # a row of this batch is there
            return False
        raise
    return True

