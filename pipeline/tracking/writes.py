"""Every write to the tracking store goes through `_write`: retried while the store is locked or
unreachable, with SIGINT/SIGTERM held until it ends, and a refused or full store turned into one line."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.errors import UserError


STORE_PATIENCE_S = 180.0  # how long a write waits out a locked or unreachable store before the run gives up


FULL = ("disk is full", "no space left on device", "disk quota exceeded")


TRANSIENT = ("database is locked", "temporarily unavailable", "connection", "timed out", "max retries", "503", "502")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:4000]


def refused(exc: BaseException) -> int | None:
    """401 or 403 when a tracking server with access control turned a request away, else None."""
    status = exc.get_http_status_code() if isinstance(exc, MlflowException) else None
    return status if status in (401, 403) else None


def refusal(exc: BaseException, what: str, hint: str = "") -> UserError:
    """One line for a refused request: a 401 points at the login settings, a 403 names what was not
    this user's (and `hint`, what to do instead)."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    if refused(exc) == 401:
        login = f"the login of {user!r}" if user else "a request without a login"
        return UserError(f"the tracking server {mlflow.get_tracking_uri()} refused {login} (HTTP 401): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return UserError(
        f"the tracking server {mlflow.get_tracking_uri()} refused {user or 'this client'} access to {what} (HTTP 403, permission denied){': ' + hint if hint else ''}"
    )


def _write(call: Callable[[], Any], patience_s: float | None = None) -> Any:
    """Run one store write, retrying a locked or unreachable store with backoff (0.5 s doubling to
    8 s) for up to `patience_s`; then one UserError line. Other errors (a param logged twice with
    another value) are raised at once."""
    patience_s = STORE_PATIENCE_S if patience_s is None else patience_s
    deadline, wait = time.monotonic() + patience_s, 0.5
    while True:
        try:
            return _attempt(call)
        except Exception as exc:  # MLflow passes SQLAlchemy's OperationalError through unwrapped
            message = str(exc).lower()
            if any(word in message for word in FULL):
                run = mlflow.active_run()
                resume = f", then `--resume {run.info.run_id}` continues from its last checkpoint" if run else ""
                raise UserError(f"the tracking store {mlflow.get_tracking_uri()} (or its artifact folder) is out of disk space: free some{resume}") from None
            if refused(exc):
                run = mlflow.active_run()
                raise refusal(exc, f"run {run.info.run_id}" if run else "the store") from None
            if not any(word in message for word in TRANSIENT):
                raise
            if time.monotonic() + wait > deadline:
                run = mlflow.active_run()
                resume = f"; its last checkpoint is kept: `--resume {run.info.run_id}` continues it" if run else ""
                raise UserError(
                    f"the tracking store {mlflow.get_tracking_uri()} stayed locked or unreachable for {patience_s:.0f} s ({_one_line(exc)}){resume}"
                ) from None
            time.sleep(wait)
            wait = min(wait * 2, 8.0)


def _attempt(call: Callable[[], Any]) -> Any:
    """One store write with SIGINT/SIGTERM held until it returns, then raised: a signal inside
    SQLAlchemy's session would surface as a store error (the run FAILED) instead of KILLED."""
    with _signals_deferred() as caught:
        try:
            return call()
        except Exception:
            if caught:
                raise KeyboardInterrupt(f"signal {caught[0]} during a store write") from None
            raise


def _retried(call: Any, give_up: Any, attempts: int = 4) -> None:
    """Call a store write, retrying a locked or unreachable store with backoff (0.5, 1, 2 s) unless
    `give_up()` says to stop (a signal arrived: the user wants out)."""
    for attempt in range(attempts):
        try:
            call()
            return
        except Exception:  # SQLite 'database is locked', a server hiccup
            if attempt == attempts - 1 or give_up():
                raise
            time.sleep(0.5 * 2**attempt)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM while a run is being closed or a store write is under way and raise the
    first afterwards; a second one raises at once (the user insists)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def defer(signum: int, frame: Any) -> None:
        caught.append(signum)
        if len(caught) > 1:
            raise KeyboardInterrupt(f"signal {signum}, a second one while closing a run or writing to the store")

    previous = {sig: signal.signal(sig, defer) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt(f"signal {caught[0]} held while closing a run or writing to the store")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (None for any other store)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
