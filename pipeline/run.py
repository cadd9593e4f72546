"""Entry point: `python -m pipeline.run [--config FILE] [dotted.key=value ...]`.

No arguments: the toy preset, every stage. Parse, build, run; a bad key or value is one
line on stderr and exit status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, field_help, load_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    keys = "\n".join(f"  {k} (default {d!r}): {h}" for k, h, d in field_help())
    p = argparse.ArgumentParser(prog="python -m pipeline.run", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="AnyFlow on-policy flow-map distillation.",
                                epilog="overrides (dotted.key=value):\n" + keys)
    p.add_argument("--config", help="YAML file or preset name (pipeline/presets/NAME.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. stage2.steps=100")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pipeline.stages import run_stages

    try:
        run_dir = run_stages(cfg)
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
    print(f"outputs: {run_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
