"""Containers of rows beyond single files: Arrow IPC files, `datasets`' save_to_disk directories, sharded
and partitioned Parquet directories, and hf:// datasets read offline from the Hugging Face cache.

Every container is listed to exactly its data files, read in bounded batches, and its rows come back as
written; what is not data (metadata, stray cache files, markers) is never read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import socket

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from foundation.errors import DropError
from tasks.ingest.discovery import default_drop_id, find_drop, list_drop_files
from tasks.ingest.readers import iter_file_records
from tasks.ingest.readers.arrow_file import read_arrow
from tests.reliability.conftest import prefect_api_url  # noqa: F401  (the fixture, for the end-to-end tests)

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def qa(i: int) -> dict:
    return {"prompt": f"What is {i} + {i}?", "completion": str(2 * i)}


def chats(n: int, start: int = 0) -> list[dict]:
    """Rows with nested values (lists of structs), as instruction-tuning datasets hold them."""
    return [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}],
             "source": f"s{i % 3}"} for i in range(start, start + n)]


def values(files: list[str], batch_rows: int = 4) -> list:
    records = [r for f in files for r in iter_file_records(f, batch_rows)]
    assert all(r.reasons == () for r in records), [r for r in records if r.reasons][:3]
    return [r.value for r in records]


def names(files: list[str], root) -> list[str]:
    return [os.path.relpath(f, root) for f in files]


# ------------------------------------------------------------------------------------ Arrow IPC


def write_stream(path, table: pa.Table, chunk: int) -> None:
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=chunk):
            writer.write_batch(batch)


def write_ipc_file(path, table: pa.Table, chunk: int) -> None:
    with pa.ipc.new_file(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=chunk):
            writer.write_batch(batch)


def test_arrow_stream_file_and_feather_are_read_row_for_row(tmp_path):
    rows = chats(25)
    table = pa.Table.from_pylist(rows)
    write_stream(tmp_path / "stream.arrow", table, chunk=7)
    write_ipc_file(tmp_path / "file.arrow", table, chunk=7)
    feather.write_feather(table, tmp_path / "compressed.feather", chunksize=10)  # lz4-compressed buffers
    for name in ("stream.arrow", "file.arrow"):  # the file format gzipped is read front to back too
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((tmp_path / name).read_bytes()))
    files = list_drop_files([str(tmp_path)])
    assert names(files, tmp_path) == ["compressed.feather", "file.arrow", "file.arrow.gz", "stream.arrow",
                                      "stream.arrow.gz"]
    for url in files:
        records = list(iter_file_records(url, 4))
        assert [r.value for r in records] == rows, url
        assert [r.source_row for r in records] == list(range(1, 26))
        assert records[0].raw.startswith('{"messages":[{"role":"user","content":"Say 0."}')


class ReadTracker(io.BufferedReader):
    """A file that remembers the furthest byte read from it."""

    furthest = 0

    def read(self, size=-1):
        data = super().read(size)
        self.furthest = max(self.furthest, self.tell())
        return data


@pytest.mark.parametrize("writer", [write_stream, write_ipc_file], ids=["stream", "file"])
def test_arrow_files_are_read_a_batch_at_a_time(tmp_path, writer):
    path = tmp_path / "big.arrow"
    writer(path, pa.Table.from_pylist([qa(i) for i in range(20_000)]), chunk=1000)
    with ReadTracker(io.FileIO(path)) as fh:
        records = read_arrow(fh, 100)
        first = next(records)
        assert first.value == qa(0) and first.source_row == 1
        assert fh.furthest < path.stat().st_size / 4  # not the whole file
        assert sum(1 for _ in records) == 19_999


def test_bad_arrow_files_keep_their_good_rows_and_name_the_problem(tmp_path):
    stream = tmp_path / "cut.arrow"
    write_stream(stream, pa.Table.from_pylist([qa(i) for i in range(30)]), chunk=10)
    stream.write_bytes(stream.read_bytes()[:-200])  # cut inside the last batch
    records = list(iter_file_records(str(stream), 4))
    assert [r.value for r in records[:-1]] == [qa(i) for i in range(len(records) - 1)]
    assert len(records) - 1 in (10, 20) and records[-1].reasons == ("unreadable_file",)
    assert records[-1].details.startswith(f"Arrow IPC file unreadable after {len(records) - 1} rows")

    text = pa.array([b"fine", b"\xff broken", b"also fine"], pa.binary()).view(pa.string())
    write_stream(tmp_path / "utf8.arrow", pa.table({"prompt": text, "completion": ["a", "b", "c"]}), chunk=10)
    records = list(iter_file_records(str(tmp_path / "utf8.arrow"), 4))
    assert [r.reasons for r in records] == [(), ("invalid_utf8",), ()]
    assert records[2].value == {"prompt": "also fine", "completion": "c"} and records[2].source_row == 3

    feather.write_feather(pa.Table.from_pylist([qa(1)]), tmp_path / "old.feather", version=1)
    (record,) = iter_file_records(str(tmp_path / "old.feather"), 4)
    assert record.reasons == ("unreadable_file",) and "Feather v1; re-save it as Feather v2" in record.details


def test_a_parquet_file_that_breaks_off_names_the_rows_its_footer_counts(tmp_path):
    path = tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist([qa(i) for i in range(30)]), path, row_group_size=10, compression="zstd")
    chunk = pq.ParquetFile(path).metadata.row_group(2).column(0)
    data = bytearray(path.read_bytes())
    end = chunk.data_page_offset + chunk.total_compressed_size
    data[end - 12 : end - 2] = b"\xab" * 10  # the last row group's pages, not the footer
    path.write_bytes(bytes(data))
    records = list(iter_file_records(str(path), 4))
    assert [r.value for r in records[:-1]] == [qa(i) for i in range(20)]
    assert records[-1].reasons == ("unreadable_file",) and records[-1].source_row == 21
    assert records[-1].details.startswith("Parquet file unreadable after 20 rows of the 30 its footer counts: ")
    assert "\n" not in records[-1].details


def test_rows_that_decode_to_more_memory_than_there_is_name_the_fix(tmp_path, monkeypatch):
    """What pyarrow raises when a batch cannot be allocated (a value repeated over many rows of a
    dictionary-encoded column decodes to gigabytes: 40 rows of 200 MB in a 7 KB file)."""
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([qa(i) for i in range(30)]), path, row_group_size=10)
    real = pq.ParquetFile.iter_batches

    def first_batch_then_out_of_memory(self, *args, **kwargs):
        yield next(real(self, *args, **kwargs))
        raise pa.ArrowMemoryError("realloc of size 6710886400 failed")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", first_batch_then_out_of_memory)
    records = list(iter_file_records(str(path), 10))
    assert [r.value for r in records[:-1]] == [qa(i) for i in range(10)]
    details = records[-1].details
    assert records[-1].reasons == ("unreadable_file",)
    assert details.startswith("Parquet file unreadable after 10 rows of the 30 its footer counts: decoding the next "
                              "rows needs more memory than there is (realloc of size 6710886400 failed)")
    assert "split the file into smaller ones or remove the long cells" in details


# ----------------------------------------------------------------------- datasets' save_to_disk


def save_dataset(path, rows: list[dict], num_shards: int = 1) -> None:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    Dataset.from_list(rows).save_to_disk(str(path), num_shards=num_shards)


def save_dataset_dict(path, splits: dict[str, list[dict]]) -> None:
    from datasets import Dataset, DatasetDict, disable_progress_bars

    disable_progress_bars()
    DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(path))


def test_a_saved_dataset_is_the_files_its_state_lists(tmp_path):
    saved = tmp_path / "saved"
    rows = chats(40)
    save_dataset(saved, rows, num_shards=3)
    # a stray cache file from .map() beside the data is not part of the dataset
    write_stream(saved / "cache-0123456789abcdef.arrow", pa.Table.from_pylist(chats(5, start=100)), chunk=5)
    files = list_drop_files([str(saved)])
    assert names(files, saved) == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    assert values(files) == rows
    drop = find_drop([str(saved)])
    assert drop.drop_id.startswith("saved-") and drop.files == files
    for metadata in ("state.json", "dataset_info.json"):
        with pytest.raises(DropError, match=rf"{metadata}: metadata of a Hugging Face save_to_disk dataset, not data; "
                                            rf"pass its directory \({saved}\) instead"):
            list_drop_files([str(saved / metadata)])


def test_every_split_of_a_saved_dataset_dict_is_read_and_its_metadata_never(tmp_path):
    saved = tmp_path / "dict"
    splits = {"train": chats(30), "validation": chats(7, start=30), "test": chats(5, start=37)}
    save_dataset_dict(saved, splits)
    (saved / "notes").mkdir()  # a directory that is not a listed split is not read
    (saved / "notes" / "rows.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    files = list_drop_files([str(saved)])
    assert names(files, saved) == [f"{split}/data-00000-of-00001.arrow" for split in splits]  # dataset_dict's order
    assert values(files) == splits["train"] + splits["validation"] + splits["test"]
    # inside a larger drop, the saved dataset takes its directory's place among the other files
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    (tmp_path / "z.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    everything = names(list_drop_files([str(tmp_path)]), tmp_path)
    assert everything == ["a.jsonl", *[f"dict/{s}/data-00000-of-00001.arrow" for s in splits], "z.jsonl"]
    assert not any(n.endswith(".json") for n in everything)


def test_an_incomplete_saved_dataset_names_what_is_missing(tmp_path):
    saved = tmp_path / "saved"
    save_dataset(saved, chats(10), num_shards=2)
    (saved / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(DropError) as raised:
        list_drop_files([str(saved)])
    assert str(raised.value) == (f"{saved}/state.json: lists data-00001-of-00002.arrow, which is not in {saved}; the "
                                 "save_to_disk directory is incomplete: copy the missing file or save the dataset again")
    (saved / "state.json").write_text('{"_fingerprint": "x"}')
    with pytest.raises(DropError, match=r"state.json: no \"_data_files\" list .* rename state.json if it holds records"):
        list_drop_files([str(saved)])

    split_dict = tmp_path / "dict"
    save_dataset_dict(split_dict, {"train": chats(3), "test": chats(2)})
    (split_dict / "test" / "state.json").unlink()
    with pytest.raises(DropError, match=rf"{split_dict}/test: a split listed in {split_dict}/dataset_dict.json "
                                        "without its state.json"):
        list_drop_files([str(split_dict)])


# ----------------------------------------------------------------------- Parquet directories


def test_sharded_and_partitioned_parquet_directories(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [qa(i) for i in range(40)]
    for n in range(4):
        pq.write_table(pa.Table.from_pylist(rows[n * 10:(n + 1) * 10]), shards / f"train-0000{n}-of-00004.parquet")
    files = list_drop_files([str(shards)])
    assert names(files, shards) == [f"train-0000{n}-of-00004.parquet" for n in range(4)]
    assert values(files) == rows

    # Spark's output: Hive-style partitions, a _SUCCESS marker, .crc checksums, and the leftovers of a
    # failed task attempt under _temporary/ and a Delta log, none of which is data
    spark = tmp_path / "spark"
    parts = {"split=train": rows[:30], "split=test": rows[30:]}
    for partition, part_rows in parts.items():
        (spark / partition).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(part_rows), spark / partition / "part-00000-c000.snappy.parquet")
        (spark / partition / ".part-00000-c000.snappy.parquet.crc").write_bytes(b"crc")
    (spark / "_SUCCESS").write_text("")
    (spark / "_temporary" / "0" / "task_1").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([qa(99)]), spark / "_temporary" / "0" / "task_1" / "part-00001.parquet")
    (spark / "_delta_log").mkdir()
    (spark / "_delta_log" / "00000000000000000000.json").write_text('{"commitInfo": {}}\n')
    files = list_drop_files([str(spark)])
    assert names(files, spark) == ["split=test/part-00000-c000.snappy.parquet",
                                   "split=train/part-00000-c000.snappy.parquet"]
    assert values(files) == rows[30:] + rows[:30]
    # a drop that itself sits under a hidden or _-prefixed directory is still read
    hidden_parent = tmp_path / ".cache" / "_exports" / "drop"
    hidden_parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:3]), hidden_parent / "part-0.parquet")
    assert values(list_drop_files([str(hidden_parent)])) == rows[:3]


# ------------------------------------------------------------------- hf:// from the local cache


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """HF_HOME with one cached dataset, org/qa at main (snapshot files linked to blobs, as the Hub's cache
    lays them out)."""
    home = tmp_path / "hf"
    repo = home / "hub" / "datasets--org--qa"
    snapshot = repo / "snapshots" / COMMIT
    (snapshot / "data").mkdir(parents=True)
    (repo / "blobs").mkdir()

    def add(path: str, data: bytes) -> None:
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path).symlink_to(os.path.relpath(blob, (snapshot / path).parent))

    for split, rows in {"train": [qa(i) for i in range(12)], "test": [qa(i) for i in range(12, 15)]}.items():
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        add(f"data/{split}-00000-of-00001.parquet", sink.getvalue().to_pybytes())
    add("README.md", b"---\nconfigs: []\n---\n")
    add(".gitattributes", b"*.parquet filter=lfs\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    """Opening any connection fails the test: hf:// drops never leave the machine."""

    def connect(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)


def test_an_hf_dataset_is_read_from_its_cached_snapshot(hub_cache, no_network):
    data = hub_cache / "data"
    expected = [str(data / "test-00000-of-00001.parquet"), str(data / "train-00000-of-00001.parquet")]
    for url in ("hf://datasets/org/qa", "hf://datasets/org/qa/", f"hf://datasets/org/qa@{COMMIT}",
                "hf://datasets/org/qa@main/data"):
        assert list_drop_files([url]) == expected, url
    assert values(expected) == [qa(i) for i in range(12, 15)] + [qa(i) for i in range(12)]
    (train,) = list_drop_files(["hf://datasets/org/qa@main/data/train-00000-of-00001.parquet"])
    assert train == expected[1]
    drop = find_drop(["hf://datasets/org/qa"])
    assert drop.drop_id == f"org-qa-{drop.fingerprint[:12]}" and drop.files == expected
    assert drop.fingerprint == find_drop([str(hub_cache)]).fingerprint  # the same content as a local directory
    assert default_drop_id(["hf://datasets/org/qa@main/data"], "ab" * 32) == "org-qa-abababababab"


def test_an_hf_dataset_not_in_the_cache_names_the_fix(hub_cache, no_network):
    cache = hub_cache.parents[2]
    with pytest.raises(DropError) as raised:
        list_drop_files(["hf://datasets/org/other"])
    assert str(raised.value) == (
        f"hf://datasets/org/other: dataset org/other is not (completely) in the Hugging Face cache {cache} and "
        "sftflow never downloads; run `hf download --repo-type dataset org/other` on a machine with internet and "
        "copy its cache here, set HF_HOME (or HF_HUB_CACHE) to the cache that holds it, or pass a local path"
    )
    assert "\n" not in str(raised.value)
    with pytest.raises(DropError, match=r"dataset org/qa@v2 is not \(completely\) in the Hugging Face cache .*"
                                        r"`hf download --repo-type dataset org/qa --revision v2`"):
        list_drop_files(["hf://datasets/org/qa@v2"])
    with pytest.raises(DropError, match=r"hf://datasets/org/qa/data/valid.parquet: no data/valid.parquet in the "
                                        rf"cached snapshot {hub_cache}; check the path"):
        list_drop_files(["hf://datasets/org/qa/data/valid.parquet"])


@pytest.mark.parametrize("url", ["hf://org/model", "hf://datasets/org", "hf://spaces/org/app",
                                 "hf://datasets/org/qa/../../../etc", "hf://datasets/../qa"])
def test_an_hf_url_that_is_not_a_dataset_is_refused(hub_cache, no_network, url):
    with pytest.raises(DropError, match=rf"^{url}: not a Hugging Face dataset URL; write hf://datasets/ORG/NAME"):
        list_drop_files([url])


@pytest.mark.parametrize("revision", ["..", "%2E%2E", "..%2F..%2F..%2Fsecret", "main%2F..%2F..", "%2Fetc%2Fpasswd"])
def test_an_hf_revision_cannot_lead_out_of_the_cache(hub_cache, no_network, revision):
    with pytest.raises(DropError, match=r"is not a branch, tag or commit; write hf://datasets/ORG/NAME@REVISION"):
        list_drop_files([f"hf://datasets/org/qa@{revision}"])


def test_an_hf_revision_with_a_slash_is_looked_up_in_the_cache(hub_cache, no_network):
    refs = hub_cache.parents[1] / "refs" / "refs" / "convert"
    refs.mkdir(parents=True)
    (refs / "parquet").write_text(COMMIT)
    assert len(list_drop_files(["hf://datasets/org/qa@refs%2Fconvert%2Fparquet/data"])) == 2


def test_a_cached_snapshot_linking_outside_its_repository_is_refused(hub_cache, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"prompt": "p", "completion": "c"}\n')
    (hub_cache / "data" / "leak.jsonl").symlink_to(secret)
    with pytest.raises(DropError, match="outside the drop directory"):
        list_drop_files(["hf://datasets/org/qa"])


# ------------------------------------------------------------------------------ end to end


def test_ingest_flow_reads_a_saved_dataset_dict_and_an_arrow_file(tmp_path, monkeypatch, prefect_api_url):  # noqa: F811
    from flows.ingest import ingest_drop
    from foundation.workspace import Workspace

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    drop = tmp_path / "drop"
    splits = {"train": [qa(i) for i in range(40)], "test": [qa(i) for i in range(40, 50)]}
    save_dataset_dict(drop / "saved", splits)
    write_stream(drop / "extra.arrow", pa.Table.from_pylist(chats(10)), chunk=3)
    report = ingest_drop(paths=[str(drop)])
    assert report.status == "ingested" and report.drop_id.startswith("drop-")
    assert (report.rows_in, report.accepted, report.quarantined, report.duplicates) == (60, 60, 0, 0)
    assert sorted(os.path.relpath(f, drop) for f in report.files) == [
        "extra.arrow", "saved/test/data-00000-of-00001.arrow", "saved/train/data-00000-of-00001.arrow"]
    assert {f.format for f in report.files.values()} == {"prompt_completion", "openai"}
    version = Workspace(tmp_path / "home").datasets.current()
    written = pq.read_table(version.path("train")).to_pylist() + pq.read_table(version.path("eval")).to_pylist()
    conversations = sorted(tuple(m["content"] for m in row["messages"]) for row in written)
    assert conversations == sorted([(r["prompt"], r["completion"]) for rows in splits.values() for r in rows]
                                   + [(f"Say {i}.", f"{i}.") for i in range(10)])


def test_ingest_flow_reads_an_hf_dataset_offline(hub_cache, tmp_path, monkeypatch, prefect_api_url):  # noqa: F811
    from flows.ingest import ingest_drop

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    report = ingest_drop(paths=["hf://datasets/org/qa"])
    assert report.drop_id.startswith("org-qa-") and report.status == "ingested"
    assert (report.rows_in, report.accepted, report.quarantined) == (15, 15, 0)
    assert sorted(report.files) == [str(hub_cache / "data" / f"{s}-00000-of-00001.parquet") for s in ("test", "train")]
    again = ingest_drop(paths=["hf://datasets/org/qa@main"])
    assert again.noop and again.drop_id == report.drop_id
