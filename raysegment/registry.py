"""The job kinds: for each, its spec class, the function that runs it, its closing summary and JSON
result, its exit code, where its outputs (and log file) go, and whether `run` joins Ray (or starts a local
one, with the logical CPUs the job needs) before calling it: infer and nightly join Ray themselves once they
hold their lock, model import and export never use it.

One table read by the CLI (`raysegment train ...`), the `ray job submit` entrypoints
(`jobs/{kind}.py`, `python -m raysegment.entrypoints KIND`) and `raysegment submit`, so a
job prints the same result whether it runs here or on a cluster. The job functions are
imported when a job runs: loading this table must not start TensorFlow or Ray.
"""

from __future__ import annotations

import importlib
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raysegment import storage
from raysegment.config import (
    CompactSpec,
    EvaluateSpec,
    ExportSpec,
    ImportSpec,
    InferSpec,
    NightlySpec,
    PrepareSpec,
    ServeSpec,
    Spec,
    TrainSpec,
    load_spec,
)
from raysegment.console import session
from raysegment.errors import ConfigError
from raysegment.specfile import MAX_SPEC_BYTES

if TYPE_CHECKING:
    from raysegment.data.manifest import Manifest
    from raysegment.models.importer import ImportResult
    from raysegment.train.trainer import TrainResult


@dataclass(frozen=True)
class _Lazy:
    """The function at `target`, "module:function", imported when it is called: the job modules import
    TensorFlow or Ray, which loading this table must not."""

    target: str

    def __call__(self, *args: Any) -> Any:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)(*args)


def _no_min_cpus(spec: Any) -> int:
    return 0


def _ok(result: Any) -> int:
    return 0


@dataclass(frozen=True)
class Job:
    """One job kind. `run(spec)` returns the job's result; `lines(spec, result)` is its closing summary,
    `payload(spec, result)` its `--json` object (README, "Results as JSON"); `output(spec)` is the folder
    its log file goes to."""

    kind: str
    spec: type[Spec]
    run: Callable[[Any], Any]
    lines: Callable[[Any, Any], list[str]]
    payload: Callable[[Any, Any], dict[str, Any]]
    output: Callable[[Any], str | None]
    exit_code: Callable[[Any], int] = _ok
    min_cpus: Callable[[Any], int] = _no_min_cpus
    # Has a jobs/{kind}.py entrypoint and can be sent with `raysegment submit`.
    on_cluster: bool = True
    # `run` joins Ray (or starts a local one, with `min_cpus`) before calling the job. False for model import and
    # export (run in the job's own process, no Ray), and for infer and nightly, which join Ray themselves once they
    # hold their lock, with `actors.min_cpus` (a locked OUTPUT is refused without starting Ray).
    joins_ray_first: bool = True


def train_min_cpus(spec: TrainSpec) -> int:
    """Logical CPUs for training: every worker's share plus one, so the Ray Data tasks that feed them can run."""
    return int(spec.workers * spec.cpus_per_worker) + 1


def _prepare_lines(spec: PrepareSpec, manifest: Manifest) -> list[str]:
    skipped = f", {len(manifest.skipped)} invalid or unpaired inputs skipped" if manifest.skipped else ""
    seconds = "?" if manifest.seconds is None else manifest.seconds
    return [
        f"prepared {spec.dest}: {manifest.counts.to_json()} images, {len(manifest.shards)} shards, "
        f"classes {list(manifest.class_names)}{skipped}",
        f"  data set   {storage.join(spec.dest, 'manifest.json')} (+ shards/), in {seconds} s",
    ]


def _prepare_payload(spec: PrepareSpec, manifest: Manifest) -> dict[str, Any]:
    return {
        "dest": spec.dest,
        "counts": manifest.counts.to_json(),
        "shards": len(manifest.shards),
        "num_classes": manifest.num_classes,
        "class_names": list(manifest.class_names),
        "skipped": len(manifest.skipped),
        "content_hash": manifest.content_hash,
        "seconds": manifest.seconds,
    }


def _train_lines(spec: TrainSpec, result: TrainResult) -> list[str]:
    m = result.metrics
    best = m["best"]
    if result.already_trained:  # the same options as the finished run in OUT: it is kept as it is
        return [
            f"{result.out}: already trained ({m['epochs_run']} epochs, best epoch {best['epoch'] + 1}, "
            f"val mIoU {best['val_mean_iou']:.4f}); nothing to do — pass --no-resume to train again"
        ]
    early = ", stopped early" if m["stopped_early"] else ""
    if m.get("stopped_by") == "time_budget":
        early = ", stopped at the time budget"
    plan = m.get("plan")
    planned = (
        f"  plan       {len(plan['auto'])} choices from the data set, {len(plan['given'])} given (model.json: plan)"
        if plan
        else "  plan       off (--no-plan): fixed defaults"
    )
    tracked = [f"  mlflow     run {result.mlflow_run_id}"] if result.mlflow_run_id else []
    return [
        # Counted from 1, as the progress lines count (`epoch 2/2`); metrics.json and history.csv keep 0-based.
        f"trained {result.out}: best epoch {best['epoch'] + 1}, val mean_iou {best['val_mean_iou']:.4f}, "
        f"pixel_accuracy {best['val_pixel_accuracy']:.4f}",
        f"  {m['epochs_run']} epochs in {m['seconds']} s{early}",
        planned,
        f"  model      {storage.join(result.out, 'model.keras')} (+ model.json, metrics.json, history.csv, "
        "training_curves.png)",
        *tracked,
    ]


def _train_payload(spec: TrainSpec, result: TrainResult) -> dict[str, Any]:
    m = result.metrics
    return {
        "out": result.out,
        "model_id": result.card.model_id,
        **{k: m.get(k) for k in ("best", "last", "epochs_run", "stopped_early", "val_pixels", "seconds")},
        "mlflow_run_id": result.mlflow_run_id,
        "already_trained": result.already_trained,
    }


def _evaluate_lines(spec: EvaluateSpec, result: dict[str, Any]) -> list[str]:
    table = [f"{'class':<20} {'IoU':>8}"]
    table += [f"{name:<20} {'-' if iou is None else f'{iou:.4f}':>8}" for name, iou in result["per_class_iou"].items()]
    edges = [f"{'from a label edge':<20} {'pixels':>8} {'wrong':>8} {'of errors':>10}"]
    edges += [
        f"{b['band']:<20} {b['pixel_share']:>8.1%} {b['error_rate']:>8.1%} {b['error_share']:>10.1%}"
        for b in result["errors_by_edge_distance"]
    ]
    return [
        *table,
        *edges,
        f"pixel_accuracy {result['pixel_accuracy']:.4f}  mean_iou {result['mean_iou']:.4f}  "
        f"mean_dice {result['mean_dice']:.4f}  ({result['images']} images, written to {result['written_to']})",
    ]


def _infer_lines(spec: InferSpec, record: dict[str, Any]) -> list[str]:
    c = record["counts"]
    report = f", {storage.join(spec.output, 'report.html')}" if spec.report else ""
    return [
        f"inferred {c['processed']} images ({c['ok']} ok, {c['error']} errors; {c['skipped']} already done) "
        f"at {record['images_per_second']} images/s; run {record['run_id']} in {spec.output}",
        f"  outputs    {storage.join(spec.output, 'masks')}/, summaries/, runs/{record['run_id']}.json{report}",
    ]


def nightly_line(report: dict[str, Any]) -> str:
    """The one-line summary of a nightly report."""
    c = report["counts"]
    d = report["drift"]
    shift = "" if d["max_shift"] is None else f", max class shift {d['max_shift']} vs {d['compared_with']}"
    held = f", {c['unchanged']} unchanged" if "unchanged" in c else ""  # reports of older versions lack it
    held += f", {c['deferred']} deferred" if c.get("deferred") else ""
    # A re-run of an unfinished date resumes: images an earlier attempt masked count as already done.
    done = f", {c['skipped']} already done" if c.get("skipped") else ""
    return (
        f"nightly {report['date']}: {report['status']}; {c['listed']} listed, {c['new']} new, {c['changed']} changed"
        f"{held}, {c['processed']} processed ({c['ok']} ok, {c['error']} errors){done}{shift}; report "
        f"{report.get('report_uri') or report['output'] + '/reports/' + report['date'] + '.json'}"
    )


def _as_is(spec: Any, result: dict[str, Any]) -> dict[str, Any]:
    """The result as the job wrote it: eval-SPLIT.json, runs/{run_id}.json, reports/DATE.json."""
    return result


def _compact_lines(spec: CompactSpec, r: dict[str, Any]) -> list[str]:
    lines = [
        f"compacted {r['output']}: {r['files_before']} summary files -> {r['files_after']} "
        f"({r['merged_files']} merged into {r['written_files']}, {r['rows_moved']} rows)"
    ]
    if r["killed_runs_checked"]:
        lines.append(
            f"  compacted the files of {len(r['killed_runs_checked'])} killed runs (no run record) as finished: "
            "the run that wrote _SUCCESS checked their rows"
        )
    if r["unfinished_runs_left"]:
        lines.append(
            f"  left {len(r['unfinished_runs_left'])} runs without a run record: an infer into OUTPUT is running, or "
            "one was killed and none has finished since; compact merges them after the next infer over OUTPUT "
            "succeeds (it resumes them), or now with --include-unfinished if none is running"
        )
    return lines


def _serve_lines(spec: ServeSpec, r: dict[str, Any]) -> list[str]:
    return [f"served {r['model_id']} at {r['endpoint']} for {r['served_s']} s; stopped"]


def serve_min_cpus(spec: ServeSpec) -> int:
    """Logical CPUs for serving on a local Ray: every replica's share at the most replicas."""
    import math

    return math.ceil(spec.replicas[1] * spec.cpus_per_replica)


def _import_lines(spec: ImportSpec, r: ImportResult) -> list[str]:
    card = r.card
    size = "native" if spec.input_size == "native" else f"{spec.input_size[0]},{spec.input_size[1]}"
    return [f"imported {card.model_id} to {r.out}: {card.num_classes} classes, {card.output}, input {size}"]


def _import_payload(spec: ImportSpec, r: ImportResult) -> dict[str, Any]:
    return {"model_id": r.card.model_id, "out": r.out, "model_card": r.card.as_dict()}


def _export_lines(spec: ExportSpec, r: dict[str, Any]) -> list[str]:
    return [f"exported {r['model_id']} as {r['format']}: {r['path']}", f"  {r['note']}"]


def _evaluate_output(spec: EvaluateSpec) -> str:
    return posixpath.dirname(spec.out) or "." if spec.out else spec.model


# The job functions, imported when a job runs.
_prepare = _Lazy("raysegment.data.prepare:prepare")
_train = _Lazy("raysegment.train.trainer:train")
_evaluate = _Lazy("raysegment.evaluate:evaluate")
_infer = _Lazy("raysegment.inference.pipeline:infer")
_nightly = _Lazy("raysegment.nightly:run_nightly")
_nightly_exit_code = _Lazy("raysegment.nightly:exit_code")
_compact = _Lazy("raysegment.inference.compact:compact")
_serve = _Lazy("raysegment.serve:serve_until_stopped")
_import = _Lazy("raysegment.models.importer:import_model")
_export = _Lazy("raysegment.export:export")

JOBS: dict[str, Job] = {
    job.kind: job
    for job in (
        Job("prepare", PrepareSpec, _prepare, _prepare_lines, _prepare_payload, lambda s: s.dest, on_cluster=False),
        Job("train", TrainSpec, _train, _train_lines, _train_payload, lambda s: s.out, min_cpus=train_min_cpus),
        Job("evaluate", EvaluateSpec, _evaluate, _evaluate_lines, _as_is, _evaluate_output),
        Job(
            "infer",
            InferSpec,
            _infer,
            _infer_lines,
            _as_is,
            lambda s: s.output,
            joins_ray_first=False,  # joins Ray itself once it holds OUTPUT's lock (pipeline.plan)
        ),
        Job(
            "nightly",
            NightlySpec,
            _nightly,
            lambda spec, report: [nightly_line(report)],
            _as_is,
            lambda s: s.output,
            _nightly_exit_code,
            joins_ray_first=False,  # joins Ray itself once it holds OUTPUT's lock (run_nightly)
        ),
        Job("compact", CompactSpec, _compact, _compact_lines, _as_is, lambda s: s.output),
        Job("serve", ServeSpec, _serve, _serve_lines, _as_is, lambda s: None, min_cpus=serve_min_cpus),
        Job("import", ImportSpec, _import, _import_lines, _import_payload, lambda s: s.dest, joins_ray_first=False),
        Job("export", ExportSpec, _export, _export_lines, _as_is, lambda s: s.dest, joins_ray_first=False),
    )
}
# What `raysegment submit` and `python -m raysegment.entrypoints` accept, in help order.
CLUSTER_KINDS: tuple[str, ...] = tuple(kind for kind, job in JOBS.items() if job.on_cluster)


def load_job_spec(kind: str, config: str | None = None, spec_json: str | None = None) -> Spec:
    """A validated spec from a YAML file or inline JSON (what `raysegment submit` sends)."""
    cls = JOBS[kind].spec
    if spec_json is None:
        return load_spec(cls, config)
    # The bounds a spec file has (specfile.py): a spec is a short mapping, whoever submitted it.
    if len(spec_json) > MAX_SPEC_BYTES:
        raise ConfigError(f"--spec: over {MAX_SPEC_BYTES >> 10} KiB; a job spec is a short mapping of field: value")
    try:
        values = json.loads(spec_json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--spec: not valid JSON ({exc})") from exc
    except RecursionError:
        raise ConfigError("--spec: nested too deep; a job spec is a short mapping of field: value") from None
    if not isinstance(values, dict):
        raise ConfigError("--spec: a job spec must be a JSON object of field: value")
    return load_spec(cls, None, values)


def run(spec: Spec, as_json: bool = False) -> int:
    """Run the job the spec is for, print its summary (and under `as_json` its one JSON object); its exit code.
    Ray is joined (or started with enough CPUs) first for the kinds marked `joins_ray_first`; infer and nightly
    join it themselves once they hold their lock."""
    from raysegment.runtime import init_ray

    job = next(job for job in JOBS.values() if type(spec) is job.spec)
    with session(job.kind, job.output(spec), as_json) as s:
        if job.joins_ray_first:
            init_ray(min_cpus=job.min_cpus(spec))
        result = job.run(spec)
        s.done(job.lines(spec, result), job.payload(spec, result), job.exit_code(result))
    return s.exit_code
