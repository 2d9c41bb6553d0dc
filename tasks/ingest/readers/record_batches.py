"""Arrow record batches -> RawRecords, shared by the readers of Arrow-based files (Parquet, Arrow IPC).

Rows are converted `batch_rows` at a time, whatever size of batch the writer chose, so no more than
that many rows are ever Python objects at once; a row with a corrupt string is its own quarantined
row, and a file that breaks off keeps the rows before the break. A row holding more than
`raw.MAX_RECORD_BYTES` (a gigantic cell: it costs its size once as Arrow data, many times over as Python
objects) is quarantined as `too_long` without being converted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.ingest.readers.raw import EXCERPT_BYTES, RawRecord, dump_raw, max_record_bytes, too_long


def batch_records(batches: Iterator[pa.RecordBatch], batch_rows: int, file_kind: str,
                  rows_in_file: Callable[[], int | None] = lambda: None) -> Iterator[RawRecord]:
    """Every row of `batches` (a lazy iterator: reading the file happens while it is consumed), numbered
    from 1. A read error becomes one last `unreadable_file` row naming `file_kind`, the rows read and, when
    `rows_in_file` knows it (a Parquet footer), how many the file has."""
    index = 0
    cap = max_record_bytes()
    try:
        for batch in batches:
            for start in range(0, batch.num_rows, batch_rows):
                chunk = batch.slice(start, batch_rows)  # zero-copy
                sizes = _row_bytes(chunk) if chunk.nbytes > cap else None
                over = np.flatnonzero(sizes > cap) if sizes is not None else ()
                if len(over):
                    keep = np.ones(chunk.num_rows, dtype=bool)
                    keep[over] = False
                    kept = iter(_to_pylist(chunk.filter(pa.array(keep))))
                    values = [next(kept) if keep[i] else _too_long_row(chunk, i, int(sizes[i]))
                              for i in range(chunk.num_rows)]
                else:
                    values = _to_pylist(chunk)
                for value in values:
                    index += 1
                    if isinstance(value, RawRecord):
                        yield value._replace(source_row=index)
                    else:
                        yield RawRecord(index, dump_raw(value), value)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # corrupt pages, footer or schema names;
        index += 1  # and pa.ArrowMemoryError: rows that decode to more memory than there is
        yield RawRecord(index, "", None, ("unreadable_file",), _unreadable(file_kind, index - 1, rows_in_file(), exc))


def _unreadable(file_kind: str, read: int, total: int | None, exc: Exception) -> str:
    rows = f"{read:,} rows" + (f" of the {total:,} its footer counts" if total is not None else "")
    said = " ".join(str(exc).split())  # one line: Arrow's messages may hold several
    if isinstance(exc, MemoryError):
        return (f"{file_kind} file unreadable after {rows}: decoding the next rows needs more memory than there is "
                f"({said}); a long cell, or a long value repeated over many rows, decodes to gigabytes: split the "
                "file into smaller ones or remove the long cells (no conversation over ingest.max_chars is accepted)")
    return f"{file_kind} file unreadable after {rows}: {said}"


def _to_pylist(chunk: pa.RecordBatch) -> list:
    try:
        return chunk.to_pylist()
    except UnicodeDecodeError:  # a corrupt string somewhere in the chunk: find its rows
        return [_row(chunk, i) for i in range(chunk.num_rows)]


def _row_bytes(batch: pa.RecordBatch) -> np.ndarray:
    """Each row's size in bytes: the bytes of its strings and binaries, and of its fixed-width values, through
    lists, structs, maps and dictionaries (types without these kernels, such as unions, count 0)."""
    total = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        total += _value_bytes(column)
    return total


_BINARY_LIKE = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary,
                pa.types.is_fixed_size_binary)
_LIST_LIKE = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)


def _value_bytes(array: pa.Array) -> np.ndarray:
    """Each value's size in bytes (see `_row_bytes`); a null is 0."""
    kind = array.type
    try:
        if pa.types.is_dictionary(kind):
            sizes = _value_bytes(array.dictionary)
            indices = array.indices.fill_null(0).to_numpy(zero_copy_only=False)
            return sizes[indices] if len(sizes) else np.zeros(len(array), dtype=np.int64)
        if pa.types.is_map(kind):  # a list of key-value structs
            return _value_bytes(array.cast(pa.list_(pa.struct([pa.field("key", kind.key_type, nullable=False),
                                                               pa.field("value", kind.item_type)]))))
        if pa.types.is_string_view(kind) or pa.types.is_binary_view(kind):  # binary_length has no kernel for them
            return _value_bytes(array.cast(pa.large_string() if pa.types.is_string_view(kind) else pa.large_binary()))
        if any(is_kind(kind) for is_kind in _BINARY_LIKE):
            return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        if any(is_kind(kind) for is_kind in _LIST_LIKE):
            parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
            return np.bincount(parents, weights=_value_bytes(array.flatten()), minlength=len(array)).astype(np.int64)
        if pa.types.is_struct(kind):
            total = np.zeros(len(array), dtype=np.int64)
            for field in array.flatten():
                total += _value_bytes(field)
            return total
        return np.full(len(array), max(kind.bit_width // 8, 1), dtype=np.int64)
    except (ValueError, pa.ArrowNotImplementedError):  # not fixed-width, no kernel (a list view, a union, ...):
        return np.zeros(len(array), dtype=np.int64)  # not counted, rather than a guess that quarantines good rows


def _too_long_row(chunk: pa.RecordBatch, i: int, size: int) -> RawRecord:
    """The quarantined row of a row over the cap, with an excerpt: each column's value when it is small, the
    start of a long string, else the column's size."""
    row = chunk.slice(i, 1)
    excerpt = {}
    for name, column in zip(row.schema.names, row.columns):
        column_bytes = int(_value_bytes(column)[0])
        if column_bytes <= EXCERPT_BYTES:
            try:
                excerpt[name] = column[0].as_py()
            except UnicodeDecodeError:
                excerpt[name] = "<not valid UTF-8>"
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            as_bytes = column.view(pa.binary() if pa.types.is_string(column.type) else pa.large_binary())  # no copy
            start = pc.binary_slice(as_bytes, 0, EXCERPT_BYTES)[0].as_py()
            excerpt[name] = start.decode("utf-8", errors="backslashreplace") + f"... [{column_bytes:,} bytes]"
        else:
            excerpt[name] = f"<{column_bytes:,} bytes>"
    return too_long(0, dump_raw(excerpt), size, "the row")


def _row(batch: pa.RecordBatch, i: int) -> Any:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError as exc:
        return RawRecord(0, "", None, ("invalid_utf8",),
                         f"a string in this row is not valid UTF-8 ({exc.reason}); rewrite the file with valid UTF-8 text")
