"""`ray job submit` entrypoint: a model behind an HTTP endpoint (Ray Serve) until the job is stopped.

ray job submit --working-dir . -- python jobs/serve.py --config jobs/examples/serve.yaml
Stop it with `raysegment jobs stop ID` (or `ray job stop ID`): the app is deleted on SIGTERM.
"""

import sys

from raysegment.entrypoints import main

if __name__ == "__main__":
    sys.exit(main("serve"))
