"""The dry run's arithmetic: optimizer steps as transformers' Trainer counts them, and packed sequences and their
trained tokens as trl packs them (tests/flows/test_train_dry_run.py checks both against real training)."""

from __future__ import annotations

import pytest

from tasks.dry_run import optimizer_steps, packed_sequences


@pytest.mark.parametrize(("sequences", "batch", "accumulation", "ranks", "epochs", "max_steps", "expected"), [
    (100, 16, 1, 1, 1.0, None, (7, 7)),      # ceil(100 / 16)
    (100, 16, 1, 1, 3.0, None, (7, 21)),
    (100, 16, 1, 1, 1.5, None, (7, 11)),     # ceil(1.5 x 7)
    (100, 8, 4, 1, 1.0, None, (4, 4)),       # 13 micro-batches -> 4 steps (the last accumulates 1)
    (100, 8, 1, 2, 1.0, None, (7, 7)),       # 50 rows per rank
    (100, 16, 1, 1, 10.0, 5, (7, 5)),        # max_steps wins over epochs
    (3, 16, 4, 1, 1.0, None, (1, 1)),        # at least one step an epoch
])
def test_optimizer_steps_as_the_trainer_counts_them(sequences, batch, accumulation, ranks, epochs, max_steps, expected):
    assert optimizer_steps(sequences, batch, accumulation, ranks, epochs, max_steps) == expected


def test_packing_counts_sequences_and_drops_each_documents_first_label():
    ids = [[1, 2, 3, 4], [5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    labels = [[-100, -100, 3, 4], [5, 6, 7], [-100, 9], [-100, 11, 12, -100, 14]]
    sequences, trained = packed_sequences(ids, labels, max_length=7)
    assert sequences == 2  # 14 tokens in sequences of at most 7: best fit (5+2, 4+3)
    assert trained == 2 + 2 + 1 + 3  # the second row's first token (5) is at position 0 of its document

    # what the trainer's padding-free collator makes of the packed rows
    import datasets
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}), 7, "bfd")
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(packed.to_list())
    assert packed.num_rows == sequences and int((batch["labels"] != -100).sum()) == trained
