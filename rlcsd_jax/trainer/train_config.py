"""Shared defaults for every training config (algorithm.md §0, §1, §3, §4.0, §5).

A config file in `configs/` calls `get_base_config()`, sets the model / data / mesh fields that
differ, and returns the locked ConfigDict.  Method-specific loss hyper-parameters live under the
method's name (`config.rlcsd.tau`), filled from the loss functions' own defaults (the shipped
config values of §4.0), so `--config.rlcsd.tau=0.03` works on the command line and a typo fails.
Empty strings / negative numbers mean "the method's default" where noted.
"""

from __future__ import annotations

import ml_collections

from rlcsd_jax import losses

METHODS = tuple(losses.names())


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # The base model's seed: random init and supervised warm start (-1 = seed).  A fixed value
    # makes `seed` vary the RL run only, like RL runs from one pretrained checkpoint.
    c.base_seed = -1
    c.method = losses.DEFAULT_METHOD       # one of METHODS (rlcsd)

    # Model: `checkpoint` = an HF folder or a converted folder; empty = random init of `preset`.
    c.model = ml_collections.ConfigDict(dict(
        checkpoint="", preset="", dtype="bfloat16", param_dtype="float32",
        remat_policy="full", scan_layers=True, attention_impl="auto"))
    c.tokenizer = ""                        # folder; empty = model.checkpoint
    c.tiny_tokenizer_vocab = 512            # the tiny tokenizer built when both are empty
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.distributed = False                   # jax.distributed.initialize() (TPU pods)

    # Data: `train` / `eval` are comma-separated parquet / jsonl paths or generated K&K names
    # (e.g. "kk_4to8").  task selects the reward routing defaults and the eval sampling count.
    c.data = ml_collections.ConfigDict(dict(
        task="math", train="", eval="", shuffle=False, max_prompt_len=2048,
        num_generated_train=0, num_generated_eval=0, generator_seed=0, enable_thinking=True,
        kk_name_pool=0))                    # generated K&K: draw names from the first N (0 = all)

    # Rollouts (§1.3): G samples per prompt, 64 prompts per training step.
    c.rollout = ml_collections.ConfigDict(dict(
        group_size=8, prompts_per_step=64, max_new_tokens=16384, temperature=1.0, top_p=0.95,
        top_k=20,
        prompt_buckets=(),                  # prompt length buckets; () = data.packing's rule
        permute_rewards=False))             # control run: rewards shuffled across each step

    # Rollout engine (rlcsd_jax.inference, docs/engine.md): rollouts and evaluation decode
    # max_slots rows at once (over the whole mesh) from a paged KV pool, refilling slots as rows
    # end.  kv_budget_tokens: pool size in tokens over all devices; 0 = kv_memory_fraction of
    # each device's free memory when sampling starts (TPU / GPU), or enough for every slot at
    # the longest row where the backend reports no limit (CPU).  enabled=False: the static
    # sampler (every row decodes until the longest ends; small jobs and comparisons only).
    # replicate_weights_fraction: the compute-dtype weight copy the engine decodes with is
    # replicated on every device (no weight all-gather per decode step) when the whole copy
    # takes at most this fraction of a device's memory; otherwise (and where the backend
    # reports no limit) it keeps the training sharding.  0 = never replicate.
    c.engine = ml_collections.ConfigDict(dict(
        enabled=True, max_slots=512, page_size=32, steps_per_call=16, kv_budget_tokens=0,
        kv_memory_fraction=0.8, replicate_weights_fraction=0.25))

    # Update loop (§1.7, §5): 16-prompt mini-batches -> 4 optimizer steps per training step.
    c.train = ml_collections.ConfigDict(dict(
        num_steps=500, minibatch_prompts=16, lr=1e-6, warmup_steps=50, weight_decay=0.01,
        b1=0.9, b2=0.999, eps=1e-8,
        grad_clip=-1.0,                     # <0: method default (1.0; 0.1 for opsd*)
        loss_aggregation="",                # "": batch for grpo, reference_micro_batch for
                                            # srpo / sdpo, per_rollout for the others
        # Memory bound of scoring and the update: rows are cut into micro-batches of at most
        # this many tokens per device (like the reference's ppo_max_token_len_per_gpu; a longer
        # row runs alone), and the LM head runs on chunks of score_chunk tokens per device.
        micro_batch_tokens=40960, score_chunk=4096, distill_top_k=100,
        # Scoring runs each distinct prefix once: a teacher prompt + hint shared by a group's
        # contexts, a student prompt shared by its G rollouts (False: every row scored whole).
        share_teacher_prefixes=True,
        teacher_max_len=40960,              # token budget of a teacher sequence (§2.4)
        teacher_buckets=(),                 # scoring row buckets; () = data.packing's rule
        rollout_is=False, rollout_is_mode="token", rollout_is_threshold=2.0,  # §10.1, off
        # Start-up memory check: every program is compiled at its largest shape and its memory
        # compared with the device's limit (memory_stats()["bytes_limit"]) before sampling;
        # memory_limit_gb is the per-device budget where the backend reports none (CPU).
        check_memory=True, memory_limit_gb=0.0,
        inject_nonfinite_grad_at=-1))       # test hook: 1-based optimizer step given a NaN gradient

    # Teacher (§3): "" = the method's default mode.
    c.teacher = ml_collections.ConfigDict(dict(
        mode="", ema_decay=0.95, sync_interval=10,
        correct_privileged_hint_source="self_rollout", k_max=4))

    for name in METHODS:
        c[name] = ml_collections.ConfigDict(dict(losses.DEFAULTS[name]))

    # Evaluation (§5): mean@12 at T=0.6 for math, pass@1 (1 sample) for K&K.
    c.eval = ml_collections.ConfigDict(dict(
        every=50, before_train=True, at_end=True, temperature=0.6, top_p=0.95, top_k=20,
        num_samples=-1,                     # <0: 12 for math, 1 for logic
        max_new_tokens=38912, batch_prompts=64, max_examples=0))

    # Saves every `every` steps and also when `every_minutes` have passed since the last save
    # (0 = off), so a preemption loses little work when steps are long (docs/tpu.md).
    c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3, every_minutes=30.0))
    # wandb=True also logs to Weights & Biases (pip install 'rlcsd_jax[wandb]'); empty project /
    # entity / name = W&B's defaults.  The run id is kept in the workdir, so a resume continues.
    c.log = ml_collections.ConfigDict(dict(every=1, progress=True, wandb=False,
                                           wandb_project="rlcsd_jax", wandb_entity="",
                                           wandb_name=""))

    # Supervised warm start on dataset solutions before RL (used by the tiny demo).
    c.warm_start = ml_collections.ConfigDict(dict(
        steps=0, lr=1e-3, batch_size=32, warmup_steps=10, num_examples=0,
        target="solution",                  # "solution" (CoT + answer), "answer" only, or
                                            # "answer_hints": answer-only plus teacher-template
                                            # examples with correct / wrong hints (K&K)
        schedule="constant",                # after warmup: "constant" or "cosine" (to 0)
        # Held-out prompts on which role-token e_ctr / e_c are measured before and after RL
        # (K&K; analysis.role_tokens, run by `python -m rlcsd_jax.train`; in summary.json);
        # 0 = off.
        hint_diagnostics=0))
    return c


# The reference's `ppo_max_token_len_per_gpu` (§2.4, §5): the token budget of a
# teacher sequence (prompt + response; the prompt is cut from the left beyond it) and of its
# micro-batches.  40,960 in every distillation config but Qwen3-4B's Knights & Knaves sdpo and
# srpo configs (32,768); the grpo configs leave it unset (max prompt + max response).  The
# values are the method table's (`MethodSpec.reference_budget`, `reference_budget_exceptions`).
def reference_token_budget(task: str, preset: str, method: str, *, max_prompt_len: int,
                           max_response_len: int) -> int:
    """The reference's token budget for a (task, model preset, method) run (see above)."""
    return losses.METHODS[method].reference_token_budget(
        task, preset, max_prompt_len=max_prompt_len, max_response_len=max_response_len)


# Reference data layout (`scripts/download_data.py` of the reference places each file at
# data/verl/<name>/{train,val}.parquet, §7).
MATH_EVAL = "data/verl/amc23+aime24+aime25/val.parquet"
LOGIC_TRAIN = "data/verl/kk_4to8/train.parquet"
LOGIC_EVAL = "data/verl/kk_4to8_test+kk_9+kk_10+kk_11/val.parquet"


def reference_config(*, task: str, preset: str, checkpoint: str,
                     math_train: str) -> ml_collections.ConfigDict:
    """A full-size run as the reference ships it: G=8, 64 prompts/step, 16-prompt mini-batches,
    lr 1e-6 with 50 warmup steps, prompts <= 2048, responses <= 16384 (eval 38912), T=1.0,
    top-p 0.95, top-k 20, eval T=0.6, rlcsd tau 0.02 / beta 1 / lam 0.5 / delta 0.02 / eta 1 /
    clip +-2 / k_max 4, self-rollout hints, snapshot teacher every 10 optimizer steps, teacher
    token budget per task and method (40,960; 32,768 for Qwen3-4B K&K sdpo / srpo)."""
    if task not in ("math", "logic"):
        raise ValueError(f"task must be 'math' or 'logic', got {task!r}")
    c = get_base_config()
    c.model.preset = preset                 # architecture check when the checkpoint is absent
    c.model.checkpoint = checkpoint
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "full"           # gradient checkpointing on (§5)
    # FSDP over every chip of a v4 / v5 pod slice; add tensor parallelism for >= 8B if the
    # per-chip batch gets too small (see benchmarks/README.md).
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.task = task
    # -1: the reference's teacher budget for this task, model and the run's method
    # (`reference_token_budget`, resolved once the method is known: setup.check_config).
    c.train.teacher_max_len = -1
    c.data.train = math_train if task == "math" else LOGIC_TRAIN
    c.data.eval = MATH_EVAL if task == "math" else LOGIC_EVAL
    return c
