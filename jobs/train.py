"""`ray job submit` entrypoint: train a U-Net with Ray Train from a job spec.

ray job submit --working-dir . -- python jobs/train.py --config jobs/examples/train.yaml
"""

import sys

from raysegment.entrypoints import main

if __name__ == "__main__":
    sys.exit(main("train"))
