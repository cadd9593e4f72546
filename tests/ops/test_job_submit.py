"""`ray job submit` of the smoke preset to a real Ray head with token authentication, tracked in MLflow.

What runs (all real, all on 127.0.0.1, nothing shared with other Ray clusters on the machine):

1. `RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<file> ray start --head --block ...` as a subprocess, with
   its own `--temp-dir` (so no other `ray.init()` finds it) and ports picked here.
2. The job-submission API refuses requests without the token (401) or with a wrong one (403), by
   plain HTTP and through the `ray job` CLI.
3. `ray job submit --working-dir <repo> -- python -m pipeline.run --config smoke ...` with the token,
   waited on until SUCCEEDED (logs in the failure message otherwise).
4. The MLflow run in the SQLite store: FINISHED, the config as params, per-step metrics of every
   stage, eval metrics against sampling steps, the artifacts.

The fixture stops exactly the processes this cluster started, by PID (never `ray stop`).

How Ray 2.60 token authentication works (read from ray/_private/authentication/*.py,
ray/scripts/scripts.py, ray/dashboard/http_server_head.py, ray/dashboard/modules/dashboard_sdk.py):
`RAY_AUTH_MODE=token` in the environment of `ray start` turns it on for every Ray process (GCS and
raylet gRPC, the dashboard's HTTP API); the token is read, first match wins, from `RAY_AUTH_TOKEN`,
the file named by `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token` (`ray get-auth-token [--generate]`
prints / creates that one); `ray start` refuses to start in token mode without one. HTTP clients send
`Authorization: Bearer <token>` (the `ray job` CLI and `JobSubmissionClient` add it themselves when
their own environment has `RAY_AUTH_MODE=token` and a token source; otherwise pass `--headers`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))

START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 480
CLI_TIMEOUT_S = 120
STOP_GRACE_S = 10
"""seconds the cluster's processes get after SIGTERM before SIGKILL (ours alone, by PID; some Ray
processes never exit on SIGTERM, and waiting 30 s for them cost every run 30 s)"""

EXCLUDES = [".git", ".benchmarks", ".pytest_cache", "runs", "mlruns", "**/__pycache__", "*.egg-info", "*.db"]
"""not uploaded with the working dir (Ray's upload also honours .gitignore)"""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(START_TIMEOUT_S + JOB_TIMEOUT_S + 300)]


@dataclass
class RayHead:
    proc: subprocess.Popen
    temp_dir: Path
    token_path: Path
    dashboard: str  # http://127.0.0.1:PORT
    env: dict  # environment that carries the token (what an operator's shell would have)
    log: Path

    def token(self) -> str:
        return self.token_path.read_text().strip()

    def cli(self, *args: str, env: dict | None = None, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env if env is None else env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _http_status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _clean_env() -> dict:
    """This process's environment without anything that would point Ray or MLflow elsewhere."""
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                "RAY_JOB_HEADERS", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        env.pop(key, None)
    return env


def _cluster_pids(temp_dir: Path, root: int) -> set[int]:
    """The `ray start --block` process, its descendants, and any process naming our temp dir."""
    import psutil

    pids: set[int] = set()
    try:
        parent = psutil.Process(root)
        pids.add(root)
        pids.update(p.pid for p in parent.children(recursive=True))
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(temp_dir) in arg for arg in (p.info["cmdline"] or [])):
                pids.add(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    pids.discard(os.getpid())
    return pids


def _stop_cluster(head: RayHead) -> list[str]:
    """SIGTERM every process of this cluster at once (the block process, its descendants, anything naming
    our temp dir: all recorded by PID), wait until they are gone or STOP_GRACE_S passes, then SIGKILL what
    is left; returns what it had to kill. (Waiting for `ray start --block` to stop its children one by
    one took about a minute.)"""
    import psutil

    def alive(pids):
        out = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    known = _cluster_pids(head.temp_dir, head.proc.pid)  # recorded before anything exits
    for p in alive(known):
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    left = alive(known)
    while left and time.monotonic() < deadline:
        head.proc.poll()  # reap the block process if it exited
        time.sleep(0.5)
        left = alive(known | _cluster_pids(head.temp_dir, head.proc.pid))
    killed = []
    for p in left:
        try:
            what = f"{p.pid} {' '.join(p.cmdline())[:120] or p.name()}"
            p.kill()
            killed.append(what)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
    if head.proc.poll() is None:
        head.proc.wait(10)
    return killed


@pytest.fixture
def ray_head():
    """A Ray head with token authentication, alone in its temp dir and ports; stopped by PID afterwards."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: unix socket paths are limited
    token_path = temp_dir / "auth_token"
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    gcs, dash, client, agent_http, agent_grpc, metrics, renv, node_mgr, obj_mgr = _free_ports(9)
    env = {**_clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    log = temp_dir / "ray_start.log"
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
           "--min-worker-port=0", "--max-worker-port=0",  # workers take OS-assigned ports
           "--num-cpus=4", "--num-gpus=0", f"--object-store-memory={512 * 1024 ** 2}",
           "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    head = RayHead(proc, temp_dir, token_path, f"http://127.0.0.1:{dash}", env, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{head.log_tail()}")
            try:
                if _http_status(f"{head.dashboard}/api/jobs/", head.token()) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head's job API did not answer within {START_TIMEOUT_S}s:\n{head.log_tail()}")
            time.sleep(1)
        yield head
    finally:
        killed = _stop_cluster(head)
        if killed:
            print("killed leftover processes of the test cluster:\n  " + "\n  ".join(killed))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_client(head: RayHead):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard, headers={"Authorization": f"Bearer {head.token()}"})


def _wait_for_job(client, job_id: str, timeout: float):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            return status
        time.sleep(2)


def test_job_submit_with_token_auth_tracks_the_run(ray_head, tmp_path):
    import mlflow

    from pipeline.config import load_config, to_dict
    from pipeline.tracking import DEFAULT_EXPERIMENT, flatten_params

    head = ray_head
    token = head.token()
    jobs_url = f"{head.dashboard}/api/jobs/"

    # --- auth is really on: no token or a wrong one is refused, over HTTP and through the CLI
    assert _http_status(jobs_url) == 401
    assert _http_status(jobs_url, "0" * 64) == 403
    assert _http_status(jobs_url, token) == 200
    no_token = {**_clean_env(), "RAY_AUTH_MODE": "disabled"}
    wrong_token = {**_clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    for env, what in ((no_token, "Authentication required"), (wrong_token, "Authentication failed")):
        refused = head.cli("job", "submit", "--address", head.dashboard, "--no-wait", "--", "python", "-c", "pass",
                           env=env)
        assert refused.returncode != 0 and what in refused.stdout + refused.stderr, (
            f"ray job submit was not refused ({what!r} expected):\n{refused.stdout}\n{refused.stderr}")
    client = _job_client(head)
    assert client.list_jobs() == [], "a refused submission created a job"

    # --- the smoke run as a Ray job, with the token from the environment (RAY_AUTH_TOKEN_PATH)
    # MLflow's default backend: SQLite at <output_dir>/mlflow.db, artifacts under <output_dir>/mlartifacts.
    # (An explicit run.tracking_uri=sqlite:///... would put the artifacts under the job's working dir,
    # inside Ray's temp dir, which goes away with the cluster: tracking.py sets the artifact location
    # only for its default backend.)
    out_dir = tmp_path / "runs"
    name = "smoke-job"
    db = out_dir / "mlflow.db"
    overrides = [f"run.output_dir={out_dir}", f"run.name={name}"]
    job_id = f"anyflow-smoke-{secrets.token_hex(4)}"
    submit = head.cli("job", "submit", "--address", head.dashboard, "--submission-id", job_id, "--no-wait",
                      "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
                      "--", "python", "-m", "pipeline.run", "--config", "smoke", *overrides)
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout}\n{submit.stderr}"
    t0 = time.monotonic()
    status = _wait_for_job(client, job_id, JOB_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    logs = client.get_job_logs(job_id)
    assert str(status) == "SUCCEEDED", (
        f"job {job_id} ended {status} after {elapsed:.0f}s (limit {JOB_TIMEOUT_S}s); last job logs:\n{logs[-8000:]}"
        f"\n--- ray start log:\n{head.log_tail(2000)}")
    info = client.get_job_info(job_id)
    print(f"job {job_id} (driver job id {info.job_id}) SUCCEEDED in {elapsed:.0f}s")

    run_dir = out_dir / name
    for f in ("config.yaml", "eval.json", "eval.png", "student/model_index.json"):
        assert (run_dir / f).is_file(), f"{f} missing from {run_dir}; job logs:\n{logs[-4000:]}"
    cfg = load_config("smoke", overrides)
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["steps"] == cfg.eval.steps

    # --- the MLflow run
    tracker = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = tracker.get_experiment_by_name(DEFAULT_EXPERIMENT)
    assert exp is not None, f"no experiment {DEFAULT_EXPERIMENT!r} in {db}"
    runs = tracker.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == rid

    # params: the whole resolved config, flattened
    expected = flatten_params(to_dict(cfg))
    assert run.data.params == expected, {k: (run.data.params.get(k), v) for k, v in expected.items()
                                         if run.data.params.get(k) != v}
    assert run.data.params["model.size"] == "tiny" and run.data.params["run.name"] == name

    # per-step metrics: one point per training step of every stage
    for stage, metric in (("teacher", "loss/teacher"), ("stage1", "loss/stage1"), ("stage2", "loss/student"),
                          ("consistency", "loss/student")):
        history = tracker.get_metric_history(rid, f"{stage}/{metric}")
        steps = getattr(cfg, stage).steps
        assert sorted(m.step for m in history) == list(range(steps)), f"{stage}/{metric}: {len(history)} points"

    # eval: every model and metric of eval.json, at step = number of sampling steps (None: not logged)
    for model, figs in result["models"].items():
        for metric, values in figs.items():
            history = sorted(tracker.get_metric_history(rid, f"eval/{model}/{metric}"), key=lambda m: m.step)
            measured = [(s, v) for s, v in zip(cfg.eval.steps, values) if v is not None]
            assert [m.step for m in history] == [s for s, _ in measured], f"eval/{model}/{metric}"
            assert [m.value for m in history] == pytest.approx([v for _, v in measured], rel=1e-6)
    assert {"teacher", "student", "consistency", "data"} <= set(result["models"])

    # artifacts: under the run's output dir (not in the job's temporary working dir), all there
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    artifact_root = Path(get_artifact_repository(run.info.artifact_uri).artifact_dir)
    assert artifact_root.is_relative_to(out_dir / "mlartifacts"), run.info.artifact_uri
    top = {a.path for a in tracker.list_artifacts(rid)}
    assert {"config.yaml", "eval.json", "eval.png", "student"} <= top, top
    student = {a.path for a in tracker.list_artifacts(rid, "student")}
    assert {"student/model_index.json", "student/transformer"} <= student, student
    local = Path(tracker.download_artifacts(rid, "eval.json", str(tmp_path)))
    assert json.loads(local.read_text()) == result

    # tags: the project version, and the Ray job id where the tracker could see it
    assert run.data.tags.get("anyflow.version")
    # ray.job_id: pipeline/tracking.py reads RAY_JOB_ID (which Ray strips from a submitted driver's
    # environment) or the runtime context of an already initialised Ray; where it is set, it must name this job
    ray_job_tag = run.data.tags.get("ray.job_id")
    print(f"MLflow run {rid}: ray.job_id tag = {ray_job_tag!r}")
    if ray_job_tag is not None:
        assert ray_job_tag in {job_id, info.job_id}, (ray_job_tag, job_id, info.job_id)
