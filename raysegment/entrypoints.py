"""Job entrypoints for `ray job submit`: a spec in, the job run, one line out, an exit code.

``python jobs/infer.py --config spec.yaml`` and ``python -m raysegment.entrypoints
infer --spec '{"model": ...}'`` both land here. Inside a submitted job Ray sets
RAY_ADDRESS, so init_ray joins the cluster. Exit codes: 0 ok, 2 user error,
3 failed job, 4 nightly drift flagged, 5 nightly lock held.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from raysegment.cli import handle_errors
from raysegment.config import EvaluateSpec, InferSpec, NightlySpec, Spec, TrainSpec, load_spec
from raysegment.errors import ConfigError


def _train(spec: TrainSpec) -> tuple[str, int]:
    from raysegment.train.trainer import train

    best = train(spec)["metrics"]["best"]
    return f"trained {spec.out}: best epoch {best['epoch']}, val mean_iou {best['val_mean_iou']:.4f}", 0


def _evaluate(spec: EvaluateSpec) -> tuple[str, int]:
    from raysegment.evaluate import evaluate

    r = evaluate(spec)
    return (
        f"evaluated {spec.model} on {r['images']} images: mean_iou {r['mean_iou']:.4f}, "
        f"pixel_accuracy {r['pixel_accuracy']:.4f}; written to {r['written_to']}"
    ), 0


def _infer(spec: InferSpec) -> tuple[str, int]:
    from raysegment.inference.pipeline import infer

    r = infer(spec)
    c = r["counts"]
    return (
        f"inferred {c['processed']} images ({c['ok']} ok, {c['error']} errors; {c['skipped']} already done); "
        f"run {r['run_id']} in {spec.output}"
    ), 0


def nightly_line(report: dict[str, Any]) -> str:
    """The one-line summary of a nightly report."""
    c = report["counts"]
    d = report["drift"]
    shift = "" if d["max_shift"] is None else f", max class shift {d['max_shift']} vs {d['compared_with']}"
    return (
        f"nightly {report['date']}: {report['status']}; {c['listed']} listed, {c['new']} new, {c['changed']} changed, "
        f"{c['processed']} processed ({c['ok']} ok, {c['error']} errors){shift}; report "
        f"{report['output']}/reports/{report['date']}.json"
    )


def _nightly(spec: NightlySpec) -> tuple[str, int]:
    from raysegment.nightly import exit_code, run_nightly

    report = run_nightly(spec)
    return nightly_line(report), exit_code(report)


JOBS: dict[str, tuple[type[Spec], Callable[[Any], tuple[str, int]]]] = {
    "train": (TrainSpec, _train),
    "evaluate": (EvaluateSpec, _evaluate),
    "infer": (InferSpec, _infer),
    "nightly": (NightlySpec, _nightly),
}


def load_job_spec(kind: str, config: str | None = None, spec_json: str | None = None) -> Spec:
    """A validated spec from a YAML file or inline JSON (what `raysegment submit` sends)."""
    cls = JOBS[kind][0]
    if spec_json is None:
        return load_spec(cls, config)
    try:
        values = json.loads(spec_json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--spec: not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise ConfigError("--spec: a job spec must be a JSON object of field: value")
    return load_spec(cls, None, values)


@handle_errors
def run_job(kind: str, config: str | None = None, spec_json: str | None = None) -> int:
    """Load the spec, join Ray, run the job, print one line; returns the exit code."""
    from raysegment.runtime import init_ray

    spec = load_job_spec(kind, config, spec_json)
    init_ray(min_cpus=int(spec.workers * spec.cpus_per_worker) + 1 if isinstance(spec, TrainSpec) else 0)
    line, code = JOBS[kind][1](spec)
    click.echo(line)
    return code


def main(kind: str | None = None, argv: list[str] | None = None) -> int:
    """Parse `[KIND] --config FILE | --spec JSON` and run the job."""
    parser = argparse.ArgumentParser(description="Run a raysegment job (an entrypoint for `ray job submit`).")
    if kind is None:
        parser.add_argument("kind", choices=sorted(JOBS))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="job spec YAML")
    source.add_argument("--spec", help="job spec as a JSON object (what `raysegment submit` passes)")
    args = parser.parse_args(argv)
    return run_job(kind or args.kind, args.config, args.spec)


if __name__ == "__main__":
    sys.exit(main())
