"""Top-k distillation losses: opsd, sdpo, srpo, opsd_ectr (algorithm.md §4.2–4.4, §4.7).

Top-k inputs are ``[B, T, k]`` log-probs normalised over the FULL vocabulary, already gathered
by the scoring code (§3 "Top-k mechanics"):
  * opsd / opsd_ectr: ids chosen by the (correct-hint) teacher; ``student_topk_logp`` = the
    student at those ids (WITH gradient, which flows into the student's full-vocab logsumexp
    through the gather), ``teacher_topk_logp`` = the teacher at its own top-k, and for opsd_ectr
    ``teacher_wrong_topk_logp`` = the wrong-hint teacher at the correct teacher's ids.
  * sdpo / srpo: ids chosen by the student; ``student_topk_logp`` = the student's own top-k
    log-probs, ``teacher_topk_logp`` = the teacher at those ids.
Each distribution gets its own tail bucket inside (``with_tail``), so the support is k + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.lax import stop_gradient

from rlcsd_jax.losses.common import (
    add_kl,
    apply_is,
    broadcast_adv,
    divergence_terms,
    dual_clip_terms,
    is_ratio_weight,
    masked_mean,
    masked_sum,
    token_count,
    with_tail,
    zero_where_masked,
)

# srpo entropy weights: cap the shifted exponent and floor the mean (§4.4, §8).
SRPO_EXP_CAP = 50.0
SRPO_MEAN_FLOOR = 1e-12
_NEG_FILL = -1e30


def _clipped_entry_sum(terms, clip):
    """``Σ_v min(term_v, clip)``: the per-entry clip is applied BEFORE the sum (§4.2)."""
    return jnp.sum(jnp.minimum(terms, clip), axis=-1), terms > clip


def opsd(*, student_topk_logp, teacher_topk_logp, mask, beta=0.0, jsd_token_clip=0.05,
         logp=None, ref_logp=None, kl_coef=0.0, is_weights=None):
    """OPSD (§4.2): ``ℓ_t = Σ_{v ∈ S_t ∪ tail} min(e^{q_v}(q_v − p_v), 0.05)``, token-mean.

    ``student_topk_logp, teacher_topk_logp: [B, T, k]`` at the TEACHER's top-k ids;
    ``mask: [B, T]``. ``beta`` is the JSD mix (0 = forward KL, the shipped value); the per-entry
    clip applies to the divergence terms for any beta. ℓ_t can be negative. ``logp`` is needed
    only for the KL term.
    """
    student_topk_logp, teacher_topk_logp, logp, ref_logp = (
        zero_where_masked(x, mask) for x in (student_topk_logp, teacher_topk_logp, logp, ref_logp))
    p = with_tail(student_topk_logp)
    q = with_tail(stop_gradient(teacher_topk_logp))
    terms = divergence_terms(p, q, beta)
    per_tok, over = _clipped_entry_sum(terms, jsd_token_clip)
    per_tok = apply_is(per_tok, is_weights, mask)
    loss = masked_mean(per_tok, mask)
    metrics = {
        "opsd/token_loss_mean": loss,
        "opsd/divergence_mean": masked_mean(stop_gradient(jnp.sum(terms, axis=-1)), mask),
        "opsd/entry_clip_frac": masked_mean(jnp.mean(over.astype(p.dtype), axis=-1), mask),
        "opsd/teacher_tail_mass": masked_mean(jnp.exp(q[..., -1]), mask),
        "response_token_count": token_count(mask),
    }
    return add_kl(loss, metrics, method=opsd.__name__, logp=logp, ref_logp=ref_logp,
                  kl_coef=kl_coef, mask=mask)


def _jsd_per_token(student_topk_logp, teacher_topk_logp, alpha):
    """``JSD_t`` over the student's top-k + tail, ``[B, T]`` (§4.3); no per-entry clip."""
    p = with_tail(student_topk_logp)
    q = with_tail(stop_gradient(teacher_topk_logp))
    return jnp.sum(divergence_terms(p, q, alpha), axis=-1)


def sdpo(*, logp, old_logp, student_topk_logp, teacher_topk_logp, mask, alpha=0.5, is_clip=2.0,
         ref_logp=None, kl_coef=0.0, is_weights=None):
    """SDPO (§4.3): token-mean(JSD_t · w_IS) with ``w_IS = min(exp(clip(lp_θ − lp_old, ±20)),
    is_clip)`` (stop-gradient). ``logp, old_logp, mask: [B, T]``; top-k arrays ``[B, T, k]`` at
    the STUDENT's top-k ids. No reward term."""
    logp, old_logp, ref_logp, student_topk_logp, teacher_topk_logp = (
        zero_where_masked(x, mask)
        for x in (logp, old_logp, ref_logp, student_topk_logp, teacher_topk_logp))
    jsd = _jsd_per_token(student_topk_logp, teacher_topk_logp, alpha)
    w_is = is_ratio_weight(logp, old_logp, is_clip)
    per_tok = apply_is(jsd * w_is, is_weights, mask)
    loss = masked_mean(per_tok, mask)
    metrics = {
        "sdpo/jsd_mean": masked_mean(stop_gradient(jsd), mask),
        "sdpo/is_weight_mean": masked_mean(w_is, mask),
        "sdpo/is_clipfrac": masked_mean((w_is >= is_clip).astype(jsd.dtype), mask),
        "ppo_kl": masked_mean(stop_gradient(old_logp) - stop_gradient(logp), mask),
        "entropy_mc": masked_mean(-stop_gradient(logp), mask),
        "response_token_count": token_count(mask),
    }
    return add_kl(loss, metrics, method=sdpo.__name__, logp=logp, ref_logp=ref_logp,
                  kl_coef=kl_coef, mask=mask)


def srpo_entropy_weights(teacher_entropy, routed, beta):
    """``dw_t = exp(−β·H_T(t))`` renormalised to mean 1 over the routed (SDPO) tokens (§4.4).

    Max-subtraction over routed tokens only (others filled with −1e30), exponent capped at 50,
    mean floored at 1e-12; 0 off the routed set. ``[B, T]``, stop-gradient.
    """
    log_w = -beta * stop_gradient(teacher_entropy)
    top = jnp.max(jnp.where(routed, log_w, _NEG_FILL))
    w = jnp.where(routed, jnp.exp(jnp.minimum(jnp.where(routed, log_w - top, 0.0),
                                              SRPO_EXP_CAP)), 0.0)
    mean = jnp.maximum(jnp.sum(w) / jnp.maximum(token_count(routed), 1.0), SRPO_MEAN_FLOOR)
    return stop_gradient(w / mean)


def srpo(*, logp, old_logp, advantages, mask, student_topk_logp, teacher_topk_logp,
         teacher_entropy, alpha=0.5, is_clip=2.0, beta=1.0, clip_ratio_low=0.2,
         clip_ratio_high=0.2, clip_ratio_c=3.0, ref_logp=None, kl_coef=0.0, is_weights=None):
    """SRPO (§4.4): rollouts with A > 0 take the GRPO dual-clip loss; A ≤ 0 (including the A = 0
    all-same groups) take ``JSD_t · w_IS · dw_t``. One shared denominator
    ``max(#GRPO + #SDPO tokens, 1)``. ``beta`` is ``srpo_beta`` (entropy weight scale);
    ``teacher_entropy: [B, T]`` is the teacher's full-vocab entropy."""
    logp, old_logp, ref_logp, student_topk_logp, teacher_topk_logp, teacher_entropy = (
        zero_where_masked(x, mask) for x in (logp, old_logp, ref_logp, student_topk_logp,
                                    teacher_topk_logp, teacher_entropy))
    adv = stop_gradient(broadcast_adv(advantages, logp))
    real = mask > 0
    to_grpo = (adv > 0) & real
    to_sdpo = (adv <= 0) & real
    grpo_tok, clipped, _, _ = dual_clip_terms(
        logp, old_logp, adv, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    jsd = _jsd_per_token(student_topk_logp, teacher_topk_logp, alpha)
    w_is = is_ratio_weight(logp, old_logp, is_clip)
    dw = srpo_entropy_weights(teacher_entropy, to_sdpo, beta)
    sdpo_tok = jsd * w_is * dw
    per_tok = apply_is(jnp.where(to_grpo, grpo_tok, sdpo_tok), is_weights, mask)
    n_grpo, n_sdpo = token_count(to_grpo), token_count(to_sdpo)
    loss = masked_sum(per_tok, real) / jnp.maximum(n_grpo + n_sdpo, 1.0)
    n_all = jnp.maximum(token_count(mask), 1.0)
    metrics = {
        "srpo/grpo_token_ratio": n_grpo / n_all,
        "srpo/sdpo_token_ratio": n_sdpo / n_all,
        "srpo/jsd_mean": masked_mean(stop_gradient(jsd), to_sdpo),
        "srpo/is_weight_mean": masked_mean(w_is, to_sdpo),
        "srpo/entropy_weight_max": jnp.max(jnp.where(to_sdpo, dw, 0.0)),
        "srpo/teacher_entropy_mean": masked_mean(stop_gradient(teacher_entropy), mask),
        "srpo/grpo_loss_sum": masked_sum(stop_gradient(per_tok), to_grpo),
        "srpo/sdpo_loss_sum": masked_sum(stop_gradient(per_tok), to_sdpo),
        "pg_clipfrac": masked_mean(clipped.astype(logp.dtype), to_grpo),
        "ppo_kl": masked_mean(stop_gradient(old_logp) - stop_gradient(logp), mask),
        "entropy_mc": masked_mean(-stop_gradient(logp), mask),
        "response_token_count": token_count(mask),
    }
    return add_kl(loss, metrics, method=srpo.__name__, logp=logp, ref_logp=ref_logp,
                  kl_coef=kl_coef, mask=mask)


def opsd_ectr(*, student_topk_logp, teacher_topk_logp, teacher_wrong_topk_logp, mask, alpha=0.5,
              log_w_floor=-5.0, cw_tau=1.0, jsd_token_clip=0.05, logp=None, ref_logp=None,
              kl_coef=0.001, is_weights=None):
    """OPSD with a contrastive target (§4.7), all top-k arrays ``[B, T, k]`` at the CORRECT
    teacher's top-k ids, each with its own tail.

    ``g = (1+α)·q^c − α·max(q^w, log_w_floor)``, renormalised with logsumexp;
    ``ℓ_t = Σ_v min(e^{g_v}(g_v − p_v), clip)``; token weight ``m_t = KL_t / (KL_t + cw_tau)``
    with ``KL_t = max(Σ e^{q^c}(q^c − q^w), 0)`` (``cw_tau = 0`` disables it). Loss =
    token-mean(ℓ_t·m_t). KL coef 0.001 by default (§4.0): pass ``logp`` and ``ref_logp``.
    """
    student_topk_logp, teacher_topk_logp, teacher_wrong_topk_logp, logp, ref_logp = (
        zero_where_masked(x, mask) for x in (student_topk_logp, teacher_topk_logp,
                                    teacher_wrong_topk_logp, logp, ref_logp))
    p = with_tail(student_topk_logp)
    qc = with_tail(stop_gradient(teacher_topk_logp))
    qw = with_tail(stop_gradient(teacher_wrong_topk_logp))
    g = (1.0 + alpha) * qc - alpha * jnp.maximum(qw, log_w_floor)
    g = g - jax.nn.logsumexp(g, axis=-1, keepdims=True)
    terms = jnp.exp(g) * (g - p)
    per_entry_sum, over = _clipped_entry_sum(terms, jsd_token_clip)
    kl_cw = jnp.maximum(jnp.sum(jnp.exp(qc) * (qc - qw), axis=-1), 0.0)
    cw_tau_arr = jnp.asarray(cw_tau, dtype=p.dtype)
    m = jnp.where(cw_tau_arr > 0, kl_cw / (kl_cw + jnp.where(cw_tau_arr > 0, cw_tau_arr, 1.0)),
                  1.0)
    m = stop_gradient(m)
    per_tok = apply_is(per_entry_sum * m, is_weights, mask)
    loss = masked_mean(per_tok, mask)
    metrics = {
        "opsd_ectr/token_loss_mean": loss,
        "opsd_ectr/unweighted_loss_mean": masked_mean(stop_gradient(per_entry_sum), mask),
        "opsd_ectr/cw_mean": masked_mean(m, mask),
        "opsd_ectr/kl_cw_mean": masked_mean(kl_cw, mask),
        "opsd_ectr/entry_clip_frac": masked_mean(jnp.mean(over.astype(p.dtype), axis=-1), mask),
        "response_token_count": token_count(mask),
    }
    return add_kl(loss, metrics, method=opsd_ectr.__name__, logp=logp, ref_logp=ref_logp,
                  kl_coef=kl_coef, mask=mask)
