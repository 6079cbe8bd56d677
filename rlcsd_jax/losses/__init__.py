"""Pure JAX loss functions for RLCSD and its baselines (algorithm.md §4).

Usage::

    from rlcsd_jax import losses
    loss, metrics = losses.get("rlcsd")(
        logp=lp, old_logp=old, advantages=adv, mask=mask,
        teacher_correct_logp=tc, teacher_wrong_logp=tw, wrong_valid=valid)   # §4.0 defaults
    loss, metrics = losses.per_rollout(losses.get("rlcsd"))(...)           # §4.9 aggregation
    loss, metrics = losses.micro_batch(losses.get("srpo"))(rollout_denominator=M, ...)

Every loss takes keyword arrays plus keyword hyper-parameters (defaults = the shipped config
values, ``losses.DEFAULTS[name]``), optional ``ref_logp``/``kl_coef`` (k3 KL, §4.10) and optional
``is_weights`` (rollout IS weights, §8/§10.1; off by default), and returns
``(scalar_loss, metrics_dict)``. No config objects inside; all functions are jittable.
"""

from rlcsd_jax.losses.advantages import grpo_advantages, lam_schedule
from rlcsd_jax.losses.common import k3_kl, masked_mean, rollout_is_weights, with_tail
from rlcsd_jax.losses.distill import opsd, opsd_ectr, sdpo, srpo, srpo_entropy_weights
from rlcsd_jax.losses.policy_gradient import (
    grpo,
    rlcsd,
    rlcsd_contrast,
    rlcsd_modulation,
    rlsd,
    rlsd_ectr,
    signal_diagnostics,
)
from rlcsd_jax.losses.methods import DEFAULT_METHOD, MethodSpec, find
from rlcsd_jax.losses.registry import (
    DEFAULTS,
    INPUTS,
    METHODS,
    get,
    micro_batch,
    names,
    per_rollout,
)

# The k3 ("low_var_kl") estimator under the name the brief uses.
kl_k3 = k3_kl

__all__ = [
    "DEFAULTS", "INPUTS", "METHODS", "MethodSpec", "DEFAULT_METHOD", "find", "get", "names",
    "per_rollout",
    "micro_batch",
    "grpo_advantages", "lam_schedule", "kl_k3", "k3_kl", "masked_mean",
    "rollout_is_weights", "with_tail", "signal_diagnostics", "rlcsd_contrast",
    "rlcsd_modulation", "srpo_entropy_weights",
    # the loss functions, each named after its method
    *(fn.__name__ for fn in (grpo, opsd, sdpo, srpo, rlsd, rlcsd, opsd_ectr, rlsd_ectr)),
]
