"""`ray job submit ... -- python jobs/train.py ARGS`: `melo-dist train` as a Ray job."""

import sys

from melo_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
