"""A class's server with access control: `mlflow server --app-name basic-auth` on PostgreSQL (runs
in one database, users and permissions in another), loopback only, `default_permission =
NO_PERMISSIONS`, the admin password from MLFLOW_AUTH_ADMIN_PASSWORD and two students made by
scripts/add_student.py. Every check is a real HTTP request or one of the project's commands run as
a student; the dataset-named experiments (breastmnist, pneumoniamnist) belong to the admin, as they
belong to whoever ran first for every other user of a class server. One server serves the whole
module; each test sets up what it reads.

Skipped (with the reason) where the PostgreSQL server binaries are missing; `.ci/run` installs them.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests.conftest import REPO, cli_env, run_step
from tests.test_team_server import running_postgres, serve

pytestmark = pytest.mark.server

ADMIN = "admin"
STUDENTS = ("alice", "bob")
REFUSED = "Permission denied"  # the basic-auth app's whole 403 body


@dataclass
class ClassServer:
    """A running class server and who may use it."""

    url: str
    artifacts: Path
    store: str  # the tracking store's SQLAlchemy URI
    auth_store: str  # the users and permissions database
    admin_password: str
    secret_key: str
    passwords: dict[str, str]
    experiments: dict[str, str]  # student -> id of the experiment add_student.py made for them

    def who(self, name: str) -> tuple[str, str]:
        """The (user, password) pair of a student or the admin."""
        return name, self.admin_password if name == ADMIN else self.passwords[name]


def psycopg2_dsn(uri: str) -> str:
    """A libpq URI from a SQLAlchemy `postgresql+psycopg2://` one."""
    return uri.replace("postgresql+psycopg2://", "postgresql://", 1)


def sql(uri: str, statement: str, autocommit: bool = False) -> list[tuple]:
    """Run one SQL statement on a PostgreSQL database; its rows (empty for statements without any)."""
    import psycopg2

    with contextlib.closing(psycopg2.connect(psycopg2_dsn(uri))) as db:
        db.autocommit = autocommit
        with db.cursor() as cursor:
            cursor.execute(statement)
            rows = cursor.fetchall() if cursor.description else []
        if not autocommit:
            db.commit()
    return rows


def add_student(url: str, admin_password: str, name: str, password: str) -> str:
    """Run the documented admin script for one student; the id of the experiment it granted."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": admin_password}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "add_student.py"), name], input=f"{password}\n", env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"user {name} created" in done.stdout and password not in done.stdout + done.stderr
    return re.search(rf"experiment {name} \(id (\d+)\): MANAGE for {name}", done.stdout).group(1)


@pytest.fixture(scope="module")
def class_server(tmp_path_factory) -> Iterator[ClassServer]:
    """The server, its admin and two students, each with an experiment of their own."""
    folder = tmp_path_factory.mktemp("class-server")
    with running_postgres() as store:
        sql(store, "CREATE DATABASE mlflow_auth", autocommit=True)
        auth_store = store.rsplit("/", 1)[0] + "/mlflow_auth"
        config = folder / "basic_auth.ini"
        config.write_text(
            f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = {auth_store}\nadmin_username = {ADMIN}\nauth_cache_ttl_seconds = 60\n"
        )  # as docs/operations.md advises: one password hash per login and minute
        admin_password, secret_key = secrets.token_urlsafe(18), secrets.token_hex(24)
        env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key}
        with serve(["--app-name", "basic-auth"], store, folder, env) as (url, artifacts):
            passwords = {name: f"{name}-{secrets.token_urlsafe(15)}" for name in STUDENTS}
            experiments = {name: add_student(url, admin_password, name, passwords[name]) for name in STUDENTS}
            for dataset in ("breastmnist", "pneumoniamnist"):  # the dataset experiments are someone else's, as for all but one student
                ok(requests.post(f"{url}/api/2.0/mlflow/experiments/create", json={"name": dataset}, auth=(ADMIN, admin_password), timeout=60))
            yield ClassServer(url, artifacts, store, auth_store, admin_password, secret_key, passwords, experiments)


def api(server: ClassServer, method: str, path: str, as_user: str | tuple[str, str] | None, **kwargs: Any) -> requests.Response:
    """One HTTP request to the server as a user (a name of ADMIN/STUDENTS, an explicit (user,
    password) pair, or None for no credentials at all)."""
    auth = server.who(as_user) if isinstance(as_user, str) else as_user
    return requests.request(method, f"{server.url}{path}", auth=auth, timeout=60, **kwargs)


def ok(response: requests.Response) -> dict[str, Any]:
    """The JSON body of a 200 response."""
    assert response.status_code == 200, f"{response.request.method} {response.url}: {response.status_code} {response.text[:300]}"
    return response.json() if response.text.strip() else {}


def new_run(server: ClassServer, name: str, tags: dict[str, str]) -> str:
    """A RUNNING run in the student's own experiment, created over REST as that student."""
    body = {"experiment_id": server.experiments[name], "tags": [{"key": k, "value": v} for k, v in tags.items()]}
    return ok(api(server, "POST", "/api/2.0/mlflow/runs/create", name, json=body))["run"]["info"]["run_id"]


def get_run(server: ClassServer, run_id: str, as_user: str = ADMIN) -> dict[str, Any]:
    """A run's JSON as the server returns it."""
    return ok(api(server, "GET", "/api/2.0/mlflow/runs/get", as_user, params={"run_id": run_id}))["run"]


def student_env(server: ClassServer, name: str, data_root: Path, tmp_path: Path, password: str | None = None, login_in_uri: bool = False) -> dict[str, str]:
    """A subprocess environment for a student's commands: the server, their login (in the two
    variables, or written into the URI) and experiment, synthetic data, and no way to fetch
    ImageNet weights (the smoke study skips that step)."""
    password = password or server.passwords[name]
    uri = server.url.replace("://", f"://{name}:{password}@", 1) if login_in_uri else server.url
    env = cli_env(data_root, uri, MLFLOW_EXPERIMENT_NAME=name, TORCH_HOME=str(tmp_path / "no-weights"), https_proxy="http://127.0.0.1:9", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    if not login_in_uri:
        env.update(MLFLOW_TRACKING_USERNAME=name, MLFLOW_TRACKING_PASSWORD=password)
    return env


def run_count(server: ClassServer) -> int:
    """How many runs the tracking store holds, read from PostgreSQL itself."""
    return sql(server.store, "SELECT count(*) FROM runs")[0][0]


def test_no_or_wrong_credentials_are_refused_with_401(class_server):
    server = class_server
    alice_experiment = server.experiments["alice"]
    requests_tried = [
        ("POST", "/api/2.0/mlflow/experiments/search", {"json": {"max_results": 100}}),
        ("GET", "/api/2.0/mlflow/experiments/get", {"params": {"experiment_id": alice_experiment}}),
        ("POST", "/api/2.0/mlflow/runs/create", {"json": {"experiment_id": alice_experiment}}),
        ("GET", "/api/2.0/mlflow-artifacts/artifacts", {"params": {"path": alice_experiment}}),
        ("POST", "/api/2.0/mlflow/users/create", {"json": {"username": "mallory", "password": "mallory-password-1"}}),
    ]
    logins = [None, ("alice", "not-alices-password"), ("alice", server.passwords["bob"]), ("mallory", server.passwords["alice"]), (ADMIN, server.passwords["alice"])]
    runs_before = run_count(server)
    for login in logins:
        for method, path, kwargs in requests_tried:
            response = api(server, method, path, login, **kwargs)
            assert response.status_code == 401, (login and login[0], method, path, response.status_code)
            assert response.headers["WWW-Authenticate"] == 'Basic realm="mlflow"'
            assert "You are not authenticated" in response.text and "alice" not in response.text
    assert run_count(server) == runs_before
    users = [u["username"] for u in ok(api(server, "GET", "/api/2.0/mlflow/users/list", ADMIN))["users"]]
    assert sorted(users) == sorted([ADMIN, *STUDENTS])  # mallory was never created
    assert ok(api(server, "GET", "/api/2.0/mlflow/users/current", "alice"))["user"]["username"] == "alice"


def test_a_student_can_neither_read_nor_change_nor_delete_anothers_experiment_runs_or_artifacts(class_server):
    server = class_server
    bob_experiment = server.experiments["bob"]
    run_id = new_run(server, "bob", {"stage": "baseline", "dataset": "breastmnist"})
    ok(
        api(
            server,
            "POST",
            "/api/2.0/mlflow/runs/log-batch",
            "bob",
            json={"run_id": run_id, "params": [{"key": "lr", "value": "0.001"}], "metrics": [{"key": "test_auroc", "value": 0.81, "timestamp": 1, "step": 0}]},
        )
    )
    artifact = f"/api/2.0/mlflow-artifacts/artifacts/{bob_experiment}/{run_id}/artifacts/predictions/test.csv"
    content = b"index,label,logit,prob\n0,1,2.0,0.88\n"
    ok(api(server, "PUT", artifact, "bob", data=content))
    on_disk = server.artifacts / bob_experiment / run_id / "artifacts" / "predictions" / "test.csv"
    assert on_disk.read_bytes() == content
    experiment_before = ok(api(server, "GET", "/api/2.0/mlflow/experiments/get", "bob", params={"experiment_id": bob_experiment}))
    run_before = get_run(server, run_id, "bob")

    attempts = {
        "read the experiment": ("GET", "/api/2.0/mlflow/experiments/get", {"params": {"experiment_id": bob_experiment}}),
        "read it by name": ("GET", "/api/2.0/mlflow/experiments/get-by-name", {"params": {"experiment_name": "bob"}}),
        "rename it": ("POST", "/api/2.0/mlflow/experiments/update", {"json": {"experiment_id": bob_experiment, "new_name": "alice-now"}}),
        "tag it": ("POST", "/api/2.0/mlflow/experiments/set-experiment-tag", {"json": {"experiment_id": bob_experiment, "key": "owner", "value": "alice"}}),
        "delete it": ("POST", "/api/2.0/mlflow/experiments/delete", {"json": {"experiment_id": bob_experiment}}),
        "start a run in it": ("POST", "/api/2.0/mlflow/runs/create", {"json": {"experiment_id": bob_experiment}}),
        "read the run": ("GET", "/api/2.0/mlflow/runs/get", {"params": {"run_id": run_id}}),
        "read a metric's history": ("GET", "/api/2.0/mlflow/metrics/get-history", {"params": {"run_id": run_id, "metric_key": "test_auroc"}}),
        "tag the run": ("POST", "/api/2.0/mlflow/runs/set-tag", {"json": {"run_id": run_id, "key": "stage", "value": "forged"}}),
        "log to the run": (
            "POST",
            "/api/2.0/mlflow/runs/log-batch",
            {"json": {"run_id": run_id, "metrics": [{"key": "test_auroc", "value": 0.99, "timestamp": 2, "step": 0}]}},
        ),
        "end the run": ("POST", "/api/2.0/mlflow/runs/update", {"json": {"run_id": run_id, "status": "KILLED"}}),
        "delete the run": ("POST", "/api/2.0/mlflow/runs/delete", {"json": {"run_id": run_id}}),
        "list the run's artifacts": ("GET", "/api/2.0/mlflow/artifacts/list", {"params": {"run_id": run_id}}),
        "list them through the proxy": ("GET", "/api/2.0/mlflow-artifacts/artifacts", {"params": {"path": f"{bob_experiment}/{run_id}/artifacts"}}),
        "download an artifact through the proxy": ("GET", artifact, {}),
        "download it through the UI's route": ("GET", "/get-artifact", {"params": {"run_id": run_id, "path": "predictions/test.csv"}}),
        "overwrite it": ("PUT", artifact, {"data": b"forged"}),
        "delete it through the proxy": ("DELETE", artifact, {}),
    }
    observed = {what: api(server, method, path, "alice", **kwargs) for what, (method, path, kwargs) in attempts.items()}
    assert {what: r.status_code for what, r in observed.items()} == {what: 403 for what in attempts}
    for response in observed.values():  # refused without a word about the experiment, the run or the file
        assert response.text == REFUSED

    # Searches answer, with nothing of Bob's in them.
    listed = ok(api(server, "POST", "/api/2.0/mlflow/experiments/search", "alice", json={"max_results": 1000}))
    assert bob_experiment not in {e["experiment_id"] for e in listed.get("experiments", [])}
    assert server.experiments["alice"] in {e["experiment_id"] for e in listed["experiments"]}
    found = ok(api(server, "POST", "/api/2.0/mlflow/runs/search", "alice", json={"experiment_ids": [bob_experiment]}))
    assert found.get("runs", []) == []

    # Nothing changed: Bob and the artifact folder see exactly what was there before.
    assert ok(api(server, "GET", "/api/2.0/mlflow/experiments/get", "bob", params={"experiment_id": bob_experiment})) == experiment_before
    assert get_run(server, run_id, "bob") == run_before
    assert run_before["info"]["status"] == "RUNNING" and "alice" not in str(run_before)
    assert api(server, "GET", artifact, "bob").content == content and on_disk.read_bytes() == content
    assert len(ok(api(server, "GET", "/api/2.0/mlflow/metrics/get-history", "bob", params={"run_id": run_id, "metric_key": "test_auroc"}))["metrics"]) == 1


def test_add_student_can_be_repeated_and_needs_the_admin(class_server):
    server = class_server
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": server.admin_password}
    script = [sys.executable, str(REPO / "scripts" / "add_student.py"), "alice"]
    again = subprocess.run(script, input="another-password-1\n", env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[:2] == ["user alice exists; its password is unchanged", f"experiment alice (id {server.experiments['alice']}): MANAGE for alice"]
    assert ok(api(server, "GET", "/api/2.0/mlflow/users/current", "alice"))["user"]["username"] == "alice"
    as_student = {**env, "MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": server.passwords["bob"]}
    refused = subprocess.run([*script[:2], "carol"], input="carols-password-1\n", env=as_student, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"add_student: error: {server.url} answered 403 to /api/2.0/mlflow/users/create: MLFLOW_TRACKING_USERNAME is not an admin"
    ]
    assert "carol" not in [u["username"] for u in ok(api(server, "GET", "/api/2.0/mlflow/users/list", ADMIN))["users"]]


def secrets_of(server: ClassServer) -> list[str]:
    """Every credential string: passwords, the URI and Basic-header forms of each login, the server's secret key."""
    found = [server.admin_password, server.secret_key]
    for name in (ADMIN, *STUDENTS):
        user, password = server.who(name)
        found += [password, f"{user}:{password}", base64.b64encode(f"{user}:{password}".encode()).decode()]
    return found


def database_text(uri: str) -> str:
    """Every row of every table of a PostgreSQL database, as text."""
    tables = [t for (t,) in sql(uri, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
    return "\n".join(str(row[0]) for table in tables for row in sql(uri, f'SELECT t::text FROM "{table}" t'))


def files_holding(folders: list[Path], needles: list[str]) -> list[str]:
    """The files under `folders` that contain any of `needles` (bytes compared, binaries included)."""
    hits = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                hits += [f"{path}: {needle[:4]}..." for needle in needles if needle.encode() in data]
    return hits


def test_the_projects_commands_work_as_a_student_and_leave_no_credential(class_server, synthetic_root, tmp_path):
    server = class_server
    env = student_env(server, "alice", synthetic_root, tmp_path)
    reports, results = tmp_path / "reports", tmp_path / "results"
    steps = [
        ("baseline", ["--dataset", "breastmnist", "--epochs", "2", "--batch-size", "32"], env),
        ("study", ["--dataset", "breastmnist", "--profile", "smoke", "--out", str(reports / "study")], env),
        (
            "compare",
            ["--dataset", "breastmnist", "--out", str(reports / "compare"), "--export-results", "handin", "--results-root", str(results)],
            student_env(server, "alice", synthetic_root, tmp_path, login_in_uri=True),
        ),
        ("runs", ["clean-stale"], env),
    ]
    for step, args, step_env in steps:
        done = run_step(step, args, step_env, tmp_path)
        assert done.returncode == 0, f"{step}: {done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, step
        assert server.passwords["alice"] not in done.stdout + done.stderr, f"{step} printed the password"  # MLflow's run links too
    assert "no stale runs" in done.stdout

    mine = ok(api(server, "POST", "/api/2.0/mlflow/runs/search", "alice", json={"experiment_ids": [server.experiments["alice"]], "max_results": 1000}))["runs"]
    stages = {next((t["value"] for t in r["data"].get("tags", []) if t["key"] == "stage"), None) for r in mine}
    assert {"baseline", "study", "compare", "ssl_pretrain", "linear_probe"} <= stages
    assert all(r["info"]["status"] == "FINISHED" for r in mine)
    assert all(r["info"]["artifact_uri"].startswith(f"mlflow-artifacts:/{server.experiments['alice']}/") for r in mine)
    assert (reports / "compare" / "breastmnist" / "draft.md").read_text().count("## Reproducibility checklist") == 1
    handed_in = list(results.rglob("handin"))
    assert handed_in and any(p.is_file() for folder in handed_in for p in folder.rglob("*"))
    # Bob sees none of it.
    assert api(server, "GET", "/api/2.0/mlflow/runs/get", "bob", params={"run_id": mine[0]["info"]["run_id"]}).status_code == 403
    assert ok(api(server, "POST", "/api/2.0/mlflow/runs/search", "bob", json={"experiment_ids": [server.experiments["alice"]]})).get("runs", []) == []

    # No credential anywhere: the tracking store, the user store (only hashes), artifacts, reports and hand-in folders.
    needles = secrets_of(server)
    store_text = database_text(server.store)
    assert mine[0]["info"]["run_id"] in store_text and "test_auroc" in store_text  # the search reads the runs
    assert [n[:4] for n in needles if n in store_text] == []
    assert [n[:4] for n in needles if n in database_text(server.auth_store)] == []
    assert len(list(server.artifacts.rglob("*.pt"))) > 0
    assert files_holding([server.artifacts, reports, results], needles) == []


def test_a_wrong_password_is_one_line_and_leaves_no_run(class_server, synthetic_root, tmp_path):
    server = class_server
    runs_before = run_count(server)
    wrong = f"wrong-{secrets.token_urlsafe(12)}"
    for login_in_uri in (False, True):
        env = student_env(server, "alice", synthetic_root, tmp_path, password=wrong, login_in_uri=login_in_uri)
        done = run_step("baseline", ["--dataset", "breastmnist", "--epochs", "1"], env, tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
        assert lines[0].startswith("medmnist-ssl baseline: error: ") and "401" in lines[0] and "MLFLOW_TRACKING_PASSWORD" in lines[0]
        assert wrong not in done.stdout + done.stderr
    assert run_count(server) == runs_before


def test_someone_elses_experiment_is_one_line_and_leaves_no_run(class_server, synthetic_root, tmp_path):
    server = class_server
    runs_before = run_count(server)
    env = student_env(server, "bob", synthetic_root, tmp_path)
    env.pop("MLFLOW_EXPERIMENT_NAME")  # standalone runs then go to the dataset's experiment, which is not Bob's
    done = run_step("baseline", ["--dataset", "pneumoniamnist", "--epochs", "1"], env, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert "pneumoniamnist" in lines[0] and "403" in lines[0] and "MLFLOW_EXPERIMENT_NAME" in lines[0]
    assert run_count(server) == runs_before


def test_clean_stale_marks_only_the_students_own_runs(class_server, synthetic_root, tmp_path):
    server = class_server
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = {"host": socket.gethostname(), "pid": str(gone.pid), "stage": "baseline", "dataset": "breastmnist"}
    alices, bobs = new_run(server, "alice", stale), new_run(server, "bob", stale)
    grant = {"username": "alice", "resource_type": "experiment", "resource_id": server.experiments["bob"]}
    ok(api(server, "POST", "/api/3.0/mlflow/users/permissions/grant", ADMIN, json={**grant, "permission": "READ"}))
    try:
        assert get_run(server, bobs, "alice")["info"]["status"] == "RUNNING"  # Alice may now read Bob's run
        done = run_step("runs", ["clean-stale"], student_env(server, "alice", synthetic_root, tmp_path), tmp_path)
    finally:
        ok(api(server, "POST", "/api/3.0/mlflow/users/permissions/revoke", ADMIN, json=grant))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith(f"marked KILLED  {alices}") for line in lines), done.stdout
    assert any(line.startswith(f"not yours      {bobs}") and "403" in line for line in lines), done.stdout
    assert "1 stale run(s) marked KILLED; 1 left alone: not yours to change" in lines[-1]
    assert get_run(server, alices)["info"]["status"] == "KILLED"
    untouched = get_run(server, bobs)
    assert untouched["info"]["status"] == "RUNNING"
    assert "failure_reason" not in {t["key"] for t in untouched["data"]["tags"]}
