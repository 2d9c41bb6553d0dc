"""Arrow record batches -> RawRecords, shared by the readers of Arrow-based files (Parquet, Arrow IPC).

Rows are converted `batch_rows` at a time, whatever size of batch the writer chose, so no more than
that many rows are ever Python objects at once; a row with a corrupt string is its own quarantined
row, and a file that breaks off keeps the rows before the break.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from tasks.ingest.readers.raw import RawRecord, dump_raw


def batch_records(batches: Iterator[pa.RecordBatch], batch_rows: int, file_kind: str) -> Iterator[RawRecord]:
    """Every row of `batches` (a lazy iterator: reading the file happens while it is consumed), numbered
    from 1. A read error becomes one last `unreadable_file` row naming `file_kind` and the rows read."""
    index = 0
    try:
        for batch in batches:
            for start in range(0, batch.num_rows, batch_rows):
                chunk = batch.slice(start, batch_rows)  # zero-copy
                try:
                    values = chunk.to_pylist()
                except UnicodeDecodeError:  # a corrupt string somewhere in the chunk: find its rows
                    values = [_row(chunk, i) for i in range(chunk.num_rows)]
                for value in values:
                    index += 1
                    if isinstance(value, RawRecord):
                        yield value._replace(source_row=index)
                    else:
                        yield RawRecord(index, dump_raw(value), value)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # corrupt pages, footer or schema names
        index += 1
        yield RawRecord(
            index, "", None, ("unreadable_file",), f"{file_kind} file unreadable after {index - 1} rows: {exc}"
        )


def _row(batch: pa.RecordBatch, i: int) -> Any:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError as exc:
        return RawRecord(0, "", None, ("invalid_utf8",),
                         f"a string in this row is not valid UTF-8 ({exc.reason}); rewrite the file with valid UTF-8 text")
