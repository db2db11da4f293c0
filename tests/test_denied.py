"""Output that cannot be written: read-only credentials, a write denied mid-run, a full disk, and
a prefix the store turned read-only (what SeaweedFS's bucket quota enforcement does). Each fails
with one clear line, writes no _SUCCESS, and reports nothing as done that is not.

The S3 users come from the session's server (helpers.IDENTITIES). The CLI runs with its own
local Ray, so its Ray workers hold the restricted credentials, as the nodes of a real cluster would.
"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MASKS_ONLY_KEY, MASKS_ONLY_OUTPUT, READ_ONLY_KEY, wait_for, write_images

from raysegment import storage
from raysegment.config import InferSpec
from raysegment.errors import StorageError
from raysegment.inference.output import summary_files
from raysegment.inference.pipeline import infer

pytestmark = [pytest.mark.slow, pytest.mark.s3]

RAYSEGMENT = str(Path(sys.executable).parent / "raysegment")


def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    r = subprocess.run([RAYSEGMENT, *argv], env=env, capture_output=True, text=True, timeout=400, check=False)
    print(f"$ raysegment {' '.join(argv)} -> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


def own_ray_env(s3_server, access_key: str) -> dict[str, str]:
    """The CLI starts its own local Ray (no RAY_ADDRESS) with these credentials."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | s3_server.env_for(access_key)


def objects(uri: str) -> list[str]:
    loc = storage.resolve(uri)
    return loc.fs.find(loc.path) if loc.fs.exists(loc.path) else []


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_read_only_credentials_fail_before_any_work(tiny_model, s3_server, s3_prefix, tmp_path):
    _, model = tiny_model
    write_images(tmp_path / "in", 4)
    out = f"{s3_prefix}/out"
    r = cli(own_ray_env(s3_server, READ_ONLY_KEY), "infer", model, str(tmp_path / "in"), out, "--no-report")
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert out in line and "access denied" in line and "AWS_ACCESS_KEY_ID" in line
    assert objects(out) == []  # the write probe failed before anything else was tried


def test_write_denied_mid_run_reports_nothing_as_done(tiny_model, s3_server, tmp_path):
    """The masks may be written, the summaries may not: the first summary write fails the job,
    no summary row claims a key, no _SUCCESS. The owner's re-run then does every key once."""
    _, model = tiny_model
    keys = write_images(tmp_path / "in", 12)
    out = MASKS_ONLY_OUTPUT
    storage.remove_tree(storage.resolve(out))
    env = own_ray_env(s3_server, MASKS_ONLY_KEY)
    r = cli(
        env, "infer", model, str(tmp_path / "in"), out, "--batch-size", "4", "--no-report", "--storage-retry-s", "5"
    )
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert f"{out}/summaries/" in line and "access denied" in line
    loc = storage.resolve(out)
    assert objects(f"{out}/masks"), "the job failed before it wrote any mask: nothing mid-run was tested"
    assert summary_files(loc) == [] and objects(f"{out}/runs") == []
    assert not storage.exists(loc.child("_SUCCESS"))

    record = infer(InferSpec(model=model, input=str(tmp_path / "in"), output=out, batch_size=4, report=False))
    assert record["counts"]["skipped"] == 0 and record["counts"]["processed"] == 12
    rows = [k for p in summary_files(loc) for k in storage.read_table(loc, p, ["key"]).column("key").to_pylist()]
    assert sorted(rows) == keys
    masks = sorted(Path(p).stem for p in objects(f"{out}/masks"))
    assert masks == keys
    assert storage.exists(loc.child("_SUCCESS"))


def test_full_disk_is_named_and_not_retried(tmp_path):
    """A real ENOSPC from the kernel (writing /dev/full), as the storage layer reports it."""
    out = str(tmp_path / "out" / "masks" / "a.png")
    with pytest.raises(StorageError, match="out of space or over quota") as err:
        with storage.storage_errors(out), open("/dev/full", "wb") as f:
            f.write(b"x" * 65536)
    assert str(err.value).startswith(out)
    assert getattr(err.value.__cause__, "errno", None) == errno.ENOSPC
    assert not storage.is_transient(err.value.__cause__)


def test_output_made_read_only_by_the_store_fails_the_job(tiny_model, s3_server, s3_prefix, tmp_path, ray_cluster):
    """SeaweedFS enforces a bucket quota by making the bucket's location read-only, after which
    writes get HTTP 500. Retried as a server error until --storage-retry-s, then the job fails."""
    _, model = tiny_model
    write_images(tmp_path / "in", 8)
    out = f"{s3_prefix}/out"
    summaries = f"/buckets/{out.removeprefix('s3://')}/summaries/"
    s3_server.shell(f"fs.configure -locationPrefix={summaries} -readOnly=true -apply")
    try:
        client = s3_server.client(retries={"max_attempts": 1})
        probe = f"{out.split('/', 3)[3]}/summaries/probe"

        def refused() -> bool:
            try:
                client.put_object(Bucket=s3_server.bucket, Key=probe, Body=b"")
            except client.exceptions.ClientError:
                return True
            client.delete_object(Bucket=s3_server.bucket, Key=probe)
            return False

        # The S3 gateway picks the filer configuration up asynchronously.
        wait_for(refused, "the read-only location to take effect", timeout=30, interval=0.5)
        r = cli(ray_cluster.env, "infer", model, str(tmp_path / "in"), out, "--no-report", "--storage-retry-s", "2")
        assert r.returncode == 2
        line = error_line(r.stderr)
        assert f"{out}/summaries/" in line and "still failing after" in line
        loc = storage.resolve(out)
        assert summary_files(loc) == [] and not storage.exists(loc.child("_SUCCESS"))
    finally:
        s3_server.shell(f"fs.configure -locationPrefix={summaries} -delete -apply")
