"""Job entrypoints for `ray job submit`: a spec in, the job run, its result lines out, an exit code.

``python jobs/infer.py --config spec.yaml`` and ``python -m raysegment.entrypoints
infer --spec '{"model": ...}'`` both land here; the kinds, their result lines and
their CPU needs come from `registry.py`. Inside a submitted job Ray sets
RAY_ADDRESS, so init_ray joins the cluster. The job logs (`ray job logs`) show
progress lines and the closing summary; RAYSEGMENT_LOG_LEVEL=INFO or DEBUG in the
job's env brings the full logs back. Exit codes: 0 ok, 2 user error,
3 failed job, 4 nightly drift flagged, 5 nightly lock held, 143 stopped by SIGTERM (`ray job stop`).
"""

from __future__ import annotations

import argparse
import sys

from raysegment import registry
from raysegment.console import handle_errors


@handle_errors
def run_job(kind: str, config: str | None = None, spec_json: str | None = None, as_json: bool = False) -> int:
    """Load the spec, join Ray, run the job, print its result; returns the exit code."""
    return registry.run(registry.load_job_spec(kind, config, spec_json), as_json)


def main(kind: str | None = None, argv: list[str] | None = None) -> int:
    """Parse `[KIND] --config FILE | --spec JSON` and run the job."""
    parser = argparse.ArgumentParser(description="Run a raysegment job (an entrypoint for `ray job submit`).")
    if kind is None:
        parser.add_argument("kind", choices=sorted(registry.CLUSTER_KINDS))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="job spec YAML")
    source.add_argument("--spec", help="job spec as a JSON object (what `raysegment submit` passes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (human output on stderr)")
    args = parser.parse_args(argv)
    return run_job(kind or args.kind, args.config, args.spec, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
