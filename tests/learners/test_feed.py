"""Streaming ingestion without Ray (learners/feed.py, pipeline/data/rows.py): rows by global index equal
`read_split`'s, the row plan's indices are the real draws', and a learner's `StreamedRows` serves a step's
rows exactly as the whole split does while holding only that step's rows."""

import pytest
import torch

from learners.feed import StreamedRows, plan_items
from pipeline import steps
from pipeline.config import load_config
from pipeline.data.rows import RowReader, read_plan_rows, read_prompt_embeds
from pipeline.data.schema import LatentDataset, read_null_embed, read_split, write_dataset

N, LATENT, EMBED = 37, (2, 3, 4, 4), (5, 6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    g = torch.Generator().manual_seed(0)

    def rows(n, first):
        return LatentDataset(torch.randn(n, *LATENT, generator=g), torch.randn(n, *EMBED, generator=g),
                             [f"p{i}" for i in range(first, first + n)], torch.arange(first, first + n))

    folder = tmp_path_factory.mktemp("feed") / "data"
    # shards of 16 rows in row groups of 5: rows cross shard and row-group borders
    write_dataset(folder, rows(N, 0), rows(4, 1000), torch.randn(*EMBED, generator=g),
                  {"generator": {"name": "test", "seed": 0}}, shard_rows=16, row_group_rows=5)
    return folder


def _cfg(*extra):
    return load_config(None, ["model.size=tiny", "stage1.batch_size=4", "stage2.batch_size=4", "stage1.steps=5",
                              "stage2.steps=5", "stage2.cotrain_weight=0.5", *extra])


def test_rows_by_global_index_equal_the_whole_split_in_any_order_with_repeats(data_dir):
    split = read_split(data_dir, "train")
    reader = RowReader(data_dir)
    assert reader.num_rows == N
    index = [36, 0, 5, 4, 15, 16, 5, 31]
    latents, embeds = reader.read(index)
    assert torch.equal(latents, split.latents[index]) and torch.equal(embeds, split.prompt_embeds[index])
    assert torch.equal(read_prompt_embeds(data_dir), split.prompt_embeds)
    with pytest.raises(IndexError, match="out of range"):
        reader.read([N])


@pytest.mark.parametrize("stage", ["teacher", "stage1", "stage2", "consistency"])
def test_the_row_plan_draws_the_indices_of_the_real_draws(stage):
    """`steps.step_rows` draws with a 1x1x1x1 latent: its indices must be those of the full-size draws."""
    cfg = _cfg()
    for step in range(3):
        for rows in [(0, 4), (0, 2), (2, 4)]:
            data, prompts = steps.step_rows(cfg, stage, step, N, rows)
            if stage in ("teacher", "stage1"):
                d = steps.supervised_draws(cfg, stage, step, N, LATENT)
                want_data, want_prompts = set(d.index[slice(*rows)].tolist()), set()
            else:
                gen, crit, co = steps.stage2_draws(cfg, stage, step, N, LATENT)
                want_data = set(co.index[slice(*rows)].tolist())
                want_prompts = (set(gen.index[slice(*rows)].tolist()) | set(crit.index[slice(*rows)].tolist()))
                want_prompts -= want_data
            assert (set(data), set(prompts)) == (want_data, want_prompts)


def _records(cfg, data_dir, stages, rank, world, start=None):
    import pyarrow as pa

    cfg.ray.learners = world
    for item in plan_items(cfg, stages, start, N):
        table = pa.Table.from_pylist([item])
        yield read_plan_rows(table, data_dir=str(data_dir), rank=rank)


@pytest.mark.parametrize("world", [1, 2])
def test_a_streamed_learner_serves_every_batch_of_the_whole_split_and_holds_one_step(data_dir, world):
    cfg = _cfg()
    split = read_split(data_dir, "train")
    null = read_null_embed(data_dir)
    whole = steps.TrainData(split.latents, split.prompt_embeds, null[None])
    stages = ["stage1", "stage2"]
    for rank in range(world):
        rows = steps.rank_rows(4, world, rank)
        fed = StreamedRows(_records(cfg, data_dir, stages, rank, world), LATENT, EMBED, N, null,
                           torch.device("cpu"), stages)
        for stage in stages:
            for step in range(5):
                fed.at(stage, step)
                if stage == "stage1":
                    d = steps.supervised_draws(cfg, stage, step, N, LATENT)
                    batches = [(d.index[slice(*rows)], d.drop[slice(*rows)])]
                else:
                    gen, crit, co = steps.stage2_draws(cfg, stage, step, N, LATENT)
                    batches = [(co.index[slice(*rows)], co.drop[slice(*rows)]), (gen.index[slice(*rows)], None),
                               (crit.index[slice(*rows)], None)]
                for index, drop in batches:
                    (x, cond), (want_x, want_cond) = fed.batch(index, drop), whole.batch(index, drop)
                    assert torch.equal(cond, want_cond)
                    assert x is None or torch.equal(x, want_x)
                assert fed.batch(batches[0][0], batches[0][1])[0] is not None  # data rows come with latents
                # never more than the step's rows: its data rows plus, on-policy, the rollouts' prompt rows
                assert fed.held_rows <= (1 if stage == "stage1" else 3) * (rows[1] - rows[0])
        assert fed.max_held_rows <= 3 * (rows[1] - rows[0])


def test_a_row_not_sent_and_a_step_out_of_order_are_errors(data_dir):
    cfg = _cfg()
    null = read_null_embed(data_dir)
    fed = StreamedRows(_records(cfg, data_dir, ["stage1"], 0, 1), LATENT, EMBED, N, null, torch.device("cpu"),
                       ["stage1"])
    fed.at("stage1", 2)  # a plan from an earlier checkpoint: the steps before are skipped
    assert fed.skipped == 2
    sent = set(steps.step_rows(cfg, "stage1", 2, N, (0, 4))[0])
    other = next(i for i in range(N) if i not in sent)
    with pytest.raises(RuntimeError, match="not streamed"):
        fed.batch(torch.tensor([other]))
    late = StreamedRows(_records(cfg, data_dir, ["stage1"], 0, 1, start=("stage1", 3)), LATENT, EMBED, N, null,
                        torch.device("cpu"), ["stage1"])
    with pytest.raises(RuntimeError, match="sent stage1 step 3 where stage1 step 2"):
        late.at("stage1", 2)


def test_a_plan_resumes_at_the_checkpoint_step():
    cfg = _cfg()
    items = plan_items(cfg, ["stage1", "stage2"], ("stage1", 3))
    assert [(i["stage"], i["step"]) for i in items] == [("stage1", 3), ("stage1", 4)] + [("stage2", i) for i in range(5)]


def test_a_read_task_reads_as_many_steps_as_fit_in_the_block_size_and_at_least_one():
    from learners.feed import StepPlan

    cfg = _cfg("data.stream_block_mb=1", "ray.learners=2")
    # stage 1: 2 rows per rank and step; stage 2: up to 3 x 2 rows (co-training + both rollouts)
    assert StepPlan(cfg, ["stage1"], None, row_bytes=2**20 // 8).steps_per_block() == 4
    assert StepPlan(cfg, ["stage1", "stage2"], None, row_bytes=2**20 // 12).steps_per_block() == 2
    assert StepPlan(cfg, ["stage2"], None, row_bytes=17 * 2**20).steps_per_block() == 1


def test_a_stream_that_begins_after_the_resume_step_is_reopened_there_once(data_dir):
    """Ray Train may restore an older checkpoint than the newest on disk (a failure right after a report):
    the plan then begins too late, and the learner streams from its own step instead."""
    cfg = _cfg()
    null = read_null_embed(data_dir)
    opened = []

    def reopen(stage, step):
        opened.append((stage, step))
        return _records(cfg, data_dir, ["stage1"], 0, 1, start=(stage, step))

    fed = StreamedRows(_records(cfg, data_dir, ["stage1"], 0, 1, start=("stage1", 4)), LATENT, EMBED, N, null,
                       torch.device("cpu"), ["stage1"], reopen=reopen)
    split = read_split(data_dir, "train")
    for step in range(2, 5):
        fed.at("stage1", step)
        d = steps.supervised_draws(cfg, "stage1", step, N, LATENT)
        assert torch.equal(fed.batch(d.index[:4])[0], split.latents[d.index[:4]])
    assert opened == [("stage1", 2)] and fed.reopened == 1


def test_the_read_task_module_imports_no_model_code():
    """A read task runs in a fresh Ray worker process: what it imports is paid once per worker (pipeline.steps
    and diffusers took about 10 s of CPU beside the learner, the regression of the default run)."""
    import subprocess
    import sys

    code = ("import sys, pipeline.data.rows; "
            "print(sorted(m for m in ('diffusers', 'pipeline.steps', 'ray', 'learners.feed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Op:
    def __init__(self, active: int, held_back: bool, done: bool = False):
        self.active, self._in_task_output_backpressure, self.done = active, held_back, done

    def get_active_tasks(self):
        return [object()] * self.active

    def has_completed(self):
        return self.done


class _Executor:
    def __init__(self, *ops):
        self._topology = {op: None for op in ops}


@pytest.mark.parametrize("ops, sleeps", [
    ([_Op(0, False), _Op(1, False)], False),  # a task in flight, its outputs taken: ray.wait blocks
    ([_Op(0, False), _Op(0, False)], True),  # nothing in flight: the loop would spin
    ([_Op(0, False), _Op(2, True)], True),  # outputs held back by the read-ahead budget: ray.wait returns at once
])
def test_the_scheduling_loop_sleeps_only_when_it_cannot_block(monkeypatch, ops, sleeps):
    from learners import feed

    slept = []
    monkeypatch.setattr(feed.time, "sleep", slept.append)
    cb = feed.IdleBackoff()
    cb.on_execution_step(_Executor(*ops))
    assert slept == ([feed.IdleBackoff.IDLE_SLEEP_S] if sleeps else [])
    # without the executor's topology (another Ray version) it always sleeps
    slept.clear()
    cb.on_execution_step(object())
    assert slept == [feed.IdleBackoff.IDLE_SLEEP_S]
