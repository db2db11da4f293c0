"""`ray job submit` entrypoint: a model directory exported as one graph (SavedModel, ONNX or TFLite).

ray job submit --working-dir . -- python jobs/export.py --config jobs/examples/export.yaml
"""

import sys

from raysegment.entrypoints import main

if __name__ == "__main__":
    sys.exit(main("export"))
