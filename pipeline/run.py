"""Entry point: `python -m pipeline.run [--config FILE] [dotted.key=value ...]`.

No arguments: the toy preset, every stage. Parse, check, build, run.

Exit statuses:

- 0: the run finished; its outputs are in the printed folder.
- 2: bad input, before any work starts: an unknown config key, a value of the wrong type or
  out of range, a dataset folder that is missing or breaks the Parquet schema (unreadable
  file, wrong column, wrong shape, NaN/Inf values), a model folder (model.teacher_path, a
  finished stage in the run folder) that is missing or does not load as the expected class or
  does not fit the dataset. One line on stderr, `error: <the thing>: <what is wrong>`.
- 3: training aborted: run.max_bad_steps bad steps in a row (non-finite loss, gradient norm
  or batch; each bad step is skipped and counted, `train/skipped_steps`). One line on
  stderr naming the stage, the step and the reason; the tracked run ends as FAILED.
"""

from __future__ import annotations

import argparse
import re
import sys

from pipeline.config import ConfigError, field_help, load_config
from pipeline.data.schema import DatasetError
from pipeline.guard import EXIT_ABORTED, EXIT_BAD_INPUT, EXIT_OK, InputError, TooManyBadSteps


def parse_args(argv: list[str]) -> argparse.Namespace:
    keys = "\n".join(f"  {k} (default {d!r}): {h}" for k, h, d in field_help())
    p = argparse.ArgumentParser(prog="python -m pipeline.run", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="AnyFlow on-policy flow-map distillation.",
                                epilog="overrides (dotted.key=value):\n" + keys
                                + "\n\nexit status: 0 done, 2 bad input (before any work), 3 training aborted "
                                  "(run.max_bad_steps bad steps in a row)")
    p.add_argument("--config", help="YAML file or preset name (pipeline/presets/NAME.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. stage2.steps=100")
    return p.parse_args(argv)


def _error(message: object) -> None:
    """`error: <message>` as exactly one line on stderr."""
    print("error: " + re.sub(r"\s*\n\s*", " ", str(message).strip()), file=sys.stderr, flush=True)


def _aborted(exc: BaseException) -> TooManyBadSteps | None:
    """The TooManyBadSteps behind `exc`, also when it comes wrapped (chained, or re-raised by
    Ray from a worker: `.cause`, a Ray Train failure's per-worker errors), else None."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, TooManyBadSteps):
            try:  # a fresh one: its own one-line message, not a wrapper's traceback text
                return TooManyBadSteps(e.stage, e.step, e.reason, e.limit, e.skipped)
            except AttributeError:  # a wrapper that only looks like one: look at its cause
                pass
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        _error(exc)
        return EXIT_BAD_INPUT
    from pipeline.stages import run_stages

    try:
        run_dir = run_stages(cfg)
    except (InputError, DatasetError) as exc:
        _error(exc)
        return EXIT_BAD_INPUT
    except Exception as exc:
        aborted = _aborted(exc)
        if aborted is None:
            raise
        _error(aborted)
        return EXIT_ABORTED
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
    print(f"outputs: {run_dir.resolve()}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
