"""Parquet, read in row batches of `batch_rows`; a row with a corrupt string is its own quarantined row."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.ingest.readers.raw import RawRecord
from tasks.ingest.readers.record_batches import batch_records


def read_parquet(fh: io.BufferedIOBase, batch_rows: int) -> Iterator[RawRecord]:
    footer: dict[str, int] = {}

    def batches() -> Iterator[pa.RecordBatch]:  # opened lazily, so a corrupt footer is a row of its own
        parquet = pq.ParquetFile(fh)
        footer["rows"] = parquet.metadata.num_rows  # named when the file breaks off: the rows not read
        yield from parquet.iter_batches(batch_size=batch_rows)

    return batch_records(batches(), batch_rows, "Parquet", lambda: footer.get("rows"))
