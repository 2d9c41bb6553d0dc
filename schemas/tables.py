"""Arrow schemas of every table that crosses a task boundary.

Bump a schema's version when its columns change; the version is stored in the Parquet metadata
and in each dataset manifest, so a reader can refuse a table it does not understand.
"""

from __future__ import annotations

import pyarrow as pa

CANONICAL_SCHEMA_VERSION = "canonical-row/2"

# `text`: a plain document (a `{"text": ...}` row), the row's only message, trained on every token.
ROLES = ("system", "user", "assistant", "tool", "text")

MESSAGE_TYPE = pa.struct([
    pa.field("role", pa.string(), nullable=False),
    pa.field("content", pa.string(), nullable=False),
    # null: the role's default (assistant turns and text rows trained, the others context); 0 or 1: as the data says
    pa.field("weight", pa.float32(), nullable=True),
    # the turn's tool calls, OpenAI-shaped ([{"type": "function", "function": {"name", "arguments"}}]), as JSON
    pa.field("tool_calls", pa.string(), nullable=True),
    # the model's reasoning before its answer (templates such as Qwen3's render it as a think block)
    pa.field("reasoning", pa.string(), nullable=True),
])

_SOURCE_FIELDS = [
    pa.field("source_drop", pa.string(), nullable=False, metadata={"doc": "drop id the row came from"}),
    pa.field("source_file", pa.string(), nullable=False, metadata={"doc": "file (path or URL) inside the drop"}),
    pa.field(
        "source_row",
        pa.int64(),
        nullable=False,
        metadata={"doc": "1-based line number (jsonl, csv) or record index (json, parquet) in source_file"},
    ),
    pa.field("source_format", pa.string(), nullable=False, metadata={"doc": "a name of tasks.ingest.formats.FORMAT_NAMES"}),
]

CANONICAL_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False, metadata={"doc": "sha256 hex of the normalised conversation"}),
        pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False,
                 metadata={"doc": "roles: system/user/assistant/tool, or one text message"}),
        pa.field("tools", pa.string(), nullable=True, metadata={"doc": "tool definitions as a JSON string, or null"}),
        *_SOURCE_FIELDS,
    ],
    metadata={"schema_version": CANONICAL_SCHEMA_VERSION},
)

# Rows after normalisation and before validation: canonical rows plus the raw source text, kept
# so that a row the GX suite rejects is quarantined with exactly what the drop contained.
STAGED_SCHEMA = CANONICAL_SCHEMA.append(pa.field("raw", pa.large_string(), nullable=False)).with_metadata(
    {"schema_version": "staged-row/2"}
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


def upgrade_canonical(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A canonical batch of an earlier schema version (canonical-row/1: messages of role and content
    only) in the current one: the fields it lacks are null, which means what version 1 meant."""
    if batch.schema.equals(CANONICAL_SCHEMA, check_metadata=False):
        return batch
    messages = batch.column("messages")
    flat = messages.flatten()
    fields = [flat.field(f.name) if flat.type.get_field_index(f.name) >= 0 else pa.nulls(len(flat), f.type)
              for f in MESSAGE_TYPE]
    structs = pa.StructArray.from_arrays(fields, fields=list(MESSAGE_TYPE))
    upgraded = pa.ListArray.from_arrays(messages.offsets, structs, type=pa.list_(MESSAGE_TYPE))
    columns = [upgraded if name == "messages" else batch.column(name) for name in CANONICAL_SCHEMA.names]
    return pa.RecordBatch.from_arrays(columns, schema=CANONICAL_SCHEMA)
