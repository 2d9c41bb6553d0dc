"""Parquet, read in row batches of `batch_rows`; a row with a corrupt string is its own quarantined row."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.ingest.readers.raw import RawRecord, dump_raw


def read_parquet(fh: io.BufferedIOBase, batch_rows: int) -> Iterator[RawRecord]:
    index = 0
    try:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows):
            try:
                values = batch.to_pylist()
            except UnicodeDecodeError:  # a corrupt string somewhere in the batch: find its rows
                values = [_parquet_row(batch, i) for i in range(batch.num_rows)]
            for value in values:
                index += 1
                if isinstance(value, RawRecord):
                    yield value._replace(source_row=index)
                else:
                    yield RawRecord(index, dump_raw(value), value)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # corrupt pages, footer or schema names
        index += 1
        yield RawRecord(
            index, "", None, ("unreadable_file",), f"Parquet file unreadable after {index - 1} rows: {exc}"
        )


def _parquet_row(batch: pa.RecordBatch, i: int) -> Any:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError as exc:
        return RawRecord(0, "", None, ("invalid_utf8",),
                         f"a string in this row is not valid UTF-8 ({exc.reason}); rewrite the file with valid UTF-8 text")
