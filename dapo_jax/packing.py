"""Packed train batches: a rollout's sequences (prompt + answer, no padding between them) placed in
rows of a fixed token budget, so the train step and the old-log-prob pass compute on tokens rather
than on padding.

    each mini-batch's sequences --first-fit decreasing by length--> rows of `budget` tokens
    its rows --> micro-batches of `rows` rows; only the micro-batches in use are computed

A row holds its sequences one after another, told apart by segment ids (1, 2, ...; 0 is padding),
each with positions from 0. Every aggregation mode stays exact: each token carries its weight in its
mini-batch's loss (`train_step.loss_weights`), with the mini-batch's token and sequence counts, not
the row's or the micro-batch's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from dapo_jax import train_step as train_step_lib


@dataclasses.dataclass(frozen=True)
class Packed:
    """Sequences placed in rows: rows[r] lists (sequence index, offset in the row)."""

    rows: list[list[tuple[int, int]]]
    budget: int


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> Packed:
    """Place sequences of these lengths in as few rows of `budget` tokens as first-fit decreasing
    finds: longest first, each into the first row with room (within 11/9 of the optimum + 1 rows)."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > budget]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sequence {i} has {n} tokens, more than the packing budget of {budget}: raise "
                         f"optim.pack_budget to at least the longest prompt + answer ({max(lengths)} tokens)")
    rows: list[list[tuple[int, int]]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            rows.append([])
            free.append(budget)
            row = len(rows) - 1
        rows[row].append((i, budget - free[row]))
        free[row] -= n
    return Packed(rows, budget)


def one_per_row(lengths: Sequence[int], budget: int) -> Packed:
    """Each sequence alone in a row of `budget` tokens, in order (no packing: the padded layout)."""
    packed = first_fit_decreasing(lengths, budget)  # only for its length check
    return Packed([[(i, 0)] for i in range(len(lengths))], packed.budget)


@dataclasses.dataclass(frozen=True)
class Answer:
    """One sequence of the batch: its prompt and answer ids and the answer's per-token values."""

    prompt: Sequence[int]
    response: Sequence[int]
    old_logp: np.ndarray  # [len(response)]
    advantage: float
    trained: bool = True  # False: in the batch (and its group's baseline) but masked out of the loss
    ref_logp: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response)


def rows_of(answers: Sequence[Answer], packed: Packed, num_rows: int) -> dict[str, np.ndarray]:
    """[num_rows, budget] tokens, segment_ids, positions, loss_mask, old_logp, advantages (and
    ref_logp when the answers carry it) for `packed`'s rows, then empty rows."""
    shape = (num_rows, packed.budget)
    out = {k: np.zeros(shape, np.int32) for k in ("tokens", "segment_ids", "positions", "sequence")}
    out.update({k: np.zeros(shape, np.float32) for k in ("loss_mask", "old_logp", "advantages")})
    with_ref = bool(answers) and all(a.ref_logp is not None for a in answers)
    if with_ref:
        out["ref_logp"] = np.zeros(shape, np.float32)
    for r, row in enumerate(packed.rows):
        for segment, (i, start) in enumerate(row, start=1):
            a = answers[i]
            p, n = len(a.prompt), len(a)
            span, answer = slice(start, start + n), slice(start + p, start + n)
            out["tokens"][r, span] = np.concatenate([np.asarray(a.prompt, np.int32), np.asarray(a.response, np.int32)])
            out["segment_ids"][r, span] = segment
            out["positions"][r, span] = np.arange(n)
            out["sequence"][r, span] = i
            out["advantages"][r, span] = a.advantage
            out["old_logp"][r, answer] = a.old_logp
            if a.trained:
                out["loss_mask"][r, answer] = 1.0
            if with_ref:
                out["ref_logp"][r, answer] = a.ref_logp
    return out


def train_batch(answers: Sequence[Answer], *, num_minibatches: int, per_minibatch: int, budget: int,
                rows_per_micro: int, loss_config: train_step_lib.LossConfig,
                pack: bool = True) -> dict[str, np.ndarray]:
    """The train step's batch (see `dapo_jax.train_step`) for `answers` in order: mini-batch m holds
    answers [m * per_minibatch, (m + 1) * per_minibatch) (fewer, or none, for a partial batch),
    packed on its own (`pack=False`: one answer per row) into micro-batches of `rows_per_micro` rows
    of `budget` tokens. The arrays have room for the most micro-batches a mini-batch can need (every
    answer alone in a row); `micro_batches` says how many each one uses."""
    if len(answers) > num_minibatches * per_minibatch:
        raise ValueError(f"{len(answers)} answers are more than {num_minibatches} mini-batches of {per_minibatch}")
    most = -(-per_minibatch // rows_per_micro)  # micro-batches when every answer fills a row alone
    parts, counts, tokens = [], [], []
    for m in range(num_minibatches):
        share = answers[m * per_minibatch:(m + 1) * per_minibatch]
        packed = (first_fit_decreasing if pack else one_per_row)([len(a) for a in share], budget)
        rows = rows_of(share, packed, most * rows_per_micro)
        rows["loss_weights"] = train_step_lib.loss_weights(rows["loss_mask"], rows["sequence"], loss_config.agg_mode,
                                                           loss_config.norm_constant)
        del rows["sequence"]
        parts.append({k: v.reshape(most, rows_per_micro, budget) for k, v in rows.items()})
        counts.append(-(-len(packed.rows) // rows_per_micro))
        tokens.append(float((rows["loss_mask"] > 0).sum()))
    batch = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    batch["num_tokens"] = np.asarray(tokens, np.float32)
    batch["micro_batches"] = np.asarray(counts, np.int32)
    return batch
