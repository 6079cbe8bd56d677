"""NumPy references the tests check the library against (never used by the library)."""

from __future__ import annotations

import numpy as np


def response_logprob_positions(prompt_lens, num_tokens: int,
                               seq_len: int | None = None) -> np.ndarray:
    """Positions whose logits predict response tokens 0..T−1: ``prompt_len − 1 + j``.

    ``prompt_lens[...]`` → ``[..., T]`` int. With ``seq_len`` the positions are clipped into
    ``[0, seq_len − 1]`` (values past a row's response length are garbage and must be masked).
    """
    pos = np.asarray(prompt_lens)[..., None] - 1 + np.arange(num_tokens)
    if seq_len is not None:
        pos = np.clip(pos, 0, seq_len - 1)
    return pos


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def gather_response_logprobs(scores, input_ids, prompt_lens, response_lens, num_tokens: int, *,
                             is_logits: bool = False) -> np.ndarray:
    """Reference (NumPy) gather of response-token log-probs, ``[B, T]`` float64.

    ``scores[B, S, V]`` are log-probs (or logits with ``is_logits=True``; log-softmaxed here).
    ``out[b, j] = scores[b, Lp_b − 1 + j, input_ids[b, Lp_b + j]]`` for ``j < L_b`` and 0 after,
    with Lp_b, L_b from THIS row only (algorithm.md §2.5).
    """
    scores = np.asarray(scores)
    if is_logits:
        scores = _log_softmax(scores)
    input_ids = np.asarray(input_ids)
    b, s = input_ids.shape
    pos = response_logprob_positions(prompt_lens, num_tokens, seq_len=s)
    tok = np.take_along_axis(input_ids, np.clip(pos + 1, 0, s - 1), axis=1)
    vals = scores[np.arange(b)[:, None], pos, tok].astype(np.float64)
    live = np.arange(num_tokens)[None, :] < np.asarray(response_lens)[:, None]
    return np.where(live, vals, 0.0)


def grpo_advantages(rewards, group_ids) -> np.ndarray:
    """Reference (NumPy, float64) GRPO advantages (§1.5), ``[N], [N] -> [N]``.

    ``A_i = (r_i − mean_g) / (std_g + 1e-6)`` with the Bessel-corrected std of the group; a group
    of one uses mean 0 and std 1. ``group_ids`` may be any hashable labels.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    labels = np.asarray(group_ids)
    seg = np.unique(labels, return_inverse=True)[1].reshape(-1)
    out = np.empty_like(rewards)
    for g in np.unique(seg):
        idx = np.nonzero(seg == g)[0]
        r = rewards[idx]
        mean, std = (0.0, 1.0) if len(idx) == 1 else (r.mean(), r.std(ddof=1))
        out[idx] = (r - mean) / (std + 1e-6)
    return out
