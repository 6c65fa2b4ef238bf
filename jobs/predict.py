"""`ray job submit ... -- python jobs/predict.py ARGS`: `melo-dist predict` as a Ray job."""

import sys

from melo_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
