"""Pieces shared by the loss functions (algorithm.md §4.0, §4.10, §8).

Shapes: B = rollouts, T = response tokens, k = top-k ids per position (k + 1 with the tail
bucket). ``mask[B, T]`` is 1 on real response tokens and 0 on padding. Every reduction goes
through :func:`masked_mean`, which uses ``jnp.where`` rather than multiplying by the mask, so a
``-inf``/NaN sitting at a padded position can never leak into the loss (``0 * -inf = NaN``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.lax import stop_gradient

# Log-ratio clamp used by grpo, the srpo GRPO branch and the sdpo/srpo IS weight (§8).
LOG_RATIO_CLAMP = 20.0
# The top-k log-mass is clamped below 0 before log(1 - exp(.)) so the tail stays finite (§8).
TAIL_LOGMASS_CAP = -1e-7


def masked_sum(x, mask):
    """Σ x over positions where ``mask > 0`` (x, mask: ``[B, T]``) -> scalar; other positions
    contribute exactly 0, even when they hold inf or NaN."""
    return jnp.sum(jnp.where(mask > 0, x, 0.0))


def token_count(mask):
    """Number of positions with ``mask > 0`` (``mask[B, T]``) -> scalar float."""
    return jnp.sum(jnp.where(mask > 0, 1.0, 0.0))


def masked_mean(x, mask):
    """Token-mean Σ(mask·x) / max(Σmask, 1) of ``x[B, T]`` -> scalar; NaN-safe (algorithm.md
    notation)."""
    return masked_sum(x, mask) / jnp.maximum(token_count(mask), 1.0)


def zero_where_masked(x, mask):
    """Replace padded positions of ``x[B, T]`` or ``x[B, T, k]`` by 0 (``mask[B, T]``).

    Scorers already write 0 there (§2.5), but a ``-inf``/NaN at a padded position would still
    poison gradients through ``where`` (the unselected branch's NaN times a zero cotangent), so
    every loss sanitises its array inputs first. ``None`` passes through.
    """
    if x is None:
        return None
    m = mask > 0
    if x.ndim == m.ndim + 1:
        m = m[..., None]
    return jnp.where(m, x, 0.0)


def broadcast_adv(advantages, like):
    """``advantages[B]`` → ``[B, T]`` (the scalar advantage spread over the rollout's tokens)."""
    return jnp.broadcast_to(advantages[:, None], like.shape).astype(like.dtype)


def ppo_clip_terms(logp, old_logp, adv, epsilon):
    """Single-sided PPO clip with NO ratio clamp (rlsd, rlsd_ectr, rlcsd; §4.0, §12.11).

    Args: ``logp, old_logp, adv`` all ``[B, T]`` (``adv`` already under stop-gradient).
    Returns: ``(loss[B, T], clipped[B, T] bool, log_ratio[B, T])`` with
    ``loss = -min(ρ·Â, clip(ρ, 1-ε, 1+ε)·Â) = max(-ρÂ, -clip(ρ)Â)``.
    """
    log_ratio = logp - stop_gradient(old_logp)
    ratio = jnp.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
    return jnp.maximum(loss1, loss2), loss2 > loss1, log_ratio


def dual_clip_terms(logp, old_logp, adv, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """verl ``vanilla`` policy loss: log-ratio clamp ±20, PPO clip, dual clip for A < 0 (§4.1).

    Used only by grpo and srpo's GRPO branch. Returns ``(loss, clipped, dual_clipped, log_ratio)``,
    all ``[B, T]``; ``log_ratio`` is the unclamped one (for ``ppo_kl``).
    """
    log_ratio = logp - stop_gradient(old_logp)
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    loss1 = -adv * ratio
    loss2 = -adv * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clipped_loss = jnp.maximum(loss1, loss2)
    loss3 = -adv * clip_ratio_c
    dual = jnp.minimum(clipped_loss, loss3)
    loss = jnp.where(adv < 0, dual, clipped_loss)
    return loss, loss2 > loss1, (clipped_loss > loss3) & (adv < 0), log_ratio


def is_ratio_weight(logp, old_logp, is_clip):
    """sdpo/srpo IS weight ``min(exp(clip(lp_θ − lp_old, ±20)), is_clip)``, stop-grad (§4.3)."""
    log_ratio = jnp.clip(stop_gradient(logp) - stop_gradient(old_logp), -LOG_RATIO_CLAMP,
                         LOG_RATIO_CLAMP)
    return jnp.minimum(jnp.exp(log_ratio), is_clip)


def with_tail(topk_logp):
    """Append the tail bucket: ``[..., k]`` → ``[..., k + 1]`` (§4.2, §8).

    ``tail = log(1 - exp(min(logsumexp(topk), -1e-7)))``, computed as ``log(-expm1(.))``. The
    top-k values are log-probs normalised over the FULL vocabulary, so the mass outside the top-k
    is ``1 - Σ exp``; gradients flow through the tail as in the reference.
    """
    lse = jax.nn.logsumexp(topk_logp, axis=-1, keepdims=True)
    tail = jnp.log(-jnp.expm1(jnp.minimum(lse, TAIL_LOGMASS_CAP)))
    return jnp.concatenate([topk_logp, tail], axis=-1)


def divergence_terms(p, q, alpha):
    """Per-entry terms of the generalised JSD between student ``p`` and teacher ``q`` (§4.3).

    ``p, q``: log-probs ``[..., V']`` over the same support (top-k + tail). Returns ``[..., V']``
    whose sum over the last axis is:
      * ``alpha == 0``: forward KL(T‖S) = Σ e^q (q − p)   (opsd / opsd_ectr, §4.2)
      * ``alpha == 1``: reverse KL(S‖T) = Σ e^p (p − q)
      * otherwise ``(1−α)·KL(S‖M) + α·KL(T‖M)``, ``M = log((1−α)e^p + αe^q)``.
    The special cases are selected with ``jnp.where`` so ``alpha`` may be traced; the mixture
    branch stays finite at α ∈ {0, 1} (log 0 = −inf only enters a logaddexp).
    """
    alpha = jnp.asarray(alpha, dtype=p.dtype)
    fwd = jnp.exp(q) * (q - p)
    rev = jnp.exp(p) * (p - q)
    # Keep log(α), log(1−α) finite-in-gradient: α is a hyper-parameter, never differentiated.
    log_a = jnp.log(stop_gradient(alpha))
    log_1ma = jnp.log1p(-stop_gradient(alpha))
    m = jnp.logaddexp(p + log_1ma, q + log_a)
    mix = (1.0 - alpha) * jnp.exp(p) * (p - m) + alpha * jnp.exp(q) * (q - m)
    return jnp.where(alpha == 0.0, fwd, jnp.where(alpha == 1.0, rev, mix))


def k3_kl(logp, ref_logp):
    """Low-variance KL estimator ``k3`` vs the frozen reference (§4.1, §4.10), ``[B, T]``.

    ``d = clip(lp_ref − lp_θ, ±20)``; ``k3 = clip(e^d − d − 1, ±10)``.
    """
    d = jnp.clip(stop_gradient(ref_logp) - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


def _is_static_zero(x) -> bool:
    return isinstance(x, (int, float)) and float(x) == 0.0


def add_kl(loss, metrics, *, method, logp, ref_logp, kl_coef, mask):
    """Add ``kl_coef · token-mean(k3)`` (§4.10). Skipped when ``kl_coef`` is a static 0.

    A non-zero coefficient without ``ref_logp`` is an error rather than a silent no-op: grpo,
    opsd_ectr and rlsd_ectr default to 0.001 (§4.0), and dropping that term quietly would change
    the objective.
    """
    if _is_static_zero(kl_coef):
        return loss, metrics
    if ref_logp is None:
        raise ValueError(
            f"{method}: kl_coef={kl_coef!r} needs ref_logp=[B, T] (reference-model log-probs); "
            "pass ref_logp, or kl_coef=0.0 to disable the KL term (§4.10). Under jit, "
            "bind hyper-parameters statically (functools.partial) so a 0 coefficient is seen."
        )
    if logp is None:
        raise ValueError(f"{method}: the KL term needs logp=[B, T] (sampled-token log-probs).")
    kl = masked_mean(k3_kl(logp, ref_logp), mask)
    metrics = dict(metrics, kl=kl)
    return loss + kl_coef * kl, metrics


def apply_is(per_token, is_weights, mask):
    """``per_token[B, T]`` times the rollout IS weights ``is_weights[B, T]`` (stop-gradient);
    identity when None (§8).

    Applied to the policy/distillation term only, not to the k3 KL term (as verl does)."""
    if is_weights is None:
        return per_token
    return per_token * stop_gradient(zero_where_masked(is_weights, mask))


def rollout_is_weights(old_logp, rollout_logp, mask, mode="token", threshold=2.0):
    """Rollout-vs-trainer importance weights (§8, §10.1), ``[B, T]``, stop-gradient.

    * ``mode="token"``: ``w_t = min(exp(clip(lp_old − lp_rollout, ±20)), threshold)``.
    * ``mode="sequence"``: one weight per rollout, ``min(exp(clip(mean_t(lp_old − lp_rollout),
      ±20)), threshold)`` (masked mean over the rollout's tokens), broadcast over its tokens.
    Padding positions get 0. The reference computes these only when the sampler returns
    log-probs (off in every shipped run, §10.1), so losses take them via ``is_weights=None``.
    """
    diff = jnp.where(mask > 0, stop_gradient(old_logp) - stop_gradient(rollout_logp), 0.0)
    if mode == "token":
        log_w = diff
    elif mode == "sequence":
        n = jnp.maximum(jnp.sum(jnp.where(mask > 0, 1.0, 0.0), axis=-1, keepdims=True), 1.0)
        log_w = jnp.broadcast_to(jnp.sum(diff, axis=-1, keepdims=True) / n, diff.shape)
    else:
        raise ValueError(f"rollout_is_weights: mode={mode!r}; allowed: 'token', 'sequence'.")
    w = jnp.minimum(jnp.exp(jnp.clip(log_w, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), threshold)
    return jnp.where(mask > 0, w, 0.0)


def pg_metrics(*, logp, old_logp, mask, clipped):
    """Metrics common to the policy-gradient losses (verl names), scalars from ``logp`` /
    ``old_logp`` / ``mask`` / ``clipped`` ``[B, T]``."""
    return {
        "pg_clipfrac": masked_mean(clipped.astype(logp.dtype), mask),
        "ppo_kl": masked_mean(stop_gradient(old_logp) - stop_gradient(logp), mask),
        # −lp of the sampled token: a Monte-Carlo estimate of the policy entropy (only the
        # sampled token's log-prob is available to these losses).
        "entropy_mc": masked_mean(-stop_gradient(logp), mask),
        "response_token_count": token_count(mask),
    }
