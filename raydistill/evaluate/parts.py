"""Incremental output of an evaluation: predictions written batch by batch into ``<out>.parts/``.

A crash loses only the batches in flight and a rerun generates only the questions not yet
predicted. Parts are keyed by the evaluation's identity (`raydistill.evaluate.run.eval_hash`), so
another model or setting never inherits predictions.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill import files
from raydistill.schemas import PREDICTION_SCHEMA

log = logging.getLogger(__name__)


def parts_dir(out_path: str | Path) -> Path:
    """Where the per-batch prediction files of ``out_path`` accumulate."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".parts")


def read_parts(parts: Path, eval_hash: str) -> pa.Table:
    """Every prediction written so far for this evaluation (parts of other evaluations are ignored).

    A part that cannot be read (damaged or cut short) is renamed ``*.corrupt`` and left
    out with a warning, so its questions are generated again and the other parts are kept.
    """
    part_files = sorted(parts.glob("part-*.parquet")) if parts.is_dir() else []
    tables = []
    for f in part_files:
        try:
            tables.append(pq.read_table(f, schema=PREDICTION_SCHEMA))
        except (OSError, pa.ArrowException) as err:
            aside = f.with_name(f.name + ".corrupt")
            os.replace(f, aside)
            reason = " ".join(str(err).split())[:200]
            log.warning("%s: unreadable prediction part (%s); moved to %s, its questions are generated again",
                        f, reason, aside.name)
    table = pa.concat_tables(tables) if tables else PREDICTION_SCHEMA.empty_table()
    return table.filter(pa.compute.equal(table["eval_hash"], eval_hash)) if len(table) else table


def write_part(parts: Path, table: pa.Table) -> None:
    """Write one batch atomically (a crash mid-write leaves no half file behind)."""
    files.write_parquet(table, parts / f"part-{uuid.uuid4().hex}.parquet")
