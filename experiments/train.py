"""Train one model from a config file.

    python experiments/train.py configs/<file>.yaml [key.sub=value ...] [--run-dir DIR]

The run folder (default ``<output_dir>/<name>``) gets the resolved config, metrics.jsonl, Orbax
checkpoints, result.json and summary.md. Running the same command again resumes from the last
checkpoint (and refuses a config that would change what was trained so far).

Exit status: 0 done, 2 a config error (nothing trained), 1 the run stopped: it diverged (a loss
or gradient norm that is not finite) or a checkpoint could not be read. Errors are one ``error:``
line on stderr.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from jattn.train import ConfigError, ExperimentConfig, RunError, TrainingInterrupted, load_config, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a YAML experiment file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    parser.add_argument("--run-dir", help="run folder (default: <output_dir>/<name>)")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(ExperimentConfig, args.config, args.overrides)
        run_dir = pathlib.Path(args.run_dir or pathlib.Path(config.output_dir) / config.name).expanduser()
        result = train(config, run_dir)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunError as err:  # diverged, or a checkpoint or metrics file that cannot be read
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:  # Ctrl-C or SIGTERM: the finished steps are checkpointed
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_status
    print((run_dir / "summary.md").read_text())
    del result
    return 0


if __name__ == "__main__":
    sys.exit(main())
