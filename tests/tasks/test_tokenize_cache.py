"""The cache of a version's tokenized rows: a second run with the same version, tokenizer and settings links
the rows and reports the gate counts of the first without loading a tokenizer; anything that decides the rows
is a miss; a damaged entry is tokenized again and replaced; a refused run stores nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.tokenize as tokenize
from foundation.artifacts import DatasetManifest, SplitRows
from foundation.stores.datasets import SPLITS, DatasetVersion
from schemas.config import RunConfig, load_run_config
from schemas.tables import CANONICAL_SCHEMA
from tests.conftest import ROOT

CONFIG = ROOT / "flows" / "configs" / "tiny_cpu.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja", "config.json")


def canonical_rows(n: int, offset: int = 0) -> pa.Table:
    return pa.Table.from_pylist(
        [{"id": f"{offset + i:064x}", "tools": None, "source_drop": "d", "source_file": "f.jsonl",
          "source_row": offset + i + 1, "source_format": "openai",
          "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
         for i in range(n)],
        schema=CANONICAL_SCHEMA,
    )


def make_version(workspace, name: str, train: int = 24, eval_: int = 6) -> DatasetVersion:
    """A dataset version as the store finds it: its two splits and a manifest."""
    version = DatasetVersion(workspace.datasets_dir / name)
    version.root.mkdir(parents=True)
    pq.write_table(canonical_rows(train), version.path("train"))
    pq.write_table(canonical_rows(eval_, offset=1000), version.path("eval"))
    DatasetManifest(version=name, content_hash=name[3:] * 4, schema_version="canonical-row/1", parent=None,
                    created_at="2025-01-01T00:00:00Z", eval_ratio=0.2, drops=[],
                    rows=SplitRows(train=train, eval=eval_), files={}).write(version.root / "manifest.json")
    return version


@pytest.fixture
def model_dir(tiny_model, tmp_path) -> Path:
    """The tiny model's tokenizer files in a directory of this test's own, which a test may change."""
    path = tmp_path / "model"
    path.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tiny_model) / name, path / name)
    return path


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The model paths tokenize.py loaded a tokenizer from."""
    seen, real = [], tokenize.load_tokenizer
    monkeypatch.setattr(tokenize, "load_tokenizer", lambda path, config: seen.append(path) or real(path, config))
    return seen


@pytest.fixture
def published(monkeypatch) -> list[dict]:
    """Run the task's body outside a flow run: its log lines go nowhere, its artifacts are recorded."""
    import logging

    artifacts: list[dict] = []
    monkeypatch.setattr(tokenize, "get_run_logger", lambda: logging.getLogger("test-tokenize"))
    monkeypatch.setattr(tokenize, "create_markdown_artifact", lambda **kwargs: artifacts.append(kwargs))
    return artifacts


def forbid_tokenizing(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("a cache hit loaded a tokenizer or ran the gates")

    monkeypatch.setattr(tokenize, "load_tokenizer", refuse)
    monkeypatch.setattr(tokenize, "run_gates", refuse)


def entries(version: DatasetVersion) -> list[str]:
    root = version.root / "tokenized"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def config_with(*overrides: str, **model) -> RunConfig:
    """The tiny config with `key=value` overrides and model fields set (a template is no override's value)."""
    config = load_run_config(CONFIG, list(overrides))
    return config.model_copy(update={"model": config.model.model_copy(update=model)}) if model else config


def tokenize_version(version, model_dir, config=None):
    warnings: list[str] = []
    rows = tokenize.tokenize_version(version, str(model_dir), config or config_with(), warnings.append)
    assert warnings == []
    return rows


def test_a_second_run_links_the_rows_of_the_first_and_loads_no_tokenizer(workspace, model_dir, published,
                                                                         monkeypatch):
    version = make_version(workspace, "ds-0000000000000001")
    config = config_with()
    first = tokenize.tokenize_dataset.fn(version.name, str(model_dir), config, "run-1")
    [key] = entries(version)

    forbid_tokenizing(monkeypatch)
    second = tokenize.tokenize_dataset.fn(version.name, str(model_dir), config, "run-2")

    runs = [workspace.runs.dir("run-1"), workspace.runs.dir("run-2")]
    entry = version.tokenized_entry(key)
    for split in SPLITS:
        one, two = runs[0].tokenized(split), runs[1].tokenized(split)
        assert one.read_bytes() == two.read_bytes() and pq.read_table(one).equals(pq.read_table(two))
        assert two.stat().st_ino == entry.path(split).stat().st_ino  # a link to the entry: no bytes copied
        assert getattr(second, split).path == str(two)
    assert second == tokenize.at_paths(first, runs[1].tokenized)  # the same record apart from its paths
    assert second.train.kept_rows == 24 and second.train.trainable_tokens > 0
    assert [a["key"] for a in published] == ["training-example-mask"] * 2
    assert published[0]["markdown"] == published[1]["markdown"] and "**⟦" in published[0]["markdown"]


def test_rows_written_over_a_runs_links_leave_the_entry_as_it_was(workspace, model_dir, published):
    version = make_version(workspace, "ds-0000000000000002")
    tokenize.tokenize_dataset.fn(version.name, str(model_dir), config_with(), "run-1")
    [key] = entries(version)
    entry = version.tokenized_entry(key)
    cached = {split: entry.path(split).read_bytes() for split in SPLITS}
    # the same run again with remote code allowed (never cached) and a template that renders other tokens: its
    # rows are written over its files, which are links into the entry
    template = (model_dir / "chat_template.jinja").read_text().replace("<|end_header_id|>\\n\\n", "<|end_header_id|>\\n")
    assert template != (model_dir / "chat_template.jinja").read_text()
    tokenize.tokenize_dataset.fn(version.name, str(model_dir), config_with(trust_remote_code=True,
                                                                            chat_template=template), "run-1")
    run = workspace.runs.dir("run-1")
    assert all(run.tokenized(split).read_bytes() != cached[split] for split in SPLITS)
    assert {split: entry.path(split).read_bytes() for split in SPLITS} == cached
    assert entries(version) == [key]


@pytest.mark.parametrize("change", ["max_seq_length", "chat_template", "dataset_version", "tokenizer_file"])
def test_what_decides_the_rows_is_a_miss(workspace, model_dir, loads, change):
    version = make_version(workspace, "ds-0000000000000003")
    tokenize_version(version, model_dir)
    assert len(loads) == 1 and len(entries(version)) == 1
    tokenize_version(version, model_dir)
    assert len(loads) == 1  # unchanged: a hit

    config = config_with()
    if change == "max_seq_length":
        config = config_with("train.max_seq_length=200")
    elif change == "chat_template":  # a template that renders the same rows, written differently
        config = config_with(chat_template=(model_dir / "chat_template.jinja").read_text() + "{# another #}")
    elif change == "dataset_version":
        version = make_version(workspace, "ds-0000000000000004")
    else:
        changed = model_dir / "tokenizer_config.json"
        changed.write_text(changed.read_text().replace('"model_max_length": 1024', '"model_max_length": 2048'))
    rows = tokenize_version(version, model_dir, config)
    assert len(loads) == 2 and not rows.reused
    assert len(entries(version)) == (1 if change == "dataset_version" else 2)


@pytest.mark.parametrize("damage", ["eval file deleted", "record truncated", "train file truncated"])
def test_a_damaged_entry_is_tokenized_again_and_replaced(workspace, model_dir, loads, damage):
    version = make_version(workspace, "ds-0000000000000005")
    first = tokenize_version(version, model_dir)
    entry = first.entry
    good = {split: entry.path(split).read_bytes() for split in SPLITS}
    if damage == "eval file deleted":
        entry.path("eval").unlink()
    elif damage == "record truncated":
        entry.record.write_bytes(entry.record.read_bytes()[:40])
    else:
        entry.path("train").write_bytes(good["train"][:100])

    again = tokenize_version(version, model_dir)
    assert len(loads) == 2 and not again.reused and again.record == first.record
    assert {split: entry.path(split).read_bytes() for split in SPLITS} == good  # replaced whole
    assert tokenize_version(version, model_dir).reused and len(loads) == 2


def test_a_run_the_gates_refuse_stores_nothing(workspace, model_dir):
    version = make_version(workspace, "ds-0000000000000006")
    with pytest.raises(tokenize.GateError, match="longer than train.max_seq_length=8"):
        tokenize_version(version, model_dir, config_with("train.max_seq_length=8"))
    assert entries(version) == []


def test_remote_code_or_a_model_that_is_no_directory_is_never_cached(workspace, model_dir):
    version = make_version(workspace, "ds-0000000000000007")
    assert tokenize.cache_key(version.name, str(model_dir), config_with(trust_remote_code=True)) is None
    assert tokenize.cache_key(version.name, "org/some-model", config_with()) is None
    assert tokenize.cache_key(version.name, str(model_dir), config_with()) is not None
