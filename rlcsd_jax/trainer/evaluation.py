"""Evaluation (mean@k / pass@1 per data source, RLCSD_SPEC §5) and step metric summaries."""

from __future__ import annotations

import jax
import numpy as np

from rlcsd_jax import sampling
from rlcsd_jax.trainer import rollout


def rollout_metrics(ro: rollout.Rollouts, num_kept: int) -> dict:
    """Reward / accuracy per source / lengths / truncation of one step's rollouts."""
    lengths = ro.lengths.astype(np.float64)
    m = {"train/reward_mean": float(ro.rewards.mean()),
         "train/response_length_mean": float(lengths.mean()),
         "train/response_length_max": float(lengths.max()),
         "train/truncation_ratio": float(ro.truncated.mean()),
         "train/kept_ratio": num_kept / max(len(ro.texts), 1)}
    for source, acc in rollout.per_source_accuracy(ro.records, ro.rewards,
                                                   ro.group_size).items():
        m[f"train/acc/{source}"] = acc
    return m


def mean_metrics(per_minibatch: list[dict]) -> dict:
    """Average loss metrics over the step's mini-batches; un-prefixed names go under train/."""
    if not per_minibatch:
        return {}
    out = {}
    for k in per_minibatch[0]:
        name = k if "/" in k else f"train/{k}"
        out[name] = float(np.mean([float(np.asarray(m[k])) for m in per_minibatch]))
    return out


def mean_at_k(records, rewards_: np.ndarray, num_samples: int) -> dict[str, float]:
    """Per source: mean over problems of the mean of the k binary accuracies (mean@k; with
    k = 1 this is pass@1), plus `avg`, the unweighted mean over sources (§5)."""
    rewards_ = np.asarray(rewards_, np.float64).reshape(len(records), num_samples)
    per_problem = rewards_.mean(axis=1)
    sources = np.asarray([r.data_source for r in records])
    out = {s: float(per_problem[sources == s].mean()) for s in sorted(set(sources.tolist()))}
    out["avg"] = float(np.mean(list(out.values()))) if out else 0.0
    return out


def evaluate(generate_fn, tokenizer, encoder, records, *, batch_prompts: int, num_samples: int,
             seed: int, pad_id: int, buckets=sampling.DEFAULT_BUCKETS) -> dict:
    """Sample `num_samples` answers per eval problem and score them: `eval/<source>`,
    `eval/avg`, `eval/response_length_mean`."""
    all_rewards, lengths = [], []
    for start in range(0, len(records), batch_prompts):
        chunk = records[start:start + batch_prompts]
        # Pad the last chunk with copies so the batch shape (and compiled program) is reused.
        padded = chunk + [chunk[0]] * (batch_prompts - len(chunk)) if len(records) > len(
            chunk) else chunk
        ro = rollout.sample(generate_fn, tokenizer, encoder, padded,
                            jax.random.key(seed + start), group_size=num_samples,
                            buckets=buckets, pad_id=pad_id)
        n = len(chunk) * num_samples
        all_rewards.append(ro.rewards[:n])
        lengths.append(ro.lengths[:n])
    scores = mean_at_k(records, np.concatenate(all_rewards), num_samples)
    out = {f"eval/{k}": v for k, v in scores.items()}
    out["eval/response_length_mean"] = float(np.concatenate(lengths).mean())
    return out
