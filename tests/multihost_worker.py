"""One process of a multi-process test run: the pre-training command, plus test switches.

Usage: python tests/multihost_worker.py [--every_batch_png] -- TRAINER_FLAGS...

Runs `keras/Genesis_Chest_CT.py`'s `main` with the trainer flags in this process.
`--every_batch_png` makes every training batch write a sample PNG (instead of about one in
100), so a test can check which processes write them. The exit status is the trainer's.

Example (two processes on one machine, KERAS_BACKEND=jax):
  python tests/multihost_worker.py -- --data cubes --coordinator_address 127.0.0.1:12345 \\
      --num_processes 2 --process_id 0 &
  python tests/multihost_worker.py -- --data cubes --coordinator_address 127.0.0.1:12345 \\
      --num_processes 2 --process_id 1
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    """Run the trainer with the given flags.

    Args:
        argv: this script's arguments; those after `--` go to the trainer.

    Returns:
        The trainer's exit status.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        cut = argv.index("--")
        own, trainer_args = argv[:cut], argv[cut + 1 :]
    elif argv in (["-h"], ["--help"]):
        own, trainer_args = argv, []  # this script's help; `-- --help` gives the trainer's
    else:
        own, trainer_args = [], argv
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--every_batch_png", action="store_true", help="a sample PNG per batch")
    args = parser.parse_args(own)
    sys.path.insert(0, os.path.join(ROOT, "keras"))
    import Genesis_Chest_CT
    import transforms

    if args.every_batch_png:
        transforms.SAMPLE_PNG_PROB = 1.0
    return Genesis_Chest_CT.main(trainer_args)


if __name__ == "__main__":
    sys.exit(main())
