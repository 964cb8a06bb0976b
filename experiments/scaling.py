"""Scaling study: time and memory of attention variants against sequence length.

    python experiments/scaling.py configs/scaling/cpu.yaml [key=value ...]

Measures every (variant, length, pass) of the config that ``out_dir/scaling.csv`` does not hold yet
(an interrupted run continues where it stopped), then writes ``scaling.md`` and the log-log plots
next to it. Overrides: ``lengths=[256,512] repeats=3 variants.0.options.implementation=chunked``.
"""

import shlex
import sys

from jattn import scaling


def main(argv: list[str]) -> None:
    if len(argv) < 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    config = scaling.load_config(argv[0], argv[1:])
    print(f"scaling: {len(scaling.plan(config))} measurements on {scaling.machine_description()}")
    rows = scaling.run_sweep(config)
    command = shlex.join(["python", "experiments/scaling.py", *argv])
    for path in scaling.write_report(config, rows, command=command):
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
