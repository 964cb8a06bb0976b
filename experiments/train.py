"""Train one model from a config file.

    python experiments/train.py configs/<file>.yaml [key.sub=value ...] [--run-dir DIR]

The run folder (default ``<output_dir>/<name>``) gets the resolved config, metrics.jsonl, Orbax
checkpoints, result.json and summary.md. Running the same command again resumes from the last
checkpoint (and refuses a config that would change what was trained so far).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from jattn.train import ConfigError, ExperimentConfig, load_config, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a YAML experiment file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    parser.add_argument("--run-dir", help="run folder (default: <output_dir>/<name>)")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(ExperimentConfig, args.config, args.overrides)
        run_dir = pathlib.Path(args.run_dir or pathlib.Path(config.output_dir) / config.name)
        result = train(config, run_dir)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((run_dir / "summary.md").read_text())
    del result
    return 0


if __name__ == "__main__":
    sys.exit(main())
