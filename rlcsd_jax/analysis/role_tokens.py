"""Does the contrast land on the tokens that decide correctness?  Role-token diagnostics.

In Knights & Knaves a 2-person answer is `\\boxed{A is a knight, B is a knave}`: once the format
and the names are learnt, correctness is decided by the role words.  On held-out rollouts
scored with the trainer's own hint contexts (`style_drift.collect_signals`, rlcsd's
self-rollout hints, algorithm.md §2.3), this module compares, on role tokens (a response token
whose decoded text contains "knight" or "knave") and on every other response token:

    e_ctr = lp_T(y | correct) − log mean_k p_T(y | wrong_k)   (RLCSD's contrast, §4.8)
    e_c   = lp_T(y | correct) − lp_S(y)                       (the non-contrastive signal)

`diagnose(cfg)` is the `rlcsd_jax.trainer.loop.run(..., diagnose=)` hook that puts these
numbers, on `warm_start.hint_diagnostics` held-out prompts before and after RL, into the run
summary (`python -m rlcsd_jax.train` passes it; None when `hint_diagnostics` is 0).
`summarize` gives mean |e| on each set, their ratio (role / other), and the share of each
signal's total |e| that lies on non-role tokens.  A teacher that reads hints has a large
e_ctr ratio; e_c also spreads mass over tokens where the hint only changes the surface.
"""

from __future__ import annotations

import re

import numpy as np

from rlcsd_jax.analysis import style_drift
from rlcsd_jax.analysis.style_report import token_strings

ROLE_WORDS = re.compile(r"knight|knave", re.IGNORECASE)


def role_mask(tokenizer, token_ids, mask) -> np.ndarray:
    """[R, N] bool: response tokens (mask > 0) whose decoded text holds a role word."""
    ids = np.asarray(token_ids)
    strings = token_strings(tokenizer, ids)
    hit = np.array([bool(ROLE_WORDS.search(s)) for s in strings], bool).reshape(ids.shape)
    return hit & (np.asarray(mask) > 0)


def _mean_abs(x: np.ndarray) -> float:
    return float(np.abs(x).mean()) if x.size else float("nan")


def summarize(signals: dict, tokenizer) -> dict:
    """Mean |e_ctr| and |e_c| on role vs other response tokens of the kept rollouts."""
    mask = np.asarray(signals["mask"]) > 0
    out = dict(rollouts=int(signals.get("num_rollouts", 0)), kept=int(mask.shape[0]),
               hint_source=signals.get("source", ""))
    if not mask.any():
        return out
    role = role_mask(tokenizer, signals["token_ids"], mask)
    other = mask & ~role
    out.update(role_tokens=int(role.sum()), other_tokens=int(other.sum()))
    for name in ("e_ctr", "e_c"):
        e = np.asarray(signals[name], np.float64)
        if not np.isfinite(e[mask]).all():
            continue
        on_role, on_other = _mean_abs(e[role]), _mean_abs(e[other])
        total = np.abs(e[mask]).sum()
        out[f"{name}_abs_role"] = on_role
        out[f"{name}_abs_other"] = on_other
        out[f"{name}_ratio"] = on_role / on_other if on_other > 0 else float("inf")
        out[f"{name}_share_other"] = float(np.abs(e[other]).sum() / total) if total > 0 else 0.0
    return out


def measure(trainer, num_prompts: int, *, seed: int = 0, split: str = "eval") -> dict:
    """Sample the config's G rollouts for `num_prompts` held-out records with the trainer's
    current weights and teacher, score them (rlcsd's self-rollout hints) and `summarize`."""
    records = style_drift.pick_records(trainer, num_prompts, split=split, seed=seed)
    signals = style_drift.collect_signals(trainer, records, seed=seed,
                                          hint_source="self_rollout")
    return dict(summarize(signals, trainer.tokenizer), prompts=len(records))


def format_line(d: dict) -> str:
    """One summary line: the two signals' role / other means and ratios."""
    if "e_ctr_ratio" not in d:
        return (f"role-token diagnostics: no usable rollouts ({d.get('kept', 0)} kept of "
                f"{d.get('rollouts', 0)})")
    return (f"|e_ctr| role {d['e_ctr_abs_role']:.3f} vs other {d['e_ctr_abs_other']:.3f} "
            f"(x{d['e_ctr_ratio']:.1f}); |e_c| role {d['e_c_abs_role']:.3f} vs other "
            f"{d['e_c_abs_other']:.3f} (x{d['e_c_ratio']:.1f}); share of |e| off role tokens: "
            f"e_ctr {d['e_ctr_share_other']:.2f}, e_c {d['e_c_share_other']:.2f} "
            f"({d['role_tokens']} role / {d['other_tokens']} other tokens, {d['kept']} rollouts)")


def diagnose(cfg):
    """The `loop.run` hook measuring `cfg.warm_start.hint_diagnostics` held-out prompts (the
    run's seed draws them and their rollouts), or None when that is 0."""
    n = cfg.warm_start.hint_diagnostics
    if n <= 0:
        return None

    def fn(trainer) -> dict:
        d = measure(trainer, n, seed=cfg.seed)
        return dict(d, line="held-out role tokens: " + format_line(d))
    return fn
