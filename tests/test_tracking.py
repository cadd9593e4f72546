"""MLflow tracking against real MLflow: the default SQLite backend and a real `mlflow server`.

One SQLite folder and one server (started lazily on a fixed free port, so the outage test can first
find nothing listening there) are shared by the module: each costs several seconds to create.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.config import Config
from pipeline.metrics import MetricsLog
from pipeline.tracking import Tracker

LOGGER = "pipeline.tracking"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Server:
    """A real `mlflow server` on 127.0.0.1:port, in its own process group, stopped by its PID."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 90) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"mlflow server not ready in {timeout}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(self.proc.pid, sig)  # the group we created: the server and its workers
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None
        self.log.close()


class Proxy:
    """A TCP forwarder to the server that can be cut and restored: the server going away mid-run."""

    def __init__(self, target: int):
        self.port, self.target, self.conns, self._open = _free_port(), target, [], threading.Event()
        self.uri = f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        sock = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        sock.settimeout(0.1)
        self._open.set()
        self._thread = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        self._thread.start()

    def _accept(self, sock: socket.socket) -> None:
        with sock:
            while self._open.is_set():
                try:
                    client, _ = sock.accept()
                except TimeoutError:
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self.conns += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self) -> None:
        self._open.clear()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns.clear()
        self._thread.join(5)  # the listening socket is closed when its accept loop ends


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"), _free_port())
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sqlite_out(tmp_path_factory):
    """One output folder (one mlflow.db) for the SQLite tests: creating the database takes seconds."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def _cfg(out: Path, name: str) -> Config:
    cfg = Config()
    cfg.run.output_dir, cfg.run.name = str(out), name
    return cfg


def _records(stage: str, steps: range, name: str = "loss/stage1") -> list[dict]:
    return [{"stage": stage, "step": k, "time": 1_700_000_000 + k, name: 1.0 / (k + 1), "note": "text"}
            for k in steps]


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def _write_outputs(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(
        {"steps": [1, 2, 4], "models": {
            "student": {"ode_error": [0.3, 0.2, 0.1], "fd": [3.0, 2.0, 1.0], "motion_error": [0.5, 0.25, 0.0]},
            "data": {"ode_error": [None] * 3, "fd": [0.9] * 3, "motion_error": [0.0] * 3}}}))
    (run_dir / "eval.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (run_dir / "videos").mkdir(exist_ok=True)
    (run_dir / "videos" / "student_n1.gif").write_bytes(b"GIF89a")
    (run_dir / "student" / "transformer").mkdir(parents=True, exist_ok=True)
    (run_dir / "student" / "model_index.json").write_text("{}")
    (run_dir / "student" / "transformer" / "config.json").write_text("{}")


# ----------------------------------------------------------------------------- unit


@pytest.mark.parametrize("name,secret", [
    ("stage1.fd_step", False), ("stage1.optim.lr", False), ("author", False), ("keyframes", False),
    ("tokenizer_path", False), ("monkey", False), ("hf_token", True), ("db.password", True), ("passwd", True),
    ("OPENAI_API_KEY", True), ("apiKey", True), ("auth.header", True), ("client_secret", True)])
def test_is_secret_name(name, secret):
    assert tracking.is_secret_name(name) is secret


def test_flatten_params_matches_config_values():
    params = tracking.flatten_params(dataclasses.asdict(Config()))
    assert params["stage1.optim.lr"] == "0.0005"
    assert params["stage1.fd_step"] == "0.005"
    assert params["stage2.num_steps_choices"] == "[2, 4, 8, 16]"
    assert params["data.toy.frames"] == str(Config().data.toy.frames)
    long = tracking.flatten_params({"a": "x" * 10_000})["a"]
    assert len(long) == tracking.MAX_PARAM_VAL_LENGTH and long.endswith("...")


# ----------------------------------------------------------------------------- (a) default SQLite backend


def test_sqlite_default_backend_params_metrics_tags_artifacts(sqlite_out, monkeypatch):
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    cfg = _cfg(sqlite_out, "a")
    run_dir = cfg.run_dir
    tr = Tracker.start(cfg, run_dir, tags={"purpose": "test"}, flush_s=0.2)
    assert tr.uri == f"sqlite:///{sqlite_out.resolve()}/mlflow.db" and (sqlite_out / "mlflow.db").is_file()
    # 1. records as MetricsLog writes them, forwarded live and in bulk
    log = MetricsLog(run_dir / "metrics.jsonl", stream=io.StringIO())
    tr.attach(log)
    for k in range(7):
        log("stage1", k, {"loss/stage1": 1.0 / (k + 1)})
    tr.log_records(_records("stage2", range(5), "loss/student") + _records("consistency", range(3), "loss/student"))
    # 2. evaluation, figures, tags, outputs
    _write_outputs(run_dir)
    tr.log_eval(run_dir / "eval.json")
    tr.log_figures({"time/total_seconds": 12.5, "skipped": "text"}, step=0)
    tr.set_tags({"stage": "done"})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    tr.log_artifacts(tracking.run_artifacts(run_dir))
    tr.end()

    client = MlflowClient(tr.uri)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "a"
    p = run.data.params
    assert p["stage1.optim.lr"] == "0.0005" and p["stage2.num_steps_choices"] == "[2, 4, 8, 16]"
    assert p["run.name"] == "a" and p["teacher.steps"] == "1200"
    assert _steps(client, tr.run_id, "stage1/loss/stage1") == list(range(7))
    assert _steps(client, tr.run_id, "stage2/loss/student") == list(range(5))
    assert _steps(client, tr.run_id, "consistency/loss/student") == list(range(3))
    hist = client.get_metric_history(tr.run_id, "stage2/loss/student")
    assert sorted(m.timestamp for m in hist) == [(1_700_000_000 + k) * 1000 for k in range(5)]
    fd = sorted((m.step, m.value) for m in client.get_metric_history(tr.run_id, "eval/student/fd"))
    assert fd == [(1, 3.0), (2, 2.0), (4, 1.0)]
    motion = sorted((m.step, m.value) for m in client.get_metric_history(tr.run_id, "eval/student/motion_error"))
    assert motion == [(1, 0.5), (2, 0.25), (4, 0.0)]
    floor = sorted((m.step, m.value) for m in client.get_metric_history(tr.run_id, "eval/data/fd"))
    assert floor == [(1, 0.9), (2, 0.9), (4, 0.9)]
    assert client.get_metric_history(tr.run_id, "eval/data/ode_error") == []  # null: not measured, not logged
    assert "skipped" not in run.data.metrics and run.data.metrics["time/total_seconds"] == 12.5
    t = run.data.tags
    assert t["purpose"] == "test" and t["stage"] == "done" and t["ray.job_id"] == "02000000"
    assert t["mlflow.runName"] == "a"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(tracking.__file__).parent, capture_output=True,
                          text=True)
    if head.returncode == 0:
        assert t[tracking.TAG_GIT] == head.stdout.strip()
    assert t[tracking.TAG_VERSION] == importlib.metadata.version("anyflow-pipeline")
    top = {a.path for a in client.list_artifacts(tr.run_id)}
    assert top == {"config.yaml", "eval.json", "eval.png", "videos", "student"}
    assert {a.path for a in client.list_artifacts(tr.run_id, "student")} == {"student/model_index.json",
                                                                             "student/transformer"}
    assert run.info.artifact_uri.startswith((sqlite_out.resolve() / "mlartifacts").as_uri())
    assert not (run_dir / tracking.PENDING_FILE).exists()


# ----------------------------------------------------------------------------- (d) resume


def test_resume_continues_the_same_run(sqlite_out, caplog):
    cfg = _cfg(sqlite_out, "d")
    tr = Tracker.start(cfg, cfg.run_dir, system_metrics=False)
    tr.log_records(_records("teacher", range(0, 4), "loss/teacher"))
    tr.end("FAILED")
    first = tr.run_id
    assert json.loads((cfg.run_dir / tracking.RUN_FILE).read_text())["run_id"] == first

    cfg.teacher.steps = 999  # a changed value on resume: the run keeps its param, with a warning
    tr2 = Tracker.start(cfg, cfg.run_dir, system_metrics=False)
    assert tr2.run_id == first
    tr2.log_records(_records("teacher", range(4, 9), "loss/teacher"))
    tr2.end()
    client = MlflowClient(tr2.uri)
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and "anyflow.resumed" in run.data.tags
    assert run.data.params["teacher.steps"] == "1200"
    assert _steps(client, first, "teacher/loss/teacher") == list(range(9))
    assert any("teacher.steps" in w for w in _warnings(caplog))

    # another tracking URI than the stored one: a new run, and a warning that says so
    caplog.clear()
    t0 = time.monotonic()
    tr3 = Tracker.start(cfg, cfg.run_dir, tracking_uri=f"http://127.0.0.1:{_free_port()}", system_metrics=False)
    tr3.end()
    assert time.monotonic() - t0 < 10
    assert any("starting a new MLflow run" in w and first in w for w in _warnings(caplog))
    assert tr3.run_id is None


# ----------------------------------------------------------------------------- (e) secrets


def test_secrets_are_masked_in_params_tags_and_artifacts(sqlite_out, monkeypatch):
    secrets = ["hf_s3cr3t", "sk-live-123", "pw-456", "tok-789", "urlpass"]
    cfg = _cfg(sqlite_out, "e")
    tree = dataclasses.asdict(cfg)
    tree["data"]["hf_token"] = secrets[0]
    tree["cluster"] = {"api_key": secrets[1], "db_password": secrets[2], "auth": {"user": "me"},
                       "url": f"https://me:{secrets[4]}@host/x", "fd_step": 0.1}
    tr = Tracker.start(tree, cfg.run_dir, tags={"GITHUB_TOKEN": secrets[3], "keyframes": "4"},
                       system_metrics=False)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    tr.log_artifacts([cfg.run_dir / "config.yaml"])
    tr.end()

    client = MlflowClient(tr.uri)
    run = client.get_run(tr.run_id)
    p, t = run.data.params, run.data.tags
    assert p["data.hf_token"] == p["cluster.api_key"] == p["cluster.db_password"] == p["cluster.auth"] == "***"
    assert p["cluster.fd_step"] == "0.1" and p["stage1.fd_step"] == "0.005" and t["keyframes"] == "4"
    assert p["cluster.url"] == "https://***@host/x" and t["GITHUB_TOKEN"] == "***"
    text = Path(client.download_artifacts(tr.run_id, "config.yaml", str(cfg.run_dir / "dl"))).read_text()
    assert yaml.safe_load(text)["cluster"]["api_key"] == "***"
    everything = json.dumps([p, t]) + text + (cfg.run_dir / tracking.RUN_FILE).read_text()
    assert not [s for s in secrets if s in everything]


# ----------------------------------------------------------------------------- (c) server down, then up


@pytest.mark.timeout(150)
def test_unreachable_server_then_back_delivers_everything_once(server, tmp_path, caplog):
    server.stop()  # in case another test started it: this one needs nothing listening on its port
    assert not _listening(server.port)
    cfg = _cfg(tmp_path, "c")
    pending = cfg.run_dir / tracking.PENDING_FILE
    # 1. start against nothing: returns at once, offline
    t0 = time.monotonic()
    tr = Tracker.start(cfg, cfg.run_dir, tracking_uri=server.uri, retry_s=3600, flush_s=0.2, system_metrics=False)
    assert time.monotonic() - t0 < 5
    assert tr.run_id is None
    # 2. records go to the pending file, which grows; one warning
    tr.log_records(_records("stage1", range(0, 10)))
    tr.flush()
    size1 = pending.stat().st_size
    tr.log_records(_records("stage1", range(10, 20)))
    tr.set_tags({"phase": "offline"})
    tr.flush()
    assert pending.stat().st_size > size1 > 0
    assert len(_warnings(caplog)) == 1 and "unreachable" in _warnings(caplog)[0]
    # 3. the server comes up on that port; more records, then end: everything, once
    server.start()
    tr.log_records(_records("stage1", range(20, 25)))
    tr.end()
    client = MlflowClient(server.uri)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "offline"
    assert _steps(client, tr.run_id, "stage1/loss/stage1") == list(range(25))
    assert run.data.params["stage1.optim.lr"] == "0.0005"
    assert int((cfg.run_dir / tracking.OFFSET_FILE).read_text()) == pending.stat().st_size
    assert len(_warnings(caplog)) == 1


@pytest.mark.timeout(150)
def test_server_going_away_mid_run_loses_and_repeats_nothing(server, tmp_path, caplog):
    server.start()
    proxy = Proxy(server.port)
    proxy.up()
    cfg = _cfg(tmp_path, "mid")
    tr = Tracker.start(cfg, cfg.run_dir, tracking_uri=proxy.uri, retry_s=3600, flush_s=0.2, system_metrics=False)
    client = MlflowClient(server.uri)
    tr.log_records(_records("stage2", range(0, 10), "loss/student"))
    tr.flush()
    assert _steps(client, tr.run_id, "stage2/loss/student") == list(range(10))
    # 1. the server goes away: training goes on, records pile up in the pending file
    proxy.down()
    tr.log_records(_records("stage2", range(10, 20), "loss/student"))
    tr.flush()
    tr.log_records(_records("stage2", range(20, 30), "loss/student"))
    tr.flush()  # within retry_s: straight to the pending file, no network call
    assert (cfg.run_dir / tracking.PENDING_FILE).stat().st_size > 0
    assert len(_warnings(caplog)) == 1
    # 2. back: the next log call after retry_s sends the backlog, then the new records
    proxy.up()
    tr.retry_s = 0
    tr.log_records(_records("stage2", range(30, 35), "loss/student"))
    tr.flush()
    assert _steps(client, tr.run_id, "stage2/loss/student") == list(range(35))
    tr.end()
    assert client.get_run(tr.run_id).info.status == "FINISHED"
    assert _steps(client, tr.run_id, "stage2/loss/student") == list(range(35))
    proxy.down()


# ----------------------------------------------------------------------------- (b) a real server


@pytest.mark.timeout(150)
def test_real_server_run_reads_back(server, tmp_path):
    server.start()
    cfg = _cfg(tmp_path, "b")
    _write_outputs(cfg.run_dir)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    with Tracker.start(cfg, cfg.run_dir, tracking_uri=server.uri, tags={"suite": "b"}) as tr:
        tr.log_records(_records("teacher", range(12), "loss/teacher"))
        tr.log_eval(cfg.run_dir / "eval.json")
        tr.log_artifacts(tracking.run_artifacts(cfg.run_dir))
    client = MlflowClient(server.uri)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["suite"] == "b"
    assert client.get_experiment(run.info.experiment_id).name == tracking.DEFAULT_EXPERIMENT
    assert run.data.params["stage2.optim.beta1"] == "0.0"
    assert _steps(client, tr.run_id, "teacher/loss/teacher") == list(range(12))
    assert [m.step for m in client.get_metric_history(tr.run_id, "eval/student/ode_error")] == [1, 2, 4]
    assert {a.path for a in client.list_artifacts(tr.run_id)} == {"config.yaml", "eval.json", "eval.png",
                                                                  "videos", "student"}
    assert {a.path for a in client.list_artifacts(tr.run_id, "videos")} == {"videos/student_n1.gif"}


def test_file_backed_stores_keep_artifacts_beside_them_and_servers_decide(tmp_path):
    from pipeline.tracking import local_artifact_root

    db = tmp_path / "elsewhere" / "runs.db"
    assert local_artifact_root(f"sqlite:///{db}", tmp_path) == (db.parent / "mlartifacts").as_uri()
    assert local_artifact_root(f"file://{tmp_path}/mlruns", tmp_path) == (tmp_path / "mlruns" / "mlartifacts").as_uri()
    assert local_artifact_root("http://127.0.0.1:5000", tmp_path) is None
    assert local_artifact_root("databricks", tmp_path) is None


def test_the_ray_job_tag_comes_from_ray_job_submit(monkeypatch):
    from pipeline.tracking import TAG_RAY_JOB, run_tags

    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_abc"}}')
    assert run_tags()[TAG_RAY_JOB] == "raysubmit_abc"
