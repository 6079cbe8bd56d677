"""Host-side batch building: who survives, teacher contexts, and the arrays of a micro-batch.

Per method (algorithm.md §2.2, §2.3, §3; `losses.METHODS[m].teacher_context`): grpo has no
teacher; opsd / sdpo / srpo / rlsd use the GT-solution teacher for every rollout; rlcsd /
opsd_ectr / rlsd_ectr build self-rollout hints and DROP rollouts without a valid hint.
Survivors keep their order and their advantage from the unfiltered group, and are cut into
mini-batches of the nominal size M (the per-rollout loss divides by M as the reference does,
§4.9); `microbatch.plan` cuts each mini-batch into micro-batches by a token budget, and the
builders below lay out one micro-batch: right-padded rows `[prompt | response | pad]` sized to
that micro-batch, zero-mask rows filling its block.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rlcsd_jax import hints as hints_lib
from rlcsd_jax import losses
from rlcsd_jax.data import packing
from rlcsd_jax.data import prompts as prompts_lib
from rlcsd_jax.trainer.rollout import PromptEncoder, Rollouts

@dataclasses.dataclass
class Contexts:
    kept: np.ndarray                       # [R'] row indices that take part in the update
    correct_prompts: list | None           # per kept row: teacher prompt ids (correct hint)
    wrong_prompts: list | None             # per kept row: list of wrong-hint prompt ids
    stats: dict


def num_wrong_slots(method: str, k_max: int) -> int:
    """Wrong-hint teacher rows per rollout (the table's `wrong_hints` rule)."""
    return losses.METHODS[method].num_wrong_slots(k_max)


def build_contexts(method: str, rollouts: Rollouts, encoder: PromptEncoder, rng, *,
                   hint_source: str, k_max: int) -> Contexts:
    g = rollouts.group_size
    all_rows = np.arange(len(rollouts.texts))
    spec = losses.METHODS[method]
    if spec.teacher_context is None:
        return Contexts(all_rows, None, None, {})
    groups = [hints_lib.Group(
        problem=prompts_lib.strip_legacy_wrappers(r.problem), ground_truth=r.ground_truth,
        responses=rollouts.texts[i * g:(i + 1) * g], rewards=rollouts.rewards[i * g:(i + 1) * g],
        solution=r.solution) for i, r in enumerate(rollouts.records)]
    if spec.teacher_context == "gt_solution":
        texts = hints_lib.gt_solution_hints(groups)
        return Contexts(all_rows, [encoder.text_ids(t) for t in texts],
                        [[] for _ in texts], {})
    batch = hints_lib.build_hints(groups, rng=rng, source=hint_source, k_max=k_max,
                                  single_wrong=spec.single_wrong)
    kept = batch.kept_indices
    targets = [batch.targets[i] for i in kept]
    return Contexts(
        kept=kept,
        correct_prompts=[encoder.text_ids(t.correct_hint) for t in targets],
        wrong_prompts=[[encoder.text_ids(w) for w in t.wrong_hints] for t in targets],
        stats={f"{method}/{k}": float(v) for k, v in batch.stats.items()})


def minibatch_rows(kept: np.ndarray, size: int) -> list[np.ndarray]:
    """Contiguous chunks of the surviving rows, each of at most `size` rows (§1.1)."""
    return [kept[i:i + size] for i in range(0, len(kept), size)]


def prompt_ids(rollouts: Rollouts, row: int) -> np.ndarray:
    """The real (unpadded) student prompt of rollout `row`."""
    p = row // rollouts.group_size
    return rollouts.prompt_ids[p][rollouts.prompt_mask[p] > 0]


def student_lengths(rollouts: Rollouts, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prompt + response, response) token counts of `rows`."""
    prompt = rollouts.prompt_mask.sum(axis=1)[np.asarray(rows, np.int64) // rollouts.group_size]
    response = rollouts.lengths[rows]
    return (prompt + response).astype(np.int64), response.astype(np.int64)


def teacher_lengths(contexts: Contexts, positions: np.ndarray, response_len: np.ndarray, *,
                    max_len: int) -> np.ndarray:
    """Longest teacher row of each rollout (its contexts, prompts left-truncated to max_len)."""
    out = np.zeros(len(positions), np.int64)
    for i, (pos, n) in enumerate(zip(positions, response_len)):
        prompts = [contexts.correct_prompts[pos], *contexts.wrong_prompts[pos]]
        out[i] = min(max_len, max(len(p) for p in prompts) + int(n))
    return out


def student_batch(rollouts: Rollouts, rows: np.ndarray, local_rows: int, width: int,
                  response_width: int, pad_id: int = 0) -> dict:
    """Student arrays of one micro-batch block: `rows` right padded to `width` tokens, then
    zero-mask rows up to `local_rows` (a host with fewer survivors still joins the step).

    input_ids / attention_mask [local_rows, width], response_start [local_rows] (the prompt
    length: the logits at start - 1 + j predict response token j), response_mask / sampler_logp
    [local_rows, response_width], advantages [local_rows].
    """
    rows = np.asarray(rows, np.int64)
    prompts = [prompt_ids(rollouts, r) for r in rows] + [[]] * (local_rows - len(rows))
    responses = [rollouts.response_ids(r) for r in rows] + [[]] * (local_rows - len(rows))
    ids, mask, start = packing.pack_rows(prompts, responses, seq_len=width, pad_id=pad_id)
    n = response_width
    resp_mask = np.zeros((local_rows, n), np.int32)
    sampler = np.zeros((local_rows, n), np.float32)
    adv = np.zeros(local_rows, np.float32)
    for i, r in enumerate(rows):
        length = int(rollouts.lengths[r])
        resp_mask[i, :length] = 1
        sampler[i, :length] = rollouts.logprobs[r, :length]
        adv[i] = rollouts.advantages[r]
    return dict(input_ids=ids, attention_mask=mask, response_start=start,
                response_mask=resp_mask, advantages=adv, sampler_logp=sampler)


def teacher_arrays(rollouts: Rollouts, contexts: Contexts, positions: np.ndarray,
                   rows: np.ndarray, local_rows: int, *, k_slots: int, max_len: int, pad_id: int,
                   width: int) -> dict:
    """[C, local_rows, width] teacher rows for the kept rows `rows` (positions `positions` in
    contexts.kept order): right-padded [teacher prompt | student response verbatim]."""
    correct = [contexts.correct_prompts[p] for p in positions]
    wrong = [contexts.wrong_prompts[p] for p in positions]
    responses = [rollouts.response_ids(r) for r in rows]
    tb = packing.pack_teacher_batch(correct, wrong, responses, k_max=k_slots,
                                          max_len=max_len, pad_id=pad_id, batch_size=local_rows,
                                          seq_len=width)
    return dict(input_ids=tb.input_ids, attention_mask=tb.attention_mask,
                response_start=tb.prompt_lens, wrong_valid=tb.wrong_valid,
                truncated_prompt_tokens=tb.prompt_tokens_truncated)
