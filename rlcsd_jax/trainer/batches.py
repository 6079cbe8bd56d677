"""Host-side batch building: who survives, teacher contexts, and static-shape mini-batches.

Per method (RLCSD_SPEC §2.2, §2.3, §3): grpo has no teacher; opsd / sdpo / srpo / rlsd use the
GT-solution teacher for every rollout; rlcsd / opsd_ectr / rlsd_ectr build self-rollout hints and
DROP rollouts without a valid hint.  Survivors keep their order and their advantage from the
unfiltered group, and are cut into mini-batches of the nominal size M (padded with zero-mask
rows, so shapes are static and the per-rollout loss divides by M as the reference does, §4.9).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rlcsd_jax import hints as hints_lib
from rlcsd_jax import teacher_batch
from rlcsd_jax.data import prompts as prompts_lib
from rlcsd_jax.trainer.rollout import PromptEncoder, Rollouts

SELF_ROLLOUT_METHODS = ("rlcsd", "opsd_ectr", "rlsd_ectr")
GT_TEACHER_METHODS = ("opsd", "sdpo", "srpo", "rlsd")


@dataclasses.dataclass
class Contexts:
    kept: np.ndarray                       # [R'] row indices that take part in the update
    correct_prompts: list | None           # per kept row: teacher prompt ids (correct hint)
    wrong_prompts: list | None             # per kept row: list of wrong-hint prompt ids
    stats: dict


def num_wrong_slots(method: str, k_max: int) -> int:
    return {"rlcsd": k_max, "opsd_ectr": 1, "rlsd_ectr": 1}.get(method, 0)


def build_contexts(method: str, rollouts: Rollouts, encoder: PromptEncoder, rng, *,
                   hint_source: str, k_max: int) -> Contexts:
    g = rollouts.group_size
    all_rows = np.arange(len(rollouts.texts))
    if method == "grpo":
        return Contexts(all_rows, None, None, {})
    groups = [hints_lib.Group(
        problem=prompts_lib.strip_legacy_wrappers(r.problem), ground_truth=r.ground_truth,
        responses=rollouts.texts[i * g:(i + 1) * g], rewards=rollouts.rewards[i * g:(i + 1) * g],
        solution=r.solution) for i, r in enumerate(rollouts.records)]
    if method in GT_TEACHER_METHODS:
        texts = hints_lib.gt_solution_hints(groups)
        return Contexts(all_rows, [encoder.text_ids(t) for t in texts],
                        [[] for _ in texts], {})
    batch = hints_lib.build_hints(groups, rng=rng, source=hint_source, k_max=k_max,
                                  single_wrong=method != "rlcsd")
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


def student_batch(rollouts: Rollouts, rows: np.ndarray, size: int, ids_full: np.ndarray,
                  mask_full: np.ndarray) -> dict:
    """Student arrays for `rows`, padded to `size` rows with zero-mask copies of row rows[0]
    (of row 0 when `rows` is empty: a host with no survivors still joins the global step).

    ids_full / mask_full: [R, Pb + N] prompt (left-padded) + response, built once per step.
    """
    pad = size - len(rows)
    idx = np.concatenate([rows, np.full(pad, rows[0] if len(rows) else 0)]).astype(np.int64)
    live = np.arange(size) < len(rows)
    resp_mask = rollouts.response_mask()[idx] * live[:, None]
    pb = rollouts.prompt_ids.shape[1]
    return dict(
        input_ids=ids_full[idx], attention_mask=mask_full[idx],
        response_start=np.full(size, pb, np.int32), response_mask=resp_mask.astype(np.int32),
        advantages=np.where(live, rollouts.advantages[idx], 0.0).astype(np.float32),
        sampler_logp=(rollouts.logprobs[idx] * resp_mask).astype(np.float32))


def full_student_rows(rollouts: Rollouts) -> tuple[np.ndarray, np.ndarray]:
    """[R, Pb + N] ids and mask: each row's left-padded prompt followed by its response."""
    g = rollouts.group_size
    ids = np.concatenate([np.repeat(rollouts.prompt_ids, g, 0), rollouts.tokens], axis=1)
    mask = np.concatenate([np.repeat(rollouts.prompt_mask, g, 0), rollouts.response_mask()],
                          axis=1)
    return ids.astype(np.int32), mask.astype(np.int32)


def teacher_arrays(rollouts: Rollouts, contexts: Contexts, chunk_positions: np.ndarray,
                   rows: np.ndarray, size: int, *, k_slots: int, max_len: int, pad_id: int,
                   buckets=None) -> dict:
    """[C, size, S] teacher rows for the kept rows `rows` (positions `chunk_positions` in
    contexts.kept order): right-padded [teacher prompt | student response verbatim]."""
    correct = [contexts.correct_prompts[p] for p in chunk_positions]
    wrong = [contexts.wrong_prompts[p] for p in chunk_positions]
    responses = [rollouts.response_ids(r) for r in rows]
    tb = teacher_batch.pack_teacher_batch(correct, wrong, responses, k_max=k_slots,
                                          max_len=max_len, pad_id=pad_id, batch_size=size,
                                          buckets=buckets)
    return dict(input_ids=tb.input_ids, attention_mask=tb.attention_mask,
                response_start=tb.prompt_lens, wrong_valid=tb.wrong_valid,
                truncated_prompt_tokens=tb.prompt_tokens_truncated)


def widen(arrays: dict, width: int, pad_id: int) -> dict:
    """Right-pad the [C, B, S] teacher rows to `width` columns (every host's block of a global
    batch needs the same S; padding columns are masked out)."""
    extra = width - arrays["input_ids"].shape[-1]
    if extra <= 0:
        return arrays
    pad = [(0, 0), (0, 0), (0, extra)]
    return dict(arrays, input_ids=np.pad(arrays["input_ids"], pad, constant_values=pad_id),
                attention_mask=np.pad(arrays["attention_mask"], pad))
