"""The one table of training methods (algorithm.md §2, §3, §4.0, §4.9, §5).

``METHODS[name]`` is a :class:`MethodSpec`: the method's loss and everything the trainer,
planner, analysis and config code branch on.  This is the only module of the package that names
methods; everything else reads the properties below (``tests/test_method_table.py`` checks
that no other module holds a method-name string).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Callable, Mapping

from rlcsd_jax.losses import distill, policy_gradient

# The method a config runs unless told otherwise (`config.method`).
DEFAULT_METHOD = "rlcsd"

# The reference's `ppo_max_token_len_per_gpu` of a distillation config (algorithm.md §2.4, §5).
REFERENCE_TOKEN_BUDGET = 40960

TEACHER_MODES = ("fixed", "ema", "snapshot")
TEACHER_CONTEXTS = ("gt_solution", "self_rollout")
WRONG_HINTS = ("none", "one", "k_max")
TEACHER_SCORINGS = ("logp", "teacher_topk", "student_topk")

# Optional arrays every loss accepts; not hyper-parameters.
OPTIONAL_ARRAYS = ("ref_logp", "is_weights", "logp")


def signature_split(fn) -> tuple[tuple[str, ...], Mapping]:
    """(required array arguments, hyper-parameter defaults) of a loss function."""
    required, hparams = [], {}
    for p in inspect.signature(fn).parameters.values():
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        elif p.name not in OPTIONAL_ARRAYS:
            hparams[p.name] = p.default
    return tuple(required), types.MappingProxyType(hparams)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One method: its loss and the settings (§2, §3, §4.0, §4.9, §5) the trainer needs."""

    name: str
    loss: Callable                  # (**arrays, **hparams) -> (scalar loss, metrics)
    # Default `train.loss_aggregation`: "per_rollout", "batch" (§4.9) or
    # "reference_micro_batch" (the reference's token-budget micro-batches, each normalised on
    # its own: `trainer.microbatch.ReferenceRule`).  sdpo and srpo default to the reference's:
    # their normalisation spans the several rollouts of a reference micro-batch (srpo's entropy
    # weights and shared denominator, sdpo's token-mean).  The other distillation
    # methods default to per-rollout.  A reference micro-batch of the ECTR variants or rlcsd
    # (several teacher rows per rollout) mostly holds one rollout; opsd's and rlsd's hold 1 to
    # 3, like sdpo's (docs/reference_differences.md).
    aggregation: str
    grad_clip: float                # default `train.grad_clip`
    # Default `teacher.mode`: "fixed" (the live θ), "ema", "snapshot"; None = no teacher.
    teacher_mode: str | None = None
    # The teacher's context: "gt_solution" (§2.2, every rollout kept) or "self_rollout" (§2.3,
    # rollouts without a valid hint dropped); None = no teacher.
    teacher_context: str | None = None
    # Wrong-hint contexts per rollout: "none", "one" (the ECTR variants) or "k_max" (up to
    # `teacher.k_max`, rlcsd); teacher rows per rollout = 1 + `num_wrong_slots(k_max)`.
    wrong_hints: str = "none"
    # What the teacher gives the loss (§3): "logp" (log-probs of the sampled tokens of every
    # context), "teacher_topk" (the teacher's top-k on the correct context; a wrong context is
    # scored at those ids), "student_topk" (the teacher at the live student's own top-k ids);
    # None = no teacher.
    teacher_scoring: str | None = None
    teacher_entropy: bool = False   # the teacher's entropy too (srpo's weights)
    # The batch-aggregated loss is ONE token-mean (a micro-batch's share of it is exact): false
    # for rlcsd (two paths, each normalised by its own token count) and srpo (entropy weights
    # normalised over the batch).
    token_mean_loss: bool = True
    # The reference's `dp_actor.update_policy` `needs_teacher_forward`: its micro-batches budget
    # the student and the teacher rows together (srpo is absent from its list).
    reference_teacher_aware: bool = False
    # The reference's teacher token budget (`train.teacher_max_len` = -1): None = unset in the
    # reference's configs (max prompt + max response); `reference_budget_exceptions` maps
    # (task, model preset) to a config's own value.
    reference_budget: int | None = REFERENCE_TOKEN_BUDGET
    reference_budget_exceptions: tuple[tuple[tuple[str, str], int], ...] = ()
    # Domain check of the method's hyper-parameter block: f(block, "config.<name>").
    check_hparams: Callable[[Mapping, str], None] | None = None

    def __post_init__(self):
        assert (self.teacher_mode is None) == (self.teacher_context is None) == (
            self.teacher_scoring is None), self.name
        assert self.teacher_mode in (None, *TEACHER_MODES), self.name
        assert self.teacher_context in (None, *TEACHER_CONTEXTS), self.name
        assert self.teacher_scoring in (None, *TEACHER_SCORINGS), self.name
        assert self.wrong_hints in WRONG_HINTS, self.name
        # the teacher passes the trainer runs (`update.teacher_outputs`): a top-k teacher scores
        # at most one wrong context, one at the student's top-k none
        assert self.teacher_scoring in ("logp", None) or self.wrong_hints != "k_max", self.name
        assert not self.student_topk or self.wrong_hints == "none", self.name
        assert self.teacher_entropy <= self.student_topk, self.name

    @property
    def inputs(self) -> tuple[str, ...]:
        """The arrays the loss requires."""
        return signature_split(self.loss)[0]

    @property
    def defaults(self) -> Mapping:
        """The loss's hyper-parameter defaults (the shipped config values, §4.0)."""
        return signature_split(self.loss)[1]

    @property
    def has_teacher(self) -> bool:
        return self.teacher_mode is not None

    @property
    def single_wrong(self) -> bool:
        """`hints.build_hints(single_wrong=...)`: one wrong hint per rollout."""
        return self.wrong_hints == "one"

    @property
    def uses_topk(self) -> bool:
        """The loss is a distillation over top-k ids (`train.distill_top_k`)."""
        return self.teacher_scoring in ("teacher_topk", "student_topk")

    @property
    def student_topk(self) -> bool:
        """The live student's own top-k ids choose the distillation support (§3)."""
        return self.teacher_scoring == "student_topk"

    def num_wrong_slots(self, k_max: int) -> int:
        return {"none": 0, "one": 1, "k_max": k_max}[self.wrong_hints]

    def needs_reference(self, hparams) -> bool:
        """A reference model (the frozen start, k3 KL §4.10) is kept iff `kl_coef` > 0."""
        return dict(hparams).get("kl_coef", 0.0) > 0

    def reference_token_budget(self, task: str, preset: str, *, max_prompt_len: int,
                               max_response_len: int) -> int:
        if self.reference_budget is None:
            return max_prompt_len + max_response_len
        return dict(self.reference_budget_exceptions).get((task, preset), self.reference_budget)


def _check_rlcsd(hp, key: str) -> None:
    """Values the reference silently maps (algorithm.md §4.0, §8): errors naming the key."""
    for name in ("delta", "eta"):
        if hp[name] < 0:
            raise ValueError(f"{key}.{name}={hp[name]} must be >= 0 (the reference clamps "
                             f"it to max({name}, 0) without a word)")
    if hp["residual_clip_low"] > hp["residual_clip_high"]:
        raise ValueError(f"{key}.residual_clip_low={hp['residual_clip_low']} is above "
                         f"{key}.residual_clip_high={hp['residual_clip_high']} (the reference "
                         "swaps reversed bounds); give low <= high")


# Qwen3-4B's Knights & Knaves sdpo and srpo configs cut teacher rows at 32,768 tokens.
_QWEN3_4B_LOGIC = ((("logic", "qwen3-4b"), 32768),)

_SPECS = (
    MethodSpec("grpo", policy_gradient.grpo, "batch", 1.0, reference_budget=None),
    MethodSpec("opsd", distill.opsd, "per_rollout", 0.1, "fixed", "gt_solution",
               teacher_scoring="teacher_topk", reference_teacher_aware=True),
    MethodSpec("sdpo", distill.sdpo, "reference_micro_batch", 1.0, "ema", "gt_solution",
               teacher_scoring="student_topk", reference_teacher_aware=True,
               reference_budget_exceptions=_QWEN3_4B_LOGIC),
    MethodSpec("srpo", distill.srpo, "reference_micro_batch", 1.0, "ema", "gt_solution",
               teacher_scoring="student_topk", teacher_entropy=True, token_mean_loss=False,
               reference_budget_exceptions=_QWEN3_4B_LOGIC),
    MethodSpec("rlsd", policy_gradient.rlsd, "per_rollout", 1.0, "snapshot", "gt_solution",
               teacher_scoring="logp", reference_teacher_aware=True),
    MethodSpec("rlcsd", policy_gradient.rlcsd, "per_rollout", 1.0, "snapshot", "self_rollout",
               wrong_hints="k_max", teacher_scoring="logp", token_mean_loss=False,
               reference_teacher_aware=True, check_hparams=_check_rlcsd),
    MethodSpec("opsd_ectr", distill.opsd_ectr, "per_rollout", 0.1, "fixed", "self_rollout",
               wrong_hints="one", teacher_scoring="teacher_topk", reference_teacher_aware=True),
    MethodSpec("rlsd_ectr", policy_gradient.rlsd_ectr, "per_rollout", 1.0, "snapshot",
               "self_rollout", wrong_hints="one", teacher_scoring="logp",
               reference_teacher_aware=True),
)

METHODS: Mapping[str, MethodSpec] = types.MappingProxyType({s.name: s for s in _SPECS})


def find(**properties) -> str:
    """The one method whose table entries equal `properties` (e.g. the analysis's
    `find(teacher_context="gt_solution", teacher_scoring="logp")`)."""
    hits = [name for name, spec in METHODS.items()
            if all(getattr(spec, k) == v for k, v in properties.items())]
    if len(hits) != 1:
        raise LookupError(f"{len(hits)} methods have {properties}: {hits}")
    return hits[0]
