"""What a sweep driver does when things go wrong around it: one driver per workdir (a lock), Ctrl-C
and SIGTERM as a clean, resumable stop, and errors that cannot fix themselves told in one line.

- :class:`WorkdirLock`: an exclusive ``fcntl.flock`` on ``<workdir>/.ablate.lock``, held by a sweep
  or boundary driver for as long as it runs. A second driver on the same workdir fails at once,
  naming the PID, host and command that hold it. The kernel drops the lock when the holder dies
  (even by SIGKILL), so a stale lock file never blocks anything.
- :class:`StopSignals`: while a sweep runs, SIGINT and SIGTERM ask Ray Tune to stop the way its own
  Ctrl-C does (the experiment state is saved with the running trials unfinished, so a re-run
  resumes them), and are remembered so that the driver can end with :class:`Interrupted` instead of
  a normal summary. A second signal aborts at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

# Tune installs its own SIGINT handler for the duration of ``fit`` and turns Ctrl-C into a quiet,
# successful return; the driver owns SIGINT instead (StopSignals) and reaches Tune's graceful stop
# through the SIGUSR1 handler that Tune always installs.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

RESUME_HINT = "interrupted: re-run the same command to resume"


class Interrupted(Exception):
    """The driver was stopped by a signal; the Tune and MLflow state were left resumable."""

    def __init__(self, signame: str):
        super().__init__(f"{signame}: {RESUME_HINT}")
        self.signame = signame


class RayStartError(RuntimeError):
    """Ray did not start on this machine (or its cluster could not be joined), after the retries
    of ``orchestrator.sweep.init_ray``. One line naming Ray, the cause and where Ray's log is."""


class WorkdirBusy(RuntimeError):
    """Another driver holds the workdir's lock."""


class WorkdirError(RuntimeError):
    """The workdir cannot be used (a file, not writable, ...). One line, naming the path."""


def prepare_workdir(workdir: str | Path) -> Path:
    """The workdir, made absolute and created; a one-line :class:`WorkdirError` when it cannot be."""
    wd = Path(workdir).expanduser().resolve()
    if wd.exists() and not wd.is_dir():
        raise WorkdirError(f"--workdir {wd} is a file, not a folder; give a folder (it is created if missing)")
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"--workdir {wd}: cannot create it ({e.strerror}); choose a folder you can write") from None
    if not os.access(wd, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir {wd}: not writable by this user; choose a folder you can write")
    return wd


_HELD: dict[str, int] = {}  # workdir -> fd of the lock this process holds


def lock_existing(workdir: str | Path, what: str = "") -> WorkdirLock | None:
    """The workdir's lock, taken now when the workdir exists (a driver that holds it made it), so
    that a second driver is refused before any slow check; None for a workdir that does not exist
    yet (nothing is created: a refused spec leaves nothing behind). Released with ``release``, or
    by the session that takes it again (re-entrant) and lets go of it at its end."""
    wd = Path(workdir).expanduser().resolve()
    if not wd.is_dir():
        return None
    return WorkdirLock(wd).acquire(what)


class WorkdirLock:
    """Exclusive lock on a workdir for one driver process (re-entrant within the process)."""

    NAME = ".ablate.lock"

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / self.NAME

    def acquire(self, what: str = "") -> WorkdirLock:
        key = str(self.path)
        if key in _HELD:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"--workdir {self.workdir}: cannot create the lock file {self.path} "
                               f"({e.strerror}); choose a folder you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise WorkdirError(f"--workdir {self.workdir}: cannot lock {self.path} ({e.strerror})") from None
            raise WorkdirBusy(f"--workdir {self.workdir} is in use by another ablate driver ({holder}); "
                              "wait for it to finish (or stop it), or use another --workdir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": what or " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        _HELD[key] = fd
        return self

    def release(self) -> None:
        fd = _HELD.pop(str(self.path), None)
        if fd is not None:
            try:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @property
    def held(self) -> bool:
        return str(self.path) in _HELD


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since', '?')}: "
                f"{info.get('command', '?')}")
    except (OSError, ValueError):
        return "holder unknown"


class StopSignals:
    """SIGINT/SIGTERM while a sweep runs: stop Tune gracefully, remember the signal; twice: abort.

    Use as a context manager around the whole driver, and call :meth:`fit` for ``tuner.fit()``.
    Outside ``fit`` (setting up, writing the summary) a first signal raises ``KeyboardInterrupt``
    at once. Only the main thread can own signals; elsewhere this is a no-op.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool = False):
        self.received: str | None = None
        self.quiet = quiet
        self.on_stop: list = []  # callables run at the first signal (e.g. silence progress lines)
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def install(self) -> None:
        """Take SIGTERM back from Ray (``ray.init`` sets its own, which exits mid-call)."""
        if self._old:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise KeyboardInterrupt(name)
        self.received = name
        tune_stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if callable(tune_stop):
            if not self.quiet:
                print(f"\n{name}: stopping the sweep, saving its state (send it again to stop at once)",
                      file=sys.stderr, flush=True)
            import logging

            logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)  # its own resume hint is not ours
            for fn in self.on_stop:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - a hook must not break the stop
                    pass
            tune_stop(signum, frame)
        else:
            raise KeyboardInterrupt(name)

    def fit(self, tuner):
        """``tuner.fit()``; a signal during it stops Tune gracefully and is then raised as Interrupted."""
        has_usr1 = hasattr(signal, "SIGUSR1") and bool(self._old)
        if has_usr1:
            old_usr1 = signal.getsignal(signal.SIGUSR1)
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # Tune installs its own inside fit
        self.install()
        try:
            result = tuner.fit()
        finally:
            if has_usr1:
                signal.signal(signal.SIGUSR1, old_usr1)
        if self.received:
            raise Interrupted(self.received)
        return result
