"""Readers: an open binary file -> RawRecords, one module per file type. Each isolates a bad record to its own row.

`READERS` is the table of readers by file suffix; the suffixes a drop may hold are its keys. A new
file type is one reader module, one row here and its test. Any of them may also be gzipped
(`rows.jsonl.gz`): fsspec decompresses the stream, inferred from the name.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec

from tasks.ingest.readers.arrow_file import read_arrow
from tasks.ingest.readers.csv_file import read_csv
from tasks.ingest.readers.json_file import read_json
from tasks.ingest.readers.jsonl import read_jsonl
from tasks.ingest.readers.parquet_file import read_parquet
from tasks.ingest.readers.raw import RawRecord

__all__ = ["READERS", "SUPPORTED_SUFFIXES", "RawRecord", "file_suffix", "iter_file_records"]

# A reader takes the open file and the rows per batch; Parquet and Arrow IPC read in batches, the
# others stream one record at a time.
READERS: dict[str, Callable[[io.BufferedIOBase, int], Iterator[RawRecord]]] = {
    ".jsonl": lambda fh, batch_rows: read_jsonl(fh),
    ".json": lambda fh, batch_rows: read_json(fh),
    ".csv": lambda fh, batch_rows: read_csv(fh),
    ".parquet": read_parquet,
    ".arrow": read_arrow,
    ".feather": read_arrow,
}

SUPPORTED_SUFFIXES = tuple(READERS)


def file_suffix(path: str) -> str:
    """The suffix that picks a file's reader: lower case, under any `.gz`."""
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


def iter_file_records(url: str, batch_rows: int) -> Iterator[RawRecord]:
    """Every record of one data file (a suffix of `READERS`, optionally .gz), read by its reader."""
    read = READERS[file_suffix(url)]
    try:
        if "://" not in url and not stat.S_ISREG(os.stat(url).st_mode):  # discovery refuses these: be sure
            yield RawRecord(0, "", None, ("unreadable_file",), "not a regular file (a pipe, a socket or a device); "
                            "write its data to a regular file")
            return
        with fsspec.open(url, "rb", compression="infer") as fh:
            yield from read(fh, batch_rows)
    except (OSError, EOFError) as exc:  # e.g. a truncated .gz stream
        yield RawRecord(0, "", None, ("unreadable_file",), f"file could not be read to the end: {exc}")
