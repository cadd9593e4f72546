"""`python -m pipeline.teachers RUN_DIR [DEST]`: install a finished teacher run as the shipped toy teacher."""

from __future__ import annotations

import argparse
import sys

from pipeline.teachers import SHIPPED, install


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.teachers",
                                description="Copy <RUN_DIR>/teacher with its config.yaml, eval.json and eval.png "
                                            "into the package's shipped teacher folder and stamp it with the toy "
                                            "world it was made for.")
    p.add_argument("run_dir", help="a finished run of `python -m pipeline.run --config toy-teacher` (or toy16-teacher)")
    p.add_argument("dest", nargs="?", help="target folder (default: the shipped teacher's folder of the run's "
                                           f"model.size: {', '.join(f'{k} -> {v}' for k, v in SHIPPED.items())})")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        dest = install(args.run_dir, args.dest)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"installed: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
