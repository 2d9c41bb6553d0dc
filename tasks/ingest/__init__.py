"""Ingest: read a drop's files in bounded batches, detect each file's format, normalise to canonical rows.

A corrupt line or record never stops a drop: it becomes a quarantined row with its raw text,
file, row number and reasons.

The parts, two of them registries (a table, and one module per row):
- `discovery`: drop ids, the data files a drop holds (those with a suffix in the readers table; the
  files a `datasets` save_to_disk directory lists; an `hf://datasets/...` snapshot in the local Hugging
  Face cache), and the fingerprint of a drop's content.
- `descriptor`: a drop's column and role mapping (`drop.yaml`, a LLaMA-Factory `dataset_info.json`, an
  Axolotl config's `datasets:`), validated, applied to each record before its format is detected, and
  part of the drop's identity.
- `readers`: `READERS`, the table of readers by file suffix, and one module per file type (JSON
  Lines, JSON, CSV, Parquet, Arrow IPC). Each turns an open binary file into `RawRecord`s and isolates a bad
  record to its own row. A new file type is one reader module, one row in `READERS` and its test.
- `formats`: `FORMATS`, the ordered table of input formats (preference pairs, OpenAI, ShareGPT, Alpaca,
  prompt/completion, plain text: how each is detected and normalised), one module per format, and what they
  share (`formats.messages`). A new format is one module defining its `FORMAT` row, one row in
  `FORMATS` and its test. It imports neither Prefect nor pyarrow, so the CLI checks `--format`
  against the table quickly.
- `nesting`: the reason given for a value nested deeper than can be written as JSON.
- `stage`: the Prefect task `read_drop`, which wires the pure parts to the file system and writes
  two staging tables per file: the normalised rows (with their raw text) and the rows that could
  not be normalised (quarantine).

The pure parts (`formats.normalize_record`, `formats.detect_format`, the readers over open files)
take and return plain data.
"""
