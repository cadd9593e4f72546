"""Benchmarks: `python -m pipeline.bench NAME [--preset toy|tiny] [--steps N] [--repeats R]`.

Prints progress, then its figures as one JSON object on the last line of stdout.

`pipeline`: the on-policy stage on Ray (`pipeline.distributed.run`) against the one-process reference
(`pipeline.reference.train_stage2`), same preset, same machine, one process, one local Ray:

    for each repeat: reference | Ray at max_policy_lag 0 | lag 1 | lag 2    (interleaved, so drift
                                                                            in machine load hits all)

Pools: 1 rollout actor, 1 scorer, 1 learner, 1 CPU and 1 torch thread each; the reference runs in
this process with 1 torch thread. Teacher and student are randomly initialised (speed does not
depend on training). Step times are steady state: the wall time between the finish of step `w`
(the warm-up) and of the last step, over the steps between; start-up is reported apart. The
object store is polled from a background thread through the raylet (`ObjectStorePoller`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from pipeline import metrics as M

FIGURES = {
    "overhead": "seconds per steady on-policy step on Ray at max_policy_lag=0 over the reference's "
                "(median of the repeats; goal <= 1.15)",
    "async_speedup": "steps per second on Ray at lag 1 and lag 2 over the reference's (medians; goal >= 1.3), "
                     "next to the ideal bound (rollout + learner seconds) / max(rollout, learner seconds) "
                     "measured at lag 0",
    "startup_s": "seconds from the start of a Ray run to the finish of its first step (Ray Data read, actors, "
                 "Ray Train workers, DeepSpeed, first step); ray_init_s: starting the local Ray",
    "rollout_nfe": "student network calls per trajectory of backward simulation, counted in the rollout actor "
                   "(mean, max; goal max <= 3), against a full N-step rollout (mean of num_steps_choices)",
    "weight_sync_s": "seconds per weight sync (the learner's publish of student + critic, sync/seconds), "
                     "against a torch clone of the same state dicts in this process (weight_copy_s, ratio)",
    "weight_sync_bytes": "bytes per weight sync (student + critic tensors; with --lora-rank the adapters only), "
                         "against weight_full_bytes, the full student + critic state",
    "object_store_bytes_per_trajectory": "object-store bytes of one trajectory (rollout + target objects, "
                                         "as Ray sized them) from polling Ray",
    "object_store_peak_bytes": "peak trajectory bytes held in the object store at once over the runs, against "
                               "object_store_capacity_bytes = ray.buffer_capacity x bytes per step",
}
TINY = [
    "model.size=tiny", "model.shift=3.0",
    "data.toy.frames=4", "data.toy.height=8", "data.toy.width=8", "data.toy.num_train=64",
    "data.toy.num_heldout=16", "data.toy.embed_dim=16", "data.toy.shard_rows=32",
    "stage2.batch_size=4", "stage2.num_steps_choices=[1, 2, 3]",
]
"""the tests' tiny world (tests/ray/conftest.py)"""
PRESETS = {"toy": ["model.size=toy"], "tiny": TINY}
POOLS = {"rollout_actors": 1, "scorer_actors": 1, "learners": 1, "rollout_cpus": 1, "scorer_cpus": 1, "learner_cpus": 1,
         "learner_threads": 1}
"""the `ray.*` pools: 1 CPU and 1 torch thread per member, so on 2 cores the rollout side (rollout actor, then
scorer) and the learner can overlap"""
RAY_CPUS = 4
"""logical CPUs of the bench's local Ray (the pools take 3; Ray Data's file listing takes 1 before them)"""
LAGS = (0, 1, 2)
THREADS = 1


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


# ----------------------------------------------------------------------------- the object store


class ObjectStorePoller(threading.Thread):
    """Polls the raylets of the running Ray for object-store use until `stop()`.

    Each poll is one `GetNodeStats` RPC per node (`ray._private.internal_api.node_stats`): its
    `store_stats` give the plasma bytes in use; with `include_memory_info` every worker lists the
    object refs it holds with their sizes, so trajectory objects are told apart by the actor that made
    them (an object ID is its task ID, whose last 16 bytes are the actor ID, then the return index;
    the actor table names the class). Trajectory objects are the first returns of calls of the
    producers (one per learner from a rollout actor and from a scorer, two per learner from a
    colocated rollout+scorer actor), not the metadata dicts returned after them.
    """

    def __init__(self, slices: int, interval_s: float = 0.2):
        super().__init__(name="bench-object-store", daemon=True)
        self.interval_s = interval_s
        self.producers = {"RolloutWorker": slices, "Scorer": slices, "RolloutScorer": 2 * slices}
        """producer class -> how many of a call's first returns are trajectory objects"""
        self._halt = threading.Event()
        self._nodes: list[tuple[str, int]] = []
        self._classes: dict[bytes, str] = {}
        self.sizes: dict[bytes, int] = {}
        """trajectory object ID -> its size (the largest any holder reported)"""
        self.peak_bytes = self.peak_total_bytes = self.polls = self.errors = 0
        self.poll_seconds = 0.0

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.poll()

    def stop(self) -> "ObjectStorePoller":
        self._halt.set()
        self.join(timeout=30)
        return self

    def poll(self) -> None:
        import ray
        from ray._private.internal_api import node_stats

        t0 = time.perf_counter()
        try:
            total, held = 0, {}
            if not self._nodes:
                self._nodes = [(n["NodeManagerAddress"], n["NodeManagerPort"]) for n in ray.nodes() if n.get("Alive")]
            for address, port in self._nodes:
                reply = node_stats(address, port, include_memory_info=True)
                total += reply.store_stats.object_store_bytes_used
                for worker in reply.core_workers_stats:
                    for ref in worker.object_refs:
                        if ref.object_size > 0 and self._is_trajectory(ref.object_id):
                            held[ref.object_id] = max(held.get(ref.object_id, 0), ref.object_size)
        except Exception:  # noqa: BLE001 - a missed poll is counted, not fatal
            self.errors += 1
            self._nodes = []
            return
        finally:
            self.poll_seconds += time.perf_counter() - t0
        self.polls += 1
        for oid, size in held.items():
            self.sizes[oid] = max(self.sizes.get(oid, 0), size)
        self.peak_bytes = max(self.peak_bytes, sum(held.values()))
        self.peak_total_bytes = max(self.peak_total_bytes, total)

    def _is_trajectory(self, object_id: bytes) -> bool:
        actor = object_id[8:24]
        if actor not in self._classes:
            import ray

            for hex_id, info in ray._private.state.actors().items():
                self._classes[bytes.fromhex(hex_id)] = info.get("ActorClassName", "")
            self._classes.setdefault(actor, "")
        return 1 <= int.from_bytes(object_id[24:28], "little") <= self.producers.get(self._classes[actor], 0)

    def bytes_per_task(self) -> dict[str, list[int]]:
        """Producer class -> the bytes of each of its calls (all objects one actor task returned)."""
        tasks: dict[bytes, int] = {}
        for oid, size in self.sizes.items():
            tasks[oid[:24]] = tasks.get(oid[:24], 0) + size
        out: dict[str, list[int]] = {}
        for task, size in tasks.items():
            out.setdefault(self._classes.get(task[8:24], ""), []).append(size)
        return out


# ----------------------------------------------------------------------------- one run each


def bench_config(preset: str, out: Path, name: str, steps: int, lag: int = 0, lora_rank: int = 0,
                 colocate: bool = False):
    from pipeline.config import load_config

    return load_config(None, [*PRESETS[preset], f"run.output_dir={out}", f"run.name={name}", "run.track=false",
                              f"stage2.steps={steps}", f"stage2.lora_rank={lora_rank}", "ray.backend=ray",
                              f"ray.max_policy_lag={lag}", f"ray.colocate={str(colocate).lower()}",
                              *(f"ray.{k}={v}" for k, v in POOLS.items())])


def steady_seconds(finish_times: list[float], warmup: int) -> float:
    """Seconds per step between the finish of step `warmup - 1` and of the last step."""
    n = len(finish_times)
    if n - warmup < 1:
        raise ValueError(f"{n} steps leave none to time after {warmup} warm-up steps")
    return (finish_times[-1] - finish_times[warmup - 1]) / (n - warmup)


def run_reference(cfg, student, teacher, data, warmup: int) -> dict:
    from pipeline import steps
    from pipeline.reference import train_stage2

    log = M.MetricsLog(None, totals={"stage2": cfg.stage2.steps})
    with steps.torch_threads(THREADS):
        train_stage2(cfg, "stage2", student, teacher, data, log)
    return {"step_s": steady_seconds([r["time"] for r in log.records], warmup)}


def run_ray(cfg, student, teacher, data_dir, warmup: int, poll_s: float) -> dict:
    """One on-policy run on Ray with the object store polled; its steady step time and figures."""
    from pipeline import distributed

    log = M.MetricsLog(None, totals={"stage2": cfg.stage2.steps})
    poller = ObjectStorePoller(cfg.ray.learners, poll_s)
    poller.start()
    t0 = time.time()
    try:
        result = distributed.run(cfg, "stage2", student, teacher, data_dir, log)
    finally:
        poller.stop()
    # step i is done when the learner has published version i + 1 (the WeightStore stamps each version)
    published = result.store_stats["published_at"]
    finish = [published[i + 1] for i in range(cfg.stage2.steps)]
    steady = log.records[warmup:]
    return {"step_s": steady_seconds(finish, warmup), "startup_s": finish[0] - t0,
            "rollout_s": _median(r.get(M.ROLLOUT_SECONDS, 0) + r.get(M.SCORE_SECONDS, 0) for r in steady),
            "learner_s": _median(r.get(M.LEARNER_SECONDS, 0) + r.get(M.SYNC_SECONDS, 0) for r in steady),
            "sync_s": [r[M.SYNC_SECONDS] for r in steady if M.SYNC_SECONDS in r],
            "pull_s": [r[M.PULL_SECONDS] for r in steady if M.PULL_SECONDS in r],
            "buffer": result.buffer_stats, "store": result.store_stats, "poller": poller}


def clone_seconds(states: list[dict], reps: int = 20) -> float:
    """Median seconds of a torch clone of every tensor of `states` (the in-memory copy a sync is held to)."""
    from pipeline import steps

    times = []
    with steps.torch_threads(THREADS):
        for _ in range(reps):
            t0 = time.perf_counter()
            copies = [{k: v.clone() for k, v in s.items()} for s in states]
            times.append(time.perf_counter() - t0)
            del copies
    return statistics.median(times)


# ----------------------------------------------------------------------------- the figures


def nfe_figures(runs: list[dict], num_steps_choices: list[int]) -> dict:
    metas = [r["buffer"].get("meta", {}) for r in runs]
    nfe = [m["nfe"] for m in metas if "nfe" in m]
    count = sum(n["count"] for n in nfe)
    mean = sum(n["mean"] * n["count"] for n in nfe) / count if count else None
    drawn = [m["num_steps"] for m in metas if "num_steps" in m]
    drawn_count = sum(n["count"] for n in drawn)
    critic = [m["nfe_critic"] for m in metas if "nfe_critic" in m]
    return {"mean": mean, "max": max((n["max"] for n in nfe), default=None), "rollouts": count,
            "critic_mean": _median(n["mean"] for n in critic),
            "full_rollout_mean": statistics.mean(num_steps_choices),
            "full_rollout_drawn_mean": (sum(n["mean"] * n["count"] for n in drawn) / drawn_count
                                        if drawn_count else None)}


def object_store_figures(runs: list[dict], cfg) -> dict:
    """Real object-store use of the trajectories (polled) against the buffer's capacity, and the buffer's own
    accounting (tensor bytes)."""
    rollout, target, both = [], [], []
    for r in runs:
        per_task = r["poller"].bytes_per_task()
        rollout += per_task.get("RolloutWorker", [])
        target += per_task.get("Scorer", [])
        both += per_task.get("RolloutScorer", [])  # colocated: one call returns rollouts and targets
    batch = cfg.stage2.batch_size
    # typical trajectory: medians; a step's bytes for the capacity: the largest call of each (a poll can
    # catch a call with some of its objects already freed, never with more)
    if both:
        per_traj, per_step = statistics.median(both) / batch, max(both)
    elif rollout and target:
        per_traj = (statistics.median(rollout) + statistics.median(target)) / batch
        per_step = max(rollout) + max(target)
    else:
        per_traj = per_step = None
    capacity = cfg.ray.buffer_capacity
    by_lag = {}
    for r in runs:
        key = f"lag{r['lag']}"
        by_lag[key] = max(by_lag.get(key, 0), r["poller"].peak_bytes)
    buf = [r["buffer"] for r in runs]
    polls = sum(r["poller"].polls for r in runs)
    return {
        "object_store_bytes_per_trajectory": per_traj,
        "object_store_peak_bytes": max(by_lag.values(), default=0),
        "object_store_capacity_bytes": capacity * per_step if per_step else None,
        "object_store": {
            "buffer_capacity_steps": capacity, "bytes_per_step": per_step, "peak_bytes_by_lag": by_lag,
            "peak_steps_by_lag": {k: v / per_step for k, v in by_lag.items()} if per_step else None,
            "peak_total_plasma_bytes": max(r["poller"].peak_total_bytes for r in runs),
            "buffer_peak_depth": max(b["peak_depth"] for b in buf),
            "buffer_bytes_per_trajectory": _median(b.get("bytes_per_trajectory") for b in buf),
            "buffer_bytes_per_step": max(b.get("bytes_per_step", 0) for b in buf),
            "polls": polls, "poll_errors": sum(r["poller"].errors for r in runs),
            "poll_s": sum(r["poller"].poll_seconds for r in runs) / max(polls, 1)}}


def timing_figures(ref: list[dict], runs: list[dict]) -> dict:
    lags = sorted({r["lag"] for r in runs})
    ray_s = {lag: [r["step_s"] for r in runs if r["lag"] == lag] for lag in lags}
    ref_s = [r["step_s"] for r in ref]
    lag0 = [r for r in runs if r["lag"] == 0]
    ideal = [(r["rollout_s"] + r["learner_s"]) / max(r["rollout_s"], r["learner_s"]) for r in lag0]
    ideal_ref = [a / max(r["rollout_s"], r["learner_s"]) for a, r in zip(ref_s, lag0)]
    overhead = [b / a for a, b in zip(ref_s, ray_s[0])]
    speedup = {f"lag{lag}": [a / b for a, b in zip(ref_s, ray_s[lag])] for lag in lags if lag}
    return {
        "overhead": _median(overhead), "overhead_values": overhead,
        "async_speedup": {**{k: _median(v) for k, v in speedup.items()}, "ideal_bound": _median(ideal),
                          "ideal_vs_reference": _median(ideal_ref),
                          "values": {**speedup, "ideal_bound": ideal, "ideal_vs_reference": ideal_ref}},
        "step_s": {"reference": ref_s, **{f"lag{lag}": v for lag, v in ray_s.items()}},
        "rollout_s": _median(r["rollout_s"] for r in lag0), "learner_s": _median(r["learner_s"] for r in lag0),
        "startup_s": _median(r["startup_s"] for r in runs), "startup_values": [r["startup_s"] for r in runs],
    }


def synced_states(cfg, student: torch.nn.Module, teacher: torch.nn.Module) -> list[dict]:
    """What one weight sync carries: the student and critic (= teacher at the start) states, or with LoRA
    their adapters (built as the learners build them)."""
    import copy

    from pipeline import steps
    from pipeline.flowmap import lora

    if steps.lora_of(cfg.stage2) is None:
        return [student.state_dict(), teacher.state_dict()]
    return [lora.adapter_state_dict(steps.with_adapters(cfg, "stage2", name, copy.deepcopy(net)))
            for name, net in (("student", student), ("critic", teacher))]


def sync_figures(runs: list[dict], states: list[dict], full_bytes: int) -> dict:
    lag0 = [r for r in runs if r["lag"] == 0]
    sync_s = _median(s for r in lag0 for s in r["sync_s"])
    copy_s = clone_seconds(states)
    stores = [r["store"] for r in lag0]
    return {"weight_sync_s": sync_s, "weight_sync_bytes": max(r["store"]["bytes_per_version"] for r in runs),
            "weight_full_bytes": full_bytes,
            "weight_copy_s": copy_s, "weight_sync_over_copy": sync_s / copy_s if sync_s and copy_s else None,
            "weight_sync_store_put_s": _median(s["put_seconds_total"] / s["publishes"] for s in stores),
            "weight_pull_s": _median(s for r in lag0 for s in r["pull_s"])}


# ----------------------------------------------------------------------------- the benchmark


def bench_pipeline(args: argparse.Namespace) -> dict:
    """Every figure of `pipeline` (FIGURES); runs and data go to --output-dir or a temporary folder."""
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="anyflow-bench-"))
    try:
        return _bench_pipeline(args, out)
    finally:
        if not args.output_dir:
            shutil.rmtree(out, ignore_errors=True)


def _bench_pipeline(args: argparse.Namespace, out: Path) -> dict:
    from pipeline import steps
    from pipeline.data.schema import read_null_embed, read_split
    from pipeline.flowmap import models
    from pipeline.stages import prepare_data

    warmup = args.warmup
    cfg = bench_config(args.preset, out, "bench", args.steps, lora_rank=args.lora_rank, colocate=args.colocate)
    data_dir = prepare_data(cfg)
    teacher = models.build_teacher(cfg.model.size, seed=cfg.model.init_seed)
    student = models.student_from_teacher(teacher)
    data = steps.TrainData.from_dataset(read_split(data_dir, "train"), read_null_embed(data_dir))
    load = [os.getloadavg()[0]]
    ray_init_s = _start_ray()
    ref, runs = [], []
    for rep in range(args.repeats):
        _say(f"repeat {rep + 1}/{args.repeats}: reference, {args.steps} steps")
        ref.append(run_reference(cfg, student, teacher, data, warmup))
        _say(f"reference: {ref[-1]['step_s']:.3f} s/step")
        for lag in args.lags:
            _say(f"repeat {rep + 1}/{args.repeats}: Ray at max_policy_lag={lag}, {args.steps} steps")
            run_cfg = bench_config(args.preset, out, f"bench-r{rep}-lag{lag}", args.steps, lag, args.lora_rank,
                                   args.colocate)
            runs.append({**run_ray(run_cfg, student, teacher, data_dir, warmup, args.poll_s), "lag": lag})
            _say(f"lag {lag}: {runs[-1]['step_s']:.3f} s/step, start-up {runs[-1]['startup_s']:.1f} s, "
                 f"object-store peak {runs[-1]['poller'].peak_bytes} B")
    load.append(os.getloadavg()[0])
    return {
        "bench": "pipeline", "preset": args.preset, "steps": args.steps, "warmup_steps": warmup,
        "repeats": args.repeats, "lags": list(args.lags), "lora_rank": args.lora_rank, "colocate": args.colocate,
        **timing_figures(ref, runs), "ray_init_s": ray_init_s,
        "rollout_nfe": nfe_figures(runs, cfg.stage2.num_steps_choices),
        **sync_figures(runs, synced_states(cfg, student, teacher),
                       sum(v.numel() * v.element_size() for m in (student, teacher) for v in m.state_dict().values())),
        **object_store_figures(runs, cfg),
        "threads": _threads(runs),
        "pools": POOLS,
        "machine": {"cpus": os.cpu_count(), "ray_cpus": RAY_CPUS, "load_avg_1m": load},
        "goals": {"overhead_max": 1.15, "async_speedup_min": 1.3, "rollout_nfe_max": 3},
    }


def _threads(runs: list[dict]) -> dict:
    meta = [r["buffer"].get("meta", {}) for r in runs]
    return {"reference": THREADS, "rollout": max((m["threads"]["max"] for m in meta if "threads" in m), default=None),
            "scorer": max((m["score_threads"]["max"] for m in meta if "score_threads" in m), default=None),
            "learner": POOLS["learner_threads"]}  # what the learners are told (ray.learner_threads)


_STARTED_RAY = False


def _start_ray() -> float:
    """Start one local Ray for the whole bench (unless one is running); its start-up seconds."""
    global _STARTED_RAY
    import ray

    if ray.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    _STARTED_RAY = True
    return time.perf_counter() - t0


def _stop_ray() -> None:
    global _STARTED_RAY
    if _STARTED_RAY:
        import ray

        ray.shutdown()
        _STARTED_RAY = False


BENCHES = {"pipeline": bench_pipeline}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    figures = "\n".join(f"  {k}: {v}" for k, v in FIGURES.items())
    p = _Parser(prog="python -m pipeline.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Benchmarks; each prints progress, then its figures as one JSON object on the last "
                            "line of stdout.\n\npipeline: the on-policy stage on Ray (--lags, default 0, 1, 2) against the "
                            "one-process reference, same preset, one process and one local Ray.",
                epilog="figures of `pipeline`:\n" + figures)
    p.add_argument("name", metavar="NAME", help=f"benchmark: {', '.join([*BENCHES, *SEPARATE])} "
                                                f"(`python -m pipeline.bench NAME --help` for theirs)")
    p.add_argument("--preset", default="toy", help="model and data: toy (the default run's) or tiny (the tests')")
    p.add_argument("--steps", type=int, default=30, help="on-policy steps per run (default 30)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of every run; timing ratios are medians")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default steps // 5)")
    p.add_argument("--lags", default=",".join(map(str, LAGS)),
                   help="policy lags to run on Ray, comma-separated; 0 must be among them (the overhead and the "
                        "ideal bound are lag-0 figures); default %(default)s")
    p.add_argument("--poll-s", type=float, default=0.2, help="object-store polling interval in seconds")
    p.add_argument("--output-dir", default="", help="where runs and data go (default: a temporary folder)")
    p.add_argument("--colocate", action="store_true",
                   help="one actor rolls out and scores (ray.colocate=true; 1 CPU, 1 thread) instead of a rollout "
                        "actor and a scorer")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train LoRA adapters of this rank (stage2.lora_rank; weight syncs then carry the adapters "
                        "only); 0: every parameter (default)")
    args = p.parse_args(argv)
    if args.name not in BENCHES:
        p.error(f"unknown benchmark {args.name!r}; choose from: {', '.join([*BENCHES, *SEPARATE])}")
    if args.preset not in PRESETS:
        p.error(f"--preset {args.preset!r}: choose from: {', '.join(PRESETS)}")
    try:
        args.lags = sorted({int(x) for x in args.lags.split(",") if x.strip()})
    except ValueError:
        p.error(f"--lags {args.lags!r}: give whole numbers separated by commas, for example 0,1,2")
    if not args.lags or args.lags[0] != 0:
        p.error(f"--lags {','.join(map(str, args.lags))}: must include 0 and no negative lag")
    if args.warmup is None:
        args.warmup = max(1, args.steps // 5)
    if args.repeats < 1 or args.poll_s <= 0 or args.warmup < 1 or args.steps - args.warmup < 2:
        p.error("need --repeats >= 1, --poll-s > 0, --warmup >= 1 and --steps >= --warmup + 2 (steps to time)")
    if args.lora_rank < 0:
        p.error(f"--lora-rank {args.lora_rank}: must be >= 0 (0: train every parameter)")
    return args


SEPARATE = {"weight_sync": "pipeline.bench_weight_sync", "ingest": "pipeline.bench_ingest"}
"""benchmarks with their own module and command line: NAME -> module (its `main(argv)`)"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SEPARATE:
        import importlib

        return importlib.import_module(SEPARATE[argv[0]]).main(argv[1:])
    args = parse_args(argv)
    try:
        figures = BENCHES[args.name](args)
    finally:
        _stop_ray()
    sys.stdout.flush()
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
