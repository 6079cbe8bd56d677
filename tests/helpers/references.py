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
    with Lp_b, L_b from THIS row only (§2.5).
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
