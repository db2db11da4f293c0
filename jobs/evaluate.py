"""`ray job submit` entrypoint: evaluate a trained model on a data set split from a job spec.

ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/examples/evaluate.yaml
"""

import sys

from raysegment.entrypoints import main

if __name__ == "__main__":
    sys.exit(main("evaluate"))
