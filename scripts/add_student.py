"""Admin: give a student an account on a class's `mlflow server --app-name basic-auth` and an
experiment of their own (MANAGE for them; with `default_permission = NO_PERMISSIONS` no one else
but the admin sees it).

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD='<admin password>'
    python scripts/add_student.py alice            # asks for alice's password (12 characters or more)

The password is read from the terminal, or from the first line of stdin when it is not one, never
from the command line (other users of the machine see command lines). An existing account or
experiment is kept (its password too) and the permission set to MANAGE again, so a run that
stopped half-way can simply be repeated. The student then sets MLFLOW_TRACKING_USERNAME,
MLFLOW_TRACKING_PASSWORD and MLFLOW_EXPERIMENT_NAME=<experiment>. Standard library only: runs
wherever the server's Python does.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class AdminError(Exception):
    """A refused or failed request, already worded for the admin."""


def call(url: str, auth: str, method: str, path: str, body: dict[str, Any] | None = None, query: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One REST call as the admin: (HTTP status, decoded JSON body or {"message": text})."""
    target = f"{url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(target, data=data, method=method, headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode(errors="replace")
    except urllib.error.URLError as exc:
        raise AdminError(f"cannot reach {url}: {exc.reason}") from None
    try:
        payload = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        payload = {"message": text.strip()}
    if status == 401:
        raise AdminError(f"{url} refused the admin login (HTTP 401): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if status == 403:
        raise AdminError(f"{url} answered 403 to {path}: MLFLOW_TRACKING_USERNAME is not an admin")
    return status, payload if isinstance(payload, dict) else {}


def expect(status: int, payload: dict[str, Any], what: str) -> dict[str, Any]:
    """The payload of a successful call; anything else is one AdminError line."""
    if status != 200:
        raise AdminError(f"{what} failed (HTTP {status}): {payload.get('message', payload)}")
    return payload


def add_student(url: str, auth: str, username: str, password: str, experiment: str) -> str:
    """Create the user and the experiment when missing and grant the user MANAGE on it; returns
    the lines to print."""
    status, payload = call(url, auth, "POST", "/api/2.0/mlflow/users/create", {"username": username, "password": password})
    if status == 200:
        lines = [f"user {username} created"]
    elif payload.get("error_code") == "RESOURCE_ALREADY_EXISTS":
        lines = [f"user {username} exists; its password is unchanged"]
    else:
        raise AdminError(f"creating user {username} failed (HTTP {status}): {payload.get('message', payload)}")
    status, payload = call(url, auth, "POST", "/api/2.0/mlflow/experiments/create", {"name": experiment})
    if status == 200:
        experiment_id = payload["experiment_id"]
    elif payload.get("error_code") == "RESOURCE_ALREADY_EXISTS":
        found = call(url, auth, "GET", "/api/2.0/mlflow/experiments/get-by-name", query={"experiment_name": experiment})
        experiment_id = expect(*found, f"looking up experiment {experiment}")["experiment"]["experiment_id"]
    else:
        raise AdminError(f"creating experiment {experiment} failed (HTTP {status}): {payload.get('message', payload)}")
    target = {"username": username, "resource_type": "experiment", "resource_id": experiment_id}
    status, payload = call(url, auth, "POST", "/api/3.0/mlflow/users/permissions/grant", {**target, "permission": "MANAGE"})
    if status != 200 and payload.get("error_code") == "RESOURCE_ALREADY_EXISTS":  # an earlier grant, perhaps READ: replaced
        expect(*call(url, auth, "POST", "/api/3.0/mlflow/users/permissions/revoke", target), f"revoking {username}'s earlier grant")
        status, payload = call(url, auth, "POST", "/api/3.0/mlflow/users/permissions/grant", {**target, "permission": "MANAGE"})
    expect(status, payload, f"granting {username} experiment {experiment}")
    lines.append(f"experiment {experiment} (id {experiment_id}): MANAGE for {username}")
    lines.append(f"the student sets MLFLOW_TRACKING_USERNAME={username}, MLFLOW_TRACKING_PASSWORD and MLFLOW_EXPERIMENT_NAME={experiment}")
    return "\n".join(lines)


def read_password(username: str) -> str:
    """The student's password from the terminal (asked twice) or the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {username}: ")
        if getpass.getpass("again: ") != first:
            raise AdminError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def main() -> None:
    """Parse the arguments, read the admin's credentials from the environment, print one line per step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("username")
    parser.add_argument("--experiment", default="", help="the student's experiment (default: the user name)")
    args = parser.parse_args()
    url = os.environ.get("MLFLOW_TRACKING_URI", "").rstrip("/")
    admin, secret = os.environ.get("MLFLOW_TRACKING_USERNAME", ""), os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    try:
        if not url.startswith(("http://", "https://")) or not admin or not secret:
            raise AdminError("set MLFLOW_TRACKING_URI (http[s]://...), MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to the admin's")
        password = read_password(args.username)
        if len(password) < 12:
            raise AdminError("the student's password must have at least 12 characters")
        auth = base64.b64encode(f"{admin}:{secret}".encode()).decode()
        print(add_student(url, auth, args.username, password, args.experiment or args.username))
    except AdminError as exc:
        print(f"add_student: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
