"""Issue 15, items 1 and 2: hostile files.

1. A record far too long to be one (gigabytes of zeros gzipped into a few megabytes) is skipped while it
   is read, in bounded memory, and quarantined as `too_long` with a short excerpt; the rows around it are
   read as usual. Every reader: JSON Lines, CSV, JSON, Parquet and Arrow IPC.
2. Only regular files are read: a named pipe, a socket, a device, a symlink loop, a dangling symlink or
   an unreadable file refuses the drop with one line naming it and the fix; never waited on, never a
   traceback.

Memory is measured by `PeakMemory`: a thread samples, every 50 ms, the resident set of this process and
of every process it starts meanwhile (the readers the flow forks), from /proc via psutil. The bound is on
what reading adds to the process tree: alone these tests start near 150 MiB, in a full session the test
process already holds over 1 GiB of imported libraries.
"""

from __future__ import annotations

import gzip
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from foundation.errors import DropError
from schemas.config import IngestConfig
from tests.conftest import ROOT

GiB, MiB = 2**30, 2**20
ROW = {"instruction": "What is 2 + 2?", "output": "4"}
GOOD_ROW = json.dumps(ROW) + "\n"
MEMORY_LIMIT = 1 * GiB


# ---------------------------------------------------------------------------------------------
# Helpers: gigabytes that take megabytes, and the peak memory of a process tree
# ---------------------------------------------------------------------------------------------


def write_gz_with_zeros(path: Path, before: bytes, zeros: int, after: bytes) -> Path:
    """A .gz of `before`, `zeros` ASCII zeros and `after`, written as concatenated gzip members (one stream
    to a reader) so neither the file nor this process ever holds the zeros: 64 MiB of them gzip to 64 KB."""
    member = gzip.compress(b"0" * (64 * MiB), compresslevel=9)
    with open(path, "wb") as out:
        out.write(gzip.compress(before))
        for _ in range(zeros // (64 * MiB)):
            out.write(member)
        out.write(gzip.compress(after))
    return path


class PeakMemory:
    """The peak memory of this process plus every process it starts while measured (the readers the flow
    forks), sampled every `interval` seconds from /proc. Processes already running (a Prefect test
    server of the session) are not counted.

    `peak` sums each process's proportional set size (PSS: its resident pages, a page shared by n
    processes counted 1/n in each), the memory the tree really takes; `rss_sum` sums resident set sizes,
    which counts the pages a forked child still shares with its parent in both (an upper bound). This
    process's own peak between two samples is not missed: its high-water mark (VmHWM) is reset on entry
    and read on exit, where the kernel allows, and `peak` is at least that."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self.rss_sum, self.samples = interval, 0, 0, 0
        self.started_processes: set[int] = set()  # the processes started while measured that were seen
        self._me = psutil.Process()
        self._stop = threading.Event()

    def _sample(self) -> None:
        pss = rss = 0
        started = [p for p in self._me.children(recursive=True) if p.pid not in self._before]
        self.started_processes.update(p.pid for p in started)
        for proc in [self._me, *started]:
            try:
                resident = proc.memory_info().rss
                rss += resident
                pss += _pss(proc.pid, resident)
            except psutil.Error:  # ended between the listing and the reading
                pass
        self.peak, self.rss_sum, self.samples = max(self.peak, pss), max(self.rss_sum, rss), self.samples + 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._before = {p.pid for p in self._me.children(recursive=True)}
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._hwm = True
        except OSError:
            self._hwm = False
        self.started = time.monotonic()
        self._sample()
        # what the process tree held before: in a full test session this process has imported torch and
        # more (over 1 GiB), so the bound is on what reading adds to it (`growth`)
        self.baseline, self.baseline_rss = self.peak, self._me.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.growth = self.peak - self.baseline
        if self._hwm:
            status = Path("/proc/self/status").read_text()
            hwm = int(status.split("VmHWM:")[1].split()[0]) * 1024
            self.peak = max(self.peak, hwm)
            self.growth = max(self.growth, hwm - self.baseline_rss)
        self.seconds = time.monotonic() - self.started
        print(f"peak {self.peak / MiB:,.0f} MiB, {self.growth / MiB:,.0f} MiB over the {self.baseline / MiB:,.0f} MiB "
              f"before (RSS summed: {self.rss_sum / MiB:,.0f} MiB) over {self.seconds:.1f} s, {self.samples} samples")


def _pss(pid: int, resident: int) -> int:
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        return int(rollup.split("\nPss:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):  # no smaps_rollup (old kernel), or the process ended
        return resident


def read_staging(path: str) -> pa.Table:
    with pa.OSFile(path) as source:
        return pa.ipc.open_file(source).read_all()


def stage(path: Path, tmp_path: Path, **config) -> tuple[list[dict], list[dict], PeakMemory]:
    """`stage_file` on one file, measured: (staged rows, quarantined rows, memory)."""
    from tasks.ingest.stage import stage_file

    staging = tmp_path / "staging"
    staging.mkdir()
    pa.default_memory_pool().release_unused()  # what earlier tests left in Arrow's pool is not this one's
    with PeakMemory() as memory:
        outcome = stage_file(0, str(path), "hostile", IngestConfig(**config), staging)
    staged, quarantined = read_staging(outcome["staged_path"]), read_staging(outcome["quarantine_path"])
    counts = outcome["counts"]
    assert counts["rows_in"] == counts["staged"] + counts["quarantined"]
    return staged.to_pylist(), quarantined.to_pylist(), memory


def assert_too_long(row: dict, source_row: int, size: int, unit: str = "bytes") -> None:
    assert row["reasons"] == ["too_long"] and row["source_row"] == source_row, row
    assert f"is {size:,} {unit}, more than the 16 MiB a record may have" in row["details"], row["details"]
    assert "shorten or split it" in row["details"] and "\n" not in row["details"]
    assert len(row["raw"]) < 1000 and row["raw"].startswith("0" * 200) and f"[{size:,} {unit} in all]" in row["raw"]


@contextmanager
def fails_after(seconds: float):
    """Turns a hang into a failure: raises TimeoutError in this (the main) thread after `seconds`; a
    blocking open() of a pipe is interrupted by the signal."""
    def give_up(signum, frame):
        raise TimeoutError(f"still waiting after {seconds} s: ingest blocked on a file")

    previous = signal.signal(signal.SIGALRM, give_up)
    started = time.monotonic()
    outer_left, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)  # pytest-timeout's, if any
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - started), 0.001), outer_interval)


# ---------------------------------------------------------------------------------------------
# 1. Records over the cap, in gigabytes
# ---------------------------------------------------------------------------------------------

ZEROS = 5 * GiB // 2  # 2.5 GiB of zeros on one line: ~2.5 MB gzipped


@pytest.mark.slow
def test_a_multi_gigabyte_jsonl_line_is_quarantined_in_bounded_memory(tmp_path):
    path = write_gz_with_zeros(tmp_path / "rows.jsonl.gz", GOOD_ROW.encode() * 3, ZEROS, b"\n" + GOOD_ROW.encode() * 2)
    assert path.stat().st_size < 5 * MiB
    staged, quarantined, memory = stage(path, tmp_path)
    assert [r["source_row"] for r in staged] == [1, 2, 3, 5, 6]
    assert len(quarantined) == 1
    assert_too_long(quarantined[0], 4, ZEROS)
    assert memory.growth < MEMORY_LIMIT, f"grew by {memory.growth / MiB:,.0f} MiB (peak {memory.peak / MiB:,.0f} MiB)"


@pytest.mark.slow
def test_a_multi_gigabyte_csv_field_is_quarantined_in_bounded_memory(tmp_path):
    path = write_gz_with_zeros(tmp_path / "rows.csv.gz", b"instruction,output\nq1,a1\nq2,a2\n", ZEROS,
                               b"\nq3,a3\nq4,a4\n")
    staged, quarantined, memory = stage(path, tmp_path)
    assert [r["source_row"] for r in staged] == [2, 3, 5, 6]
    assert len(quarantined) == 1
    assert_too_long(quarantined[0], 4, ZEROS + 1, "characters")  # the line break is part of the record
    assert memory.growth < MEMORY_LIMIT, f"grew by {memory.growth / MiB:,.0f} MiB (peak {memory.peak / MiB:,.0f} MiB)"


@pytest.mark.slow
def test_a_multi_gigabyte_string_in_a_json_array_is_quarantined_and_the_array_read_on(tmp_path):
    zeros = 2 * GiB
    head = b'[' + json.dumps(ROW).encode() + b', {"instruction": "q", "output": "'
    path = write_gz_with_zeros(tmp_path / "rows.json.gz", head, zeros,
                               b'"}, ' + json.dumps(ROW).encode() + b", " + json.dumps(ROW).encode() + b"]")
    staged, quarantined, memory = stage(path, tmp_path)
    assert [r["source_row"] for r in staged] == [1, 3, 4]
    assert len(quarantined) == 1
    row = quarantined[0]
    size = len(b'{"instruction": "q", "output": "') + zeros + len(b'"}')
    assert row["reasons"] == ["too_long"] and row["source_row"] == 2
    assert f"record 2 is {size:,} bytes, more than the 16 MiB" in row["details"]
    assert len(row["raw"]) < 1000 and row["raw"].startswith('{"instruction": "q", "output": "000')
    assert memory.growth < MEMORY_LIMIT, f"grew by {memory.growth / MiB:,.0f} MiB (peak {memory.peak / MiB:,.0f} MiB)"


@pytest.mark.slow
def test_the_ingest_flow_reads_a_drop_of_gigabyte_lines_in_bounded_memory(tmp_path, monkeypatch, prefect_api_url):
    from flows.ingest import ingest_drop

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    drop = tmp_path / "drop"
    drop.mkdir()
    rows = [json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n" for i in range(8)]
    write_gz_with_zeros(drop / "a.jsonl.gz", "".join(rows[:4]).encode(), ZEROS, b"\n" + "".join(rows[4:]).encode())
    write_gz_with_zeros(drop / "b.csv.gz", b"instruction,output\nq1,a1\nq2,a2\n", ZEROS, b"\nq3,a3\nq4,a4\n")
    pa.default_memory_pool().release_unused()
    with PeakMemory() as memory:  # two files: each is read by a forked worker (on two cores or more)
        report = ingest_drop(paths=[str(drop)], drop_id="gigabyte-lines", config=IngestConfig(max_reject_rate=0.5))
    assert memory.started_processes or (os.cpu_count() or 1) < 2  # the forked readers were measured
    assert report.rows_in == 14 and report.accepted == 12 and report.quarantined == 2
    assert report.reasons == {"too_long": 2}
    quarantine = pq.read_table(report.quarantine_path).to_pylist()
    assert sorted((Path(r["source_file"]).name, r["source_row"]) for r in quarantine) == [("a.jsonl.gz", 5),
                                                                                         ("b.csv.gz", 4)]
    assert all(len(r["raw"]) < 1000 for r in quarantine)
    assert memory.growth < MEMORY_LIMIT, f"grew by {memory.growth / MiB:,.0f} MiB (peak {memory.peak / MiB:,.0f} MiB)"


@pytest.mark.slow
def test_many_long_records_under_the_cap_are_ingested_in_bounded_memory(tmp_path, monkeypatch, prefect_api_url):
    """Records each under the 16 MiB cap but far over ingest.max_chars, many of them (600 lines of 1 MiB, gzipped
    into a few megabytes): read, staged and validated a bounded batch at a time (BATCH_RAW_CHARS), not
    `batch_rows` rows at once (600 MiB of raw text, as much again as messages, and copies of both)."""
    from flows.ingest import ingest_drop

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    drop = tmp_path / "drop"
    drop.mkdir()
    good = [json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n" for i in range(5)]
    with gzip.open(drop / "long.jsonl.gz", "wt", compresslevel=1) as fh:
        fh.write("".join(good))
        for i in range(600):
            fh.write(json.dumps({"instruction": f"Long {i}?", "output": "a" * MiB}) + "\n")
    pa.default_memory_pool().release_unused()
    with PeakMemory() as memory:
        report = ingest_drop(paths=[str(drop)], drop_id="long-lines", config=IngestConfig(max_reject_rate=1.0))
    assert report.rows_in == 605 and report.accepted == 5 and report.quarantined == 600
    quarantine = pq.ParquetFile(report.quarantine_path)
    assert quarantine.metadata.num_rows == 600  # every long row kept whole, with its raw text
    first = next(quarantine.iter_batches(batch_size=1)).to_pylist()[0]
    assert first["source_row"] == 6 and len(first["raw"]) > MiB
    assert memory.growth < MEMORY_LIMIT, f"grew by {memory.growth / MiB:,.0f} MiB (peak {memory.peak / MiB:,.0f} MiB)"


def _write_table_with_a_huge_cell(path: str, cell_bytes: int, kind: str) -> None:
    """Written in a child process, so the cell never sits in the memory measured here."""
    code = f"""
import pyarrow as pa, pyarrow.feather as feather, pyarrow.parquet as pq
row = {{"instruction": "What is 2 + 2?", "output": "4"}}
table = pa.Table.from_pylist([row, row, {{"instruction": "q", "output": "0" * {cell_bytes}}}, row])
if {kind!r} == "parquet":
    pq.write_table(table, {path!r})
else:
    feather.write_feather(table, {path!r}, compression="zstd")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_a_huge_cell_in_a_parquet_or_arrow_file_is_quarantined_not_converted(tmp_path, kind):
    # What sftflow caps is the conversion of the row to Python objects and JSON text (several times its
    # size). Decoding the cell is pyarrow's: its Parquet reader takes about 3 times the cell (a 300 MiB
    # cell: ~930 MiB in pq.ParquetFile.iter_batches alone), so the cell here is 128 MiB.
    path = tmp_path / f"rows.{kind}"
    _write_table_with_a_huge_cell(str(path), 128 * MiB, kind)
    staged, quarantined, memory = stage(path, tmp_path)
    assert [r["source_row"] for r in staged] == [1, 2, 4]
    assert len(quarantined) == 1
    row = quarantined[0]
    assert row["reasons"] == ["too_long"] and row["source_row"] == 3
    assert f"the row is {128 * MiB + 1:,} bytes, more than the 16 MiB" in row["details"]
    assert len(row["raw"]) < 1000 and row["raw"].startswith('{"instruction":"q","output":"000')
    assert memory.growth < MEMORY_LIMIT, f"grew by {memory.growth / MiB:,.0f} MiB (peak {memory.peak / MiB:,.0f} MiB)"


# ---------------------------------------------------------------------------------------------
# 1. The same, small: the cap lowered, every reader's edge cases
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def cap(monkeypatch):
    """MAX_RECORD_BYTES lowered to 100,000 (the readers look it up when they open a file)."""
    monkeypatch.setattr("tasks.ingest.readers.raw.MAX_RECORD_BYTES", 100_000)
    return 100_000


def records(path: Path) -> list:
    from tasks.ingest.readers import iter_file_records

    return [(r.source_row, r.reasons, r.value) for r in iter_file_records(str(path), 3)]


def test_jsonl_lines_over_the_cap_anywhere(tmp_path, cap):
    long = json.dumps({"instruction": "q", "output": "x" * cap})
    path = tmp_path / "rows.jsonl"
    path.write_text("\r\n".join([long, json.dumps(ROW), long, "", json.dumps(ROW), long]))  # CRLF, no final newline
    assert records(path) == [(1, ("too_long",), None), (2, (), ROW), (3, ("too_long",), None), (5, (), ROW),
                             (6, ("too_long",), None)]
    exact = tmp_path / "exact.jsonl"  # a line of exactly the cap is a record
    overhead = len(json.dumps({"instruction": "q", "output": ""}))
    at_cap = json.dumps({"instruction": "q", "output": "x" * (cap - overhead)})
    assert len(at_cap) == cap
    exact.write_text(at_cap + "\n" + json.dumps(ROW) + "\n")
    assert [r[1] for r in records(exact)] == [(), ()]


def test_csv_records_over_the_cap_even_when_a_quoted_field_spans_lines(tmp_path, cap):
    path = tmp_path / "rows.csv"
    multiline = '"' + "line\n" * (cap // 5) + '",a'
    lines = ["instruction,output", "q1,a1", multiline, "q2,a2", "x" * (cap + 1) + ",b", "q3,a3"]
    path.write_text("\n".join(lines) + "\n")
    got = records(path)
    assert [(row, reasons) for row, reasons, _ in got] == [(2, ()), (3, ("too_long",)), (cap // 5 + 4, ()),
                                                           (cap // 5 + 5, ("too_long",)), (cap // 5 + 6, ())]
    assert [v["instruction"] for _, _, v in got if v] == ["q1", "q2", "q3"]
    header = tmp_path / "header.csv"
    header.write_text("x" * (cap + 1) + "\nq,a\n")
    from tasks.ingest.readers import iter_file_records

    [only] = list(iter_file_records(str(header), 3))
    assert only.reasons == ("too_long",) and "the header row is" in only.details
    assert "no row of the file was read" in only.details


@pytest.mark.parametrize("shape", ["array", "pretty array", "object of arrays", "single record", "cut off"])
def test_json_records_over_the_cap_in_every_shape(tmp_path, cap, shape):
    big = {"instruction": "q", "output": "x\\\"[{" * cap}  # escapes and brackets inside the string
    nested = {"messages": [{"role": "user", "content": "y" * 100}] * (cap // 50)}
    path = tmp_path / "rows.json"
    if shape in ("array", "pretty array"):
        path.write_text(json.dumps([ROW, big, ROW, nested, big, ROW], indent=2 if shape == "pretty array" else None))
        expected = [(1, ()), (2, ("too_long",)), (3, ()), (4, ("too_long",)), (5, ("too_long",)), (6, ())]
    elif shape == "object of arrays":
        path.write_text(json.dumps({"train": [ROW, big, ROW], "test": [big], "eval": [ROW]}))
        expected = [(1, ()), (2, ("too_long",)), (3, ()), (4, ("too_long",)), (5, ())]
    elif shape == "single record":
        path.write_text(json.dumps(big))
        expected = [(1, ("too_long",))]
    else:
        path.write_text(json.dumps([ROW, big, ROW])[: cap * 2])
        expected = [(1, ()), (2, ("too_long",))]
    got = records(path)
    assert [(row, reasons) for row, reasons, _ in got] == expected
    assert all(value == ROW for _, reasons, value in got if not reasons)
    if shape == "cut off":
        from tasks.ingest.readers import iter_file_records

        assert "the file ends inside it" in list(iter_file_records(str(path), 3))[-1].details


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_parquet_and_arrow_rows_over_the_cap_nested_or_not(tmp_path, cap, kind):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "tag": "a"},
            {"messages": [{"role": "user", "content": "y" * 1000}] * (cap // 1000 + 1), "tag": "b"},
            {"messages": [{"role": "user", "content": "z" * (cap + 1)}], "tag": "c"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "tag": "d"}]
    table = pa.Table.from_pylist(rows)
    path = tmp_path / f"rows.{kind}"
    pq.write_table(table, path) if kind == "parquet" else feather.write_feather(table, path)
    got = records(path)
    assert [(row, reasons) for row, reasons, _ in got] == [(1, ()), (2, ("too_long",)), (3, ("too_long",)), (4, ())]
    assert [v["tag"] for _, _, v in got if v] == ["a", "d"]


# ---------------------------------------------------------------------------------------------
# 2. Only regular files are read
# ---------------------------------------------------------------------------------------------


def a_drop(tmp_path: Path) -> Path:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "rows.jsonl").write_text(GOOD_ROW)
    return drop


def refused(paths: list[Path]) -> str:
    """The one-line message every way into a drop refuses it with, within seconds."""
    from tasks.ingest.descriptor import find_mapped_drop
    from tasks.ingest.discovery import find_drop, list_drop_files

    messages = set()
    with fails_after(20):
        for find in (list_drop_files, find_drop, find_mapped_drop):
            with pytest.raises(DropError) as refusal:
                find([str(p) for p in paths])
            messages.add(str(refusal.value))
    assert len(messages) == 1 and "\n" not in next(iter(messages))
    return messages.pop()


def test_a_fifo_named_directly_is_refused_not_waited_on(tmp_path):
    drop = a_drop(tmp_path)
    os.mkfifo(drop / "pipe.jsonl")
    message = refused([drop / "pipe.jsonl"])
    assert message.startswith(f"{drop / 'pipe.jsonl'}: a named pipe (FIFO), not a regular file")
    assert "write its data to a file in the drop, or remove it" in message


def test_a_fifo_inside_a_drop_directory_is_refused_not_waited_on(tmp_path):
    drop = a_drop(tmp_path)
    (drop / "split=train").mkdir()
    os.mkfifo(drop / "split=train" / "pipe.jsonl")
    assert refused([drop]).startswith(f"{drop / 'split=train' / 'pipe.jsonl'}: a named pipe (FIFO)")
    os.mkfifo(drop / "notes")  # a pipe is refused whatever its name: sftflow does not guess what it holds
    (drop / "split=train" / "pipe.jsonl").unlink()
    assert refused([drop]).startswith(f"{drop / 'notes'}: a named pipe (FIFO)")
    (drop / "notes").unlink()
    os.mkfifo(drop / "_SUCCESS")  # hidden and _-prefixed names are never read, so never opened
    from tasks.ingest.discovery import find_drop

    with fails_after(20):
        assert find_drop([str(drop)]).files == [str(drop / "rows.jsonl")]


def test_a_socket_in_a_drop_is_refused(tmp_path, monkeypatch):
    drop = a_drop(tmp_path)
    monkeypatch.chdir(drop)  # a socket's path may be at most ~108 bytes: bind it by its short name
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("events.jsonl")
        assert refused([drop]).startswith(f"{drop / 'events.jsonl'}: a socket, not a regular file")
        assert refused([drop / "events.jsonl"]).startswith(f"{drop / 'events.jsonl'}: a socket")


def test_a_symlink_loop_is_refused_not_a_traceback(tmp_path):
    drop = a_drop(tmp_path)
    (drop / "a.jsonl").symlink_to(drop / "b.jsonl")
    (drop / "b.jsonl").symlink_to(drop / "a.jsonl")
    message = refused([drop / "a.jsonl"])
    assert message.startswith(f"{drop / 'a.jsonl'}: a symlink loop (a.jsonl -> {drop / 'b.jsonl'}")
    assert "point the link at a file in the drop, or remove it" in message
    assert ": a symlink loop" in refused([drop])
    for name in ("a.jsonl", "b.jsonl"):
        (drop / name).unlink()
    (drop / "sub").mkdir()
    (drop / "sub" / "self").symlink_to("self")  # a loop of one, under a name that is not data
    assert refused([drop]).startswith(f"{drop / 'sub' / 'self'}: a symlink loop (self -> self")


def test_a_dangling_symlink_is_refused(tmp_path):
    drop = a_drop(tmp_path)
    (drop / "gone.jsonl").symlink_to(drop / "moved.jsonl")
    expected = f"{drop / 'gone.jsonl'}: a symlink to {drop / 'moved.jsonl'}, which does not exist; copy the file"
    assert refused([drop]).startswith(expected)
    assert refused([drop / "gone.jsonl"]).startswith(expected)


def test_a_device_is_refused(tmp_path):
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null here")
    # a link to /dev/null leads out of the drop (refused as such); named directly, the device itself
    assert refused([Path("/dev/null")]).startswith("/dev/null: a character device, not a regular file")


def test_an_unreadable_file_or_directory_is_refused(tmp_path):
    from tasks.ingest.discovery import list_drop_files

    if os.geteuid() != 0:
        drop = a_drop(tmp_path)
        (drop / "secret.jsonl").write_text(GOOD_ROW)
        (drop / "secret.jsonl").chmod(0)
        assert refused([drop]).startswith(f"{drop / 'secret.jsonl'}: cannot be read (Permission denied)")
        return
    # root reads any file whatever its mode: check as the unprivileged user `nobody`, in a forked child
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root, and there is no user 'nobody' to check permissions as")
    shared = Path(os.environ.get("TMPDIR", "/tmp")) / f"sftflow-hostile-{os.getpid()}"
    shared.mkdir(mode=0o755)
    try:
        shared.chmod(0o755)
        cases = {}
        for case in ("file", "directory"):
            drop = shared / case
            drop.mkdir()
            drop.chmod(0o755)
            (drop / "rows.jsonl").write_text(GOOD_ROW)
            (drop / "rows.jsonl").chmod(0o644)
        (shared / "file" / "secret.jsonl").write_text(GOOD_ROW)
        (shared / "file" / "secret.jsonl").chmod(0)
        (shared / "directory" / "private").mkdir(mode=0o700)
        for case in ("file", "directory"):
            cases[case] = _as_user(nobody, list_drop_files, [str(shared / case)])
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=True)
    if cases["file"] == "could not change user":
        pytest.skip("running as root, and a child could not become 'nobody' to check permissions")
    assert cases["file"].startswith(f"{shared / 'file' / 'secret.jsonl'}: cannot be read (Permission denied)")
    assert "chmod a+r" in cases["file"]
    assert cases["directory"].startswith(f"{shared / 'directory' / 'private'}: the directory cannot be listed "
                                         "(Permission denied)")


def _as_user(user: pwd.struct_passwd, fn, *args) -> str:
    """What fn(*args) raises as a DropError (its message), run in a forked child as `user`."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        except OSError:
            os.write(write, b"could not change user")
            os._exit(0)
        try:
            fn(*args)
            os.write(write, b"not refused")
        except DropError as exc:
            os.write(write, str(exc).encode())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(write, f"{type(exc).__name__}: {exc}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        message = answer.read().decode()
    os.waitpid(pid, 0)
    return message


def test_the_cli_refuses_a_drop_holding_a_fifo_in_one_line(tmp_path):
    drop = a_drop(tmp_path)
    os.mkfifo(drop / "pipe.jsonl")
    env = {**os.environ, "SFTFLOW_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), "SFTFLOW_PROGRESS": "0"}
    done = subprocess.run([sys.executable, "-m", "sftflow", "ingest", str(drop)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)  # a hang fails here
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {drop / 'pipe.jsonl'}: a named pipe (FIFO), not a regular file; a drop "
                                   "is read from regular files only (reading a pipe or a device can wait forever): "
                                   "write its data to a file in the drop, or remove it")


def test_a_file_that_became_a_fifo_after_listing_is_not_waited_on(tmp_path):
    from tasks.ingest.discovery import fingerprint_files
    from tasks.ingest.readers import iter_file_records

    drop = a_drop(tmp_path)
    os.mkfifo(drop / "late.jsonl")
    with fails_after(20):
        with pytest.raises(DropError, match="late.jsonl: a named pipe"):
            fingerprint_files([str(drop / "rows.jsonl"), str(drop / "late.jsonl")])
        [record] = list(iter_file_records(str(drop / "late.jsonl"), 10))
    assert record.reasons == ("unreadable_file",) and "not a regular file" in record.details
