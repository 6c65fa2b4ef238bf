"""`ray job submit ... -- python jobs/evaluate.py ARGS`: `melo-dist evaluate` as a Ray job."""

import sys

from melo_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
