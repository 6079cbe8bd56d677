"""Padded token rows: the bucket rule that sizes every padded axis, and the packing of
student / teacher rows with the response log-prob alignment rule.

**Buckets.** One rule sizes padded token axes (prompt widths, scoring rows, response lengths).

Static shapes keep the number of compiled programs small, so every padded length is rounded up to
a bucket.  Powers of two waste up to half the row at long lengths (a 33k-token teacher row
would pad to 65,536), so above `LONG_FROM` tokens the buckets grow in fixed steps of
`LONG_STEP` instead: at most 2,047 padding tokens per row, about 20 buckets up to 40k.

**Rows** are right-padded. Every row is ``[prompt ids | response ids | pad ...]``:

    position   0 .. Lp-1      Lp .. Lp+L-1         Lp+L .. S-1
    tokens     teacher prompt student response     pad_id
    attention  1              1                    0

so a row's positions are simply ``0..S-1`` from its first real token, and the log-prob of
response token j (0-based) is the log-softmax of the logits at position ``Lp − 1 + j`` of THAT
row, read at id ``input_ids[Lp + j]`` (the previous token's position; the last prompt token for
j = 0). Both Lp and L are per row, so nothing depends on the padded width or on the longest
response in the batch (a bug the reference once had, algorithm.md §9). The student batch uses the same rule with its
own prompt.

Teacher batches stack ``C = 1 + k_max`` contexts per target: slot 0 = correct hint, slots
1..k_max = wrong hints. ``input_ids[C, B, S]``, ``attention_mask[C, B, S]``,
``prompt_lens[C, B]``, ``response_lens[B]``, ``wrong_valid[B, k_max]``. Empty wrong slots hold a
copy of the first wrong prompt (or of the correct prompt when there is none) so every slot can
be forwarded unconditionally; losses ignore them through ``wrong_valid``. The response ids are
the student's, verbatim (never re-tokenised); take them from the response mask
(:func:`response_ids_from_mask`), not by dropping pad ids (§12.14). When prompt + response
exceeds ``max_len`` the PROMPT is truncated from the left (its last tokens are kept); the
response never is. ``S`` is rounded up to a bucket so a run compiles few shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

MIN_BUCKET = 16
LONG_FROM = 8192
LONG_STEP = 2048


def default_bucket(n: int) -> int:
    """Smallest power of two >= n (at least MIN_BUCKET) up to LONG_FROM, then the next multiple
    of LONG_STEP."""
    n = max(int(n), 1)
    if n > LONG_FROM:
        return -(-n // LONG_STEP) * LONG_STEP
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
    """Smallest of `buckets` >= n, or `default_bucket(n)` when no buckets are given."""
    if not buckets:
        return default_bucket(n)
    fits = [b for b in sorted(buckets) if b >= n]
    if not fits:
        raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}; add a larger "
                         "bucket or lower the length limit")
    return int(fits[0])

TokenIds = Sequence[int]


def truncate_prompt_left(prompt: TokenIds, response_len: int,
                         max_len: int | None) -> tuple[list[int], int]:
    """Keep the LAST prompt tokens so prompt + response ≤ max_len (§2.4). Returns
    ``(prompt, n_dropped)``. At least one prompt token must remain to predict response token 0."""
    prompt = list(prompt)
    if max_len is None or len(prompt) + response_len <= max_len:
        return prompt, 0
    room = max_len - response_len
    if room < 1:
        raise ValueError(
            f"response of {response_len} tokens leaves no room for a prompt token within the "
            f"token budget {max_len}; the response is never truncated (§2.4).")
    return prompt[-room:], len(prompt) - room


def response_ids_from_mask(responses: np.ndarray, response_mask: np.ndarray) -> list[list[int]]:
    """Student response ids ``[B, T]`` → per-row lists of the ids under the mask (verbatim)."""
    responses, response_mask = np.asarray(responses), np.asarray(response_mask)
    return [row[m > 0].tolist() for row, m in zip(responses, response_mask)]


def pack_rows(prompts: Sequence[TokenIds], responses: Sequence[TokenIds], *, seq_len: int,
              pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded rows ``[prompt | response | pad]`` of width ``seq_len``.

    Returns ``input_ids[B, S]`` int32, ``attention_mask[B, S]`` int32, ``prompt_lens[B]`` int32.
    """
    b = len(prompts)
    ids = np.full((b, seq_len), pad_id, dtype=np.int32)
    att = np.zeros((b, seq_len), dtype=np.int32)
    plen = np.zeros((b,), dtype=np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        if n > seq_len:
            raise ValueError(f"row {i}: {n} tokens do not fit seq_len={seq_len}.")
        ids[i, : len(p)] = p
        ids[i, len(p): n] = r
        att[i, :n] = 1
        plen[i] = len(p)
    return ids, att, plen


@dataclasses.dataclass(frozen=True)
class TeacherBatch:
    """Static-shape teacher inputs; see the module docstring for the layout."""

    input_ids: np.ndarray  # [C, B, S] int32
    attention_mask: np.ndarray  # [C, B, S] int32
    prompt_lens: np.ndarray  # [C, B] int32 (after truncation)
    response_lens: np.ndarray  # [B] int32
    wrong_valid: np.ndarray  # [B, k_max] bool
    prompt_tokens_truncated: np.ndarray  # [C, B] int32, prompt tokens dropped on the left

    @property
    def num_slots(self) -> int:
        return self.input_ids.shape[0]

    @property
    def active_slots(self) -> int:
        """``1 + max K`` in the batch: slot columns past this are all invalid and may be skipped
        on the host to save forwards (§11); the maths only ever uses valid slots."""
        k = int(self.wrong_valid.sum(axis=1).max()) if self.wrong_valid.size else 0
        return 1 + k


def pack_teacher_batch(correct_prompts: Sequence[TokenIds],
                       wrong_prompts: Sequence[Sequence[TokenIds]],
                       responses: Sequence[TokenIds], *, k_max: int,
                       max_len: int | None = None, buckets: Sequence[int] | None = None,
                       pad_id: int = 0, batch_size: int | None = None,
                       seq_len: int | None = None) -> TeacherBatch:
    """Pack one correct + up to ``k_max`` wrong teacher contexts per target.

    Args:
      correct_prompts: B lists of teacher prompt ids (chat template applied, tokenised with
        ``add_special_tokens=False``).
      wrong_prompts: B lists of 0..k_max wrong-hint prompt id lists (0 for the GT-teacher
        methods, 1 for the ECTR methods).
      responses: B lists of the student's response ids (verbatim).
      k_max: number of wrong slots (C = 1 + k_max).
      max_len: token budget per teacher sequence (``ppo_max_token_len_per_gpu``, §2.4).
      buckets: allowed sequence widths; default next power of two.
      batch_size: pad B with empty rows (all-pad, lengths 0, no valid slot) to this size.
      seq_len: the row width S (default: the bucket of the longest row).
    """
    b = len(correct_prompts)
    if not (len(wrong_prompts) == len(responses) == b):
        raise ValueError(f"got {b} correct prompts, {len(wrong_prompts)} wrong-prompt lists and "
                         f"{len(responses)} responses; they must match.")
    if batch_size is not None and batch_size < b:
        raise ValueError(f"batch_size={batch_size} is smaller than the {b} targets.")
    c = 1 + k_max
    slots: list[list[list[int]]] = [[] for _ in range(c)]
    dropped = np.zeros((c, batch_size or b), dtype=np.int32)
    valid = np.zeros((batch_size or b, k_max), dtype=bool)
    for i in range(b):
        wrongs = list(wrong_prompts[i])
        if len(wrongs) > k_max:
            raise ValueError(f"target {i}: {len(wrongs)} wrong prompts > k_max={k_max}.")
        filler = wrongs[0] if wrongs else correct_prompts[i]
        row = [correct_prompts[i]] + wrongs + [filler] * (k_max - len(wrongs))
        valid[i, : len(wrongs)] = True
        for s, prompt in enumerate(row):
            kept, n_drop = truncate_prompt_left(prompt, len(responses[i]), max_len)
            slots[s].append(kept)
            dropped[s, i] = n_drop
    resp = [list(r) for r in responses]
    longest = max((len(p) + len(r) for slot in slots for p, r in zip(slot, resp)), default=1)
    seq_len = seq_len or bucket_length(max(longest, 1), buckets)
    pad_rows = (batch_size or b) - b
    resp_padded = resp + [[]] * pad_rows
    ids, att, plen = [], [], []
    for s in range(c):
        x, m, p = pack_rows(slots[s] + [[]] * pad_rows, resp_padded, seq_len=seq_len,
                            pad_id=pad_id)
        ids.append(x)
        att.append(m)
        plen.append(p)
    return TeacherBatch(
        input_ids=np.stack(ids), attention_mask=np.stack(att), prompt_lens=np.stack(plen),
        response_lens=np.array([len(r) for r in resp_padded], dtype=np.int32),
        wrong_valid=valid, prompt_tokens_truncated=dropped)
