"""Arrow IPC (`.arrow`, `.feather`): the stream format (what Hugging Face `datasets` writes) and the file
format (Feather v2), read one record batch at a time and converted `batch_rows` rows at a time."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pyarrow as pa

from tasks.ingest.readers.raw import RawRecord
from tasks.ingest.readers.record_batches import batch_records

# The file format is "ARROW1", padding to 8 bytes, then the stream format (ending with its end-of-stream
# marker), then a footer. Reading it as a stream after those 8 bytes needs no seeking to the footer, so
# a gzipped file (`.arrow.gz`) is read front to back like any other.
FILE_MAGIC = b"ARROW1"
FEATHER_V1_MAGIC = b"FEA1"


def read_arrow(fh: io.BufferedIOBase, batch_rows: int) -> Iterator[RawRecord]:
    def batches() -> Iterator[pa.RecordBatch]:
        head = fh.read(8)
        if head.startswith(FEATHER_V1_MAGIC):
            raise pa.ArrowInvalid("it is Feather v1; re-save it as Feather v2 "
                                  "(pyarrow.feather.write_feather(pyarrow.feather.read_table(path), path))")
        if not head.startswith(FILE_MAGIC):
            fh.seek(0)  # the stream format starts at the first byte
        yield from pa.ipc.open_stream(fh)

    return batch_records(batches(), batch_rows, "Arrow IPC")
