"""Rollouts: G sampled answers per prompt, scored, shaped, and turned into a train batch's answers.

    records --generate (jitted)--> responses --decode, math_dapo score, overlong shaping--> Groups
    Groups --old (and reference) log-probs, group advantages--> Answers --dapo_jax.packing--> train batch

The reward of an answer is its correctness score (+1 / -1) plus the soft overlong penalty on its
token count; accuracy (for dynamic sampling and the metrics) is the correctness alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dapo_jax import algorithm, packing, sampling, sharding
from dapo_jax.data.datasets import PromptRecord
from dapo_jax.rewards import math_dapo
from dapo_jax.rewards.overlong import overlong_penalty
from dapo_jax.tokenizer import Tokenizer
from dapo_jax.train_step import token_logprobs


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    max_response_length: int
    overlong_buffer: int = 0  # L_cache; 0 turns the soft overlong punishment off
    overlong_penalty_factor: float = 1.0


_LOGP_FIELDS = ("sampler_logp", "old_logp", "ref_logp")


@dataclasses.dataclass
class Group:
    """The G answers to one prompt, scored. Lists are per answer."""

    record: PromptRecord
    responses: list[list[int]]  # token ids, up to and including the end-of-sequence id
    sampler_logp: list[np.ndarray]  # float32 log-probs the sampler reported for those ids
    texts: list[str]
    scores: list[float]  # correctness: +1 / -1
    rewards: list[float]  # score + overlong penalty: what the advantage is computed from
    accs: list[bool]
    preds: list[str]
    truncated: list[bool]  # hit max_response_length without an end-of-sequence id
    old_logp: list[np.ndarray] | None = None  # float32, under the parameters that generated them
    ref_logp: list[np.ndarray] | None = None  # float32, under the reference policy (only with a KL penalty)
    entropy_sums: list[float] | None = None  # per answer, the sum over its tokens of the generating policy's entropy
    step: int = 0  # the rollout step that generated it (a carried group's age is the current step minus this)

    @property
    def informative(self) -> bool:
        """Dynamic sampling keeps a group only if its answers disagree on correctness (std > 0)."""
        return len(set(self.accs)) > 1

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.responses)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["record"] = dataclasses.asdict(self.record)
        for key in _LOGP_FIELDS:
            out[key] = None if out[key] is None else [x.tolist() for x in out[key]]
        return out

    @classmethod
    def from_json(cls, d: dict) -> Group:
        record = d["record"]
        arrays = {key: None if d.get(key) is None else [np.asarray(x, np.float32) for x in d[key]]
                  for key in _LOGP_FIELDS}
        return cls(**{**d, **arrays, "record": PromptRecord(**{**record, "prompt_ids": tuple(record["prompt_ids"])})})


def score_group(record: PromptRecord, responses: Sequence[Sequence[int]], sampler_logp, truncated,
                tokenizer: Tokenizer, reward: RewardConfig) -> Group:
    texts, scores, rewards, accs, preds = [], [], [], [], []
    for ids in responses:
        text = tokenizer.decode(ids)  # the end-of-sequence id is a special token and drops out
        result = math_dapo.compute_score(text, record.ground_truth)
        penalty = (overlong_penalty(len(ids), max_response_length=reward.max_response_length,
                                    buffer_length=reward.overlong_buffer,
                                    penalty_factor=reward.overlong_penalty_factor)
                   if reward.overlong_buffer else 0.0)
        texts.append(text)
        scores.append(result["score"])
        rewards.append(result["score"] + penalty)
        accs.append(bool(result["acc"]))
        preds.append(result["pred"])
    return Group(record, [list(r) for r in responses], [np.asarray(x, np.float32) for x in sampler_logp], texts,
                 scores, rewards,
                 accs, preds, list(truncated))


def stream_groups(model_config, params, records: Sequence[PromptRecord], tokenizer: Tokenizer, *,
                  samples_per_prompt: int, reward: RewardConfig, temperature: float, top_p: float, top_k: int,
                  seed: int, prompt_bucket: int, stop_ids: Sequence[int], mesh=None, timer: dict | None = None,
                  slots: int = 0, pages: int = 0, page_size: int = 64) -> Iterator[Group]:
    """Each record's `samples_per_prompt` answers, scored, in record order, each group as soon as
    the rollout engine has finished it and every group before it (`sampling.generate_stream`;
    seconds spent waiting for it and scoring are added to timer["generate"] and timer["reward"]).
    `slots` answers decode at once (0: every answer; the KV cache grows with them, `python -m
    dapo_jax.plan` says what fits; `pages` > 0 caps it at a pool of pages). An answer ends with the first of `stop_ids` it samples
    (included in the answer) or at reward.max_response_length tokens. Closing the iterator stops
    the engine: records it has not reached are never generated.
    """
    g, timer = samples_per_prompt, {} if timer is None else timer
    answers = sampling.generate_stream(model_config, params, [list(r.prompt_ids) for r in records],
                                       max_new_tokens=reward.max_response_length, temperature=temperature,
                                       top_p=top_p, top_k=top_k, eos_ids=stop_ids, num_samples=g, seed=seed % 2**32,
                                       mesh=mesh, prompt_bucket=prompt_bucket, slots=slots, pages=pages,
                                       page_size=page_size)
    try:
        while True:
            start = time.perf_counter()
            item = next(answers, None)
            scored = time.perf_counter()
            timer["generate"] = timer.get("generate", 0.0) + scored - start
            if item is None:
                return
            i, results = item
            with jax.profiler.TraceAnnotation("dapo/reward"):
                group = score_group(records[i], [r.tokens for r in results], [r.logprobs for r in results],
                                    [r.truncated for r in results], tokenizer, reward)
            timer["reward"] = timer.get("reward", 0.0) + time.perf_counter() - scored
            yield group
    finally:
        answers.close()


def generate_groups(model_config, params, records: Sequence[PromptRecord], tokenizer: Tokenizer, **kwargs
                    ) -> list[Group]:
    """Every group of `stream_groups` (same arguments)."""
    return list(stream_groups(model_config, params, records, tokenizer, **kwargs))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where prompt and response sit in a row of one answer (the SFT warmup's batches)."""

    max_prompt_length: int
    max_response_length: int
    pad_id: int

    @property
    def width(self) -> int:
        return self.max_prompt_length + self.max_response_length


def pack(groups: Sequence[Group], layout: Layout, rows: int) -> dict[str, np.ndarray]:
    """tokens / attention_mask / loss_mask [rows, width] for the groups' answers, in order; rows past
    the last answer are padding (all masks 0), so a partial batch keeps the compiled shape."""
    p = layout.max_prompt_length
    tokens = np.full((rows, layout.width), layout.pad_id, np.int32)
    attention = np.zeros((rows, layout.width), np.int32)
    loss = np.zeros((rows, layout.width), np.int32)
    row = 0
    for group in groups:
        prompt = group.record.prompt_ids
        if len(prompt) > p:
            raise ValueError(f"prompt {group.record.origin} has {len(prompt)} tokens > max_prompt_length={p}")
        for response in group.responses:
            if row == rows:
                raise ValueError(f"the groups hold more than {rows} answers")
            tokens[row, p - len(prompt):p] = prompt
            tokens[row, p:p + len(response)] = response
            attention[row, p - len(prompt):p + len(response)] = 1
            loss[row, p:p + len(response)] = 1
            row += 1
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}


def advantages(groups: Sequence[Group], rows: int, *, norm_by_std: bool) -> np.ndarray:
    """[rows] group advantages (padding rows 0)."""
    rewards = [r for g in groups for r in g.rewards]
    ids = [i for i, g in enumerate(groups) for _ in g.rewards]
    out = np.zeros((rows,), np.float32)
    if rewards:
        out[:len(rewards)] = algorithm.group_advantages(rewards, ids, norm_by_std=norm_by_std)
    return out


def make_logprob_fn(model_config, *, temperature: float, chunk_rows: int, mesh=None):
    """`logprobs(policies, tokens, segment_ids, positions) -> (logp [len(policies), rows, width],
    entropy [rows, width])`: log pi(tokens[t] | tokens[<t]) under each parameter tree in `policies`
    (the old policy, and the reference policy when there is a KL penalty) and the entropy of the
    first one's distribution at each position, for rows of packed sequences (`dapo_jax.packing`), in
    one compiled call per `chunk_rows` rows (rows are padded up to a multiple of chunk_rows)."""
    def fn(policies, t, s, pos):
        mask = (s > 0).astype(jnp.int32)
        (logp, entropy), *others = [token_logprobs(model_config, p, t, mask, temperature, s, pos) for p in policies]
        return jnp.stack([logp] + [other[0] for other in others]), entropy

    if mesh is None:
        jitted = jax.jit(fn)
    else:
        rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        stacked_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
        sharded = jax.jit(fn, in_shardings=(None, rows_sharding, rows_sharding, rows_sharding),
                          out_shardings=(stacked_sharding, rows_sharding))

        def jitted(policies, *rows):
            # Under the mesh: attention picks its implementation for the mesh's devices (splash in
            # shard_map on TPU) and the activations' sharding constraints apply.
            with jax.set_mesh(mesh):
                return sharded(policies, *(sharding.host_to_global(x, rows_sharding) for x in rows))

        def lower(policies, *rows):
            with jax.set_mesh(mesh):
                return sharded.lower(policies, *rows)

    def logprobs(policies, tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray):
        n = tokens.shape[0]
        padded = -(-n // chunk_rows) * chunk_rows
        rows = [np.pad(x, ((0, padded - n), (0, 0))) for x in (tokens, segment_ids, positions)]
        logp, entropy = [], []
        for start in range(0, padded, chunk_rows):
            part = jitted(tuple(policies), *(x[start:start + chunk_rows] for x in rows))
            logp.append(sharding.to_host(part[0]))
            entropy.append(sharding.to_host(part[1]))
        return np.concatenate(logp, axis=1)[:, :n], np.concatenate(entropy)[:n]

    if mesh is not None:
        logprobs.lower = lower  # compiling ahead of time from ShapeDtypeStructs (the planner, tests)
    return logprobs


def attach_logprobs(groups: Sequence[Group], params, logprob_fn, budget: int, ref_params=None) -> None:
    """Fill the fresh groups' (those without old_logp) old_logp with log-probs under `params` (the
    parameters that generated them), their entropy_sums, and given `ref_params` their ref_logp under
    the reference policy, all in one pass over their sequences packed into rows of `budget` tokens."""
    todo = [g for g in groups if g.old_logp is None]
    if not todo:
        return
    sequences = [packing.Answer(g.record.prompt_ids, response, np.zeros(len(response), np.float32), 0.0)
                 for g in todo for response in g.responses]
    packed = packing.first_fit_decreasing([len(s) for s in sequences], budget)
    rows = packing.rows_of(sequences, packed, len(packed.rows))
    policies = (params,) if ref_params is None else (params, ref_params)
    logp, entropy = logprob_fn(policies, rows["tokens"], rows["segment_ids"], rows["positions"])
    where = {i: (r, start) for r, row in enumerate(packed.rows) for i, start in row}
    i = 0
    for g in todo:
        g.old_logp, g.ref_logp, g.entropy_sums = [], None if ref_params is None else [], []
        for response in g.responses:
            r, start = where[i]
            span = slice(start + len(g.record.prompt_ids), start + len(sequences[i]))
            g.old_logp.append(np.asarray(logp[0, r, span], np.float32))
            g.entropy_sums.append(float(np.sum(entropy[r, span], dtype=np.float64)))
            if ref_params is not None:
                g.ref_logp.append(np.asarray(logp[1, r, span], np.float32))
            i += 1


def entropy_before_update(groups: Sequence[Group]) -> float:
    """The token mean, over the groups' answers, of the entropy of the policy that generated them (the
    reference logs this as actor/entropy); NaN without groups."""
    known = [g for g in groups if g.entropy_sums is not None]  # (carried groups saved before it was recorded)
    tokens = sum(g.num_tokens for g in known)
    return sum(sum(g.entropy_sums) for g in known) / tokens if tokens else float("nan")


def answers(groups: Sequence[Group], *, norm_by_std: bool, overlong_filter: bool) -> list[packing.Answer]:
    """The groups' answers as sequences for a packed train batch, with their group advantages;
    overlong_filter keeps truncated answers out of the loss (their rewards still count in the
    group's baseline)."""
    n = sum(len(g.responses) for g in groups)
    adv = advantages(groups, n, norm_by_std=norm_by_std)
    out = []
    for g in groups:
        for j, response in enumerate(g.responses):
            out.append(packing.Answer(g.record.prompt_ids, response, g.old_logp[j], float(adv[len(out)]),
                                      trained=not (overlong_filter and g.truncated[j]),
                                      ref_logp=None if g.ref_logp is None else g.ref_logp[j]))
    return out
