"""Scaling study: time and memory of attention variants against sequence length.

    python experiments/scaling.py configs/scaling/cpu.yaml [key=value ...]

Measures every (variant, length, pass) of the config that ``out_dir/scaling.csv`` does not hold yet
(an interrupted run continues where it stopped; errors, and rows decided by a budget or ``max_length``
since raised, are measured again), then writes ``scaling.md`` and the log-log plots
next to it. Overrides: ``lengths=[256,512] repeats=3 variants.0.options.implementation=chunked``
(an integer indexes a list: ``variants.0`` is the first entry).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from jattn import scaling
from jattn.train import ConfigError


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    csv_path = None
    try:
        config = scaling.load_config(argv[0], argv[1:])
        # A misconfigured entry, an out_dir that cannot be made, a CSV of another setup: an error
        # before anything is counted or measured.
        rows = scaling.check_sweep(config)
        points = len(scaling.plan(config))
        todo = len(scaling.pending(config, rows))
        csv_path = Path(config.out_dir) / "scaling.csv"
        print(
            f"scaling: {todo} of {points} measurements to run, {points - todo} already in {csv_path}; "
            f"on {scaling.machine_description()}"
        )
        rows = scaling.run_sweep(config)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # rows are appended as they are measured
        kept = f" in {csv_path}" if csv_path is not None else ""
        print(f"stopped: the measurements made are kept{kept}; the same command resumes", file=sys.stderr)
        return 130
    command = shlex.join(["python", "experiments/scaling.py", *argv])
    for path in scaling.write_report(config, rows, command=command):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
