"""The rlcsd_jax side: decode, scoring and an rlcsd train step, timed after warm-up.

Every function returns a plain dict: tokens (counted per step), seconds (median), tok_s,
first_s / compile_s, mem_bytes + mem_method, plus measurement-specific extras.  Inference
(decode, scoring) runs on a copy of the parameters in the compute dtype (`infer_params`), like
the HF side's bf16 model; the train step keeps fp32 master weights and casts per matmul.
"""

from __future__ import annotations

import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import measure
from benchmarks.suites import Shapes
from rlcsd_jax import losses, models, sampling, scoring

DECODE_OPTIONS = sampling.SamplingOptions(temperature=1.0, top_k=20, top_p=0.95)


def build(cfg: models.ModelConfig, seed: int = 0):
    """(model, graphdef, fp32 master params State)."""
    model = models.build(cfg, seed)
    graphdef, params = nnx.split(model)
    return model, graphdef, params


def infer_params(params, cfg: models.ModelConfig, mode: str = "compute"):
    """Parameters for decode/scoring: cast to the compute dtype ('compute') or kept ('master')."""
    if mode == "master" or jnp.dtype(cfg.dtype) == jnp.dtype(cfg.param_dtype):
        return params
    return jax.tree.map(lambda x: x.astype(cfg.dtype), params)


def _memory(*compiled) -> tuple[int | None, str]:
    peak = measure.jax_device_peak()
    if peak is not None:
        return peak, "peak_bytes_in_use (cumulative)"
    return measure.compiled_bytes(*compiled), "compiled estimate"


def logits(graphdef, params, ids: np.ndarray) -> np.ndarray:
    """fp32 logits [B, S, V] of the full forward (parity check against HF)."""
    def forward(params, ids):  # params as an argument: a closure would bake them in as constants
        return nnx.merge(graphdef, params)(ids, jnp.ones_like(ids))

    return np.asarray(jax.jit(forward)(params, jnp.asarray(ids)))


# ----------------------------------------------------------------------------------------------
# 1. decode
# ----------------------------------------------------------------------------------------------


def decode(graphdef, params, ids: np.ndarray, mask: np.ndarray, new_tokens: int,
           repeats: int) -> dict:
    """`sampling.generate_arrays` on prompts [B, P], forced length (no eos), T=1 p=.95 k=20.

    tokens = B * new_tokens; compile_s = first call - steady call.  prefill_s times the jitted
    prefill alone, so decode_ms_per_step = (total - prefill) / (new_tokens - 1).
    """
    ids_j, mask_j, key = jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0)
    kw = dict(max_new_tokens=new_tokens, options=DECODE_OPTIONS, eos_ids=(), pad_id=0)
    last = {}

    def call():
        last["out"] = sampling.generate_arrays(graphdef, params, ids_j, mask_j, key, **kw)
        jax.block_until_ready(last["out"])

    timing = measure.time_calls(call, repeats)
    lengths = np.asarray(last["out"]["lengths"])
    if not (lengths == new_tokens).all():
        raise RuntimeError(f"decode stopped early: lengths {sorted(set(lengths.tolist()))}")
    prefill_t, compiled = None, []
    try:  # the sampler's own programs: a change there costs the breakdown only
        static = sampling.make_static(max_new_tokens=new_tokens, num_samples=1,
                                      options=DECODE_OPTIONS, eos_ids=(), pad_id=0)

        def prefill():
            return jax.block_until_ready(sampling.prefill_jit(graphdef, params, ids_j, mask_j,
                                                              key, static))

        prefill_t = measure.time_calls(prefill, repeats, first=False).median
        state = prefill()
        compiled = [sampling.prefill_jit.lower(graphdef, params, ids_j, mask_j, key,
                                               static).compile(),
                    sampling.decode_jit.lower(graphdef, params, state, static).compile()]
        del state
    except Exception as e:  # noqa: BLE001
        print(f"[benchmarks] JAX decode breakdown unavailable: {e}", file=sys.stderr)
    mem, method = _memory(*compiled)
    tokens = ids.shape[0] * new_tokens
    return dict(tokens=tokens, seconds=timing.median, tok_s=tokens / timing.median,
                cores=timing.cores,
                first_s=timing.first, compile_s=timing.compile, prefill_s=prefill_t,
                step_ms=(None if prefill_t is None
                         else 1e3 * (timing.median - prefill_t) / max(new_tokens - 1, 1)),
                mem_bytes=mem, mem_method=method)


# ----------------------------------------------------------------------------------------------
# 2. scoring
# ----------------------------------------------------------------------------------------------


def score(graphdef, params, ids: np.ndarray, mask: np.ndarray, s: Shapes, repeats: int) -> dict:
    """`scoring.score` on [C, B, S] rows: log-probs of the T = S - response_start response tokens.

    tokens = C * B * S (every position goes through the layers); the LM head runs on T
    positions per row in chunks of s.chunk.  Returns also `logp_row0` [T] for the parity check.
    """
    c, b, seq = ids.shape
    length = seq - s.response_start
    args = (graphdef, params, jnp.asarray(ids), jnp.asarray(mask),
            jnp.full((c, b), s.response_start, jnp.int32))
    kw = dict(length=length, chunk=min(s.chunk, length))
    last = {}

    def call():
        last["out"] = jax.block_until_ready(scoring.score(*args, **kw))

    timing = measure.time_calls(call, repeats)
    logp = np.asarray(last["out"]["logp"])
    if not np.isfinite(logp).all():
        raise FloatingPointError("non-finite scoring log-probs")
    mem, method = _memory(scoring.score.lower(*args, **kw).compile())
    tokens = c * b * seq
    return dict(tokens=tokens, seconds=timing.median, tok_s=tokens / timing.median,
                cores=timing.cores,
                first_s=timing.first, compile_s=timing.compile, mem_bytes=mem,
                mem_method=method, logp_row0=logp[0, 0])


# ----------------------------------------------------------------------------------------------
# 3. train step
# ----------------------------------------------------------------------------------------------


def optimizer(lr: float = 1e-6) -> optax.GradientTransformation:
    """Global-norm clip 1.0 then AdamW (fp32 states), as in training."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))


def make_train_step(graphdef, length: int, chunk: int, tx: optax.GradientTransformation):
    """jit(step(params, opt_state, batch) -> (params, opt_state, loss)), params/state donated.

    Forward with grad through `scoring.response_stats` on the student batch, then
    `losses.per_rollout(losses.get("rlcsd"))` with precomputed teacher log-probs.
    """
    loss_fn = losses.per_rollout(losses.get("rlcsd"))

    def objective(params, batch):
        model = nnx.merge(graphdef, params)
        stats = scoring.response_stats(model, batch["input_ids"], batch["attention_mask"],
                                       batch["response_start"], length, chunk=chunk)
        loss, _ = loss_fn(logp=stats["logp"], old_logp=batch["old_logp"],
                          advantages=batch["advantages"], mask=batch["mask"],
                          teacher_correct_logp=batch["teacher_correct_logp"],
                          teacher_wrong_logp=batch["teacher_wrong_logp"],
                          wrong_valid=batch["wrong_valid"])
        return loss

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(objective)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


class TrainState:
    """fp32 master params + optimizer state, rebuilt from the config if a failed (OOM) call
    left donated buffers deleted."""

    def __init__(self, cfg, params, tx, seed: int = 0):
        self.cfg, self.tx, self.seed = cfg, tx, seed
        self.params, self.opt_state = params, tx.init(params)

    def ensure_alive(self):
        leaves = jax.tree.leaves((self.params, self.opt_state))
        if any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
            self.params = None
            self.opt_state = None
            _, _, self.params = build(self.cfg, self.seed)
            self.opt_state = self.tx.init(self.params)


def train_step(state: TrainState, graphdef, batch_np: dict, s: Shapes, repeats: int,
               bytes_limit: int | None = None) -> dict:
    """Time the rlcsd update on batch [B, S]; tokens = B * S.

    compile_s is lower+compile measured directly.  With bytes_limit (GPU) a compiled estimate
    above the device's limit is reported as a predicted OOM instead of being run.
    """
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    b, seq = batch_np["input_ids"].shape
    length = seq - s.response_start
    step = make_train_step(graphdef, length, min(s.chunk, length), state.tx)
    state.ensure_alive()
    t0 = time.perf_counter()
    compiled = step.lower(state.params, state.opt_state, batch).compile()
    compile_s = time.perf_counter() - t0
    est = measure.compiled_bytes(compiled)
    if bytes_limit is not None and est is not None and est > bytes_limit:
        raise MemoryError(f"out of memory (predicted): compiled estimate {est / 2**30:.1f} GiB > "
                          f"device limit {bytes_limit / 2**30:.1f} GiB")
    losses_seen = []

    def call():
        state.params, state.opt_state, loss = compiled(state.params, state.opt_state, batch)
        losses_seen.append(float(loss))

    try:
        timing = measure.time_calls(call, repeats)
    except Exception:
        state.ensure_alive()
        raise
    if not all(math.isfinite(x) for x in losses_seen):
        raise FloatingPointError(f"non-finite train loss {losses_seen}")
    mem, method = _memory(compiled)
    tokens = b * seq
    return dict(tokens=tokens, seconds=timing.median, tok_s=tokens / timing.median,
                cores=timing.cores,
                first_s=timing.first, compile_s=compile_s, mem_bytes=mem, mem_method=method,
                mem_estimate=est, loss=losses_seen[-1], batch=b)
