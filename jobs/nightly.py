"""`ray job submit` entrypoint: incremental nightly inference over new or changed images from a job spec.

ray job submit --working-dir . -- python jobs/nightly.py --config jobs/examples/nightly.yaml
"""

import sys

from raysegment.entrypoints import main

if __name__ == "__main__":
    sys.exit(main("nightly"))
