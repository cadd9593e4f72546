"""One local Ray cluster for the whole test session (4 logical CPUs, bound to 127.0.0.1), and the
tiny on-policy setup the Ray tests share (a toy world of 4 frames x 4 x 8 x 8, a random tiny teacher)."""

import pytest

TINY = [
    "model.size=tiny", "model.shift=3.0",
    "data.toy.frames=4", "data.toy.height=8", "data.toy.width=8", "data.toy.num_train=64",
    "data.toy.num_heldout=16", "data.toy.embed_dim=16", "data.toy.shard_rows=32",
    "stage2.batch_size=4", "stage2.num_steps_choices=[1, 2, 3]",
    # exercise the warm-up schedules and the EMA's decay within the tests' 20 steps
    "stage2.optim.warmup=5", "stage2.optim.ema_start=5", "stage2.critic_optim.warmup=3",
    # small pools: 4 logical CPUs hold every pool with one to spare (the learners' row stream takes 0 CPUs)
    "ray.backend=ray", "ray.colocate=false", "ray.rollout_cpus=0.5", "ray.scorer_cpus=0.5", "ray.learner_cpus=0.75",
    # strictly on-policy unless a test says otherwise: the reference comparisons need lag 0
    "ray.max_policy_lag=0", "ray.learner_threads=1",
]
CLUSTER_CPUS = 4


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # log_to_driver=False: workers' logs (a fault drill's traceback, say) would otherwise reach
    # the stderr of whichever later test is running when they arrive
    ray.init(address="local", num_cpus=CLUSTER_CPUS, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """(config overrides, data folder, teacher, student): a random tiny teacher and its converted student."""
    from pipeline.config import load_config
    from pipeline.flowmap import models
    from pipeline.stages import prepare_data

    out = tmp_path_factory.mktemp("ray_runs")
    base = [*TINY, f"run.output_dir={out}"]
    data_dir = prepare_data(load_config(None, base))
    teacher = models.build_teacher("tiny", seed=0)
    return base, data_dir, teacher, models.student_from_teacher(teacher)



def reference_stage2(cfg, data_dir, student, teacher):
    """The one-process stage 2 on the dataset at `data_dir`, in one torch thread (as the Ray roles run):
    (per-step figures, (student EMA, critic)), what the lag-0 equivalence tests compare against."""
    from pipeline import reference, steps
    from pipeline.data.schema import read_null_embed, read_split

    data = reference.TrainData.from_dataset(read_split(data_dir, "train"), read_null_embed(data_dir))
    figures = []
    with steps.torch_threads(1):
        nets = reference.train_stage2(cfg, "stage2", student, teacher, data, lambda s, i, f: figures.append(f))
    return figures, nets


@pytest.fixture
def learner_fault_run(tiny_world, tmp_path, monkeypatch):
    """`run(cfg, after_step)`: see `_run_through_a_learner_fault`."""
    return lambda cfg, after_step: _run_through_a_learner_fault(cfg, tiny_world, tmp_path / "fault-fired",
                                                                monkeypatch, after_step)


def _run_through_a_learner_fault(cfg, tiny_world, marker, monkeypatch, after_step: int):
    """A stage-2 session whose learner rank 0 fails once after `after_step` (the fault drill); checks that
    the drill fired, every step was logged once and Ray Train restarted the group once. Returns
    (per-step figures, the session's result)."""
    from learners.session import FAULT_ENV
    from pipeline import distributed
    from pipeline.metrics import LEARNER_RESTARTS

    _, data_dir, teacher, student = tiny_world
    monkeypatch.setenv(FAULT_ENV, f"stage2:{after_step}:{marker}")
    records = []
    out = distributed.train_session(cfg, ["stage2"], {"student_stage1": student, "teacher": teacher}, data_dir,
                                    lambda s, i, f: records.append((i, f)), fresh=True)
    assert marker.exists(), "the fault drill did not fire"
    assert [i for i, _ in records] == list(range(cfg.stage2.steps)), [i for i, _ in records]
    assert out.stats["stage2"]["hub"].get(LEARNER_RESTARTS) == 1
    return [f for _, f in records], out
