"""`ray job submit` entrypoint: a Keras model file or a TensorFlow SavedModel folder made a model directory.

ray job submit --working-dir . -- python jobs/import.py --config jobs/examples/import.yaml
"""

import sys

from raysegment.entrypoints import main

if __name__ == "__main__":
    sys.exit(main("import"))
