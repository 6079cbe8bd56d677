"""Evaluation (mean@k / pass@1 per data source, algorithm.md §5) and step metric summaries."""

from __future__ import annotations

import jax
import numpy as np

from rlcsd_jax import sampling
from rlcsd_jax.distributed import multihost
from rlcsd_jax.trainer import reductions, rollout


def rollout_metrics(ro: rollout.Rollouts, num_kept: int, source_names: list[str]) -> dict:
    """Reward / accuracy per source / lengths / truncation of one step's rollouts, over the
    GLOBAL batch (each process holds its block of `ro`; per-row values are all-gathered).

    source_names: every data source of the training set, the same list on every process.
    """
    index = {name: i for i, name in enumerate(source_names)}
    rewards, lengths, truncated, sources = multihost.allgather_columns(
        ro.rewards, ro.lengths, ro.truncated,
        [index[r.data_source] for r in ro.records for _ in range(ro.group_size)])
    metrics = {"train/reward_mean": float(rewards.mean()),
         "train/response_length_mean": float(lengths.mean()),
         "train/response_length_max": float(lengths.max()),
         "train/truncation_ratio": float(truncated.mean()),
         "train/kept_ratio": multihost.global_sum(num_kept) / max(len(rewards), 1)}
    for i in sorted(set(sources.astype(int).tolist())):
        metrics[f"train/acc/{source_names[i]}"] = float(rewards[sources == i].mean())
    return metrics


def update_metrics(per_minibatch: list[dict]) -> dict:
    """The step's update metrics from its mini-batches', each reduced as `reductions` declares
    (counts add up, a mean is weighted by its denominator, a maximum is the largest); the
    private denominators (`_weight`) are dropped and un-prefixed names go under train/."""
    out = reductions.reduce(per_minibatch)
    return {reductions.step_name(k): v for k, v in out.items() if not k.startswith("_")}


def _per_problem_by_source(records, rewards_: np.ndarray, num_samples: int):
    """{source: [n_source] mean of the k binary accuracies of each of its problems}."""
    per_problem = np.asarray(rewards_, np.float64).reshape(len(records), num_samples).mean(1)
    sources = np.asarray([r.data_source for r in records])
    return {s: per_problem[sources == s] for s in sorted(set(sources.tolist()))}


def mean_at_k(records, rewards_: np.ndarray, num_samples: int) -> dict[str, float]:
    """Per source: mean over problems of the mean of the k binary accuracies (mean@k; with
    k = 1 this is pass@1), plus `avg`, the unweighted mean over sources (§5)."""
    by_source = _per_problem_by_source(records, rewards_, num_samples)
    out = {s: float(x.mean()) for s, x in by_source.items()}
    out["avg"] = float(np.mean(list(out.values()))) if out else 0.0
    return out


def mean_at_k_stderr(records, rewards_: np.ndarray, num_samples: int) -> float:
    """Standard error of mean_at_k's `avg` over problems: per source the sample standard
    deviation of the per-problem means over sqrt(n), combined as for an unweighted mean of
    independent source means.  It covers both the choice of problems and the k samples, so it
    says whether two evaluations differ by more than noise (a source with one problem adds 0)."""
    by_source = _per_problem_by_source(records, rewards_, num_samples)
    variances = [x.var(ddof=1) / len(x) if len(x) > 1 else 0.0 for x in by_source.values()]
    return float(np.sqrt(np.sum(variances)) / len(variances)) if variances else 0.0


def evaluate(generate_fn, tokenizer, encoder, records, *, batch_prompts: int, num_samples: int,
             seed: int, pad_id: int, buckets=sampling.DEFAULT_BUCKETS) -> dict:
    """Sample `num_samples` answers per eval problem and score them: `eval/<source>`,
    `eval/avg`, `eval/response_length_mean`."""
    all_rewards, lengths = [], []
    count = jax.process_count()
    for start in range(0, len(records), batch_prompts):
        chunk = records[start:start + batch_prompts]
        # Pad the last chunk with copies so the batch shape (and compiled program) is reused,
        # and so that it splits into equal per-process blocks.
        size = batch_prompts if len(records) > len(chunk) else -(-len(chunk) // count) * count
        padded = chunk + [chunk[0]] * (size - len(chunk))
        mine = padded[multihost.block(len(padded))]   # this process samples and grades its block
        ro = rollout.sample(generate_fn, tokenizer, encoder, mine,
                            jax.random.key(seed + start), group_size=num_samples,
                            buckets=buckets, pad_id=pad_id)
        n = len(chunk) * num_samples
        chunk_rewards, chunk_lengths = multihost.allgather_columns(ro.rewards, ro.lengths)
        all_rewards.append(chunk_rewards[:n])
        lengths.append(chunk_lengths[:n])
    rewards = np.concatenate(all_rewards)
    out = {f"eval/{k}": v for k, v in mean_at_k(records, rewards, num_samples).items()}
    out["eval/avg_stderr"] = mean_at_k_stderr(records, rewards, num_samples)
    out["eval/response_length_mean"] = float(np.concatenate(lengths).mean())
    return out
