"""The embedded default: a tiny Qwen3-architecture model learning Knights & Knaves on a CPU.

No downloads: the tiny tokenizer is built into the workdir, Knights & Knaves puzzles are
generated, a short supervised warm start teaches the answer format, then RL (RLCSD by default;
any method with --config.method) trains on the verifier's reward.

Sized for a 2-core CPU in under 10 minutes, which forces three departures from the reference:
the warm start and the rollouts use the answer-only form (`<think>\n\n</think>` then the boxed
answer, Qwen3's no-thinking form: ~25 response tokens instead of ~200), names come from a pool of
4 so a 2-layer model need not learn to copy rare names, and the learning rates are those of a
0.4M-parameter model, not of a 1.7B one.

    python -m rlcsd_jax.train --config=configs/tiny.py --workdir=/tmp/rlcsd_tiny
"""

from rlcsd_jax import config_base


def get_config():
    c = config_base.get_base_config()
    c.model.preset = "qwen3-tiny"
    c.model.dtype = "float32"          # CPU: bf16 matmuls are emulated and slower
    c.model.remat_policy = "none"
    c.mesh.fsdp = 1
    c.data.task = "logic"
    c.data.train = "kk_2to3"
    c.data.eval = "kk_2to3_test"
    c.data.num_generated_train = 2000
    c.data.num_generated_eval = 64
    c.data.kk_name_pool = 4
    c.data.max_prompt_len = 512
    c.data.shuffle = True
    c.rollout.group_size = 8
    c.rollout.prompts_per_step = 16
    c.rollout.max_new_tokens = 48
    c.rollout.prompt_buckets = tuple(range(64, 1025, 32))   # fine buckets: less padding on CPU
    c.train.minibatch_prompts = 4
    c.train.num_steps = 30
    c.train.lr = 1e-4                 # 5e-4 and 2e-3 collapse the tiny policy (see note)
    c.train.warmup_steps = 2
    c.train.teacher_max_len = 1024
    c.train.teacher_buckets = tuple(range(64, 2049, 64))
    c.train.score_chunk = 64
    c.train.distill_top_k = 32
    c.teacher.sync_interval = 10
    c.eval.every = 0
    c.eval.num_samples = 4
    c.eval.max_new_tokens = 48
    c.eval.batch_prompts = 64
    c.checkpoint.every = 10
    c.warm_start.steps = 300
    c.warm_start.lr = 3e-3
    c.warm_start.batch_size = 32
    c.warm_start.num_examples = 2000
    c.warm_start.target = "answer"
    return c
