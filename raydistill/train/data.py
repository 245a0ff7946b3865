"""Training data on a worker: the checked (question, rationale) rows of a Parquet, token ids with the
prompt masked out of the labels, each rank's length-grouped micro-batches, and padded tensors."""

from __future__ import annotations

import math
import os
import random

import pyarrow.parquet as pq

from raydistill.schemas import answer_problem
from raydistill.spec import TrainSpec
from raydistill.train.job import TrainInputError

IGNORE_INDEX = -100


def read_examples(path: str | os.PathLike) -> list[dict]:
    """The (question, rationale) rows of a training Parquet, checked: a file that is missing,
    not Parquet, without these text columns, empty, or with a blank row raises TrainInputError
    naming the file (and rows)."""
    import pyarrow as pa

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise TrainInputError(f"{path}: no such training file; check --data (or the cell's "
                              "examples.parquet)") from None
    except (OSError, pa.ArrowException) as err:
        reason = " ".join(str(err).split())[:200]
        raise TrainInputError(f"{path}: not a readable Parquet file ({reason}); delete it and write it "
                              "again (raydistill data export, or rerun the annotation)") from None
    missing = [c for c in ("question", "rationale") if c not in table.column_names]
    if missing:
        raise TrainInputError(f"{path}: missing columns {missing} (has {table.column_names}); training needs "
                              "question and rationale (EXAMPLE_SCHEMA)")
    for name in ("question", "rationale"):
        kind = table.schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise TrainInputError(f"{path}: column {name!r} has type {kind}, not string; write it as text")
    if table.num_rows == 0:
        raise TrainInputError(f"{path}: no rows to train on; check the cell's filters (policy, limits)")
    rows = table.select(["question", "rationale"]).to_pylist()
    blank = [i for i, r in enumerate(rows) if not (r["question"] or "").strip() or not (r["rationale"] or "").strip()]
    if blank:
        raise TrainInputError(f"{path}: rows {blank[:10]}{' ...' if len(blank) > 10 else ''} have an empty "
                              f"question or rationale ({len(blank)} in all); remove or fill them")
    problem = answer_problem(table)
    if problem:
        raise TrainInputError(f"{path}: {problem}")
    return rows


def tokenize_examples(rows: list[dict], tokenizer, template, cutoff_len: int,
                      overlong: str = "truncate") -> tuple[list[dict], int]:
    """Token ids with the prompt masked out of the labels.

    Sequences over `cutoff_len` are cut (`overlong="truncate"`) or left out (`"drop"`).
    Returns the examples and how many sequences were over the cutoff.
    """
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"train.overlong must be 'truncate' or 'drop', got {overlong!r}")
    examples, over = [], 0
    for row in rows:
        prompt_ids, response_ids = template.encode(tokenizer, row["question"], row["rationale"])
        input_ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        if len(input_ids) > cutoff_len:
            over += 1
            if overlong == "drop":
                continue
            input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
        examples.append({"input_ids": input_ids, "labels": labels})
    if not examples:
        raise ValueError(f"train.cutoff_len={cutoff_len} with overlong='drop' leaves no example")
    return examples, over


def micro_batches(lengths: list[int], spec: TrainSpec, rank: int, world: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) for the whole run.

    Each epoch is a seeded shuffle cut into global micro-batches of `micro_batch_size x world`
    examples, grouped by length within windows of 50 to cut padding; rank r takes every
    world-th example of each. The count is a whole number of optimizer steps, equal on every rank.
    """
    per_step = spec.micro_batch_size * world
    batches_per_epoch = max(1, len(lengths) // per_step)
    steps = max(1, round(spec.epochs * batches_per_epoch / spec.grad_accum_steps))
    needed = steps * spec.grad_accum_steps
    rng = random.Random(spec.seed)
    mine: list[list[int]] = []
    while len(mine) < needed:
        order = rng.sample(range(len(lengths)), len(lengths))
        order = (order * math.ceil(per_step / len(order)))[: max(1, len(order) // per_step) * per_step]
        groups = (_length_grouped(order, lengths, per_step, rng) if group_by_length
                  else [order[i:i + per_step] for i in range(0, len(order), per_step)])
        mine += [group[rank::world] for group in groups]
    return mine[:needed]


def _length_grouped(order: list[int], lengths: list[int], size: int, rng: random.Random,
                    window_batches: int = 50) -> list[list[int]]:
    groups = []
    for start in range(0, len(order), size * window_batches):
        window = sorted(order[start:start + size * window_batches], key=lengths.__getitem__)
        groups += [window[i:i + size] for i in range(0, len(window), size)]
    rng.shuffle(groups)
    return groups


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of the token slots in padded micro-batches that hold padding."""
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / slots if slots else 0.0


def collate(examples: list[dict], indices: list[int], pad_id: int):
    import torch

    width = max(len(examples[i]["input_ids"]) for i in indices)
    ids, labels, mask = [], [], []
    for i in indices:
        seq, lab = examples[i]["input_ids"], examples[i]["labels"]
        pad = width - len(seq)
        ids.append(seq + [pad_id] * pad)
        labels.append(lab + [IGNORE_INDEX] * pad)
        mask.append([1] * len(seq) + [0] * pad)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }
