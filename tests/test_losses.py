"""Loss registry vs independent NumPy float64 implementations of algorithm.md §4.1–4.8.

The NumPy side below is written from docs/algorithm.md's formulas (loops where that reads
closer to them), not from the JAX code. The JAX side runs under ``jax.enable_x64`` so both sides are
float64: the loss then agrees to rounding (~1e-15) and the JAX gradient agrees with a central
finite difference (step 1e-6, truncation error O(1e-12), cancellation O(1e-10)); rtol 1e-5 /
atol 1e-8 is therefore loose enough to never flake and tight enough to catch any formula slip
(a wrong constant moves results by ≥ 1e-3). A separate test checks that the default float32 run
agrees with float64 to 1e-4.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcsd_jax import losses
from helpers import references

RTOL, ATOL = 1e-5, 1e-8


# ----------------------------------------------------------------------------------------------
# NumPy float64 reference (algorithm.md §4 formulas)


def np_lse(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)), axis)


def np_log_softmax(x):
    return x - np_lse(x)[..., None]


def np_tail(x):
    t = np.log(1.0 - np.exp(np.minimum(np_lse(x), -1e-7)))
    return np.concatenate([x, t[..., None]], axis=-1)


def tmean(x, m):
    return float((x * m).sum() / max(m.sum(), 1.0))


def np_k3(lp, ref):
    d = np.clip(ref - lp, -20, 20)
    return np.clip(np.exp(d) - d - 1, -10, 10)


def np_ppo(lp, old, a, eps):
    rho = np.exp(lp - old)
    return -np.minimum(rho * a, np.clip(rho, 1 - eps, 1 + eps) * a)


def np_dual(lp, old, a, lo=0.2, hi=0.2, c=3.0):
    rho = np.exp(np.clip(lp - old, -20, 20))
    loss = np.maximum(-a * rho, -a * np.clip(rho, 1 - lo, 1 + hi))
    return np.where(a < 0, np.minimum(loss, -c * a), loss)


def np_grpo(d, lp, sg_lp, kl_coef=0.001):
    a = d["advantages"][:, None]
    loss = tmean(np_dual(lp, d["old_logp"], a), d["mask"])
    return loss + kl_coef * tmean(np_k3(lp, d["ref_logp"]), d["mask"])


def np_rlsd_like(lp, d, a_vec, delta, eps=0.2, eps_w=0.2, lam=0.5, exp_clamp=None):
    a = np.broadcast_to(a_vec[:, None], lp.shape)
    arg = np.sign(a) * delta
    if exp_clamp is not None:
        arg = np.clip(arg, -exp_clamp, exp_clamp)
    w = np.clip(np.exp(arg), 1 - eps_w, 1 + eps_w)
    a_hat = a * ((1 - lam) + lam * w)
    return tmean(np_ppo(lp, d["old_logp"], a_hat, eps), d["mask"])


def np_rlsd(d, lp, sg_lp):
    return np_rlsd_like(lp, d, d["advantages"], d["teacher_logp"] - sg_lp)


def np_rlsd_ectr(d, lp, sg_lp, kl_coef=0.001):
    delta = d["teacher_correct_logp"] - d["teacher_wrong_logp"][:, 0]
    loss = np_rlsd_like(lp, d, d["advantages"], delta, exp_clamp=60.0)
    return loss + kl_coef * tmean(np_k3(lp, d["ref_logp"]), d["mask"])


def np_rlcsd(d, lp, sg_lp, tau=0.02, beta=1.0, lam=0.5, delta=0.02, eta=1.0, lo=-2.0, hi=2.0,
             eps=0.2, return_e=False):
    """Token-by-token transcription of the §4.8 pseudo-code."""
    B, T = lp.shape
    sum_s = sum_ns = n_s = n_ns = 0.0
    e_all = np.zeros((B, T))
    for b in range(B):
        A = d["advantages"][b]
        valid = [k for k in range(d["wrong_valid"].shape[1]) if d["wrong_valid"][b, k]]
        for t in range(T):
            if not d["mask"][b, t]:
                continue
            mix = np.mean([np.exp(d["teacher_wrong_logp"][b, k, t]) for k in valid])
            e = d["teacher_correct_logp"][b, t] - np.log(mix)
            e_all[b, t] = e
            r = np.clip(beta * lam * np.tanh(e / max(tau, 1e-6)), lo, hi)
            rho = np.exp(lp[b, t] - d["old_logp"][b, t])
            if abs(r) > delta:
                a_hat = A + r
                a_hat = max(a_hat, 0.0) if A > 0 else (min(a_hat, 0.0) if A < 0 else 0.0)
                sum_s += -min(rho * a_hat, np.clip(rho, 1 - eps, 1 + eps) * a_hat)
                n_s += 1
            else:
                sum_ns += -min(rho * A, np.clip(rho, 1 - eps, 1 + eps) * A)
                n_ns += 1
    if return_e:
        return e_all
    return sum_ns / max(n_ns, 1) + eta * sum_s / max(n_s, 1)


def np_opsd(d, sp, clip=0.05):
    p, q = np_tail(sp), np_tail(d["teacher_topk_logp"])
    per_tok = np.sum(np.minimum(np.exp(q) * (q - p), clip), axis=-1)
    return tmean(per_tok, d["mask"])


def np_jsd(p, q, alpha=0.5):
    m = np.log((1 - alpha) * np.exp(p) + alpha * np.exp(q))
    return ((1 - alpha) * np.sum(np.exp(p) * (p - m), -1)
            + alpha * np.sum(np.exp(q) * (q - m), -1))


def np_is(sg_lp, old, cap=2.0):
    return np.minimum(np.exp(np.clip(sg_lp - old, -20, 20)), cap)


def np_sdpo(d, sp, sg_lp):
    jsd = np_jsd(np_tail(sp), np_tail(d["teacher_topk_logp_s"]))
    return tmean(jsd * np_is(sg_lp, d["old_logp"]), d["mask"])


def np_srpo(d, lp, sp, sg_lp, beta=1.0):
    a = np.broadcast_to(d["advantages"][:, None], lp.shape)
    m = d["mask"]
    grpo_tok = np_dual(lp, d["old_logp"], a)
    jsd = np_jsd(np_tail(sp), np_tail(d["teacher_topk_logp_s"]))
    routed = (a <= 0) & (m > 0)
    logw = -beta * d["teacher_entropy"]
    w = np.exp(logw - logw[routed].max())
    dw = w / w[routed].mean()
    sdpo_tok = jsd * np_is(sg_lp, d["old_logp"]) * dw
    per = np.where(a > 0, grpo_tok, sdpo_tok)
    return float((per * m).sum() / max(m.sum(), 1))


def np_opsd_ectr(d, sp, lp, alpha=0.5, floor=-5.0, cw_tau=1.0, clip=0.05, kl_coef=0.001):
    p = np_tail(sp)
    qc, qw = np_tail(d["teacher_topk_logp"]), np_tail(d["teacher_wrong_topk_logp"])
    g = (1 + alpha) * qc - alpha * np.maximum(qw, floor)
    g = g - np_lse(g)[..., None]
    per_tok = np.sum(np.minimum(np.exp(g) * (g - p), clip), -1)
    kl = np.maximum(np.sum(np.exp(qc) * (qc - qw), -1), 0)
    wt = kl / (kl + cw_tau) if cw_tau > 0 else np.ones_like(kl)
    loss = tmean(per_tok * wt, d["mask"])
    return loss + kl_coef * tmean(np_k3(lp, d["ref_logp"]), d["mask"])


def fd_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


# ----------------------------------------------------------------------------------------------
# Random but realistic inputs: full-vocab log-softmax, sampled ids, top-k gathers, padding = 0.


def make_data(seed=0, B=5, T=6, K=3, V=10, k=4):
    rng = np.random.default_rng(seed)
    lens = np.array([6, 4, 1, 5, 3])[:B]
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.float64)
    s_full = np_log_softmax(1.5 * rng.normal(size=(B, T, V)))
    t_full = np_log_softmax(np.log(np.exp(s_full) + 0.0) + 0.8 * rng.normal(size=(B, T, V)))
    w_full = np_log_softmax(t_full[:, None] + 0.8 * rng.normal(size=(B, K, T, V)))
    y = rng.integers(V, size=(B, T))
    take = lambda full, ids: np.take_along_axis(full, ids, axis=-1)  # noqa: E731
    logp = take(s_full, y[..., None])[..., 0]
    d = {
        "mask": mask,
        # Mixed signs, A = 0, and small |A| so rlcsd's sign-preserving clamp binds both ways.
        "advantages": np.array([1.3, 0.0, -0.8, -0.2, 0.25])[:B],
        "logp": logp,
        "old_logp": logp + 0.15 * rng.normal(size=(B, T)),
        "ref_logp": logp + 0.3 * rng.normal(size=(B, T)),
        "teacher_logp": take(t_full, y[..., None])[..., 0],
        "teacher_correct_logp": take(t_full, y[..., None])[..., 0],
        "teacher_wrong_logp": np.stack(
            [take(w_full[:, j], y[..., None])[..., 0] for j in range(K)], axis=1),
        "wrong_valid": np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]],
                                bool)[:B, :K],
        "teacher_entropy": -np.sum(np.exp(t_full) * t_full, -1),
    }
    t_ids = np.argsort(-t_full, -1)[..., :k]  # opsd family: the teacher's top-k
    s_ids = np.argsort(-s_full, -1)[..., :k]  # sdpo family: the student's top-k
    d["student_topk_logp"] = take(s_full, t_ids)
    d["teacher_topk_logp"] = take(t_full, t_ids)
    d["teacher_wrong_topk_logp"] = take(w_full[:, 0], t_ids)
    d["student_topk_logp_s"] = take(s_full, s_ids)
    d["teacher_topk_logp_s"] = take(t_full, s_ids)
    for key, val in d.items():  # padded positions hold 0, as the scorer writes them (§2.5)
        if key not in ("mask", "advantages", "wrong_valid", "teacher_wrong_logp"):
            d[key] = np.where(mask.reshape(mask.shape + (1,) * (val.ndim - 2)) > 0, val, 0.0)
    d["teacher_wrong_logp"] = np.where(mask[:, None] > 0, d["teacher_wrong_logp"], 0.0)
    return d


# Arrays passed to each loss; the value is the key in make_data's dict.
ARGS = {
    "grpo": dict(logp="logp", old_logp="old_logp", advantages="advantages", mask="mask",
                 ref_logp="ref_logp"),
    "rlsd": dict(logp="logp", old_logp="old_logp", advantages="advantages", mask="mask",
                 teacher_logp="teacher_logp"),
    "rlsd_ectr": dict(logp="logp", old_logp="old_logp", advantages="advantages", mask="mask",
                      teacher_correct_logp="teacher_correct_logp",
                      teacher_wrong_logp="teacher_wrong_logp0", ref_logp="ref_logp"),
    "rlcsd": dict(logp="logp", old_logp="old_logp", advantages="advantages", mask="mask",
                  teacher_correct_logp="teacher_correct_logp",
                  teacher_wrong_logp="teacher_wrong_logp", wrong_valid="wrong_valid"),
    "opsd": dict(student_topk_logp="student_topk_logp", teacher_topk_logp="teacher_topk_logp",
                 mask="mask"),
    "sdpo": dict(logp="logp", old_logp="old_logp", student_topk_logp="student_topk_logp_s",
                 teacher_topk_logp="teacher_topk_logp_s", mask="mask"),
    "srpo": dict(logp="logp", old_logp="old_logp", advantages="advantages", mask="mask",
                 student_topk_logp="student_topk_logp_s",
                 teacher_topk_logp="teacher_topk_logp_s", teacher_entropy="teacher_entropy"),
    "opsd_ectr": dict(student_topk_logp="student_topk_logp",
                      teacher_topk_logp="teacher_topk_logp",
                      teacher_wrong_topk_logp="teacher_wrong_topk_logp", mask="mask",
                      logp="logp", ref_logp="ref_logp"),
}


def arrays_for(name, d):
    d = dict(d, teacher_wrong_logp0=d["teacher_wrong_logp"][:, 0])
    return {arg: d[key] for arg, key in ARGS[name].items()}


def jit_loss(name, **hp):
    """The float32 (default precision) loss, jitted with static hyper-parameters."""
    return jax.jit(functools.partial(losses.get(name), **hp))


@functools.lru_cache(maxsize=None)
def _jitted(name, hp_items, wrt, keys):
    """One compiled value-and-grad per (method, hyper-parameters, variables, inputs); the x64
    flag is part of jit's own cache key, so both precisions reuse this wrapper."""
    fn = functools.partial(losses.get(name), **dict(hp_items))

    def f(xs, rest):
        return fn(**rest, **xs)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


def jax_value_and_grad(name, arrays, wrt, x64=True, **hp):
    """Jitted loss, d loss / d arrays[w] for each w in ``wrt``, and metrics (as NumPy)."""
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        ja = {k: (jnp.asarray(v) if v.dtype == bool else jnp.asarray(v, dtype))
              for k, v in arrays.items()}
        step = _jitted(name, tuple(sorted(hp.items())), tuple(wrt), tuple(sorted(ja)))
        (loss, metrics), grads = step({w: ja[w] for w in wrt},
                                      {k: v for k, v in ja.items() if k not in wrt})
        return (float(loss), {k: np.asarray(v) for k, v in grads.items()},
                {k: np.asarray(v) for k, v in metrics.items()})


# (method, hyper-parameters, numpy reference (d, x_by_name, sg_lp) -> loss, variables)
CASES = [
    ("grpo", {}, lambda d, x, s: np_grpo(d, x["logp"], s), ["logp"]),
    ("rlsd", {}, lambda d, x, s: np_rlsd(d, x["logp"], s), ["logp"]),
    ("rlsd_ectr", {}, lambda d, x, s: np_rlsd_ectr(d, x["logp"], s), ["logp"]),
    ("rlcsd", {}, lambda d, x, s: np_rlcsd(d, x["logp"], s), ["logp"]),
    ("rlcsd", dict(tau=1.0, delta=0.2, beta=0.8, eta=0.7),
     lambda d, x, s: np_rlcsd(d, x["logp"], s, tau=1.0, delta=0.2, beta=0.8, eta=0.7),
     ["logp"]),
    ("opsd", {}, lambda d, x, s: np_opsd(d, x["student_topk_logp"]), ["student_topk_logp"]),
    ("sdpo", {}, lambda d, x, s: np_sdpo(d, x["student_topk_logp"], s),
     ["logp", "student_topk_logp"]),
    ("srpo", {}, lambda d, x, s: np_srpo(d, x["logp"], x["student_topk_logp"], s),
     ["logp", "student_topk_logp"]),
    ("opsd_ectr", {}, lambda d, x, s: np_opsd_ectr(d, x["student_topk_logp"], x["logp"]),
     ["student_topk_logp", "logp"]),
    ("opsd_ectr", dict(cw_tau=0.0, kl_coef=0.0),
     lambda d, x, s: np_opsd_ectr(d, x["student_topk_logp"], x["logp"], cw_tau=0.0,
                                  kl_coef=0.0), ["student_topk_logp"]),
]


@pytest.mark.parametrize("name,hp,ref,wrt", CASES, ids=[f"{c[0]}-{i}" for i, c in
                                                        enumerate(CASES)])
def test_loss_and_grad_match_numpy(name, hp, ref, wrt):
    d = make_data(seed=1)
    arrays = arrays_for(name, d)
    # Variables are named by the loss's argument names; map them back to make_data keys.
    base = {w: arrays[w] for w in wrt}
    sg_lp = d["logp"]

    def np_loss(xs):
        dd = dict(d)
        dd["teacher_topk_logp_s"] = d["teacher_topk_logp_s"]
        return ref(dd, {**{"logp": d["logp"], "student_topk_logp": arrays.get(
            "student_topk_logp")}, **xs}, sg_lp)

    loss, grads, metrics = jax_value_and_grad(name, arrays, wrt, **hp)
    np.testing.assert_allclose(loss, np_loss(base), rtol=RTOL, atol=ATOL)
    for w in wrt:
        fd = fd_grad(lambda v: np_loss({**base, w: v}), base[w].copy())
        np.testing.assert_allclose(grads[w], fd, rtol=RTOL, atol=ATOL, err_msg=f"d/d{w}")
        # Padded positions never receive gradient.
        pad = d["mask"] == 0
        assert np.all(grads[w][pad] == 0)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in metrics.values())


@pytest.mark.parametrize("name", losses.names())
def test_float32_agrees_with_float64(name):
    d = make_data(seed=2)
    arrays = arrays_for(name, d)
    wrt = [w for w in ("logp", "student_topk_logp") if w in arrays]
    l64, g64, _ = jax_value_and_grad(name, arrays, wrt, x64=True)
    l32, g32, _ = jax_value_and_grad(name, arrays, wrt, x64=False)
    np.testing.assert_allclose(l32, l64, rtol=1e-4, atol=1e-6)
    for w in wrt:
        np.testing.assert_allclose(g32[w], g64[w], rtol=1e-3, atol=1e-5)


def test_registry_and_defaults():
    assert set(losses.names()) == {"grpo", "opsd", "sdpo", "srpo", "rlsd", "rlcsd",
                                   "opsd_ectr", "rlsd_ectr"}
    assert dict(losses.DEFAULTS["rlcsd"]) == dict(
        epsilon=0.2, tau=0.02, beta=1.0, lam=0.5, delta=0.02, eta=1.0,
        residual_clip_low=-2.0, residual_clip_high=2.0, kl_coef=0.0)
    assert losses.DEFAULTS["opsd_ectr"]["log_w_floor"] == -5.0
    assert losses.DEFAULTS["grpo"]["kl_coef"] == 0.001
    assert losses.DEFAULTS["rlsd_ectr"]["kl_coef"] == 0.001
    assert losses.DEFAULTS["opsd"]["jsd_token_clip"] == 0.05
    assert losses.METHODS["opsd"].grad_clip == 0.1
    with pytest.raises(KeyError, match="allowed"):
        losses.get("ppo")
    with pytest.raises(TypeError):  # strict signatures: unknown arrays are an error
        losses.get("rlsd")(**arrays_for("rlsd", make_data()), teacher_entropy=np.zeros((5, 6)))


def test_kl_needs_ref_logp():
    arrays = arrays_for("grpo", make_data())
    del arrays["ref_logp"]
    with pytest.raises(ValueError, match="ref_logp"):
        losses.get("grpo")(**arrays)
    loss, metrics = jit_loss("grpo", kl_coef=0.0)(**arrays)
    assert "kl" not in metrics and np.isfinite(loss)


def test_kl_term_is_added():
    d = make_data()
    arrays = arrays_for("rlcsd", d)
    base, _ = jit_loss("rlcsd")(**arrays)
    with_kl, metrics = jit_loss("rlcsd", kl_coef=0.05)(**arrays, ref_logp=d["ref_logp"])
    np.testing.assert_allclose(with_kl - base, 0.05 * tmean(np_k3(d["logp"], d["ref_logp"]),
                                                            d["mask"]), rtol=1e-4)
    np.testing.assert_allclose(metrics["kl"], tmean(np_k3(d["logp"], d["ref_logp"]), d["mask"]),
                               rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Hand-checked corner cases


def _rlcsd_hand_inputs():
    """3 rollouts × 2 tokens, K = 2; ρ = 1 everywhere (logp == old_logp)."""
    L = np.log
    nan = np.nan
    tc = np.array([[L(.5), L(.3)], [L(.2), L(.9)], [L(.8), -np.inf]])
    tw = np.array([
        [[L(.25), L(.3)], [nan, nan]],        # row 0: slot 1 invalid, holds garbage
        [[L(.6), L(.1)], [L(.2), L(.1)]],      # row 1: both valid
        [[L(.4), -np.inf], [0.0, 0.0]],        # row 2: slot 1 invalid; token 1 is padding
    ])
    logp = np.array([[-1.0, -2.0], [-0.5, -0.1], [-3.0, 0.0]])
    return dict(logp=logp, old_logp=logp.copy(), advantages=np.array([1.0, -1.0, -0.3]),
                mask=np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]),
                teacher_correct_logp=tc, teacher_wrong_logp=tw,
                wrong_valid=np.array([[1, 0], [1, 1], [1, 0]], bool))


def test_rlcsd_hand_computed_example():
    # Row 0 (A=+1): t0 e = log(.5/.25) = log 2, r = 0.5·tanh(34.7) = 0.5, selected, Â = 1.5;
    #               t1 e = log(.3/.3) = 0, r = 0, NOT selected, uses A = 1.
    # Row 1 (A=−1): t0 mix = (.6+.2)/2 = .4, e = log(.2/.4) < 0, r = −0.5, Â = −1.5;
    #               t1 mix = .1, e = log 9, r = +0.5, Â = −0.5.
    # Row 2 (A=−0.3): t0 e = log 2, r = 0.5, Â = 0.2 → sign clamp → 0; t1 padding.
    # With ρ = 1 the per-token loss is −Â: selected Σ = −1.5 + 1.5 + 0.5 + 0 = 0.5 over 4 tokens;
    # non-selected Σ = −1 over 1 token. L = −1/1 + 1·0.5/4 = −0.875.
    # dL/dlogp = −Â / n_path: [[−1.5/4, −1], [1.5/4, 0.5/4], [0, 0]].
    arrays = _rlcsd_hand_inputs()
    loss, grads, m = jax_value_and_grad("rlcsd", arrays, ["logp"])
    np.testing.assert_allclose(loss, -0.875, rtol=1e-12)
    np.testing.assert_allclose(grads["logp"], [[-0.375, -1.0], [0.375, 0.125], [0.0, 0.0]],
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m["rlcsd/selected_token_ratio"], 0.8)
    np.testing.assert_allclose(m["rlcsd/k_valid_mean"], 4 / 3)
    np.testing.assert_allclose(m["rlcsd/e_ctr_mean"], np.log(18) / 5, rtol=1e-12)
    np.testing.assert_allclose(m["rlcsd/residual_mean"], 0.2, rtol=1e-12)
    np.testing.assert_allclose(m["rlcsd/sign_clamp_ratio"], 0.25)
    np.testing.assert_allclose(m["rlcsd/loss_selected"], 0.125)
    np.testing.assert_allclose(m["rlcsd/loss_nonselected"], -1.0)
    # Float32 default path gives the same numbers.
    loss32, _ = jax.jit(losses.get("rlcsd"))(**arrays)
    np.testing.assert_allclose(loss32, -0.875, rtol=1e-6)


def test_rlcsd_a_zero_gives_zero_loss_and_grad():
    d = make_data()
    arrays = arrays_for("rlcsd", d)
    arrays["advantages"] = np.zeros_like(arrays["advantages"])
    loss, grads, m = jax_value_and_grad("rlcsd", arrays, ["logp"])
    assert loss == 0.0 and np.all(grads["logp"] == 0.0)
    assert m["rlcsd/adv_hat_mean"] == 0.0
    # A = 0 rows still count in the denominators (§4.8 note): adding one changes the scale.
    arrays = arrays_for("rlcsd", d)
    l_all, g_all, _ = jax_value_and_grad("rlcsd", arrays, ["logp"])
    assert np.all(g_all["logp"][1] == 0.0)  # row 1 has A = 0
    keep = [0, 2, 3, 4]
    sub = {k: v[keep] for k, v in arrays.items()}
    l_sub, _, _ = jax_value_and_grad("rlcsd", sub, ["logp"])
    assert not np.isclose(l_all, l_sub)


@pytest.mark.parametrize("delta,ratio", [(10.0, 0.0), (0.0, 1.0)])
def test_rlcsd_none_or_all_selected(delta, ratio):
    d = make_data()
    arrays = arrays_for("rlcsd", d)
    loss, _, m = jax_value_and_grad("rlcsd", arrays, ["logp"], delta=delta)
    assert float(m["rlcsd/selected_token_ratio"]) == ratio
    a = d["advantages"][:, None]
    if ratio == 0.0:  # plain PPO-clip token-mean with the raw advantage
        expected = tmean(np_ppo(d["logp"], d["old_logp"], a, 0.2), d["mask"])
    else:
        expected = np_rlcsd(d, d["logp"], d["logp"], delta=0.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-10)


def test_rlcsd_invalid_slot_is_ignored():
    arrays = _rlcsd_hand_inputs()
    base, gb, _ = jax_value_and_grad("rlcsd", arrays, ["logp"])
    for junk in (np.nan, np.inf, -np.inf, 1e30):
        a = dict(arrays, teacher_wrong_logp=arrays["teacher_wrong_logp"].copy())
        a["teacher_wrong_logp"][0, 1] = junk
        a["teacher_wrong_logp"][2, 1] = junk
        loss, g, m = jax_value_and_grad("rlcsd", a, ["logp"])
        assert loss == base and np.array_equal(g["logp"], gb["logp"])
        assert all(np.isfinite(np.asarray(v)).all() for v in m.values())
    # Dropping the invalid column entirely (K = 1 for rows 0 and 2) is not the same batch, but
    # rows 0 and 2 alone give identical results with K = 1.
    one = {k: v[[0, 2]] for k, v in arrays.items()}
    k1 = dict(one, teacher_wrong_logp=one["teacher_wrong_logp"][:, :1],
              wrong_valid=one["wrong_valid"][:, :1])
    np.testing.assert_allclose(jax_value_and_grad("rlcsd", one, ["logp"])[0],
                               jax_value_and_grad("rlcsd", k1, ["logp"])[0], rtol=1e-14)


@pytest.mark.parametrize("name", losses.names())
def test_garbage_at_padding_gives_same_finite_result(name):
    """−inf / NaN at padded positions of every input must change nothing (§8: `where`)."""
    d = make_data(seed=3)
    arrays = arrays_for(name, d)
    wrt = [w for w in ("logp", "student_topk_logp") if w in arrays]
    clean_loss, clean_g, _ = jax_value_and_grad(name, arrays, wrt)
    pad = d["mask"] == 0
    dirty = {}
    for k, v in arrays.items():
        v = v.copy()
        if k in ("mask", "advantages", "wrong_valid"):
            dirty[k] = v
            continue
        if k == "teacher_wrong_logp" and v.ndim == 3:
            v[np.broadcast_to(pad[:, None], v.shape)] = -np.inf
        else:
            v[pad] = -np.inf if k.startswith("teacher") else np.nan
        dirty[k] = v
    loss, g, metrics = jax_value_and_grad(name, dirty, wrt)
    assert loss == pytest.approx(clean_loss, rel=1e-12)
    for w in wrt:
        assert np.all(np.isfinite(g[w]))
        np.testing.assert_allclose(g[w], clean_g[w], rtol=1e-12, atol=1e-15)
    assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())


def test_opsd_per_entry_clip_before_sum():
    # q = [.6, .3 | tail .1], p = [.1, .5 | tail .4]
    # entries: .6·log 6 = 1.075 → clipped to .05; .3·log(.6) = −.15325; .1·log(.25) = −.13863
    q = np.log([[[0.6, 0.3]]])
    p = np.log([[[0.1, 0.5]]])
    expected = 0.05 + 0.3 * np.log(0.3 / 0.5) + 0.1 * np.log(0.1 / 0.4)
    assert expected < 0  # ℓ_t can be negative; a clip after the sum would give +0.05
    loss, _, m = jax_value_and_grad(
        "opsd", dict(student_topk_logp=p, teacher_topk_logp=q, mask=np.ones((1, 1))),
        ["student_topk_logp"])
    np.testing.assert_allclose(loss, expected, rtol=1e-9)
    np.testing.assert_allclose(m["opsd/entry_clip_frac"], 1 / 3)


def test_tail_bucket_full_mass_is_finite():
    x = np.log(np.array([[[0.7, 0.2, 0.1]]]))  # top-k already holds all the mass
    with jax.enable_x64(True):
        t = losses.with_tail(jnp.asarray(x))
        g = jax.jit(jax.grad(lambda v: losses.with_tail(v)[..., -1].sum()))(jnp.asarray(x))
    np.testing.assert_allclose(t[..., -1], np.log(-np.expm1(-1e-7)), rtol=1e-9)
    assert np.all(np.isfinite(np.asarray(g)))


def test_srpo_routes_a_zero_to_sdpo():
    d = make_data()
    sd = arrays_for("srpo", d)
    sd["teacher_entropy"] = np.full_like(sd["teacher_entropy"], 0.7)  # dw ≡ 1
    # All A ≤ 0 (including A = 0) → every token takes the SDPO branch → srpo == sdpo.
    sd["advantages"] = np.array([0.0, 0.0, -1.0, 0.0, -0.5])
    l_srpo, g_srpo, m = jax_value_and_grad("srpo", sd, ["student_topk_logp"])
    sdpo_args = {k: sd[k] for k in ARGS["sdpo"]}
    l_sdpo, g_sdpo, _ = jax_value_and_grad("sdpo", sdpo_args, ["student_topk_logp"])
    np.testing.assert_allclose(l_srpo, l_sdpo, rtol=1e-12)
    np.testing.assert_allclose(g_srpo["student_topk_logp"], g_sdpo["student_topk_logp"],
                               rtol=1e-10, atol=1e-15)
    assert float(m["srpo/sdpo_token_ratio"]) == 1.0
    assert np.any(g_srpo["student_topk_logp"][0] != 0)  # the A = 0 rollout IS distilled
    # All A > 0 → srpo == grpo without KL.
    sd["advantages"] = np.array([1.0, 0.5, 2.0, 0.1, 0.3])
    l_srpo, _, _ = jax_value_and_grad("srpo", sd, ["logp"])
    g_args = {k: sd[k] for k in ("logp", "old_logp", "advantages", "mask")}
    l_grpo, _, _ = jax_value_and_grad("grpo", g_args, ["logp"], kl_coef=0.0)
    np.testing.assert_allclose(l_srpo, l_grpo, rtol=1e-12)


def test_sdpo_alpha_endpoints_are_kl():
    d = make_data()
    arrays = arrays_for("sdpo", d)
    p, q = np_tail(arrays["student_topk_logp"]), np_tail(arrays["teacher_topk_logp"])
    w = np_is(d["logp"], d["old_logp"])
    for alpha, kl in ((0.0, np.sum(np.exp(q) * (q - p), -1)),
                      (1.0, np.sum(np.exp(p) * (p - q), -1))):
        loss, g, _ = jax_value_and_grad("sdpo", arrays, ["student_topk_logp"], alpha=alpha)
        np.testing.assert_allclose(loss, tmean(kl * w, d["mask"]), rtol=1e-10)
        assert np.all(np.isfinite(g["student_topk_logp"]))


def test_grpo_advantages_spec_example_and_singletons():
    r = np.array([1, 0, 0, 0, 0, 0, 0, 0, 1.0, 0.0, 3.0])
    g = np.array([5] * 8 + [9, 9, 2])
    adv = np.asarray(jax.jit(losses.grpo_advantages)(jnp.asarray(r), jnp.asarray(g)))
    np.testing.assert_allclose(adv[0], 2.475, atol=5e-4)
    np.testing.assert_allclose(adv[1:8], -0.354, atol=5e-4)
    np.testing.assert_allclose(adv[0], 0.875 / (np.sqrt(0.125) + 1e-6), rtol=1e-6)
    # Two-member group [1, 0]: mean 0.5, Bessel std sqrt(0.5).
    np.testing.assert_allclose(adv[8:10], np.array([0.5, -0.5]) / (np.sqrt(0.5) + 1e-6),
                               rtol=1e-6)
    np.testing.assert_allclose(adv[10], 3.0 / (1.0 + 1e-6), rtol=1e-6)  # singleton: mean 0, std 1
    np.testing.assert_allclose(references.grpo_advantages(r, g), adv, rtol=1e-6)
    same = losses.grpo_advantages(np.ones(4), np.zeros(4, int))
    assert np.all(np.asarray(same) == 0.0)  # all-same group → 0/(0 + 1e-6)
    uids = np.array(["a"] * 8 + ["b", "b", "c"], dtype=object)
    np.testing.assert_allclose(losses.grpo_advantages(r, uids), adv, rtol=1e-6)
    fixed = losses.grpo_advantages(jnp.asarray(r), jnp.array([0] * 8 + [1, 1, 2]), num_groups=3)
    np.testing.assert_allclose(fixed, adv, rtol=1e-6)


def test_per_rollout_is_mean_of_row_losses():
    d = make_data()
    arrays = arrays_for("rlcsd", d)
    fn = losses.get("rlcsd")
    per_row = jax.jit(losses.per_rollout(fn))

    def np_rows(**hp):
        return [np_rlcsd({k: (v[i:i + 1] if isinstance(v, np.ndarray) and v.ndim else v)
                          for k, v in d.items()}, d["logp"][i:i + 1], None, **hp)
                for i in range(5)]

    loss, metrics = per_row(**arrays)
    np.testing.assert_allclose(loss, np.mean(np_rows()), rtol=1e-5)
    batch_loss, _ = jit_loss("rlcsd")(**arrays)
    assert not np.isclose(loss, batch_loss)  # per-rollout ≠ batch token-mean (§12.7)
    # A zero-mask padding row adds 0 to the numerator; rollout_denominator fixes the scale.
    padded = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in arrays.items()}
    padded["wrong_valid"][-1] = False
    lp, mp = jax.jit(losses.per_rollout(fn))(**padded, rollout_denominator=5)
    np.testing.assert_allclose(lp, loss, rtol=1e-5)
    np.testing.assert_allclose(mp["rlcsd/e_ctr_mean"], metrics["rlcsd/e_ctr_mean"], rtol=1e-5)
    # Hyper-parameters pass through unbatched.
    l2, _ = per_row(**arrays, tau=1.0, delta=0.2)
    np.testing.assert_allclose(l2, np.mean(np_rows(tau=1.0, delta=0.2)), rtol=1e-5)


def test_rollout_is_weights_and_their_use():
    d = make_data()
    rollout = d["old_logp"] + np.random.default_rng(0).normal(size=d["logp"].shape)
    m = d["mask"]
    w_tok = np.asarray(jax.jit(losses.rollout_is_weights)(d["old_logp"], rollout, m))
    exp_tok = np.minimum(np.exp(np.clip(d["old_logp"] - rollout, -20, 20)), 2.0) * m
    np.testing.assert_allclose(w_tok, exp_tok, rtol=1e-5)
    seq = functools.partial(losses.rollout_is_weights, mode="sequence", threshold=1.5)
    w_seq = np.asarray(jax.jit(seq)(d["old_logp"], rollout, m))
    mean_lr = ((d["old_logp"] - rollout) * m).sum(1) / np.maximum(m.sum(1), 1)
    exp_seq = np.minimum(np.exp(mean_lr), 1.5)[:, None] * m
    np.testing.assert_allclose(w_seq, exp_seq, rtol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        losses.rollout_is_weights(d["old_logp"], rollout, m, mode="geo")
    # Multiplied into every per-token loss (checked on grpo without KL and on rlsd).
    a = d["advantages"][:, None]
    got, _ = jit_loss("grpo", kl_coef=0.0)(
        **{k: d[k] for k in ("logp", "old_logp", "advantages", "mask")}, is_weights=exp_tok)
    np.testing.assert_allclose(got, tmean(np_dual(d["logp"], d["old_logp"], a) * exp_tok, m),
                               rtol=1e-5)
    ones, _ = jit_loss("rlsd")(**arrays_for("rlsd", d), is_weights=np.ones_like(m))
    plain, _ = jit_loss("rlsd")(**arrays_for("rlsd", d))
    np.testing.assert_allclose(ones, plain, rtol=1e-6)


def test_signal_diagnostics_share_the_rlcsd_contrast():
    d = make_data()
    a = arrays_for("rlcsd", d)
    sig = jax.jit(losses.signal_diagnostics)(
        logp=a["logp"], teacher_correct_logp=a["teacher_correct_logp"],
        teacher_wrong_logp=a["teacher_wrong_logp"], wrong_valid=a["wrong_valid"], mask=a["mask"])
    np.testing.assert_allclose(sig["e_ctr"], np_rlcsd(d, d["logp"], d["logp"], return_e=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sig["e_c"], (d["teacher_correct_logp"] - d["logp"]) * d["mask"],
                               rtol=1e-5, atol=1e-6)
    _, m = jit_loss("rlcsd")(**a)
    np.testing.assert_allclose(m["rlcsd/e_ctr_mean"], tmean(np.asarray(sig["e_ctr"]), d["mask"]),
                               rtol=1e-5)


def test_lam_schedule():
    assert losses.lam_schedule(0.5, 7, 0) == 0.5  # reference behaviour: no decay (§10.2)
    assert losses.lam_schedule(0.5, None, 50) == 0.5
    np.testing.assert_allclose(losses.lam_schedule(0.5, 1, 50), 0.5)
    np.testing.assert_allclose(losses.lam_schedule(0.5, 26, 50), 0.25)
    np.testing.assert_allclose(losses.lam_schedule(0.5, 500, 50), 0.0)
