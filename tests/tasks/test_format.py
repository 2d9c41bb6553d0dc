"""Dedup, split and content hashing: pure functions over Arrow arrays."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from tasks.format import eval_mask, hash_sorted_ids, new_row_mask, sorted_ids


def ids(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def content_hash(ids: pa.Array, eval_ratio: float) -> str:
    return hash_sorted_ids(sorted_ids(ids), eval_ratio)


def split_of(row_id: str, eval_ratio: float) -> str:
    return "eval" if eval_mask(pa.array([row_id]), eval_ratio)[0] else "train"


def test_split_is_a_pure_function_of_the_id_with_the_requested_ratio():
    sample = ids(20_000)
    mask = eval_mask(pa.array(sample), 0.1)
    assert 0.09 < mask.mean() < 0.11
    # the same id gets the same split whatever else is in the batch, and in any order
    assert [split_of(i, 0.1) for i in sample[:50]] == ["eval" if m else "train" for m in mask[:50]]
    assert (eval_mask(pa.array(sample[::-1]), 0.1) == mask[::-1]).all()


def test_new_row_mask_separates_new_in_drop_repeats_and_dataset_duplicates():
    a, b, c, d = ids(4)
    new, repeat = new_row_mask(pa.array([a, b, a, c, b, d]), pa.array([c]))
    assert new.tolist() == [True, True, False, False, False, True]
    assert repeat.tolist() == [False, False, True, False, True, False]


def test_content_hash_ignores_order_and_sees_content_and_ratio():
    sample = ids(1000)
    h = content_hash(pa.array(sample), 0.1)
    assert h == content_hash(pa.array(list(reversed(sample))), 0.1)
    assert h == content_hash(pa.chunked_array([sample[:300], sample[300:]]).combine_chunks(), 0.1)
    assert h != content_hash(pa.array(sample[:-1]), 0.1)
    assert h != content_hash(pa.array(sample), 0.2)
    sliced = pa.array(["x" * 64] + sample).slice(1)
    assert content_hash(sliced, 0.1) == h
    assert np.unique([content_hash(pa.array(ids(5, s)), 0.1) for s in "abc"]).size == 3


def test_the_split_ratio_of_a_lineage_never_changes():
    import pytest

    from foundation.artifacts import DatasetManifest, SplitRows
    from foundation.errors import DatasetError
    from tasks.format import check_eval_ratio

    parent = DatasetManifest(version="ds-1", content_hash="0" * 64, schema_version="canonical-row/1", parent=None,
                             created_at="2026-12-01T00:00:00+00:00", eval_ratio=0.1, drops=[],
                             rows=SplitRows(train=9, eval=1), files={})
    check_eval_ratio(None, 0.3)  # a first version sets it
    check_eval_ratio(parent, 0.1)
    with pytest.raises(DatasetError, match="keep --eval-ratio 0.1"):
        check_eval_ratio(parent, 0.2)
