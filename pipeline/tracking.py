"""MLflow tracking of a pipeline run: one MLflow run per run folder (driver process only).

    tracker = Tracker.start(cfg, cfg.run_dir, tracking_uri=None)   # or `with Tracker.start(...) as tracker:`
    tracker.attach(log)                     # forward every MetricsLog record as it is written
    tracker.log_eval(run_dir / "eval.json")
    tracker.log_artifacts(run_artifacts(run_dir))
    tracker.end()                           # or end("FAILED")

Only the driver imports this module; `pipeline/flowmap` and `pipeline/data` never do.

Backend. `tracking_uri` (the driver passes it when it has one), else `MLFLOW_TRACKING_URI`, else a
SQLite file `sqlite:///<output_dir>/mlflow.db` with artifacts under `<output_dir>/mlartifacts` (any SQLite
or file store keeps its artifacts in `mlartifacts/` beside it).

What is logged. Params: the resolved config, nested keys flattened (`stage1.optim.lr`), lists as
JSON strings, values cut to MLflow's length limit. Tags: `anyflow.version` (the installed
`anyflow-pipeline`), `mlflow.source.git.commit` (when `git rev-parse HEAD` works in the repo),
`ray.job_id` (env `RAY_JOB_ID`, the submission id `ray job submit` passes in the job config, or
Ray's runtime context when Ray is already imported and
initialised; Ray is never imported here), the run name (`mlflow.runName`), plus the caller's.
System metrics (`system/...`) through MLflow's own monitor when psutil is installed.

Metric keys and steps. A MetricsLog record `{"stage": S, "step": k, "time": t, NAME: v, ...}` is
logged as metric `S/NAME` (for example `stage2/loss/student`) at step `k`, timestamp `t`: each
stage has its own curves, stage2 and the consistency baseline (which share metric names) are
never mixed, and a resumed stage lands on the same steps, which needs no state. Non-numeric values
are skipped. `log_figures` logs keys as given; `log_eval` logs `eval/<model>/<metric>` at
step = the number of sampling steps.

Batching. Records are queued in memory (never a network call on the caller's thread) and a
background thread sends them with `MlflowClient.log_batch` every `batch_size` records or `flush_s`
seconds, whichever comes first; `flush()` sends now, `end()` sends the rest.

Resume. `<run_dir>/mlflow_run.json` holds the run id, the tracking URI (credentials masked) and
the experiment; `Tracker.start` with the same run folder and URI continues that run (status back
to RUNNING, metrics appended, params already there kept). A different URI starts a new run, with
a warning (an unsent backlog then goes to the new run).

Faults. If the backend cannot be reached at start or stops answering mid-run, training goes on:
one `logging.warning`, and what could not be sent is appended to `<run_dir>/mlflow_pending.jsonl`
(one request per line). Every later flush (at most every `retry_s` seconds, ~30 s) and `end()`
retry; the backlog is sent first, in order, and `<run_dir>/mlflow_pending.offset` (bytes of the
backlog already sent) moves after each line, so nothing is lost or sent twice, also across a
crash and a later `Tracker.start`. A request the server rejects (4xx) is dropped with a warning
instead of blocking the queue. Network calls are bounded: unless already set,
`MLFLOW_HTTP_REQUEST_MAX_RETRIES=0` and `MLFLOW_HTTP_REQUEST_TIMEOUT=10` (seconds) are put in the
environment, so an unreachable server costs one connection attempt, not minutes of back-off.

Secrets. Config keys, tag names and YAML keys whose name parts (split on `.`, `_`, `-`, `/`,
camelCase) include token, secret, password, passwd, auth, credential(s) or an `api`/`access`/
`private`/... + `key` pair have their values replaced by `***`; `user:password@` in URLs is
masked. `config.yaml` is uploaded as a masked copy.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

logger = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
PENDING_FILE = "mlflow_pending.jsonl"
OFFSET_FILE = "mlflow_pending.offset"
DEFAULT_EXPERIMENT = "anyflow"
ARTIFACTS = ("config.yaml", "eval.json", "eval.png", "videos", "student")
"""what `run_artifacts` picks from a run folder"""
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MASK = "***"
TAG_VERSION, TAG_GIT, TAG_RAY_JOB = "anyflow.version", "mlflow.source.git.commit", "ray.job_id"

# ----------------------------------------------------------------------------- secrets

_SECRET_WORDS = {"token", "tokens", "secret", "secrets", "password", "passwords", "passwd", "pwd", "auth",
                 "authorization", "credential", "credentials", "apikey", "accesskey", "privatekey", "secretkey"}
_KEY_OWNERS = {"api", "access", "private", "secret", "ssh", "signing", "encryption", "client"}
_URL_CREDS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def name_parts(name: str) -> list[str]:
    """`stage1.fd_step` -> [stage1, fd, step]; `hfToken` -> [hf, token]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(name))
    return [p for p in re.split(r"[^a-zA-Z0-9]+", spaced.lower()) if p]


def is_secret_name(name: str) -> bool:
    """True for names like `hf_token`, `db.password`, `OPENAI_API_KEY`, `auth.header`; not `fd_step`."""
    parts = name_parts(name)
    pairs = zip(parts, parts[1:])
    return any(p in _SECRET_WORDS for p in parts) or any(a in _KEY_OWNERS and b == "key" for a, b in pairs)


def mask_url_credentials(text: str) -> str:
    """`https://user:pw@host/x` -> `https://***@host/x`."""
    return _URL_CREDS.sub(lambda m: m.group("scheme") + MASK + "@", text)


def mask_secrets(tree: Any, name: str = "") -> Any:
    """A copy of a nested dict/list with secret-named values masked and URL credentials removed."""
    if name and is_secret_name(name):
        return MASK
    if isinstance(tree, Mapping):
        return {k: mask_secrets(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [mask_secrets(v) for v in tree]
    return mask_url_credentials(tree) if isinstance(tree, str) else tree


# ----------------------------------------------------------------------------- params, tags, metrics


def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"stage1.optim.lr": "0.0005", ...}: lists as JSON, secrets masked, long values cut."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if is_secret_name(str(k)):
            out[key] = MASK
        elif isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        else:
            text = json.dumps(mask_secrets(v)) if isinstance(v, (list, tuple)) else mask_url_credentials(str(v))
            out[key] = text if len(text) <= MAX_PARAM_VAL_LENGTH else text[:MAX_PARAM_VAL_LENGTH - 3] + "..."
    return out


def record_metrics(record: Mapping) -> list[list]:
    """A MetricsLog record -> [[f"{stage}/{name}", value, timestamp_ms, step], ...] (numbers only)."""
    stage, step = record["stage"], int(record["step"])
    ts = int(float(record.get("time", time.time())) * 1000)
    return [[f"{stage}/{k}", float(v), ts, step] for k, v in record.items()
            if k not in ("stage", "step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)]


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent.parent,
                              capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def _ray_job_id() -> str | None:
    if os.environ.get("RAY_JOB_ID"):
        return os.environ["RAY_JOB_ID"]
    # `ray job submit` hands the driver its submission id in the job config, not as RAY_JOB_ID
    try:
        submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        if submitted.get("metadata", {}).get("job_submission_id"):
            return str(submitted["metadata"]["job_submission_id"])
    except (json.JSONDecodeError, AttributeError):
        pass
    ray = sys.modules.get("ray")  # only if the driver already imported it; never import Ray here
    try:
        if ray is not None and ray.is_initialized():
            return str(ray.get_runtime_context().get_job_id())
    except Exception:  # noqa: BLE001 - a tag is not worth failing a run
        return None
    return None


def local_artifact_root(uri: str, output_dir: Path) -> str | None:
    """Where a file-backed store keeps artifacts: `mlartifacts/` next to its SQLite file (or in its
    folder), so they live with the run and not in whatever the working directory is (under `ray
    job submit` that is a temporary copy); None for a server, which decides itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    if uri.startswith(("file:", "/", "./", "../")):
        base = uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):] if uri.startswith("file:") else uri
        return (Path(base).resolve() / "mlartifacts").as_uri()
    return None


def run_tags() -> dict[str, str]:
    """The project version, the git commit and the Ray job id, where known."""
    tags = {}
    try:
        tags[TAG_VERSION] = importlib.metadata.version("anyflow-pipeline")
    except importlib.metadata.PackageNotFoundError:
        pass
    for key, value in ((TAG_GIT, _git_commit()), (TAG_RAY_JOB, _ray_job_id())):
        if value:
            tags[key] = value
    return tags


def run_artifacts(run_dir: str | Path) -> list[Path]:
    """The outputs of a run folder worth uploading (those of ARTIFACTS that exist)."""
    return [Path(run_dir) / n for n in ARTIFACTS if (Path(run_dir) / n).exists()]


def resolve_tracking_uri(output_dir: str | Path, tracking_uri: str | None = None) -> str:
    """`tracking_uri`, else `MLFLOW_TRACKING_URI`, else `sqlite:///<output_dir>/mlflow.db` (absolute)."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve()}/mlflow.db"


def _rejected(exc: BaseException) -> bool:
    """The server answered and refused this request (4xx): retrying will not help."""
    return isinstance(exc, MlflowException) and 400 <= exc.get_http_status_code() < 500 \
        and exc.get_http_status_code() not in (408, 429)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the tracker


class Tracker:
    """One MLflow run per run folder, fed from the driver; never raises into training after `start`."""

    def __init__(self, run_dir: Path, uri: str, experiment: str, run_name: str, params: dict[str, str],
                 tags: dict[str, str], artifact_location: str | None = None, resume_id: str | None = None,
                 batch_size: int = 100, flush_s: float = 5.0, retry_s: float = 30.0,
                 system_metrics: bool = False):
        self.run_dir, self.uri, self.experiment, self.run_name = Path(run_dir), uri, experiment, run_name
        self.params, self.tags, self.artifact_location = params, tags, artifact_location
        self.batch_size, self.flush_s, self.retry_s = batch_size, flush_s, retry_s
        self.system_metrics = system_metrics
        self.run_id: str | None = None
        self._connected = False  # run created or resumed, params logged
        self.pending_path = self.run_dir / PENDING_FILE
        self.client = MlflowClient(uri)
        self._resume_id = resume_id
        self._queue: list[dict] = []
        self._queued = 0
        self._lock = threading.Lock()  # guards the queue (held for microseconds)
        self._io = threading.Lock()  # one sender at a time
        self._online = False
        self._warned: set[str] = set()
        self._last_try = -math.inf
        self._sysmon = None
        self._ended = False
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    # -- construction

    @classmethod
    def start(cls, cfg, run_dir: str | Path | None = None, tags: Mapping[str, str] | None = None, *,
              tracking_uri: str | None = None, experiment: str | None = None, batch_size: int = 100,
              flush_s: float = 5.0, retry_s: float = 30.0, system_metrics: bool | None = None) -> "Tracker":
        """Start (or resume) the MLflow run of `run_dir` (default `cfg.run_dir`) and the sender thread.

        `cfg` is a `Config` (or its dict); `tracking_uri` is passed by the driver when it has one;
        `experiment` defaults to `MLFLOW_EXPERIMENT_NAME`, else "anyflow"; `system_metrics=None`
        turns MLflow's system metrics on when psutil is installed. Returns within about
        `MLFLOW_HTTP_REQUEST_TIMEOUT` seconds even when the server is down (it then works offline).
        """
        for name, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        tree = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
        run_dir = Path(run_dir) if run_dir is not None else Path(tree["run"]["output_dir"]) / tree["run"]["name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        output_dir = Path(tree["run"]["output_dir"])
        uri = resolve_tracking_uri(output_dir, tracking_uri)
        artifacts = local_artifact_root(uri, output_dir)
        if system_metrics is None:
            system_metrics = importlib.util.find_spec("psutil") is not None
        self = cls(run_dir, uri, experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
                   str(tree["run"]["name"]), flatten_params(tree),
                   {**run_tags(), **mask_secrets(dict(tags or {}))},
                   artifacts,
                   cls._stored_run_id(run_dir, uri), batch_size, flush_s, retry_s, system_metrics)
        self.flush(force=True)  # connect now: create or resume the run, send any old backlog
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _stored_run_id(run_dir: Path, uri: str) -> str | None:
        stored = _read_json(run_dir / RUN_FILE)
        if not stored.get("run_id"):
            return None
        if stored.get("tracking_uri") != mask_url_credentials(uri):
            logger.warning("MLflow: %s holds run %s of %s but the tracking URI is now %s: starting a new "
                           "MLflow run", run_dir / RUN_FILE, stored["run_id"], stored.get("tracking_uri"),
                           mask_url_credentials(uri))
            return None
        return stored["run_id"]

    def _connect(self) -> None:
        """Resume the stored run or create one; log params and tags; start system metrics."""
        run = self._resume(self._resume_id) if self._resume_id else None
        resumed = run is not None
        if resumed:
            self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = self.client.create_run(self._experiment_id(), run_name=self.run_name, tags=self.tags)
        self.run_id = self._resume_id = run.info.run_id
        self._log_params(run.data.params, resumed)
        _write_atomic(self.run_dir / RUN_FILE, json.dumps(
            {"run_id": self.run_id, "tracking_uri": mask_url_credentials(self.uri), "experiment": self.experiment,
             "experiment_id": run.info.experiment_id}, indent=1))
        self._connected = True
        self._start_system_metrics(resumed)

    def _resume(self, run_id: str):
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if not _rejected(exc):
                raise
            logger.warning("MLflow: run %s (from %s) is not on %s: starting a new run", run_id, RUN_FILE,
                           mask_url_credentials(self.uri))
            return None
        if run.info.lifecycle_stage == "deleted":
            logger.warning("MLflow: run %s was deleted: starting a new run", run_id)
            return None
        self.client.set_tag(run_id, "anyflow.resumed", time.strftime("%Y-%m-%d %H:%M:%S"))
        return run

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)
            except MlflowException:  # created meanwhile by another driver
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _log_params(self, existing: Mapping[str, str], resumed: bool) -> None:
        """Params are immutable in MLflow: on resume only new keys are logged, changed ones reported."""
        changed = sorted(k for k, v in self.params.items() if k in existing and existing[k] != v)
        if changed:
            logger.warning("MLflow: run %s keeps its original values of %s (changed in this config)",
                           self.run_id, ", ".join(changed))
        new = [Param(k, v) for k, v in self.params.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        if resumed:  # tags are mutable: refresh the commit, job id and the caller's tags
            tags = [RunTag(k, v) for k, v in self.tags.items()]
            for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=tags[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def _start_system_metrics(self, resumed: bool) -> None:
        if not self.system_metrics or (self._sysmon is not None and self._sysmon._process is not None
                                       and self._sysmon._process.is_alive()):
            return
        try:  # what mlflow.start_run(log_system_metrics=True) does, for a run held by a client
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._sysmon = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.uri)
            self._sysmon.start()
        except Exception as exc:  # noqa: BLE001 - optional feature
            self._sysmon = None
            self._warn_once("sysmon", "MLflow: system metrics are off (%s)", exc)

    # -- logging (all of it queued; nothing here waits for the network)

    def on_record(self, record: Mapping) -> None:
        """Sink for MetricsLog records: queue their figures (see the module doc for keys and steps)."""
        if self._ended:
            return
        try:
            self._enqueue_metrics(record_metrics(record))
        except Exception as exc:  # noqa: BLE001 - tracking must not stop training
            self._warn_once("record", "MLflow: could not queue a metrics record (%s); skipping such records", exc)

    def attach(self, log) -> None:
        """Forward every record that `log` (a MetricsLog) writes from now on to `on_record`."""
        log.records = _ForwardingList(log.records, self.on_record)

    def log_records(self, records: Iterable[Mapping]) -> None:
        """Queue many MetricsLog records (for example `read_metrics(run_dir / "metrics.jsonl")`)."""
        for rec in records:
            self.on_record(rec)

    def log_figures(self, figures: Mapping[str, Any], step: int) -> None:
        """Queue `{key: number}` as metrics at `step` (keys as given; non-numbers skipped)."""
        ts = int(time.time() * 1000)
        self._enqueue_metrics([[k, float(v), ts, int(step)] for k, v in figures.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)])

    def log_eval(self, result: Mapping | str | Path) -> None:
        """eval.json (or its dict) as `eval/<model>/<metric>` with step = number of sampling steps."""
        if not isinstance(result, Mapping):
            result = json.loads(Path(result).read_text())
        for i, n in enumerate(result["steps"]):
            self.log_figures({f"eval/{model}/{metric}": values[i] for model, figs in result["models"].items()
                              for metric, values in figs.items()}, step=n)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue tags (secret-named ones masked)."""
        self._enqueue({"kind": "tags", "tags": {k: str(v) for k, v in mask_secrets(dict(tags)).items()}})

    def log_artifacts(self, paths: Iterable[str | Path]) -> None:
        """Upload files (at the artifact root) and folders (under their own name), in order with the
        metrics; sent now when the backend is up, else kept in the backlog like everything else."""
        self._enqueue({"kind": "artifacts", "paths": [str(Path(p).resolve()) for p in paths]})
        self.flush()

    def _enqueue_metrics(self, metrics: list[list]) -> None:
        if not metrics:
            return
        with self._lock:
            for m in metrics:  # one queue entry = one log_batch request
                last = self._queue[-1] if self._queue else None
                if last is None or last["kind"] != "metrics" or len(last["metrics"]) >= MAX_METRICS_PER_BATCH:
                    last = {"kind": "metrics", "metrics": []}
                    self._queue.append(last)
                last["metrics"].append(m)
            self._queued += len(metrics)
            full = self._queued >= self.batch_size
        if full:
            self._wake.set()

    def _enqueue(self, entry: dict) -> None:
        with self._lock:
            self._queue.append(entry)

    # -- sending

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            self.flush()

    def flush(self, force: bool = False) -> None:
        """Send what is queued now (backlog first). Offline, retry at most every `retry_s` unless `force`."""
        with self._io:
            with self._lock:
                entries, self._queue, self._queued = self._queue, [], 0
            if not self._online and not force and time.monotonic() - self._last_try < self.retry_s:
                return self._spill(entries)
            try:
                if not self._online:
                    self._last_try = time.monotonic()
                    if not self._connected:
                        self._connect()
                    self._send_backlog()
                    if "offline" in self._warned:
                        logger.info("MLflow: %s answers again; backlog sent", mask_url_credentials(self.uri))
                    self._online = True
                    self._start_system_metrics(resumed=True)
            except Exception as exc:  # noqa: BLE001 - unreachable: keep everything for later
                return self._offline(exc, entries)
            for i, entry in enumerate(entries):
                try:
                    self._send(entry)
                except Exception as exc:  # noqa: BLE001
                    return self._offline(exc, entries[i:])

    def _offline(self, exc: BaseException, unsent: list[dict]) -> None:
        self._online = False
        self._last_try = time.monotonic()
        self._spill(unsent)
        self._warn_once("offline", "MLflow: tracking backend %s unreachable (%s); training goes on, records are "
                        "kept in %s and sent when it answers again", mask_url_credentials(self.uri),
                        str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__, self.pending_path)

    def _spill(self, entries: list[dict]) -> None:
        if entries:
            with open(self.pending_path, "a") as f:
                f.write("".join(json.dumps(e) + "\n" for e in entries))

    def _send_backlog(self) -> None:
        """Send the pending file from the stored offset, moving the offset after each line."""
        if not self.pending_path.is_file():
            return
        offset_path = self.run_dir / OFFSET_FILE
        try:
            offset = int(offset_path.read_text())
        except (OSError, ValueError):
            offset = 0
        with open(self.pending_path, "rb") as f:
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a torn last line (crash while writing): never complete, never sent
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if entry is not None:
                    self._send(entry)
                offset += len(line)
                _write_atomic(offset_path, str(offset))

    def _send(self, entry: dict) -> None:
        """One request; a 4xx answer drops the entry with a warning (retrying would not help)."""
        try:
            if entry["kind"] == "metrics":
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step)
                                                            for k, v, ts, step in entry["metrics"]])
            elif entry["kind"] == "tags":
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in entry["tags"].items()])
            elif entry["kind"] == "artifacts":
                self._upload(entry["paths"])
        except MlflowException as exc:
            if not _rejected(exc):
                raise
            logger.warning("MLflow: dropped a %s request the server refused: %s", entry["kind"], exc)

    def _upload(self, paths: list[str]) -> None:
        for p in map(Path, paths):
            if not p.exists():
                logger.warning("MLflow: artifact %s is gone; skipped", p)
            elif p.is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path=p.name)
            elif p.suffix in (".yaml", ".yml"):
                with tempfile.TemporaryDirectory() as tmp:  # never upload a secret: a masked copy
                    masked = Path(tmp) / p.name
                    masked.write_text(yaml.safe_dump(mask_secrets(yaml.safe_load(p.read_text())), sort_keys=False))
                    self.client.log_artifact(self.run_id, str(masked))
            else:
                self.client.log_artifact(self.run_id, str(p))

    def _warn_once(self, what: str, msg: str, *args) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(msg, *args)

    # -- the end

    def end(self, status: str = "FINISHED") -> None:
        """Send everything (one forced retry if offline) and close the run with `status`."""
        if self._ended:
            return
        self._ended = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self.flush(force=True)
        if self._sysmon is not None:
            self._sysmon.finish()
        if self._online:
            try:
                self.client.set_terminated(self.run_id, status)
                return
            except Exception as exc:  # noqa: BLE001
                self._online = False
                self._warn_once("offline", "MLflow: could not close run %s (%s)", self.run_id, exc)
        logger.warning("MLflow: backend %s still unreachable at the end; the unsent records stay in %s and are "
                       "sent by the next Tracker.start with this run folder", mask_url_credentials(self.uri),
                       self.pending_path)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")


class _ForwardingList(list):
    """MetricsLog.records that also hands each appended record to a sink."""

    def __init__(self, items, sink):
        super().__init__(items)
        self.sink = sink

    def append(self, item) -> None:
        super().append(item)
        self.sink(item)
