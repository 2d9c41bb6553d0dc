"""Arrow schemas of every table that crosses a task boundary.

Bump a schema's version when its columns change; the version is stored in the Parquet metadata
and in each dataset manifest, so a reader can refuse a table it does not understand.
"""

from __future__ import annotations

import pyarrow as pa

CANONICAL_SCHEMA_VERSION = "canonical-row/1"

ROLES = ("system", "user", "assistant", "tool")

MESSAGE_TYPE = pa.struct([pa.field("role", pa.string(), nullable=False), pa.field("content", pa.string(), nullable=False)])

_SOURCE_FIELDS = [
    pa.field("source_drop", pa.string(), nullable=False, metadata={"doc": "drop id the row came from"}),
    pa.field("source_file", pa.string(), nullable=False, metadata={"doc": "file (path or URL) inside the drop"}),
    pa.field(
        "source_row",
        pa.int64(),
        nullable=False,
        metadata={"doc": "1-based line number (jsonl, csv) or record index (json, parquet) in source_file"},
    ),
    pa.field("source_format", pa.string(), nullable=False, metadata={"doc": "alpaca|sharegpt|openai|prompt_completion"}),
]

CANONICAL_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False, metadata={"doc": "sha256 hex of the normalised conversation"}),
        pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False, metadata={"doc": "roles: system/user/assistant/tool"}),
        pa.field("tools", pa.string(), nullable=True, metadata={"doc": "tool definitions as a JSON string, or null"}),
        *_SOURCE_FIELDS,
    ],
    metadata={"schema_version": CANONICAL_SCHEMA_VERSION},
)

# Rows after normalisation and before validation: canonical rows plus the raw source text, kept
# so that a row the GX suite rejects is quarantined with exactly what the drop contained.
STAGED_SCHEMA = CANONICAL_SCHEMA.append(pa.field("raw", pa.large_string(), nullable=False)).with_metadata(
    {"schema_version": "staged-row/1"}
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source_drop", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("source_format", pa.string(), nullable=True),
        pa.field("reasons", pa.list_(pa.string()), nullable=False, metadata={"doc": "machine-readable reason codes"}),
        pa.field("details", pa.string(), nullable=False, metadata={"doc": "what is wrong and how to fix it"}),
        pa.field("raw", pa.large_string(), nullable=False, metadata={"doc": "the row as it was in the drop"}),
    ],
    metadata={"schema_version": "quarantine-row/1"},
)

DUPLICATE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False, metadata={"doc": "id of the row this one duplicates"}),
        pa.field("source_drop", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field(
            "duplicate_of",
            pa.string(),
            nullable=False,
            metadata={"doc": "'dataset:<version>' or 'drop:<drop_id>' (earlier row of the same drop)"},
        ),
    ],
    metadata={"schema_version": "duplicate-row/1"},
)

SPLITS = ("train", "eval")
