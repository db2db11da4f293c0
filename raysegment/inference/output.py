"""The inference output layout, both directions: what `infer` writes under OUTPUT and how it is read back.

    masks/{key}.png              --mask-format png: one PNG per image (masks/_long/{sha256}.png for keys
                                 too long to be a file name: see png_mask_name)
    masks/part-{batch}.npz       --mask-format npz: one array per key, per batch
    masks/part-{batch}.bin       --mask-format packed: PNGs back to back, per batch (offset/length in the row)
    masks/{key}.tif              a big raster's mask, whatever --mask-format: a Cloud-Optimised GeoTIFF the
                                 predictor wrote window by window (inference/rasters.py)
    summaries/run={run_id}/part-{keys}.parquet    one row per input image (SUMMARY_COLUMNS), many batches a file
    summaries/run=_compacted/part-{files}.parquet what `raysegment compact` merged (footer: what it replaces)
    runs/{run_id}.json           the run record (RunRecord)
    report_tally.json            what the last report's pass over the summaries found, and in which files
                                 (report_scan.py: the next report reads only the files added since)
    archives/{uri digest}.parquet the member keys of one input tar archive (inference/archives.py)
    _SUCCESS                     {"run_id": ...}: the output is complete

The commit protocol: write tasks write each batch's masks and return its rows
(`write_masks`); the driver gathers references to them and commits them, `--summary-rows`
at a time, as one summary file written whole under a name derived from its keys, by a
task (`SummaryWriter`: the driver never reads the rows). A key counts
as done only once its summary row exists, so a job killed at any point leaves at worst
masks that the re-run rewrites under the same names (or, for the per-batch packs, an
orphan pack no summary points to). `_SUCCESS` is removed when a run starts and
written after its run record, only when the run checks out.

`infer` (inference/pipeline.py) writes through this module; `report`, `nightly`,
resuming (inference/resume.py) and compaction read through it. One file on purpose,
about 550 lines: the layout is one contract, and its writers and readers change together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import posixpath
import re
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raysegment import storage
from raysegment.data import imaging
from raysegment.errors import DataError, StorageError
from raysegment.models.card import ModelCard

MASKS = "masks"
SUMMARIES = "summaries"
RUN_LOCK = "_infer.lock"  # held by a run for its whole length (`pipeline.infer`)
RUNS = "runs"
ARCHIVES = "archives"  # member lists of input tar archives (inference/archives.py)
CLASS_NAMES_META = b"raysegment.class_names"
# `raysegment compact` writes under summaries/run=_compacted/; each file's footer lists what it replaces.
COMPACTED = "run=_compacted"
REPLACES_META = b"raysegment.replaces"
# The report's running tally (report_scan.py), beside report.html: not in summaries/, where readers take every
# file for a Parquet file. Removed with the summaries (--overwrite).
REPORT_TALLY = "report_tally.json"
# An npz pack's zip comment when its members are named exactly by key (NpzMasks); older packs lack it.
NPZ_MEMBERS_BY_KEY = b"raysegment npz: members named by key"
# An npz member's mask_uri: OUTPUT/masks/part-{batch_name}.npz#{key}. The pack's name, not a mere `.npz#`,
# marks it: a PNG key may hold `.npz#` (image scan.npz#2.png). The first match: the key may hold one too.
_NPZ_REF = re.compile(rf"(.*?/{MASKS}/part-[0-9a-f]+\.npz)#(.*)\Z", re.DOTALL)
T = TypeVar("T")
# What filesystems and S3 allow a mask name: ext4, XFS and most others take 255 bytes per path
# component; S3 takes 1024 bytes per key, of which OUTPUT's own prefix needs a part.
MAX_NAME_BYTES = 255
MAX_MASK_NAME_BYTES = 512
LONG_NAMES = "_long"
# Summary files hold many batches' rows (`--summary-rows`); these bound one from the other sides.
MAX_SUMMARY_BYTES = 64 << 20
FLUSH_EVERY_S = 300.0
ROW_GROUP_ROWS = 64 * 1024
WRITES_IN_FLIGHT = 16
Palette = Sequence[Sequence[int]] | None


def summary_schema(class_names: list[str]) -> pa.Schema:
    """The summaries' columns; class names travel in the file metadata."""
    return pa.schema(
        [
            ("key", pa.string()),
            ("source_uri", pa.string()),
            ("mask_uri", pa.string()),
            ("mask_offset", pa.int64()),
            ("mask_length", pa.int64()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("class_fractions", pa.list_(pa.float32())),
            ("mean_confidence", pa.float32()),
            ("model_id", pa.string()),
            ("model_sha256", pa.string()),
            ("run_id", pa.string()),
            ("decode_ms", pa.float32()),
            ("predict_ms", pa.float32()),
            ("write_ms", pa.float32()),
            ("peak_rss_mb", pa.float32()),  # the predictor actor's peak resident memory after the row's batch
        ],
        metadata={CLASS_NAMES_META: json.dumps(class_names)},
    )


SUMMARY_COLUMNS = tuple(summary_schema([]).names)


# -- masks: one small writer/reader per --mask-format ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskRef:
    """Where a summary row says its mask is: a URI, plus a byte range inside a packed file."""

    uri: str = ""
    offset: int = -1
    length: int = -1

    @classmethod
    def of_row(cls, row: Mapping[str, Any]) -> MaskRef:
        offset, length = row.get("mask_offset"), row.get("mask_length")  # absent in summaries of old runs
        return cls(row.get("mask_uri") or "", -1 if offset is None else offset, -1 if length is None else length)


class MaskFormat:
    """One mask format, in the shape of a Ray Data datasink: opened per batch, `write` per
    mask, `finish` before the batch's summary commits the rows; `read` decodes one back."""

    name: ClassVar[str]

    def __init__(self, output: storage.Location, batch: str, palette: Palette) -> None:
        self.output, self.batch, self.palette = output, batch, palette

    def write(self, key: str, mask: np.ndarray) -> MaskRef:
        raise NotImplementedError

    def finish(self) -> None:
        """Flush what the batch's masks share (a pack); nothing for one file per mask."""

    @staticmethod
    def holds(ref: MaskRef) -> bool:
        """True when a summary row's mask reference was written in this format."""
        raise NotImplementedError

    @staticmethod
    def read(output: storage.Location, key: str, ref: MaskRef) -> tuple[np.ndarray, Palette]:
        """(class ids, the PNG's palette or None)."""
        raise NotImplementedError


def mask_name(key: str, ext: str) -> str:
    """A key's mask file below masks/: `{key}{ext}`, or `_long/{sha256(key)}{ext}` when that name would pass
    what a filesystem or S3 allows (a part over 255 bytes, or the whole over 512). The summary row
    keeps the key and points at the stored name; a function of the key alone, so a moved output
    and a re-run find the same file."""
    name = f"{key}{ext}"
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_MASK_NAME_BYTES or any(len(part) > MAX_NAME_BYTES for part in raw.split(b"/")):
        return f"{LONG_NAMES}/{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()}{ext}"
    return name


def png_mask_name(key: str) -> str:
    """A key's PNG below masks/ (see `mask_name`)."""
    return mask_name(key, ".png")


class PngMasks(MaskFormat):
    """One PNG per mask; a batch's files are uploaded WRITES_IN_FLIGHT at a time at `finish`
    (each under the storage deadline: on S3 a small object costs a round trip, not bandwidth)."""

    name = "png"

    def __init__(self, output: storage.Location, batch: str, palette: Palette) -> None:
        super().__init__(output, batch, palette)
        self.pending: list[tuple[storage.Location, bytes]] = []

    def write(self, key: str, mask: np.ndarray) -> MaskRef:
        target = self.output.child(MASKS, png_mask_name(key))
        self.pending.append((target, imaging.encode_mask(mask, self.palette)))
        return MaskRef(target.uri)

    def finish(self) -> None:
        if self.pending:
            with ThreadPoolExecutor(min(WRITES_IN_FLIGHT, len(self.pending))) as pool:
                list(pool.map(lambda item: storage.write_bytes(*item), self.pending))

    @staticmethod
    def holds(ref: MaskRef) -> bool:
        return True  # the default: asked last

    @staticmethod
    def read(output: storage.Location, key: str, ref: MaskRef) -> tuple[np.ndarray, Palette]:
        return _decode_png(storage.read_bytes(output.child(MASKS, png_mask_name(key))))


class NpzMasks(MaskFormat):
    """One .npz pack per batch, one member per key named exactly the key (`np.load(pack)[key]` finds it: NpzFile
    tries the exact member name first). Written member by member, not by `np.savez_compressed(**arrays)`: keys as
    keyword names clash with its own parameters (`file` raised, `allow_pickle` was lost) and with one another
    (`a` and `a.npy` were both read as `a.npy`)."""

    name = "npz"

    def __init__(self, output: storage.Location, batch: str, palette: Palette) -> None:
        super().__init__(output, batch, palette)
        self.pack = output.child(MASKS, f"part-{batch}.npz")
        self.arrays: dict[str, np.ndarray] = {}

    def write(self, key: str, mask: np.ndarray) -> MaskRef:
        self.arrays[key] = mask
        return MaskRef(f"{self.pack.uri}#{key}")

    def finish(self) -> None:
        if self.arrays:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as pack:
                pack.comment = NPZ_MEMBERS_BY_KEY
                for key, mask in self.arrays.items():
                    with pack.open(key, "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asarray(mask), allow_pickle=False)
            storage.write_bytes(self.pack, buf.getvalue())

    @staticmethod
    def holds(ref: MaskRef) -> bool:
        return _NPZ_REF.match(ref.uri) is not None

    @staticmethod
    def read(output: storage.Location, key: str, ref: MaskRef) -> tuple[np.ndarray, Palette]:
        found = _NPZ_REF.match(ref.uri)
        if found is None:
            raise DataError(f"{storage.redact(ref.uri)}: not a mask in an npz pack (masks/part-*.npz#key)")
        pack, member = found.group(1), found.group(2)
        data = storage.read_bytes(_mask_location(output, pack))
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as packed:
                # Packs written before NPZ_MEMBERS_BY_KEY were np.savez_compressed's: member `{key}.npy`.
                name = member if packed.comment == NPZ_MEMBERS_BY_KEY else f"{member}.npy"
                with packed.open(name) as f:
                    return np.asarray(np.lib.format.read_array(f, allow_pickle=False), np.uint8), None
        except KeyError:
            raise DataError(f"{storage.redact(ref.uri)}: the pack holds no mask of key {member!r}") from None
        except zipfile.BadZipFile as exc:
            raise DataError(f"{storage.redact(pack)}: not a readable npz pack ({exc})") from None


class PackedMasks(MaskFormat):
    name = "packed"

    def __init__(self, output: storage.Location, batch: str, palette: Palette) -> None:
        super().__init__(output, batch, palette)
        self.pack = output.child(MASKS, f"part-{batch}.bin")
        self.buf = io.BytesIO()

    def write(self, key: str, mask: np.ndarray) -> MaskRef:
        png = imaging.encode_mask(mask, self.palette)
        offset = self.buf.tell()
        self.buf.write(png)
        return MaskRef(self.pack.uri, offset, len(png))

    def finish(self) -> None:
        if self.buf.tell():
            storage.write_bytes(self.pack, self.buf.getvalue())

    @staticmethod
    def holds(ref: MaskRef) -> bool:
        return ref.offset >= 0

    @staticmethod
    def read(output: storage.Location, key: str, ref: MaskRef) -> tuple[np.ndarray, Palette]:
        loc = _mask_location(output, ref.uri)
        return _decode_png(loc.call(lambda: loc.fs.cat_file(loc.path, start=ref.offset, end=ref.offset + ref.length)))


MASK_FORMATS: dict[str, type[MaskFormat]] = {f.name: f for f in (PngMasks, NpzMasks, PackedMasks)}


class RasterMasks(MaskFormat):
    """A big raster's mask, `masks/{key}.tif`, whatever --mask-format: written by the predictor actor
    window by window (inference/rasters.py, which names it `WrittenMask`); read back as a view at most
    `rasters.VIEW_SIDE` pixels per side, from its overviews (report, show), never whole."""

    name = "tif"

    @staticmethod
    def holds(ref: MaskRef) -> bool:
        return ref.uri.lower().endswith(".tif")  # asked after the packs (a packed key may end in .tif)

    @staticmethod
    def read(output: storage.Location, key: str, ref: MaskRef) -> tuple[np.ndarray, Palette]:
        from raysegment.inference import rasters

        return rasters.read_mask_view(_mask_location(output, ref.uri, key))


class WrittenMask(BaseModel):
    """A mask the predictor wrote itself (a big raster), as the write task is told in the `written` column."""

    uri: str
    class_fractions: list[float]


def read_mask(output: storage.Location, row: Mapping[str, Any]) -> tuple[np.ndarray, Palette]:
    """(class ids, the PNG's palette or None) for a summary row, whatever its --mask-format (a big raster's:
    a view, see `RasterMasks`)."""
    ref = MaskRef.of_row(row)
    fmts = (PackedMasks, NpzMasks, RasterMasks, PngMasks)
    fmt = next(f for f in fmts if f.holds(ref))  # summaries do not name the format
    return fmt.read(output, str(row["key"]), ref)


def own_mask_files(output: storage.Location, rows: pa.Table) -> list[storage.Location]:
    """The mask files these summary rows alone point at (a PNG or a big raster per key, never a shared
    pack): deleted with the rows when a re-run drops them, so no stale mask sits beside a failed redo.
    Only files below OUTPUT/masks: a URI that leads elsewhere (a hand-edited or foreign summary) names none."""
    found = []
    uris = rows.column("mask_uri").to_pylist()
    offsets = rows.column("mask_offset").to_pylist() if "mask_offset" in rows.column_names else [None] * len(uris)
    keys = rows.column("key").to_pylist() if "key" in rows.column_names else [None] * len(uris)
    masks = output.child(MASKS)
    for uri, offset, key in zip(uris, offsets, keys):
        ref = MaskRef(uri or "", -1 if offset is None else offset)
        if ref.uri and not PackedMasks.holds(ref) and not NpzMasks.holds(ref):
            loc = _mask_location(output, ref.uri, key)
            if _below(masks, loc):
                found.append(loc)
    return found


def _below(folder: storage.Location, loc: storage.Location) -> bool:
    """Whether `loc` is a file below `folder` on the same store, by its path: no '.', '..' or empty part on the
    way (a key has none: `sources.unsafe_key_reason`), so none leads out of it."""
    prefix = folder.path.rstrip("/") + "/"
    if loc.remote != folder.remote or not loc.path.startswith(prefix):
        return False
    return all(part not in ("", ".", "..") for part in loc.path[len(prefix) :].split("/"))


def _mask_location(output: storage.Location, uri: str, key: str | None = None) -> storage.Location:
    """Where a mask file is now: below OUTPUT/masks even if the output was moved since the run.

    A key's own file (`key`: a PNG, a big raster's .tif) is `mask_name(key, ext)` below masks/: a key may hold a
    folder named masks (`photos/masks/a`), so a `/masks/` found in the URI may be the key's, not OUTPUT's. A pack
    (`part-*`, one path part) follows the URI's last `/masks/`."""
    if key is not None:
        name = mask_name(key, posixpath.splitext(uri)[1])
        if uri.endswith(f"/{MASKS}/{name}"):
            return output.child(MASKS, name)
    below = output.child(MASKS).uri.rstrip("/") + "/"
    if uri.startswith(below):  # not moved
        return output.child(MASKS, uri[len(below) :])
    if f"/{MASKS}/" in uri:
        return output.child(MASKS, uri.rsplit(f"/{MASKS}/", 1)[1])
    return storage.resolve(uri, output.endpoint_url)


def _decode_png(data: bytes) -> tuple[np.ndarray, Palette]:
    ids = imaging.decode_mask(data)
    with Image.open(io.BytesIO(data)) as img:
        flat = img.getpalette() if img.mode == "P" else None
    return ids, [flat[i : i + 3] for i in range(0, len(flat), 3)] if flat else None


# -- writing a batch: masks, then its summary file (the commit) -------------------------------------------


def batch_name(keys: np.ndarray) -> str:
    """A stable file name for a batch, from its keys."""
    h = hashlib.sha256()
    for k in keys:
        h.update(str(k).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def write_masks(
    batch: dict[str, np.ndarray], output: storage.Location, card: ModelCard, run_id: str, mask_format: str
) -> pa.Table:
    """Resize predictions to the original size and write the batch's masks; returns its summary rows.

    The rows are not committed here: `SummaryWriter` commits many batches' rows in one file, after
    their masks exist (this runs in Ray tasks; the driver's writer gathers their output blocks)."""
    n, k = len(batch["key"]), card.num_classes
    masks = MASK_FORMATS[mask_format](output, batch_name(batch["key"]), card.palette)
    written = batch.get("written", np.full(n, "", dtype=object))  # big rasters: already written by the actor
    refs: list[MaskRef] = []
    fractions: list[list[float] | None] = []
    write_ms: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        if batch["error"][i]:
            refs.append(MaskRef())
            fractions.append(None)  # NULL, not zeros: an average that forgets `status` must not count it
        elif written[i]:
            done = WrittenMask.model_validate_json(written[i])
            refs.append(MaskRef(done.uri))
            fractions.append(done.class_fractions)
        else:
            mask = imaging.resize_mask(batch["pred"][i], (int(batch["height"][i]), int(batch["width"][i])))
            refs.append(masks.write(str(batch["key"][i]), mask))
            fractions.append((np.bincount(mask.ravel(), minlength=k)[:k] / max(mask.size, 1)).tolist())
        write_ms.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    masks.finish()  # uploads (all of a batch's PNGs at once): their time is shared by its masks
    write_ms = [ms + (time.perf_counter() - t0) * 1000 / max(n, 1) for ms in write_ms]
    return pa.table(
        {
            "key": batch["key"].astype(str),
            "source_uri": batch["source_uri"].astype(str),
            "mask_uri": [r.uri for r in refs],
            "mask_offset": [r.offset for r in refs],
            "mask_length": [r.length for r in refs],
            "height": batch["height"].astype(np.int32),
            "width": batch["width"].astype(np.int32),
            "status": ["error" if e else "ok" for e in batch["error"]],
            "error": batch["error"].astype(str),
            "class_fractions": fractions,
            "mean_confidence": pa.array(
                [None if e else float(c) for e, c in zip(batch["error"], batch["mean_confidence"])], pa.float32()
            ),
            "model_id": [card.model_id] * n,
            "model_sha256": [card.model_sha256] * n,
            "run_id": [run_id] * n,
            "decode_ms": batch["decode_ms"].astype(np.float32),
            "predict_ms": batch["predict_ms"].astype(np.float32),
            "write_ms": np.asarray(write_ms, np.float32),
            "peak_rss_mb": pa.array(  # NULL where no predictor ran (tools writing outside a run)
                np.asarray(batch.get("peak_rss_mb", np.full(n, np.nan)), np.float32), pa.float32(), from_pandas=True
            ),
        },
        schema=summary_schema(card.class_names),
    )


def commit_rows(output: storage.Location, run_id: str, rows: pa.Table) -> str:
    """Write one summary file holding exactly `rows` (their masks must exist): the rows' commit.

    Written whole (one PUT on S3, a rename locally) under a name derived from its keys, so a
    file is never half there and a retried write replaces itself. Returns the file's URI."""
    buf = io.BytesIO()
    pq.write_table(rows, buf, row_group_size=ROW_GROUP_ROWS, **storage.PAGE_CHECKSUMS)
    target = output.child(SUMMARIES, f"run={run_id}", f"part-{batch_name(rows.column('key').to_numpy(False))}.parquet")
    storage.write_bytes(target, buf.getvalue())
    return target.uri


def ok_count(status: pa.Array | pa.ChunkedArray) -> int:
    """How many rows of a summary's `status` column are "ok" (the rest are error rows)."""
    import pyarrow.compute as pc

    return pc.sum(pc.equal(status, "ok")).as_py() or 0


@dataclasses.dataclass(frozen=True)
class PendingRows:
    """Rows waiting for their summary file: rows `start:stop` of a table, or of a reference to one in
    Ray's object store (a write task's output block, which the driver hands to the committing task
    without reading it: see `SummaryWriter`)."""

    table: Any  # pa.Table | ray.ObjectRef[pa.Table]
    start: int
    stop: int
    nbytes: int

    @classmethod
    def of(cls, table: pa.Table) -> PendingRows:
        return cls(table, 0, table.num_rows, table.nbytes)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def split(self, n: int) -> tuple[PendingRows, PendingRows]:
        """(the first n rows, the rest); bytes shared in proportion."""
        head = self.nbytes * n // max(self.num_rows, 1)
        return (
            PendingRows(self.table, self.start, self.start + n, head),
            PendingRows(self.table, self.start + n, self.stop, self.nbytes - head),
        )


def commit_pieces(output: storage.Location, run_id: str, spans: list[tuple[int, int]], *tables: pa.Table) -> str:
    """`commit_rows` of the concatenated `tables[i][start:stop]` (what a SummaryWriter's flush commits)."""
    return commit_rows(output, run_id, pa.concat_tables([t.slice(a, b - a) for (a, b), t in zip(spans, tables)]))


class BlockCommitter:
    """A run's zero-CPU Ray actor that reads the write tasks' output blocks so the driver does not: it
    counts a block's statuses and writes summary files from blocks (Ray resolves the references).
    Reading a block maps every object-store page it sits on into the reader's RSS (bench scale: the
    driver grew 326 -> 451 MB from 30k to 300k images, 83 MB of it those pages). One actor, not a task
    a call: zero-CPU tasks beside a busy pipeline each started a worker process (a test run of 60
    images with a commit every 2 rows took 69 s instead of 45)."""

    def status_counts(self, block: pa.Table, start: int, stop: int | None) -> tuple[int, int]:
        """(rows, ok rows) of block[start:stop] (stop None: to its end)."""
        stop = block.num_rows if stop is None else stop
        if stop <= start:
            return 0, 0  # an empty block (a batch whose keys were all done) may have no columns
        return stop - start, ok_count(block.column("status").slice(start, stop - start))

    def commit(self, output: storage.Location, run_id: str, spans: list[tuple[int, int]], *tables: pa.Table) -> str:
        # A retried call writes the same file (its name comes from the keys): no duplicate rows.
        return commit_pieces(output, run_id, spans, *tables)


def start_committer() -> Any:
    """A BlockCommitter actor (stateless, so restarted and retried freely); `ray.kill` it after the run."""
    import ray

    return ray.remote(BlockCommitter).options(num_cpus=0, max_restarts=3, max_task_retries=3).remote()


class SummaryWriter:
    """Commits rows many batches at a time: a summary file of exactly `max_rows` rows (a batch that
    crosses the mark is split; fewer rows at MAX_SUMMARY_BYTES, or FLUSH_EVERY_S after the last file,
    so a killed run loses minutes, not hours), and the rest at `close`. Rows waiting here are not
    done: a run killed before their file exists redoes them.

    Rows given as object references are committed by `committer` (a BlockCommitter actor): the driver
    holds references, never the rows."""

    def __init__(self, output: storage.Location, run_id: str, max_rows: int, committer: Any = None) -> None:
        self.output, self.run_id, self.max_rows, self.committer = output, run_id, max_rows, committer
        self.pending: list[PendingRows] = []
        self.rows = self.nbytes = 0
        self.files: list[str] = []
        self.last_flush = time.monotonic()

    def add(self, rows: PendingRows | pa.Table) -> None:
        rest = rows if isinstance(rows, PendingRows) else PendingRows.of(rows)
        while rest.num_rows > 0:
            piece, rest = rest.split(min(rest.num_rows, self.max_rows - self.rows))
            self.pending.append(piece)
            self.rows += piece.num_rows
            self.nbytes += piece.nbytes
            if (
                self.rows >= self.max_rows
                or self.nbytes >= MAX_SUMMARY_BYTES
                or time.monotonic() - self.last_flush >= FLUSH_EVERY_S
            ):
                self.flush()

    def flush(self) -> None:
        if self.rows:
            spans = [(p.start, p.stop) for p in self.pending]
            tables = [p.table for p in self.pending]
            if all(isinstance(t, pa.Table) for t in tables):
                self.files.append(commit_pieces(self.output, self.run_id, spans, *tables))
            else:
                import ray

                self.files.append(ray.get(self.committer.commit.remote(self.output, self.run_id, spans, *tables)))
        self.pending, self.rows, self.nbytes = [], 0, 0
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()


# -- reading summaries back -----------------------------------------------------------------------------


class SummariesChanged(Exception):
    """A summary file went away while being read: `raysegment compact` replaced it. Read again."""


@contextlib.contextmanager
def changed_if_gone(path: str) -> Iterator[None]:
    """A storage call on summary file `path`: its StorageError for a file not found (compaction removed it since
    it was listed) as SummariesChanged, any other as it is. The one such mapping of every reader of summaries."""
    try:
        yield
    except StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise SummariesChanged(path) from None
        raise


def fetch_summary(output: storage.Location, path: str) -> bytes:
    """One summary file's bytes, under the output's retry deadline (SummariesChanged: see `changed_if_gone`)."""
    with changed_if_gone(path):
        return storage.call(output, lambda: output.fs.cat_file(path))


def relative_path(output: storage.Location, path: str) -> str:
    """A summary file's path below OUTPUT/summaries/ (what a compacted file's `replaces` names)."""
    return path[len(output.child(SUMMARIES).path.rstrip("/")) + 1 :]


def replaced_by(output: storage.Location, path: str) -> list[str]:
    """The files a compacted summary file replaces (paths below summaries/), from its footer."""
    loc = output.child(SUMMARIES)

    def read() -> dict[bytes, bytes]:
        with loc.fs.open(path, "rb") as f:
            return pq.read_metadata(f).metadata or {}

    with changed_if_gone(path):
        meta = loc.call(read)
    return json.loads(meta.get(REPLACES_META, b"[]"))


def _live(output: storage.Location, paths: list[str]) -> list[str]:
    """`paths` (every Parquet file under summaries/, sorted) less those a compacted file replaces."""
    replaced = {
        r for p in paths if relative_path(output, p).startswith(f"{COMPACTED}/") for r in replaced_by(output, p)
    }
    return [p for p in paths if relative_path(output, p) not in replaced]


def summary_files(output: storage.Location) -> list[str]:
    """Every summary file under OUTPUT that holds rows now: all of them, less those a compacted
    file replaces (compaction writes the new file first and deletes the old ones after, so a
    listing in between sees both, and must read only the new one)."""
    return _live(output, storage.parquet_files(output.child(SUMMARIES)))


def summary_stamps(output: storage.Location) -> dict[str, str]:
    """`summary_files` (in its order), each with a stamp of its version from the same listing: its size and
    its ETag on S3, its mtime on a local disk. A file rewritten under its name (or replaced by a copy) gets
    another stamp, so the report's tally of it is not taken for the file's rows (report_scan.py)."""
    root = output.child(SUMMARIES)

    def find() -> dict[str, Any]:
        return root.fs.find(root.path, detail=True) if root.fs.exists(root.path) else {}

    found = root.call(find)
    stamps = {
        p: f"{info.get('size')}/{info.get('ETag') or info.get('mtime') or info.get('LastModified') or ''}"
        for p, info in sorted(found.items())
        if p.endswith(".parquet") and info.get("type", "file") == "file"
    }
    return {p: stamps[p] for p in _live(output, list(stamps))}


DAMAGED_SUMMARY = "delete it and run `infer` again with the same OUTPUT: the keys it recorded are redone"


def read_summary(output: storage.Location, path: str, columns: list[str] | None = None) -> pa.Table:
    """One summary file; SummariesChanged when compaction removed it since it was listed. A readable Parquet
    file without a summary's columns (someone's export dropped beside them) is named as such, not as damaged."""
    try:
        with changed_if_gone(path):
            table = storage.read_table(output, path, columns=columns, fix=DAMAGED_SUMMARY)
    except DataError:
        if columns and (names := _schema_names(output, path)) is not None and not {"key", "status"} <= set(names):
            raise _not_a_summary(output, path, names) from None
        raise
    if columns is None and not {"key", "status"} <= set(table.schema.names):
        raise _not_a_summary(output, path, table.schema.names)
    return table


def _schema_names(output: storage.Location, path: str) -> list[str] | None:
    """A Parquet file's column names (`_footer_schema`), or None if its footer cannot be read (damaged, gone
    since, storage failing): then the caller's own error stands."""
    try:
        return _footer_schema(output, path).names
    except (DataError, StorageError, SummariesChanged):
        return None


FOOTER_GUESS = 64 << 10  # bytes read from a Parquet file's end for its footer (again, more, if it is longer)


def _footer_size(data: bytes) -> int:
    """The bytes a Parquet file's footer takes at its end (its length field, then 8), from the file's last bytes."""
    return int.from_bytes(data[-8:-4], "little") + 8 if len(data) >= 8 else 0


def _footer_schema(output: storage.Location, path: str) -> pa.Schema:
    """A summary file's schema from its footer alone, read by range (the one reader of summary footers): a
    damaged file (cut short, not Parquet) is a DataError naming it, one gone since it was listed SummariesChanged.
    Fetched under the storage deadline, parsed after: a damaged file is no storage failure."""

    def tail() -> bytes:
        with output.fs.open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(size - FOOTER_GUESS, 0))
            data = f.read()
            need = _footer_size(data)
            if len(data) < need <= size:
                f.seek(size - need)
                data = f.read()
            return data

    with changed_if_gone(path):
        data = storage.call(output, tail)
    need = _footer_size(data)
    try:
        if data[-4:] != b"PAR1" or need > len(data):
            raise pa.ArrowInvalid("no Parquet footer at the end of the file")
        schema = pq.read_schema(io.BytesIO(b"PAR1" + data[-need:]))  # the footer, as a file of nothing else
    except (pa.ArrowException, OSError) as exc:
        raise storage.damaged_parquet(output, path, exc, DAMAGED_SUMMARY) from exc
    return schema


def _summary_schema(output: storage.Location, path: str) -> pa.Schema:
    """A summary file's schema (`_footer_schema`; damaged, not a summary, SummariesChanged: as `read_summary`)."""
    schema = _footer_schema(output, path)
    if not {"key", "status"} <= set(schema.names):
        raise _not_a_summary(output, path, schema.names)
    return schema


def _not_a_summary(output: storage.Location, path: str, names: list[str]) -> DataError:
    uri = storage.redact(f"s3://{path}" if output.remote else path)
    return DataError(
        f"{uri}: not a raysegment summary (columns {names[:6]}, no key/status); move it out of {SUMMARIES}/, "
        "where every Parquet file is read as a run's rows"
    )


def consistent(read: Callable[[], T], attempts: int = 5) -> T:
    """`read()` (a whole pass over the summaries), again from the start when compaction changed
    the files under it: a pass sees every row exactly once or is repeated."""
    for _ in range(attempts - 1):
        try:
            return read()
        except SummariesChanged:
            continue
    return read()


def summary_tables(output: storage.Location, columns: list[str]) -> Iterator[pa.Table]:
    """The given columns of each summary file under OUTPUT, one file at a time (SummariesChanged
    midway: see `consistent`)."""
    for path in summary_files(output):
        yield read_summary(output, path, columns)


class Summaries:
    """Every summary row under OUTPUT, streamed a file at a time (the report's pass over them).

    Each file is read through `storage`, so under the output's retry deadline, like every other
    storage call of a report; a file is one batch of rows, so memory stays that small."""

    def __init__(self, output: storage.Location) -> None:
        self.stamps = summary_stamps(output)  # each file's version (`summary_stamps`), for the report's tally
        self.paths = list(self.stamps)
        if not self.paths:
            raise DataError(
                f"{output.uri}: no inference summaries ({SUMMARIES}/run=*/part-*.parquet); run `raysegment infer`"
            )
        self.output = output
        # The first file names the classes, as a dataset over all of them would: its footer only (a report from
        # the tally reads no other byte of the files it counted).
        self.metadata = _summary_schema(output, self.paths[0]).metadata or {}

    @property
    def class_names(self) -> list[str]:
        """Class names from the files' metadata; empty for summaries written without them."""
        names = self.metadata.get(CLASS_NAMES_META)
        return [str(n) for n in json.loads(names)] if names else []


# -- run records and the _SUCCESS marker -----------------------------------------------------------------


class RunCounts(BaseModel):
    total: int = 0  # this run's inputs: processed + skipped
    skipped: int = 0  # this run's inputs that earlier runs did
    processed: int = 0
    ok: int = 0
    error: int = 0


class FirstBatch(BaseModel):
    """When the first masks were written: the job's start-up cost (actor start, model load)."""

    seconds: float
    rows: int


class RunRecord(BaseModel):
    """runs/{run_id}.json. Fields other than run_id have defaults so records of older runs load."""

    model_config = ConfigDict(extra="allow")

    run_id: str
    status: str = "succeeded"  # succeeded | failed
    model_id: str = ""
    model_sha256: str = ""
    input: str = ""
    source: str = ""
    decoded_in: str = ""
    output: str = ""
    counts: RunCounts = Field(default_factory=RunCounts)
    seconds: float | None = None
    images_per_second: float | None = None
    first_batch: FirstBatch | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    actors: dict[str, Any] = Field(default_factory=dict)  # the predictor pool `--actors auto` resolved to
    raysegment: str = ""
    problems: list[str] = Field(default_factory=list)  # why a run failed; only written for failed runs

    def as_dict(self) -> dict[str, Any]:
        """The record's JSON; `problems` only when there are some, as records have always been."""
        out = self.model_dump(mode="json")
        if not self.problems:
            out.pop("problems")
        return out


def new_run_id() -> str:
    """A UTC timestamp and a random suffix: sorting run ids sorts runs by start time (see find_run)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def write_run_record(output: storage.Location, record: RunRecord) -> None:
    storage.write_json(output.child(RUNS, f"{record.run_id}.json"), record.as_dict())


def find_run(output: storage.Location, run_id: str | None = None) -> tuple[str | None, RunRecord | None]:
    """(run id, run record): the given run, else the one _SUCCESS names, else the newest record."""
    runs = output.child(RUNS)
    if run_id is None and storage.has_success(output):
        run_id = storage.read_json(output.child(storage.SUCCESS)).get("run_id")
    if run_id is None and storage.exists(runs):
        records = storage.list_files(runs, (".json",))
        if records:
            run_id = posixpath.basename(records[-1])[: -len(".json")]
    if run_id is None:
        return None, None
    record_loc = runs.child(f"{run_id}.json")
    if not storage.exists(record_loc):
        return run_id, None
    try:
        return run_id, RunRecord.model_validate(storage.read_json(record_loc))
    except ValidationError as exc:
        raise DataError(f"{record_loc.uri}: not a raysegment run record ({exc.errors()[0]['msg']})") from None


def clear(output: storage.Location) -> None:
    """--overwrite: remove the marker first, then everything an earlier run wrote."""
    storage.remove_success(output)
    for part in (SUMMARIES, MASKS, RUNS, ARCHIVES, REPORT_TALLY):
        storage.remove_tree(output.child(part))


def mark_incomplete(output: storage.Location) -> None:
    """Remove _SUCCESS: done first by every run, so a half-written output never looks complete."""
    storage.remove_success(output)


def mark_complete(output: storage.Location, run_id: str) -> None:
    """Write _SUCCESS naming the run: the last write of a complete output."""
    storage.mark_success(output, {"run_id": run_id})


def is_complete(output: storage.Location) -> bool:
    return storage.has_success(output)
