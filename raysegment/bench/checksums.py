"""`raysegment bench checksums`: what the page CRCs on every Parquet file cost a shard read, beside the
decode the training feed does with the same bytes, in one run.

Every Parquet file raysegment writes carries a CRC per page and every read checks them
(`storage.PAGE_CHECKSUMS`, `storage.VERIFY_PAGES`). The shard is read from the page cache, so
the read figures are CPU cost only, the case where the CRC weighs most.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysegment import storage
from raysegment.data import imaging


def _images(rows: int, size: int) -> list[bytes]:
    """Grey PNGs of a textured scene (64 levels of smoothed noise): a microscope slice's entropy."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(rows):
        noise = rng.normal(size=(size, size)).cumsum(0).cumsum(1)
        scaled = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-9)
        out.append(imaging.encode_mask((scaled * 63).astype(np.uint8) * 4))
    return out


def bench_checksums(rows: int = 1000, size: int = 512, repeats: int = 7) -> dict[str, Any]:
    images = _images(rows, size)
    folder = tempfile.mkdtemp(prefix="raysegment-bench-crc-")
    path = os.path.join(folder, "train-00000.parquet")
    try:
        table = pa.table({"image": pa.array(images, pa.binary())})
        pq.write_table(table, path, compression="none", row_group_size=32, **storage.PAGE_CHECKSUMS)
        mib = os.path.getsize(path) / 2**20
        pq.read_table(path)  # into the page cache first: every timed read finds it there
        reads: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):  # alternated, so drift on a shared machine falls on both alike
            for verify in (False, True):
                t0 = time.perf_counter()
                pq.read_table(path, page_checksum_verification=verify)
                reads[verify].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for data in images:
            imaging.decode_upright(data)
        decode_s = time.perf_counter() - t0
    finally:
        if os.path.exists(path):
            os.remove(path)
        os.rmdir(folder)
    plain, checked = statistics.median(reads[False]), statistics.median(reads[True])
    return {
        "rows": rows,
        "image_size": size,
        "shard_mib": round(mib, 1),
        "read_s_without_crc": round(plain, 4),
        "read_s_with_crc": round(checked, 4),
        "read_mib_per_s_without_crc": round(mib / plain, 1),
        "read_mib_per_s_with_crc": round(mib / checked, 1),
        "decode_s": round(decode_s, 3),
        # What the CRC adds to reading and decoding the shard once, as the training feed does.
        "crc_share_of_read_and_decode": round((checked - plain) / (plain + decode_s), 4),
    }


def checksum_lines(r: dict[str, Any]) -> list[str]:
    return [
        f"bench checksums: a {r['shard_mib']} MiB shard of {r['rows']} {r['image_size']}x{r['image_size']} PNGs, "
        f"median of the reads",
        f"read without page CRCs {r['read_s_without_crc']} s ({r['read_mib_per_s_without_crc']} MiB/s), "
        f"with {r['read_s_with_crc']} s ({r['read_mib_per_s_with_crc']} MiB/s); "
        f"decoding its images {r['decode_s']} s",
        f"the CRCs add {100 * r['crc_share_of_read_and_decode']:.1f}% to reading and decoding the shard",
    ]
