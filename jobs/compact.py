"""`ray job submit` entrypoint: merge small summary files of an inference output.

ray job submit --working-dir . -- python jobs/compact.py --spec '{"output": "s3://bucket/out"}'
"""

import sys

from raysegment.entrypoints import main

if __name__ == "__main__":
    sys.exit(main("compact"))
