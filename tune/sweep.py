"""The sweep entry point: `melo-dist tune` as a script and as a Ray job.

    python tune/sweep.py --space tune/spaces/smoke.yaml --trials 4 --out runs/sweep-smoke
    ray job submit --working-dir . -- python tune/sweep.py --space tune/spaces/ml1m-melo.yaml \
        --trials 40 --out /shared/sweeps/ml1m-melo --storage s3://bucket/melo-dist
"""

import sys

from melo_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
