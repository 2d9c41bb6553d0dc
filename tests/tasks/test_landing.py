"""The landing zone: completeness rules, exactly-once announcement, hostile entries refused."""

from __future__ import annotations

import shutil
import time

import pytest

from foundation.errors import DropError
from tasks.landing import announce, is_complete, land_drop, scan_landing
from tests.conftest import SAMPLE_DROPS


class Recorder:
    def __init__(self):
        self.sent = []

    def __call__(self, drop):
        self.sent.append(drop)


def _copy_without_marker(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_SUCCESS"))
    return dst


def test_a_drop_with_success_marker_is_announced_once(workspace):
    shutil.copytree(SAMPLE_DROPS / "arithmetic", workspace.landing_dir / "arith-1")
    send = Recorder()
    first = scan_landing(workspace, quiet_seconds=3600, send=send, log=lambda m: None)
    second = scan_landing(workspace, quiet_seconds=3600, send=send, log=lambda m: None)
    assert [d.drop_id for d in send.sent] == ["arith-1"]
    assert [r["drop_id"] for r in first["announced"]] == ["arith-1"] and second["announced"] == []
    record = workspace.landing.emitted("arith-1")
    assert record.event_id == str(send.sent[0].event_id) and record.files == 1


def test_a_drop_without_marker_waits_for_the_quiet_period(workspace):
    # copytree keeps the files' old mtimes, as `cp -a` would: their ctime still says they are new
    path = _copy_without_marker(SAMPLE_DROPS / "arithmetic", workspace.landing_dir / "arith-2")
    send = Recorder()
    result = scan_landing(workspace, quiet_seconds=3600, send=send, log=lambda m: None)
    assert result["waiting"] == ["arith-2"] and send.sent == []
    assert not is_complete(path, quiet_seconds=60)
    assert is_complete(path, quiet_seconds=60, now=time.time() + 61)
    time.sleep(1.1)
    assert [r["drop_id"] for r in scan_landing(workspace, 1, send=send, log=lambda m: None)["announced"]] == ["arith-2"]


def test_a_failed_send_is_retried_on_the_next_scan_with_the_same_event_id(workspace):
    shutil.copytree(SAMPLE_DROPS / "arithmetic", workspace.landing_dir / "arith-3")

    def broken(drop):
        raise ConnectionError("server down")

    result = scan_landing(workspace, 0, send=broken, log=lambda m: None)
    assert result["pending"] == ["arith-3"] and "server down" in result["delivery_error"]
    assert workspace.landing.emitted("arith-3") is None
    send = Recorder()
    scan_landing(workspace, 0, send=send, log=lambda m: None)
    assert len(send.sent) == 1 and workspace.landing.emitted("arith-3").event_id == str(send.sent[0].event_id)


def test_event_id_depends_on_drop_and_content(workspace, tmp_path):
    a = land_drop(workspace, SAMPLE_DROPS / "arithmetic", "same-content-a")
    b = land_drop(workspace, SAMPLE_DROPS / "arithmetic", "same-content-b")
    again = land_drop(workspace, SAMPLE_DROPS / "arithmetic", "same-content-a")
    assert a.fingerprint == b.fingerprint and a.event_id != b.event_id and again.event_id == a.event_id


def test_land_drop_copies_whole_with_marker_and_refuses_new_content_under_an_old_id(workspace, tmp_path):
    landed = land_drop(workspace, SAMPLE_DROPS / "json-extraction")
    assert landed.drop_id == "json-extraction" and (landed.path / "_SUCCESS").exists()
    assert (landed.path / "rows.jsonl").read_bytes() == (SAMPLE_DROPS / "json-extraction" / "rows.jsonl").read_bytes()
    assert not [p for p in workspace.landing_dir.iterdir() if p.name.startswith(".tmp-")]
    other = tmp_path / "json-extraction"
    other.mkdir()
    (other / "rows.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    with pytest.raises(DropError, match="already holds other data.*--drop-id"):
        land_drop(workspace, other)


def test_announce_records_once_even_when_called_twice(workspace):
    landed = land_drop(workspace, SAMPLE_DROPS / "arithmetic", "twice")
    send = Recorder()
    assert announce(workspace, landed, send) is not None
    assert announce(workspace, landed, send) is None
    assert len(send.sent) == 1


@pytest.mark.parametrize("bad_name", ["a..b", "-leading-dash", "a b"])
def test_entries_with_bad_names_are_refused_and_reported_once(workspace, bad_name):
    shutil.copytree(SAMPLE_DROPS / "arithmetic", workspace.landing_dir / bad_name)
    send = Recorder()
    first = scan_landing(workspace, 0, send=send, log=lambda m: None)
    second = scan_landing(workspace, 0, send=send, log=lambda m: None)
    assert send.sent == [] and [r["name"] for r in first["refused"]] == [bad_name] and second["refused"] == []
    assert "not allowed" in first["refused"][0]["reason"]


def test_symlinks_out_of_the_landing_zone_are_refused_not_followed(workspace, tmp_path):
    outside = tmp_path / "secrets"
    outside.mkdir()
    (outside / "rows.jsonl").write_text('{"instruction": "leak", "output": "secret"}\n')
    (workspace.landing_dir / "linked-dir").symlink_to(outside, target_is_directory=True)
    inner = workspace.landing_dir / "inner-link"
    inner.mkdir()
    (inner / "rows.jsonl").symlink_to(outside / "rows.jsonl")
    (inner / "_SUCCESS").touch()
    send = Recorder()
    result = scan_landing(workspace, 0, send=send, log=lambda m: None)
    assert send.sent == []
    reasons = {r["name"]: r["reason"] for r in result["refused"]}
    assert "not followed" in reasons["linked-dir"] and "symlinks are not accepted" in reasons["inner-link"]
    with pytest.raises(DropError, match="symlinks are not accepted"):
        land_drop(workspace, inner, "copy-of-inner")
    assert not (workspace.landing_dir / "copy-of-inner").exists()


def test_drop_ids_that_escape_are_refused_by_land_drop(workspace):
    for drop_id in ["../escape", "/abs/path", ".."]:
        with pytest.raises(DropError, match="not allowed"):
            land_drop(workspace, SAMPLE_DROPS / "arithmetic", drop_id)
    assert not (workspace.root / "escape").exists()


def test_a_drop_changed_after_announcement_is_refused(workspace):
    landed = land_drop(workspace, SAMPLE_DROPS / "arithmetic", "mutable")
    scan_landing(workspace, 0, send=Recorder(), log=lambda m: None)
    time.sleep(0.01)
    (landed.path / "more.jsonl").write_text('{"instruction": "new", "output": "row"}\n')
    send = Recorder()
    result = scan_landing(workspace, 0, send=send, log=lambda m: None)
    assert send.sent == [] and "changed after it was announced" in result["refused"][0]["reason"]
