"""Batching rules of the SFT stage: equal work on every rank, whole optimizer steps, less padding."""

import random

import pytest

from raydistill.spec import TrainSpec
from raydistill.train import IGNORE_INDEX, collate, micro_batches, padding_fraction


def _lengths(n=100, seed=0):
    rng = random.Random(seed)
    return [rng.randint(10, 400) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_rank_gets_the_same_number_of_micro_batches(world):
    spec = TrainSpec(global_batch_size=8 * world, micro_batch_size=4, num_workers=world, epochs=2)
    lengths = _lengths()
    per_rank = [micro_batches(lengths, spec, rank, world) for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    assert len(per_rank[0]) % spec.grad_accum_steps == 0
    assert all(len(mb) == spec.micro_batch_size for b in per_rank for mb in b)


def test_ranks_see_disjoint_examples_within_a_step():
    spec = TrainSpec(global_batch_size=16, micro_batch_size=4, num_workers=2, epochs=1)
    lengths = _lengths()
    r0, r1 = (micro_batches(lengths, spec, rank, 2) for rank in (0, 1))
    for a, b in zip(r0, r1):
        assert not set(a) & set(b)


def test_epochs_set_the_number_of_steps():
    lengths = _lengths(96)
    one = micro_batches(lengths, TrainSpec(global_batch_size=8, micro_batch_size=4, epochs=1), 0, 1)
    three = micro_batches(lengths, TrainSpec(global_batch_size=8, micro_batch_size=4, epochs=3), 0, 1)
    assert len(one) == 96 // 4
    assert len(three) == 3 * len(one)
    # one epoch visits every example exactly once
    assert sorted(i for mb in one for i in mb) == list(range(96))


def test_dataset_smaller_than_a_global_batch_still_trains_one_step():
    spec = TrainSpec(global_batch_size=64, micro_batch_size=4, epochs=1)
    batches = micro_batches(_lengths(5), spec, 0, 1)
    assert len(batches) == spec.grad_accum_steps == 16


def test_length_grouping_cuts_padding():
    lengths = _lengths(800)
    spec = TrainSpec(global_batch_size=8, micro_batch_size=8, epochs=1)
    grouped = micro_batches(lengths, spec, 0, 1)
    rng = random.Random(1)
    order = rng.sample(range(800), 800)
    ungrouped = [order[i:i + 8] for i in range(0, 800, 8)]
    assert padding_fraction(grouped, lengths) < 0.5 * padding_fraction(ungrouped, lengths)


def test_collate_pads_and_masks():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(examples, [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
