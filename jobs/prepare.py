"""`ray job submit ... -- python jobs/prepare.py ARGS`: `melo-dist prepare` as a Ray job."""

import sys

from melo_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
