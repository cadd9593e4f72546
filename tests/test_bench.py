"""`python -m pipeline.bench`: its command line (figures as one JSON object on the last line of stdout,
`--help`, a one-line error for an unknown NAME) and a short run on the tiny preset whose figures are all
there and sane. Timing goals are not asserted: they depend on the machine and its load."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.bench import FIGURES, ObjectStorePoller, steady_seconds

ROOT = Path(__file__).resolve().parents[1]
TINY_LATENT = (4, 4, 8, 8)
"""(F, C, H, W) of the tiny preset's toy world"""


def _bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_figure():
    out = _bench("--help")
    assert out.returncode == 0, out.stderr
    for name in FIGURES:
        assert name in out.stdout, name


@pytest.mark.parametrize("args", [["nope"], ["pipeline", "--preset", "huge"], ["pipeline", "--lora-rank", "-1"],
                                  ["pipeline", "--lags", "1,2"], ["pipeline", "--lags", "0,x"],
                                  ["weight_sync", "--size", "huge"], ["weight_sync", "--repeats", "0"],
                                  ["ingest", "--rows", "0"]])
def test_an_unknown_name_or_preset_is_one_line_on_stderr_and_status_2(args):
    out = _bench(*args, timeout=120)  # weight_sync's --size check imports diffusers (slow on a loaded machine)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and args[-1] in out.stderr, out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 16])
def test_the_rollout_counter_counts_the_backward_simulation_plan_and_a_full_rollout_n_calls(num_steps):
    import torch

    from actors.rollout import CallCounter
    from pipeline.flowmap.simulate import anystep_sample, backward_simulate, backward_simulation_plan

    counter = CallCounter(lambda z, t, r, cond: torch.zeros_like(z))
    noise, cond = torch.randn(2, 1, 1, 2, 2), torch.zeros(2, 1, 1)
    for k in range(num_steps):
        counter.calls = 0
        backward_simulate(counter, noise, cond, num_steps, k, 3.0)
        assert counter.calls == len(backward_simulation_plan(num_steps, k, 3.0)) <= 3
    counter.calls = 0
    anystep_sample(counter, noise, cond, num_steps, 3.0)
    assert counter.calls == num_steps


def test_steady_seconds_is_the_time_from_the_last_warm_up_step_to_the_last_step_per_step():
    finish = [10.0, 10.5, 11.0, 12.0, 13.0]
    assert steady_seconds(finish, warmup=1) == (13.0 - 10.0) / 4
    assert steady_seconds(finish, warmup=3) == (13.0 - 11.0) / 2
    with pytest.raises(ValueError, match="none to time"):
        steady_seconds(finish, warmup=5)


def test_the_poller_counts_the_slices_of_rollout_and_scorer_calls_by_the_actor_in_the_object_id():
    rollout, scorer, store = (bytes([i]) * 16 for i in (1, 2, 3))
    poller = ObjectStorePoller(slices=2)
    poller._classes = {rollout: "RolloutWorker", scorer: "Scorer", store: "WeightStore"}

    def oid(task: int, actor: bytes, index: int) -> bytes:  # task ID (8 unique bytes + actor ID), return index
        return bytes([task]) * 8 + actor + index.to_bytes(4, "little")

    assert [poller._is_trajectory(oid(7, rollout, i)) for i in (1, 2, 3)] == [True, True, False]  # 3: metadata
    assert poller._is_trajectory(oid(7, scorer, 1)) and not poller._is_trajectory(oid(7, store, 1))
    poller.sizes = {oid(7, rollout, 1): 100, oid(7, rollout, 2): 50, oid(8, rollout, 1): 70, oid(9, scorer, 1): 30}
    assert sorted(poller.bytes_per_task()["RolloutWorker"]) == [70, 150]
    assert poller.bytes_per_task()["Scorer"] == [30]


def _tiny_weight_bytes() -> int:
    from pipeline.flowmap import models

    teacher = models.build_teacher("tiny", seed=0)
    student = models.student_from_teacher(teacher)
    return sum(t.numel() * t.element_size() for m in (student, teacher) for t in m.state_dict().values())


@pytest.mark.ray
def test_the_pipeline_bench_on_the_tiny_preset_reports_every_figure_sane(tmp_path):
    # lags 0 and 1 (the default adds 2: the same asynchronous path with a wider bound, and one more Ray
    # session of about 35 s in the suite)
    out = _bench("pipeline", "--preset", "tiny", "--steps", "6", "--repeats", "1", "--lags", "0,1",
                 "--output-dir", str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("[bench]") for line in lines[:-1]), "no progress before the figures"
    fig = json.loads(lines[-1])
    assert set(FIGURES) <= set(fig), set(FIGURES) - set(fig)

    # timing: positive ratios of positive step times; the ideal overlap bound lies in [1, 2]
    assert fig["lags"] == [0, 1] and set(fig["step_s"]) == {"reference", "lag0", "lag1"}
    assert all(t > 0 for ts in fig["step_s"].values() for t in ts) and len(fig["step_s"]["lag1"]) == 1
    assert fig["overhead"] > 0 and fig["async_speedup"]["lag1"] > 0 and "lag2" not in fig["async_speedup"]
    assert 1 <= fig["async_speedup"]["ideal_bound"] <= 2
    assert fig["startup_s"] > 0 and fig["ray_init_s"] > 0
    assert fig["threads"] == {"reference": 1, "rollout": 1, "scorer": 1, "learner": 1}

    # network calls: backward simulation makes 1 to 3 calls per trajectory; num_steps_choices=[1, 2, 3]
    nfe = fig["rollout_nfe"]
    assert 1 <= nfe["mean"] <= nfe["max"] <= 3 and nfe["rollouts"] == 2 * 6
    assert nfe["full_rollout_mean"] == 2 and 1 <= nfe["full_rollout_drawn_mean"] <= 3

    # weight sync: the bytes are exactly the student's and the critic's tensors
    assert fig["weight_sync_bytes"] == fig["weight_full_bytes"] == _tiny_weight_bytes() and fig["lora_rank"] == 0
    assert fig["weight_sync_s"] > 0 and fig["weight_copy_s"] > 0 and fig["weight_sync_over_copy"] > 0

    # object store: a trajectory is x_old, x_crit and y (float32) plus serialisation overhead;
    # the polled peak is positive and within the buffer's capacity
    tensor_bytes = 3 * math.prod(TINY_LATENT) * 4
    store = fig["object_store"]
    assert store["buffer_bytes_per_trajectory"] == tensor_bytes
    assert tensor_bytes <= fig["object_store_bytes_per_trajectory"] <= 1.2 * tensor_bytes
    assert fig["object_store_capacity_bytes"] == store["buffer_capacity_steps"] * store["bytes_per_step"]
    assert 0 < fig["object_store_peak_bytes"] <= fig["object_store_capacity_bytes"]
    assert store["polls"] > 0 and store["buffer_peak_depth"] <= store["buffer_capacity_steps"]


def test_weight_sync_at_the_tiny_size_prints_its_figures_and_the_weights_arrive_bit_exact():
    """`python -m pipeline.bench weight_sync` on the tiny shape: the JSON contract, bytes against the
    networks built the ordinary way, and the follower's weights checked against the published ones."""
    import torch

    from pipeline.flowmap import lora, models

    out = _bench("weight_sync", "--size", "tiny", "--repeats", "2", "--lora-ranks", "2", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("model_size", "dtype", "bytes", "sync_s", "copy_s", "ratio", "peak_rss_bytes", "lora_bytes",
                "lora_sync_s", "publish_s", "load_s", "legacy_sync_s"):
        assert key in fig, key
    teacher = models.build_teacher("tiny", seed=0).to(torch.bfloat16)
    student = models.student_from_teacher(teacher)
    assert fig["model_size"] == "tiny" and fig["dtype"] == "bfloat16" and fig["bit_exact"] is True
    assert fig["bytes"] == sum(v.numel() * 2 for net in (student, teacher) for v in net.state_dict().values())
    adapters = sum(v.numel() * 2 for net in (student, teacher)
                   for v in lora.adapter_parameters(lora.add_adapters(net, lora.LoraSettings(2, 2.0),
                                                                      torch.Generator().manual_seed(0))).values())
    assert fig["lora_bytes"] == {"2": adapters}
    assert fig["ratio"] == pytest.approx(fig["sync_s"] / fig["copy_s"])
    assert all(math.isfinite(fig[k]) and fig[k] > 0 for k in ("sync_s", "copy_s", "publish_s", "load_s"))
    assert fig["sync_s"] >= fig["publish_s"] and fig["lora_sync_s"]["2"] > 0
    assert fig["peak_rss_bytes"] > fig["bytes"]


def test_ingest_at_a_tiny_size_prints_flat_streaming_figures_and_each_step_holds_its_rows_only(tmp_path):
    """`python -m pipeline.bench ingest` on tiny rows (the streaming path only, to stay fast): the JSON
    contract, the learner held one step's rows at a time, and the datasets are cleaned up."""
    out = _bench("ingest", "--rows", "16", "--scale", "2", "--row-mb", "0.05", "--steps", "3", "--batch-size", "2",
                 "--no-old", "--output-dir", str(tmp_path / "ingest"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    assert fig["rows"] == {"1x": 16, "2x": 32} and fig["row_bytes"] > 0.04 * 2**20
    for key in ("stream_1x", "stream_2x"):
        assert fig["peak_rss_bytes"][key] >= fig["base_rss_bytes"][key] > 0
        assert fig["steps_per_s"][key] > 0 and 1 <= fig["max_held_rows"][key] <= 2
    assert fig["stream_peak_ratio"] > 0 and "whole_peak_ratio" not in fig
    assert not (tmp_path / "ingest").exists()
