"""URI resolution, atomic writes and markers on the local filesystem."""

import os
import time

import pytest

from raysegment import storage
from raysegment.errors import StorageError


def test_resolve_local_and_file_scheme(tmp_path):
    a = storage.resolve(str(tmp_path))
    b = storage.resolve(f"file://{tmp_path}")
    assert a.path == b.path == str(tmp_path) and not a.remote
    assert storage.resolve("relative/dir").path == os.path.abspath("relative/dir")


def test_resolve_s3_and_errors():
    loc = storage.resolve("s3://bucket/some/prefix/", endpoint_url="http://127.0.0.1:1")
    assert loc.remote and loc.path == "bucket/some/prefix" and loc.uri == "s3://bucket/some/prefix"
    assert loc.child("a", "b.png").path == "bucket/some/prefix/a/b.png"
    with pytest.raises(StorageError, match="unsupported scheme"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        storage.resolve("s3:///x")
    with pytest.raises(StorageError, match="credentials in the URI") as err:
        storage.resolve("s3://AKIAXXX:topsecret@bucket/x")
    assert "topsecret" not in str(err.value)


def test_atomic_write_and_success_marker(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    target = out.child("a", "b.json")
    storage.write_json(target, {"x": 1})
    assert storage.read_json(target) == {"x": 1}
    assert [p for p in os.listdir(tmp_path / "out" / "a")] == ["b.json"]  # no temp files left
    assert not storage.has_success(out)
    storage.mark_success(out, {"run": "r1"})
    assert storage.has_success(out)
    storage.remove_success(out)
    assert not storage.has_success(out)


def test_missing_local_path_is_clear(tmp_path):
    with pytest.raises(StorageError, match="not found"):
        storage.check_readable(storage.resolve(str(tmp_path / "nope")))


def test_missing_credentials_are_named(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    loc = storage.resolve("s3://bucket/x", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StorageError, match="s3://bucket/x: access denied or bad credentials; set AWS_ACCESS_KEY_ID"):
        storage.check_readable(loc)


def test_unreachable_endpoint_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    # Unreachable is transient: retried until the deadline (here 2 s), then one clear line.
    loc = storage.resolve("s3://bucket/x", endpoint_url="http://127.0.0.1:9", retry_s=2)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="storage endpoint unreachable") as err:
        storage.check_readable(loc)
    assert time.monotonic() - t0 < 60
    message = str(err.value)
    assert "s3://bucket/x" in message and "still failing after" in message and "\n" not in message
    assert err.value.transient


def test_retry_deadline_is_fixed_where_the_uri_is_resolved(monkeypatch):
    """The driver's deadline travels with each Location (local ones too: a local URI list can name
    s3:// images), so tasks on other nodes do not fall back to their own environment."""
    monkeypatch.setenv("RAYSEGMENT_STORAGE_RETRY_S", "7")
    for uri in ("/tmp/raysegment-x", "s3://bucket/x"):
        loc = storage.resolve(uri)
        assert loc.retry_s == 7.0 and loc.child("y").retry_s == 7.0
        assert storage.resolve(uri, retry_s=3).retry_s == 3


def test_longest_legal_file_name_is_written_atomically(tmp_path):
    # A 255-byte name is legal on ext4; its temporary name must not be longer (issue #20, case 4).
    name = "k" * 251 + ".png"
    loc = storage.resolve(str(tmp_path)).child(name)
    storage.write_bytes(loc, b"mask")
    with storage.staged_file(storage.resolve(str(tmp_path)).child("s" * 255)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"shard")
    assert sorted(os.listdir(tmp_path)) == sorted([name, "s" * 255])
    assert (tmp_path / name).read_bytes() == b"mask"


def test_a_store_that_never_answers_fails_within_the_deadline(monkeypatch):
    # A PUT to an endpoint that accepts connections and stays silent hung without end before
    # every attempt got a time bound (raysegment/s3client.py); now the job's deadline holds.
    import pickle
    import socket
    import threading

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: held.extend(server.accept() for _ in range(16)), daemon=True).start()
    try:
        loc = storage.resolve("s3://bucket/x.bin", f"http://127.0.0.1:{server.getsockname()[1]}", retry_s=1)
        assert pickle.loads(pickle.dumps(loc.fs)).pipe_file.keywords == {"timeout": 10.0}  # survives Ray
        with pytest.raises(StorageError, match="did not answer in time") as err:
            storage.write_bytes(loc, b"mask")
        # The 1 s deadline counts from the first timed-out attempt: one retry fits, a third does not.
        assert err.value.transient and "after 2 attempts" in str(err.value)
    finally:
        server.close()


def test_an_output_path_that_is_not_a_file_is_refused_and_left_as_it_was(tmp_path):
    """Outputs are written beside their path and renamed over it: that would replace a pipe or a link (run as
    root, `--out /dev/stdout` replaced the link every program on the machine writes through) with a plain file,
    and fail on a folder with a temporary file's name. Each is one error naming the path; nothing is replaced."""
    target = tmp_path / "real.json"
    target.write_text("kept")
    folder, link, pipe = tmp_path / "folder", tmp_path / "link.json", tmp_path / "pipe"
    folder.mkdir()
    link.symlink_to(target)
    os.mkfifo(pipe)
    for path, kind in ((folder, "folder"), (link, "link"), (pipe, "pipe")):
        loc = storage.resolve(str(path))
        with pytest.raises(StorageError, match=f"{path}: is a {kind}, not a file; give a file path"):
            storage.write_json(loc, {"a": 1})
        with pytest.raises(StorageError, match=f"is a {kind}"), storage.staged_file(loc):
            raise AssertionError("staged_file must refuse before the work")
    assert link.is_symlink() and target.read_text() == "kept" and folder.is_dir() and list(folder.iterdir()) == []
    assert os.path.exists(pipe) and not os.path.isfile(pipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "link.json", "pipe", "real.json"]  # no temp
    storage.write_json(storage.resolve(str(target)), {"a": 1})  # a plain file is replaced whole, as before
    assert target.read_text().startswith("{")


def test_a_file_where_an_output_folder_is_needed_is_named(tmp_path):
    """DEST, OUTPUT or a folder on the way to them being a plain file was `storage error (FileExistsError: ...)`;
    now the line names the file that stands in the way."""
    blocker = tmp_path / "afile"
    blocker.write_text("kept")
    for path in (blocker / "plan.json", blocker / "sub" / "deeper" / "x.json"):
        with pytest.raises(StorageError, match=f"{path}: {blocker} is a file where a folder is needed; give a folder"):
            storage.write_json(storage.resolve(str(path)), {"a": 1})
    assert blocker.read_text() == "kept"


def test_a_damaged_parquet_file_is_named_with_the_fix(tmp_path):
    """A summary or ledger file emptied or cut short (a full disk, a copy stopped half-way) stopped resume,
    report and nightly with pyarrow's traceback; it is one error naming the file and what to do."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysegment.errors import DataError
    from raysegment.inference.output import DAMAGED_SUMMARY

    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"key": ["a", "b"]}), path)
    loc = storage.resolve(str(tmp_path))
    assert storage.read_table(loc, str(path))["key"].to_pylist() == ["a", "b"]
    whole = path.read_bytes()
    # Written as raysegment writes (a CRC per page), then damaged in place: same size, other bytes.
    pq.write_table(pa.table({"key": [f"k{i:05d}" for i in range(2000)]}), path, **storage.PAGE_CHECKSUMS)
    whole = path.read_bytes()
    flipped = whole[:100] + bytes(b ^ 0xFF for b in whole[100:110]) + whole[110:]
    for damaged in (b"", whole[: len(whole) // 2], b"x" * len(whole), flipped):
        path.write_bytes(damaged)
        with pytest.raises(DataError, match=f"{path}: damaged Parquet file .*; delete it and run `infer` again"):
            storage.read_table(loc, str(path), fix=DAMAGED_SUMMARY)


def test_a_uri_list_entry_with_credentials_is_an_error_row_without_them(tmp_path):
    """`s3://KEY:SECRET@bucket/b.png` in a URI list became the key `KEY:SECRET@bucket/b` (summaries, mask
    names, the report) and the raw source_uri, and was read with the secret as part of the bucket name."""
    from raysegment.inference import urilist

    listing = tmp_path / "list.txt"
    listing.write_text("s3://bucket/a.png\ns3://AKIAEXAMPLE:wJalrSECRET@bucket/b.png\n")
    (block,) = list(urilist._blocks(storage.resolve(str(listing))))
    assert block.errors == ["", urilist.CREDENTIALS_IN_URI]
    assert block.paths[1] == "s3://***@bucket/b.png" and block.keys[1] == "***@bucket/b"
    assert "SECRET" not in repr(block) and "AKIA" not in repr(block)


def _walk_sample(root, n, skip_hidden=False):
    """What `sources._sample` gave before it stopped early: `fs.walk`, folder by folder."""
    from raysegment.inference.listing import hidden

    names = []
    for _, dirs, files in root.fs.walk(root.path):
        if skip_hidden:
            dirs[:] = [d for d in dirs if not hidden(d)]
            files = [f for f in files if not hidden(f)]
        names.extend(files[: n - len(names)])
        if len(names) >= n:
            break
    return names


def test_the_input_sample_stops_after_n_names(tmp_path, monkeypatch):
    """`detect_kind` and `unread_inputs_note` look at 1000 names, but `fs.walk` listed and stat-ed a whole flat
    folder first: two more full listings of a 1M-file INPUT (7-9 s each, on S3 a paginated LIST each). The
    sample reads a bounded number of entries now, and gives the names it gave."""
    from raysegment.inference import sources

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(5000):
        (flat / f"{i:05d}.png").touch()
    read = []
    real_scandir = os.scandir

    class Counted:
        def __init__(self, path):
            self.it = real_scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.it.close()

        def __iter__(self):
            for e in self.it:
                read.append(e.name)
                yield e

    monkeypatch.setattr(os, "scandir", Counted)
    root = storage.resolve(str(flat))
    sample = sources._sample(root, n=10)
    assert len(sample) == 10 and len(read) <= 100, f"{len(read)} entries read for a sample of 10"
    monkeypatch.undo()
    assert sample == _walk_sample(root, 10)
    # Nested folders, hidden ones, links and a file root: the names fs.walk gave, in its order.
    tree = tmp_path / "tree"
    for rel in ("a.png", "b/c.png", "b/d/e.png", ".h/f.png", "b/.g.png", "z/y.tar", "z/x/w.png"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).touch()
    (tree / "link").symlink_to(tree / "b")
    nested = storage.resolve(str(tree))
    for n in (1, 2, 3, 4, 1000):
        for skip in (False, True):
            assert sources._sample(nested, n, skip) == _walk_sample(nested, n, skip), (n, skip)
    assert sources._sample(storage.resolve(str(tree / "a.png"))) == _walk_sample(
        storage.resolve(str(tree / "a.png")), 1000
    )
    assert sources._sample(storage.resolve(str(tmp_path / "missing"))) == []


@pytest.mark.s3
def test_the_input_sample_on_s3_is_one_limited_listing(s3_prefix, monkeypatch):
    """On S3 the sample was a complete paginated LIST of a flat prefix; now a page of n keys, then it stops."""
    from raysegment.inference import sources

    root = storage.resolve(s3_prefix)
    rels = [f"flat/{i:04d}.png" for i in range(30)] + ["n/a.png", "n/b/c.png", "n/.h/d.png", "n/b/.e.png", "n/f/g.tar"]
    root.fs.pipe({f"{root.path}/{r}": b"x" for r in rels})
    calls = []
    real = root.fs.call_s3

    def counted(method, **kwargs):
        calls.append((method, kwargs.get("MaxKeys")))
        return real(method, **kwargs)

    monkeypatch.setattr(root.fs, "call_s3", counted)  # the cached filesystem is shared: put back after
    flat = root.child("flat")
    assert sources._sample(flat, n=10) == [f"{i:04d}.png" for i in range(10)]
    assert calls == [("list_objects_v2", 10)]
    nested = root.child("n")
    for n in (1, 2, 3, 1000):
        for skip in (False, True):
            assert sources._sample(nested, n, skip) == _walk_sample(nested, n, skip), (n, skip)
