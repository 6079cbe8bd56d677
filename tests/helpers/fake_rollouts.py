"""Deterministic stand-in for a trained model's answers, shared by loop and resume tests.

The tiny random model writes gibberish, so decoding is replaced by a fixed pattern of boxed
answers per group (the token ids the losses see are still the model's own samples):
  group 0: all correct          -> dropped by rlcsd (all-correct group)
  group 1: 1 correct, 3 wrong   -> the lone correct target is dropped, 3 wrong targets kept
  group 2: 2 correct, 2 wrong   -> all kept
  group 3: all wrong            -> dropped (self_rollout)
"""

from rlcsd_jax.trainer import rollout

from rlcsd_jax.trainer import rl_trainer
PATTERN = [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


def flip(answer: str) -> str:
    """Every knight a knave and vice versa: wrong for a puzzle with a unique solution."""
    return answer.replace("knight", "\0").replace("knave", "knight").replace("\0", "knave")


def install(setattr_fn=None, pattern=PATTERN, by_record_index=False):
    """Patch rollout decoding so group p's j-th answer is correct iff pattern[p][j] (cycled).
    Returns a dict holding the latest batch's `records` and `rollouts`.

    setattr_fn: pytest's monkeypatch.setattr, or plain setattr (subprocess drivers).
    by_record_index: key the pattern by the record's dataset index instead of the group's
      position in the batch (a process holds only its block of the batch in multi-host runs).
    """
    setattr_fn = setattr_fn or setattr
    state = {}
    real_sample = rollout.sample

    def decode(tokenizer, tokens, lengths):
        records = state["records"]
        g = len(tokens) // len(records)
        texts = []
        for p, rec in enumerate(records):
            key = rec.index if by_record_index else p
            row = pattern[key % len(pattern)]
            for j in range(g):
                ok = row[j % len(row)]
                ans = rec.ground_truth if ok else flip(rec.ground_truth)
                texts.append(f"reasoning {key}.{j} \\boxed{{{ans}}}")
        return texts

    def sample(generate_fn, tokenizer, encoder, records, key, **kw):
        state["records"] = list(records)
        state["rollouts"] = real_sample(generate_fn, tokenizer, encoder, records, key, **kw)
        return state["rollouts"]

    setattr_fn(rollout, "decode", decode)
    setattr_fn(rollout, "sample", sample)
    setattr_fn(rl_trainer.rollout, "sample", sample)
    return state
