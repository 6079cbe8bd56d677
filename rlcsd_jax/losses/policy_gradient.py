"""Sampled-token policy-gradient losses: grpo, rlsd, rlsd_ectr, rlcsd (algorithm.md §4.1, §4.5,
§4.6, §4.8).

Inputs per rollout b and response token t: ``logp[B, T]`` (current policy, WITH gradient),
``old_logp[B, T]``, ``advantages[B]`` (GRPO, §1.5), ``mask[B, T]`` and the teacher's log-probs of
the sampled tokens. Each function returns ``(scalar_loss, metrics)`` and reduces over the whole
batch it is given; per-rollout aggregation (§4.9) is :func:`rlcsd_jax.losses.per_rollout`.
All modulation (teacher signals, modulated advantages, selections) is under stop-gradient; the
gradient flows only through the PPO ratio (and the k3 KL when it is on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.lax import stop_gradient

from rlcsd_jax.losses.common import (
    add_kl,
    apply_is,
    broadcast_adv,
    dual_clip_terms,
    masked_mean,
    masked_sum,
    pg_metrics,
    ppo_clip_terms,
    token_count,
    zero_where_masked,
)

# rlsd_ectr clamps the exponent of exp(sign(A)·δ) (§4.6, §8).
ECTR_EXP_CLAMP = 60.0


def grpo(*, logp, old_logp, advantages, mask, clip_ratio_low=0.2, clip_ratio_high=0.2,
         clip_ratio_c=3.0, ref_logp=None, kl_coef=0.001, is_weights=None):
    """GRPO / verl ``vanilla`` policy loss (§4.1): dual clip, log-ratio clamp ±20, token-mean,
    plus ``kl_coef · token-mean(k3)`` (0.001 by default, §4.0; needs ``ref_logp``).

    logp / old_logp / ref_logp / mask ``[B, T]``, advantages ``[B]``; returns (scalar, metrics)."""
    logp, old_logp, ref_logp = (zero_where_masked(x, mask) for x in (logp, old_logp, ref_logp))
    adv = stop_gradient(broadcast_adv(advantages, logp))
    per_tok, clipped, dual, _ = dual_clip_terms(
        logp, old_logp, adv, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    per_tok = apply_is(per_tok, is_weights, mask)
    loss = masked_mean(per_tok, mask)
    metrics = pg_metrics(logp=logp, old_logp=old_logp, mask=mask, clipped=clipped)
    metrics["pg_clipfrac_lower"] = masked_mean(dual.astype(logp.dtype), mask)
    metrics["pg_loss"] = loss
    return add_kl(loss, metrics, method=grpo.__name__, logp=logp, ref_logp=ref_logp,
                  kl_coef=kl_coef, mask=mask)


def _rlsd_core(method, *, logp, old_logp, advantages, mask, signal, teacher_logp, epsilon,
               epsilon_w, lam, exp_clamp, ref_logp, kl_coef, is_weights):
    """Shared rlsd / rlsd_ectr body: ``Â = A·((1−λ) + λ·clip(exp(sign(A)·δ), 1±ε_w))``, PPO-clip.

    Array inputs arrive with their padded positions zeroed (``zero_where_masked``)."""
    adv = stop_gradient(broadcast_adv(advantages, logp))
    arg = jnp.sign(adv) * stop_gradient(signal)
    if exp_clamp is not None:
        arg = jnp.clip(arg, -exp_clamp, exp_clamp)
    # A = 0 ⇒ sign = 0 ⇒ w = 1 and Â = 0; `where` keeps a non-finite δ from making 0·inf = NaN.
    arg = jnp.where(adv == 0, 0.0, arg)
    w = jnp.clip(jnp.exp(arg), 1.0 - epsilon_w, 1.0 + epsilon_w)
    adv_hat = stop_gradient(adv * ((1.0 - lam) + lam * w))
    per_tok, clipped, _ = ppo_clip_terms(logp, old_logp, adv_hat, epsilon)
    per_tok = apply_is(per_tok, is_weights, mask)
    loss = masked_mean(per_tok, mask)
    metrics = pg_metrics(logp=logp, old_logp=old_logp, mask=mask, clipped=clipped)
    metrics.update({
        f"{method}/w_mean": masked_mean(w, mask),
        f"{method}/delta_mean": masked_mean(stop_gradient(signal), mask),
        f"{method}/adv_hat_mean": masked_mean(adv_hat, mask),
        "teacher_gap": masked_mean(stop_gradient(teacher_logp) - stop_gradient(logp), mask),
        "pg_loss": loss,
    })
    return add_kl(loss, metrics, method=method, logp=logp, ref_logp=ref_logp, kl_coef=kl_coef,
                  mask=mask)


def rlsd(*, logp, old_logp, advantages, mask, teacher_logp, epsilon=0.2, epsilon_w=0.2, lam=0.5,
         ref_logp=None, kl_coef=0.0, is_weights=None):
    """RLSD (§4.5): ``δ_t = lp_T(y_t | GT ctx) − sg(lp_θ(y_t))`` (CURRENT student lp, not old).

    ``teacher_logp[B, T]``. No exponent clamp (exp may overflow to inf; the clip to 1±ε_w makes
    that harmless). ``lam`` is the effective λ; the inert decay of §10.2 is
    :func:`rlcsd_jax.losses.lam_schedule`, applied by the caller.
    """
    logp, old_logp, ref_logp, teacher_logp = (
        zero_where_masked(x, mask) for x in (logp, old_logp, ref_logp, teacher_logp))
    signal = stop_gradient(teacher_logp) - stop_gradient(logp)
    return _rlsd_core(rlsd.__name__, logp=logp, old_logp=old_logp, advantages=advantages,
                      mask=mask, signal=signal, teacher_logp=teacher_logp, epsilon=epsilon,
                      epsilon_w=epsilon_w, lam=lam, exp_clamp=None, ref_logp=ref_logp,
                      kl_coef=kl_coef, is_weights=is_weights)


def rlsd_ectr(*, logp, old_logp, advantages, mask, teacher_correct_logp, teacher_wrong_logp,
              epsilon=0.2, epsilon_w=0.2, lam=0.5, ref_logp=None, kl_coef=0.001, is_weights=None):
    """RLSD with the contrastive signal (§4.6): ``δ_t = lp_T(y_t|c) − lp_T(y_t|w)``, exponent
    clamped at ±60. ``teacher_correct_logp[B, T]``, ``teacher_wrong_logp[B, T]`` (ONE wrong hint).
    KL coef 0.001 by default (§4.0)."""
    logp, old_logp, ref_logp, teacher_correct_logp, teacher_wrong_logp = (
        zero_where_masked(x, mask)
        for x in (logp, old_logp, ref_logp, teacher_correct_logp, teacher_wrong_logp))
    signal = stop_gradient(teacher_correct_logp) - stop_gradient(teacher_wrong_logp)
    return _rlsd_core(rlsd_ectr.__name__, logp=logp, old_logp=old_logp, advantages=advantages,
                      mask=mask, signal=signal, teacher_logp=teacher_correct_logp,
                      epsilon=epsilon, epsilon_w=epsilon_w, lam=lam, exp_clamp=ECTR_EXP_CLAMP,
                      ref_logp=ref_logp, kl_coef=kl_coef, is_weights=is_weights)


def rlcsd_contrast(teacher_correct_logp, teacher_wrong_logp, wrong_valid):
    """The RLCSD contrast ``e_t = lp_T(y|c) − log((1/K_valid) Σ_k valid_k · p_T(y|w_k))`` (§4.8).

    Args:
      teacher_correct_logp: ``[B, T]``.
      teacher_wrong_logp: ``[B, K, T]``; values in invalid slots are ignored (may be anything,
        including NaN/−inf).
      wrong_valid: ``[B, K]`` 0/1 or bool.
    Returns ``(e[B, T], k_valid[B])``, both stop-gradient. Invalid slots are set to −inf BEFORE
    the logsumexp (averaging probabilities, not log-probs, §12.4); ``K_valid ≥ 1``. A row with
    no valid slot (never a real surviving rollout, §8) gets ``e = 0`` instead of +inf.
    """
    valid = wrong_valid > 0
    lw = jnp.where(valid[:, :, None], stop_gradient(teacher_wrong_logp), -jnp.inf)
    k_valid = jnp.maximum(jnp.sum(valid.astype(teacher_correct_logp.dtype), axis=-1), 1.0)
    # logsumexp over an all −inf column returns −inf (no NaN); guarded by `any_valid` below.
    logmix = jax.nn.logsumexp(lw, axis=1) - jnp.log(k_valid)[:, None]
    any_valid = jnp.any(valid, axis=-1)[:, None]
    e = jnp.where(any_valid,
                  stop_gradient(teacher_correct_logp) - jnp.where(any_valid, logmix, 0.0), 0.0)
    return e, k_valid


def rlcsd_modulation(e, advantages_bt, mask, *, tau, beta, lam, delta, residual_clip_low,
                     residual_clip_high):
    """Residual, selection and modulated advantage of §4.8 (all stop-gradient, ``[B, T]``).

    ``r = clip(β·λ·tanh(e / max(τ, 1e-6)), low, high)`` is ADDED to A (not multiplied, not
    sign-scaled); ``sel = |r| > δ`` on real tokens; then the verifier keeps the sign:
    ``Â = max(Â, 0)`` if A > 0, ``min(Â, 0)`` if A < 0, and 0 if A = 0.
    Returns ``(r, sel, adv_hat)``.
    """
    s = jnp.tanh(e / jnp.maximum(tau, 1e-6))
    r = jnp.clip(beta * lam * s, residual_clip_low, residual_clip_high)
    sel = (jnp.abs(r) > delta) & (mask > 0)
    raw = advantages_bt + r
    adv_hat = jnp.where(advantages_bt > 0, jnp.maximum(raw, 0.0),
                        jnp.where(advantages_bt < 0, jnp.minimum(raw, 0.0), 0.0))
    return stop_gradient(r), stop_gradient(sel), stop_gradient(adv_hat)


def rlcsd(*, logp, old_logp, advantages, mask, teacher_correct_logp, teacher_wrong_logp,
          wrong_valid, epsilon=0.2, tau=0.02, beta=1.0, lam=0.5, delta=0.02, eta=1.0,
          residual_clip_low=-2.0, residual_clip_high=2.0, ref_logp=None, kl_coef=0.0,
          is_weights=None):
    """RLCSD (§4.8), two-path loss with independent normalisation.

    Arrays: ``logp, old_logp, mask, teacher_correct_logp: [B, T]``, ``advantages: [B]``,
    ``teacher_wrong_logp: [B, K, T]``, ``wrong_valid: [B, K]``. Defaults are the shipped config
    values (τ=0.02, β=1, λ=0.5, δ=0.02, η=1, residual clip ±2; ε=0.2; KL 0).
    ``L = Σ_ns PPO(A)/max(#ns, 1) + η · Σ_s PPO(Â)/max(#s, 1)``: single-sided clip, no ratio
    clamp, no dual clip.
    """
    logp, old_logp, ref_logp, teacher_correct_logp = (
        zero_where_masked(x, mask) for x in (logp, old_logp, ref_logp, teacher_correct_logp))
    teacher_wrong_logp = jnp.where(mask[:, None, :] > 0, teacher_wrong_logp, 0.0)
    adv = stop_gradient(broadcast_adv(advantages, logp))
    e, k_valid = rlcsd_contrast(teacher_correct_logp, teacher_wrong_logp, wrong_valid)
    r, sel, adv_hat = rlcsd_modulation(
        e, adv, mask, tau=tau, beta=beta, lam=lam, delta=delta,
        residual_clip_low=residual_clip_low, residual_clip_high=residual_clip_high)
    ns = (mask > 0) & ~sel
    loss_ns, clip_ns, _ = ppo_clip_terms(logp, old_logp, adv, epsilon)
    loss_s, clip_s, _ = ppo_clip_terms(logp, old_logp, adv_hat, epsilon)
    loss_ns = apply_is(loss_ns, is_weights, mask)
    loss_s = apply_is(loss_s, is_weights, mask)
    n_ns, n_s = token_count(ns), token_count(sel)
    path_ns = masked_sum(loss_ns, ns) / jnp.maximum(n_ns, 1.0)
    path_s = masked_sum(loss_s, sel) / jnp.maximum(n_s, 1.0)
    loss = path_ns + eta * path_s

    dtype = logp.dtype
    clipped = jnp.where(sel, clip_s, clip_ns)
    effective_adv = jnp.where(sel, adv_hat, adv)
    rows = jnp.any(mask > 0, axis=-1)  # rows that carry tokens (zero-mask padding rows excluded)
    metrics = pg_metrics(logp=logp, old_logp=old_logp, mask=mask, clipped=clipped)
    metrics.update({
        "rlcsd/e_ctr_mean": masked_mean(e, mask),
        "rlcsd/e_ctr_abs_mean": masked_mean(jnp.abs(e), mask),
        "rlcsd/selected_token_ratio": n_s / jnp.maximum(token_count(mask), 1.0),
        "rlcsd/selected_token_count": n_s,
        "rlcsd/residual_mean": masked_mean(r, mask),
        "rlcsd/residual_abs_mean": masked_mean(jnp.abs(r), mask),
        "rlcsd/adv_hat_mean": masked_mean(effective_adv, mask),
        "rlcsd/adv_hat_selected_mean": masked_mean(adv_hat, sel),
        # Selected tokens where the sign-preserving clamp bound (Â pinned at 0 with A ≠ 0).
        "rlcsd/sign_clamp_ratio": masked_mean(
            ((adv_hat == 0) & (adv != 0)).astype(dtype), sel),
        "rlcsd/k_valid_mean": jnp.sum(jnp.where(rows, k_valid, 0.0))
        / jnp.maximum(jnp.sum(rows.astype(dtype)), 1.0),
        "rlcsd/loss_selected": path_s,
        "rlcsd/loss_nonselected": path_ns,
        "teacher_gap": masked_mean(stop_gradient(teacher_correct_logp) - stop_gradient(logp), mask),
        "pg_loss": loss,
    })
    return add_kl(loss, metrics, method=rlcsd.__name__, logp=logp, ref_logp=ref_logp,
                  kl_coef=kl_coef, mask=mask)


def signal_diagnostics(*, logp, teacher_correct_logp, teacher_wrong_logp, wrong_valid, mask):
    """Per-token signals of the paper's Figure 1a, ``[B, T]`` each, 0 on padding.

    ``e_c = lp_T(y | correct) − lp_S(y)`` (the RLSD/OPD-style signal) and ``e_ctr`` = the RLCSD
    contrast e_t (the same :func:`rlcsd_contrast` the loss uses).
    """
    logp = zero_where_masked(logp, mask)
    teacher_correct_logp = zero_where_masked(teacher_correct_logp, mask)
    teacher_wrong_logp = jnp.where(mask[:, None, :] > 0, teacher_wrong_logp, 0.0)
    e_ctr, _ = rlcsd_contrast(teacher_correct_logp, teacher_wrong_logp, wrong_valid)
    e_c = stop_gradient(teacher_correct_logp) - stop_gradient(logp)
    return {"e_c": jnp.where(mask > 0, e_c, 0.0), "e_ctr": jnp.where(mask > 0, e_ctr, 0.0)}
