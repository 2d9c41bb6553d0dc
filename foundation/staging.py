"""Staging tables: the intermediate tables tasks hand each other inside one flow run.

They are Arrow IPC files, uncompressed: written once and read back within seconds, so encoding
speed matters more than size (the products, dataset versions and quarantines, are Parquet).
Readers stream them batch by batch, so memory stays bounded by one batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa


def open_writer(path: Path | str, schema: pa.Schema) -> pa.ipc.RecordBatchFileWriter:
    return pa.ipc.new_file(str(path), schema)


def iter_batches(*paths: Path | str) -> Iterator[pa.RecordBatch]:
    """The record batches of one or more staging files, in order."""
    for path in paths:
        with pa.OSFile(str(path)) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)


def read_columns(path: Path | str, columns: list[str]) -> pa.Table:
    """Only the named columns of a staging file: the other columns are never read."""
    with pa.OSFile(str(path)) as source:
        schema = pa.ipc.open_file(source).schema
        fields = [schema.get_field_index(c) for c in columns]
        source.seek(0)
        reader = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=fields))
        table = pa.Table.from_batches([reader.get_batch(i) for i in range(reader.num_record_batches)], reader.schema)
    return table.select(columns)
