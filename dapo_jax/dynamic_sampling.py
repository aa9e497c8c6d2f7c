"""Dynamic sampling (DAPO section 3.2): train only on groups whose answers disagree, and keep
generating until the batch is full.

A group whose G answers are all right or all wrong has zero advantage everywhere: it adds no
gradient, only dilutes the token mean. So, per rollout step:

    kept = groups carried over from earlier steps, at most max_carry_age steps old
    for each fresh group, in prompt order, generated as it is asked for:
        keep it if 0 < accuracy < 1; stop once len(kept) == prompts_per_step
    train on kept[:prompts_per_step]; carry kept[prompts_per_step:] into the next step

Fresh groups come from the rollout engine as a stream (`rollout.stream`): generation stops at the
group that fills the batch, and the prompts after it go back to the data stream for the next step,
so nothing is generated in vain beyond the answers in flight. Groups are taken in prompt order,
never in the order they finish: taking whichever finished first would favour prompts with short
answers (and make the batch depend on slot counts and timing).

The reference instead generates whole generation batches and discards the surplus of the batch
that filled the step (`rollout.stream=False`). We can carry that surplus over, wasting no
generated token (the metrics report the share of generated tokens that reached a gradient update).
A carried group keeps the log-probs of the parameters that generated it, so its importance ratio
stays correct, but the clip is centred on that older policy: with the paper's 3x over-generation
the carry grows whenever more than a third of the groups are informative, so groups older than
`max_carry_age` rollout steps are dropped (and counted), and every step reports the age of what it
trained on. A step whose carry already fills the batch generates nothing and trains only on
carried groups; its metrics say so.

After `max_gen_batches` generation batches' worth of prompts without a full batch the step either
stops with an explanation of what was seen, or trains on the partial batch
(`on_limit="train_partial"`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from dapo_jax.rollout import Group

ON_LIMIT = ("error", "train_partial")


class GenerationBatchLimit(RuntimeError):
    """Dynamic sampling could not fill a batch within max_gen_batches generation batches."""


@dataclasses.dataclass
class Collected:
    step: int
    groups: list[Group]  # to train on, at most prompts_per_step of them
    carry: list[Group]  # informative groups left over, for the next step
    generated: list[Group]  # every group generated this step (for the metrics)
    gen_batches: int = 0
    carried_in: int = 0  # carried groups still young enough to train on
    stale_dropped: int = 0  # carried groups dropped for being older than max_carry_age
    partial: bool = False

    @property
    def filtered(self) -> int:
        """Generated groups dropped for being all right or all wrong."""
        return sum(not g.informative for g in self.generated)

    @property
    def ages(self) -> list[int]:
        """The trained groups' ages in rollout steps (0: generated this step)."""
        return [self.step - g.step for g in self.groups]

    def metrics(self) -> dict[str, float]:
        """The step's dynamic-sampling figures (present on every step, generating or not)."""
        ages, trained = self.ages, max(len(self.groups), 1)
        return {
            "dynamic_sampling/gen_batches": self.gen_batches,
            "dynamic_sampling/groups_generated": len(self.generated),
            "dynamic_sampling/filtered_frac": self.filtered / max(len(self.generated), 1),
            "dynamic_sampling/groups_trained": len(self.groups),
            "dynamic_sampling/carried_in": self.carried_in,
            "dynamic_sampling/carried_out": len(self.carry),
            "dynamic_sampling/stale_dropped": self.stale_dropped,
            # the share of trained groups generated in an earlier step, under an older policy
            "dynamic_sampling/stale_frac": sum(a > 0 for a in ages) / trained,
            "dynamic_sampling/age_mean": sum(ages) / trained,
            "dynamic_sampling/age_max": max(ages, default=0),
            "dynamic_sampling/partial_batch": float(self.partial),
        }


def limit_message(step: int, need: int, kept: int, generated: list[Group], max_gen_batches: int) -> str:
    right = sum(all(g.accs) for g in generated)
    wrong = sum(not any(g.accs) for g in generated)
    answers = sum(len(g.accs) for g in generated)
    accuracy = sum(sum(g.accs) for g in generated) / max(answers, 1)
    return (f"dynamic sampling: step {step} reached rollout.max_gen_batches={max_gen_batches} with {kept} of the "
            f"{need} groups it needs. Of the {len(generated)} groups generated this step, {right} were all "
            f"correct and {wrong} all wrong (answer accuracy {accuracy:.1%}), so the data is too "
            f"{'easy' if right > wrong else 'hard'} for this model at G={len(generated[0].accs) if generated else '?'}. "
            f"Raise rollout.max_gen_batches or rollout.gen_prompts_per_batch, use "
            f"{'harder' if right > wrong else 'easier'} prompts, raise rollout.samples_per_prompt, or set "
            f"rollout.on_gen_batch_limit='train_partial' to train on the groups found.")


def collect(step: int, need: int, carry: list[Group], fresh: Iterable[Group], *, per_batch: int,
            whole_batches: bool = False, dynamic: bool = True, carry_over: bool = True, max_carry_age: int = 1,
            max_gen_batches: int = 10, on_limit: str = "error") -> Collected:
    """Gather `need` groups for one rollout step.

    `fresh` yields the step's new groups, scored, in prompt order, generated only as they are asked
    for (a stream from the engine, or generation batches of `per_batch` prompts); each is stamped
    with `step`. Carried groups more than `max_carry_age` steps old are dropped before anything else
    (0 keeps none: every step trains on its own generations). Taking stops once `need` informative
    groups are in hand: at once, or with `whole_batches` at the end of the generation batch that got
    there (its surplus carried). Without dynamic sampling the first `need` groups are trained on as
    they are. Fresh groups come back without old log-probs: the caller computes them (still under
    the generating parameters) for the ones that are kept.
    """
    if on_limit not in ON_LIMIT:
        raise ValueError(f"on_limit={on_limit!r}: use one of {ON_LIMIT}")
    if max_carry_age < 0:
        raise ValueError(f"max_carry_age={max_carry_age} must be >= 0 (rollout steps a carried group may wait)")
    fresh = iter(fresh)
    generated: list[Group] = []

    def take() -> Group:
        group = next(fresh, None)
        if group is None:
            raise RuntimeError(f"step {step}: the fresh groups ran out after {len(generated)}, before the "
                               f"{per_batch * (max_gen_batches if dynamic else 1)} prompts a step may draw")
        group.step = step
        generated.append(group)
        return group

    if not dynamic:
        for _ in range(need):
            take()
        return Collected(step, generated[:], [], generated, gen_batches=1)
    young = [g for g in carry if step - g.step <= max_carry_age]
    kept = young
    out = Collected(step, [], [], generated, carried_in=len(young), stale_dropped=len(carry) - len(young))
    while len(kept) < need or (whole_batches and len(generated) % per_batch):
        if len(generated) == per_batch * max_gen_batches:
            if on_limit == "error":
                raise GenerationBatchLimit(limit_message(step, need, len(kept), generated, max_gen_batches))
            out.partial = True
            break
        group = take()
        if group.informative:
            kept.append(group)
    out.groups, out.gen_batches = kept[:need], -(-len(generated) // per_batch)
    out.carry = kept[need:] if carry_over and max_carry_age > 0 else []
    return out
