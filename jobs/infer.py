"""`ray job submit` entrypoint: batch inference over an image archive from a job spec.

ray job submit --working-dir . -- python jobs/infer.py --config jobs/examples/infer.yaml
"""

import sys

from raysegment.entrypoints import main

if __name__ == "__main__":
    sys.exit(main("infer"))
