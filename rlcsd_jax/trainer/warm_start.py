"""Supervised warm start on dataset solutions (the embedded tiny demo uses it).

A randomly initialised model cannot produce a well-formed `\\boxed{}` answer, so RL would see
reward 0 everywhere.  A few hundred steps of next-token training on
`<student prompt> <think>\\n{solution}\\n</think>\\n\\n\\boxed{answer}<eos>` teach the format;
RL then improves correctness.  Loss: token-mean negative log-likelihood of the response tokens,
computed with the same chunked scoring code as the RL losses.

`target="answer_hints"` (configs/tiny_hints.py) makes the warm start a mixture that also
teaches the model to read the teacher's "Reference Solution" context (algorithm.md §2.1): per
record, the answer-only student example plus `HINT_EXAMPLES_PER_RECORD` teacher-template
examples, rendered with the trainer's own teacher prompt code (`prompts.teacher_user_message`
through `rollout.PromptEncoder.text_ids`, as `hints.build_group_hints` renders a sibling
rollout), whose hint is either the correct answer or a wrong one (the ground truth with a
non-empty random subset of Knights & Knaves roles flipped), and whose target is the hint's
answer.  Under a wrong hint the model then puts its mass on the wrong roles, so RLCSD's
contrast e_ctr (algorithm.md §4.8) has something to measure: a tiny model never trained on
the template ignores it (docs/tiny_demo.md).

"""

from __future__ import annotations

import functools
import logging
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlcsd_jax import scoring
from rlcsd_jax.data import packing, prompts as prompts_lib
from rlcsd_jax.trainer import state as state_lib


TARGETS = ("solution", "answer", "answer_hints")
# answer_hints: teacher-template examples per record (half with a correct, half with a wrong
# hint on average), next to the record's student example.
HINT_EXAMPLES_PER_RECORD = 2
WRONG_HINT_SHARE = 0.5
_ROLE = re.compile(r"\b(knight|knave)\b")
SCHEDULES = ("constant", "cosine")


def target_text(record, target: str = "solution") -> str:
    """The supervised response: the dataset CoT inside <think>, then the boxed answer.

    target="answer" leaves the thinking empty (Qwen3's no-thinking form): 10x shorter
    sequences, which is what lets the embedded demo train on a 2-core CPU in minutes.
    """
    if target not in TARGETS:
        raise ValueError(f"warm_start.target={target!r}; allowed: {', '.join(TARGETS)}")
    thinking = record.solution.strip() if target == "solution" else ""
    return answer_text(record.ground_truth, thinking)


def answer_text(answer: str, thinking: str = "") -> str:
    return f"<think>\n{thinking}\n</think>\n\n\\boxed{{{answer}}}"


def wrong_answer(answer: str, rng: np.random.Generator) -> str:
    """A Knights & Knaves answer with a non-empty random subset of its roles flipped (what a
    wrong sibling rollout looks like once names are learnt: a role error)."""
    roles = list(_ROLE.finditer(answer))
    if not roles:
        raise ValueError(f"no knight/knave role in answer {answer!r}")
    flip = rng.random(len(roles)) < 0.5
    flip[int(rng.integers(len(roles)))] = True
    out, last = [], 0
    for m, f in zip(roles, flip):
        out.append(answer[last:m.start()])
        out.append(("knave" if m.group(1) == "knight" else "knight") if f else m.group(1))
        last = m.end()
    return "".join(out) + answer[last:]


def hint_examples(record, encoder, tokenizer, eos_id: int, rng: np.random.Generator,
                  n: int = HINT_EXAMPLES_PER_RECORD, wrong_share: float = WRONG_HINT_SHARE):
    """`n` teacher-template examples for one record: the hint is a rollout-shaped answer
    (correct, or with `wrong_answer`'s flipped roles with probability `wrong_share`), rendered
    as `hints.build_group_hints` renders a sibling (the decoded response text as the solution,
    its boxed answer as "Correct final answer"), and the target is the hint's own answer."""
    problem = prompts_lib.strip_legacy_wrappers(record.problem)
    out = []
    for _ in range(n):
        answer = (wrong_answer(record.ground_truth, rng) if rng.random() < wrong_share
                  else record.ground_truth)
        ids = tokenizer.encode(answer_text(answer), add_special_tokens=False)
        # the rollout's text as the trainer decodes it (rollout.decode skips special tokens)
        hint_response = tokenizer.decode(ids, skip_special_tokens=True)
        message = prompts_lib.teacher_user_message(problem, hint_response, answer)
        out.append((encoder.text_ids(message), ids + [eos_id]))
    return out


def encode_examples(records, encoder, tokenizer, eos_id: int, target: str = "solution", *,
                    seed: int = 0):
    """[(prompt ids, response ids)] for records that carry a solution (answer_hints: plus the
    records' teacher-template examples, drawn with `seed`)."""
    if target not in TARGETS:
        raise ValueError(f"warm_start.target={target!r}; allowed: {', '.join(TARGETS)}")
    rng = np.random.default_rng([seed, 4242])
    out = []
    for r in records:
        if target == "solution" and not r.solution:
            continue
        plain = "answer" if target == "answer_hints" else target
        response = tokenizer.encode(target_text(r, plain), add_special_tokens=False) + [eos_id]
        out.append((encoder(r), response))
        if target == "answer_hints":
            out.extend(hint_examples(r, encoder, tokenizer, eos_id, rng))
    if not out:
        raise ValueError("warm start needs records with a `solution` (dataset CoT)")
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "length"),
                   donate_argnames=("params", "opt_state"))
def _sft_step(graphdef, params, opt_state, batch, lr, *, tx, length: int):
    def loss_fn(p):
        stats = scoring.response_stats(nnx.merge(graphdef, p), batch["input_ids"],
                                       batch["attention_mask"], batch["response_start"], length,
                                       right_padded=True)
        mask = batch["response_mask"]
        return -jnp.sum(jnp.where(mask > 0, stats["logp"], 0.0)) / jnp.maximum(mask.sum(), 1)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    return params, opt_state, loss


def learning_rate(step: int, *, steps: int, lr: float, warmup_steps: int,
                  schedule: str = "constant") -> float:
    """The lr of SFT step ``step`` (0-based): linear warmup over ``warmup_steps`` steps, then
    ``constant``, or ``cosine`` decay to 0 at ``steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"warm_start.schedule={schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if schedule == "constant":   # the RL schedule's, counted in completed SFT steps
        return state_lib.learning_rate(step + 1, lr, warmup_steps)
    return float(optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup_steps, 1), max(steps, warmup_steps + 1))(step + 1))


def warm_start(graphdef, params, examples, *, steps: int, batch_size: int, lr: float,
               warmup_steps: int, seed: int, pad_id: int, schedule: str = "constant",
               buckets=None, put=lambda x: x, log_every: int = 50):
    """Run `steps` SFT steps; returns the new params.  Batches are drawn with a seeded RNG and
    padded to the smallest of ``buckets`` (None: the next power of two) that fits.

    The warm start stands in for pretraining: it trains float32 weights whatever the run's
    `model.param_dtype`, and returns them rounded to the dtype they came in (bf16 weights
    would lose most of its updates: 3e-3 steps are below half a bf16 ulp of a weight near 1)."""
    dtypes = jax.tree.map(lambda x: x.dtype, params)
    params = jax.tree.map(lambda x: x.astype(jnp.float32)
                          if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    # The RL optimizer's chain with optax's Adam defaults, clipping at 1 and no weight decay.
    tx = state_lib.make_optimizer(grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    opt_state = tx.init(params)
    rng = np.random.default_rng([seed, 12345])
    max_resp = max(len(r) for _, r in examples)
    length = packing.bucket_length(max_resp)
    t0 = time.perf_counter()
    for step in range(steps):
        pick = rng.choice(len(examples), size=batch_size, replace=len(examples) < batch_size)
        prompts = [examples[i][0] for i in pick]
        responses = [examples[i][1] for i in pick]
        width = packing.bucket_length(max(len(p) + len(r) for p, r in
                                                zip(prompts, responses)), buckets)
        ids, mask, starts = packing.pack_rows(prompts, responses, seq_len=width,
                                                    pad_id=pad_id)
        resp_mask = (np.arange(length)[None] < np.array([len(r) for r in responses])[:, None])
        batch = put(dict(input_ids=ids, attention_mask=mask, response_start=starts,
                         response_mask=resp_mask.astype(np.int32)))
        cur_lr = learning_rate(step, steps=steps, lr=lr, warmup_steps=warmup_steps,
                               schedule=schedule)
        params, opt_state, loss = _sft_step(graphdef, params, opt_state, batch,
                                            jnp.float32(cur_lr), tx=tx, length=length)
        if log_every and (step % log_every == 0 or step == steps - 1):
            logging.info("warm start %d/%d  nll %.4f  (%.1fs)", step + 1, steps, float(loss),
                         time.perf_counter() - t0)
    return jax.tree.map(lambda x, d: x.astype(d), params, dtypes)
