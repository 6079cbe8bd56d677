"""The embedded default: a tiny Qwen3-architecture model learning Knights & Knaves on a CPU.

No downloads: the tiny tokenizer is built into the workdir, Knights & Knaves puzzles are
generated, a short supervised warm start teaches the answer format, then RL (RLCSD by default;
any method with --config.method) trains on the verifier's reward.

Sized for a 2-core CPU in well under 10 minutes, which forces departures from the reference
(the measurements behind each choice are in docs/tiny_demo.md):
- answer-only responses (`<think>\n\n</think>` then the boxed answer, Qwen3's no-thinking form:
  ~20 tokens instead of ~200) and names from a pool of 4, so a 2-layer model need not learn to
  copy rare names;
- a 768-entry tiny tokenizer: K&K prompts take 99 tokens instead of 165 with 512 entries;
- 2-person puzzles only: answer-only supervision takes this model to a plateau of ~40% on them
  (chance 25%) and to ~10% with 3 people;
- `base_seed` pins the random init and the 400-step warm start (held-out ~0.38, at that
  plateau), so `--config.seed` varies the RL run only, like RL runs from one checkpoint;
- 8 prompts x 16 rollouts with one optimizer step per training step: with G = 16 few groups have
  <= 1 correct rollout, which RLCSD drops (all wrong) or keeps only as negatives;
- RL lr 3e-4: from 5e-4 up, rlcsd degrades or collapses (fewer correct rollouts -> more
  negative-only groups -> every group dropped); k_max = 2 wrong hints buys RL steps.
Held-out evaluation is 512 puzzles x 4 samples.  About 6 minutes per run.  Held-out pass@1
0.378 -> 0.401 / 0.421 / 0.441 for seeds 0-2; with permuted rewards the model degrades, and a
supervised continuation at the RL lr gains about as much (docs/tiny_demo.md).

    python -m rlcsd_jax.train --config=configs/tiny.py --workdir=/tmp/rlcsd_tiny
"""

from rlcsd_jax.trainer import train_config


def get_config():
    c = train_config.get_base_config()
    c.base_seed = 0
    c.tiny_tokenizer_vocab = 768
    c.model.preset = "qwen3-tiny"
    c.model.dtype = "float32"          # CPU: bf16 matmuls are emulated and slower
    c.model.remat_policy = "none"
    c.mesh.fsdp = 1
    c.data.task = "logic"
    c.data.train = "kk_2to2"
    c.data.eval = "kk_2to2_test"
    c.data.num_generated_train = 2000
    c.data.num_generated_eval = 512
    c.data.kk_name_pool = 4
    c.data.max_prompt_len = 512
    c.data.shuffle = True
    c.rollout.group_size = 16
    c.rollout.prompts_per_step = 8
    c.rollout.max_new_tokens = 32     # 2-person answers are ~20 tokens
    c.rollout.prompt_buckets = tuple(range(64, 1025, 32))   # fine buckets: less padding on CPU
    c.train.minibatch_prompts = 8      # one optimizer step per training step
    c.train.num_steps = 60
    c.train.lr = 3e-4                 # 1e-3 degrades rlcsd (see note)
    c.train.warmup_steps = 2
    c.train.teacher_max_len = 1024
    c.train.teacher_buckets = tuple(range(64, 2049, 64))
    c.train.distill_top_k = 32
    c.teacher.sync_interval = 10
    c.teacher.k_max = 2
    c.eval.every = 0
    c.eval.num_samples = 4
    c.eval.max_new_tokens = 32
    c.eval.batch_prompts = 64
    c.checkpoint.every = 20
    c.warm_start.steps = 400
    c.warm_start.lr = 3e-3
    c.warm_start.batch_size = 32
    c.warm_start.num_examples = 2000
    c.warm_start.target = "answer"
    return c
