"""Rollouts: student prompts -> G samples each -> decoded text -> rewards -> GRPO advantages.

Device work is one `sampling.generate_arrays` call; the host then decodes the responses (special
tokens skipped, thinking kept, algorithm.md §2.3) and grades them (§6).  Advantages are computed on
the full, unfiltered groups (§1.5).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from rlcsd_jax import losses, rewards, sampling
from rlcsd_jax.distributed import multihost
from rlcsd_jax.data import packing
from rlcsd_jax.data import prompts as prompts_lib
from rlcsd_jax.data.records import Record


@dataclasses.dataclass
class Rollouts:
    """P prompts x G samples = R rows, prompt-major (row r continues prompt r // G)."""

    records: list[Record]
    prompt_ids: np.ndarray      # [P, Pb] left-padded
    prompt_mask: np.ndarray     # [P, Pb]
    tokens: np.ndarray          # [R, N] (pad after EOS)
    logprobs: np.ndarray        # [R, N] sampler log-probs (full vocab, / T)
    lengths: np.ndarray         # [R] tokens up to and including EOS
    truncated: np.ndarray       # [R] bool
    texts: list[str]            # decoded responses
    rewards: np.ndarray         # [R] float
    group: np.ndarray           # [R] prompt index
    advantages: np.ndarray      # [R]

    @property
    def group_size(self) -> int:
        return len(self.texts) // len(self.records)

    def response_mask(self) -> np.ndarray:
        n = self.tokens.shape[1]
        return (np.arange(n)[None, :] < self.lengths[:, None]).astype(np.int32)

    def response_ids(self, row: int) -> list[int]:
        return self.tokens[row, :self.lengths[row]].tolist()


class PromptEncoder:
    """Student prompt ids per record (cached: the same dataset rows come back every epoch)."""

    def __init__(self, tokenizer, enable_thinking: bool = True):
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self._cache: dict = {}

    def __call__(self, record: Record) -> list[int]:
        key = (record.data_source, record.index, record.problem)
        if key not in self._cache:
            text = prompts_lib.student_prompt(self.tokenizer, record,
                                              enable_thinking=self.enable_thinking)
            self._cache[key] = prompts_lib.encode_prompt(self.tokenizer, text)
        return self._cache[key]

    def text_ids(self, text: str) -> list[int]:
        """Teacher prompt ids for a teacher user message (rendered with the chat template)."""
        key = ("teacher", text)
        if key not in self._cache:
            rendered = prompts_lib.render_chat(self.tokenizer, text, self.enable_thinking)
            self._cache[key] = prompts_lib.encode_prompt(self.tokenizer, rendered)
            if len(self._cache) > 200_000:  # teacher texts are mostly unique: bound the cache
                self._cache.clear()
        return self._cache[key]


def pad_prompts(encoder: PromptEncoder, records: Sequence[Record], buckets, pad_id: int):
    """Left-padded [P, Pb] ids and mask; Pb is the bucket of the longest prompt on ANY host
    (the processes' blocks form one global array)."""
    ids = [encoder(r) for r in records]
    width = packing.bucket_length(multihost.global_max(max(len(x) for x in ids)), buckets)
    return sampling.left_pad(ids, width, pad_id)


def decode(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    return tokenizer.batch_decode([row[:n].tolist() for row, n in zip(tokens, lengths)],
                                  skip_special_tokens=True)


def grade(records: Sequence[Record], texts: Sequence[str], group_size: int) -> np.ndarray:
    sources = [r.data_source for r in records for _ in range(group_size)]
    truths = [r.ground_truth for r in records for _ in range(group_size)]
    scores = rewards.compute_scores(sources, texts, truths)
    return np.asarray([s["score"] for s in scores], np.float32)


def sample(generate_fn, tokenizer, encoder: PromptEncoder, records: Sequence[Record], key, *,
           group_size: int, buckets, pad_id: int) -> Rollouts:
    """This process's prompts `records` -> its rollouts.

    generate_fn(ids, mask, key, num_samples) -> dict of this process's rows of the sampling
    API's arrays (tokens, logprobs, lengths, truncated), as host or device arrays.
    """
    ids, mask = pad_prompts(encoder, records, buckets, pad_id)
    out = jax.device_get(generate_fn(ids, mask, key, group_size))
    texts = decode(tokenizer, out["tokens"], out["lengths"])
    reward = grade(records, texts, group_size)
    group = np.repeat(np.arange(len(records)), group_size)
    adv = np.asarray(losses.grpo_advantages(reward, group, num_groups=len(records)), np.float32)
    return Rollouts(records=list(records), prompt_ids=ids, prompt_mask=mask,
                    tokens=np.asarray(out["tokens"]), logprobs=np.asarray(out["logprobs"]),
                    lengths=np.asarray(out["lengths"]), truncated=np.asarray(out["truncated"]),
                    texts=texts, rewards=reward, group=group, advantages=adv)


def permute_rewards(ro: Rollouts, rng: np.random.Generator) -> Rollouts:
    """A control run's rollouts: rewards shuffled across the batch (their rate kept, their link
    to the answers gone) and the GRPO advantages recomputed from them."""
    reward = rng.permutation(ro.rewards)
    adv = np.asarray(losses.grpo_advantages(reward, ro.group), np.float32)
    return dataclasses.replace(ro, rewards=reward, advantages=adv)
