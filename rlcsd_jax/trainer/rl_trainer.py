"""`Trainer`: one RL training step (algorithm.md §1.6–1.7) and the run around it.

    rollouts (sampler, G per prompt) -> rewards -> GRPO advantages (unfiltered groups)
    -> hints + drops / GT teacher -> old (and ref) log-probs -> for each mini-batch:
       teacher scoring with the teacher weights of that moment -> loss -> AdamW step
       -> teacher EMA / snapshot update
A step whose rollouts are all dropped makes no update and does not advance the schedule.

Multi-host (see `rlcsd_jax.distributed.multihost`): each process owns a contiguous block of the step's
prompts and does the host work (decoding, rewards, hints, packing) for its block; device work
runs on global arrays over the whole mesh; metrics are reduced over all processes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlcsd_jax import hints as hints_lib
from rlcsd_jax import inference, sampling
from rlcsd_jax.distributed import multihost
from rlcsd_jax.data.iterator import BatchIterator
from rlcsd_jax.data.tokenizer import load_tokenizer
from rlcsd_jax.trainer import batches as batches_lib
from rlcsd_jax.trainer import evaluation, microbatch, programs, rollout, setup
from rlcsd_jax.trainer import shared_passes, shared_scoring
from rlcsd_jax.trainer import state as state_lib
from rlcsd_jax.trainer import update as update_lib
from rlcsd_jax.trainer import warm_start


# --- preemption hook (used by trainer/loop.py) -----------------------------------------------
class Preempted(Exception):
    """`train_step` stopped right after sampling because `should_stop()` said so; nothing was
    updated, so the state is still that of the last completed step (`args[0]` = self.step)."""
# --- end preemption hook ----------------------------------------------------------------------


def _on_mesh(method):
    """Run a Trainer method with the run's mesh as JAX's context mesh: kernels that must run
    under shard_map (TPU splash attention) and the LM-head chunking read it while tracing."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return method(self, *args, **kwargs)
    return wrapped


class Trainer:
    should_stop = None   # preemption hook: a callable checked after sampling (trainer/run.py)

    def __init__(self, cfg, workdir: str):
        setup.check_config(cfg)
        self.cfg, self.workdir = cfg, workdir
        self.mesh = setup.make_mesh(cfg)
        setup.check_processes(cfg, self.mesh)
        self.tok_dir = setup.tokenizer_dir(cfg, workdir)
        self.tokenizer = load_tokenizer(self.tok_dir)
        self.pad_id = setup.pad_id(self.tokenizer)
        self.eos_ids = setup.stop_ids(cfg, self.tokenizer, self.tok_dir)
        self.encoder = rollout.PromptEncoder(self.tokenizer, cfg.data.enable_thinking)
        model = setup.build_model(cfg, self.tokenizer, self.mesh)
        self.model_config = model.config
        self.graphdef, params = setup.split_model(model)
        self.train_records, self.eval_records = setup.load_data(cfg, self.tokenizer)
        self.source_names = sorted({r.data_source for r in self.train_records})
        # Per process: its block of every global batch of prompts_per_step prompts.
        self.iterator = BatchIterator(self.train_records,
                                      cfg.rollout.prompts_per_step // jax.process_count(),
                                      seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.spec = setup.step_spec(cfg, cfg.rollout.max_new_tokens)
        self.minibatch_rows = cfg.train.minibatch_prompts * cfg.rollout.group_size  # global
        setup.check_mesh_batch(self.mesh, self.minibatch_rows, "a mini-batch")
        self.local_minibatch_rows = self.minibatch_rows // jax.process_count()
        self.need_ref = self.spec.need_ref
        self.state = state_lib.init_state(params, self.spec.tx, self.spec.teacher_mode,
                                          self.need_ref)
        self.step = 0                 # training steps attempted (data / RNG position)
        self.engine_stats = None      # the rollout engine's counters of its latest job
        self.prompt_buckets = tuple(cfg.rollout.prompt_buckets) or sampling.DEFAULT_BUCKETS
        self.teacher_buckets = tuple(cfg.train.teacher_buckets) or None
        if cfg.train.check_memory:
            self.check_memory()

    def check_memory(self) -> None:
        """Compile every program at its largest shape and stop, before any sampling, if one needs
        more memory than a device has (the planner's numbers, on the real devices)."""
        from rlcsd_jax.planner import compile as compile_lib
        from rlcsd_jax.planner import report

        limit = setup.device_memory_limit(self.cfg, self.mesh)
        if limit is None:
            return
        rs = programs.run_setup(self.cfg, self.mesh, eos_ids=self.eos_ids, pad_id=self.pad_id,
                                model_config=self.model_config)
        measured = compile_lib.compile_programs(rs, budget=limit, with_cost=False, log=False)
        problems = report.refusals(measured)
        if problems:
            raise MemoryError(f"{problems}\n(`python -m rlcsd_jax.plan` shows every program's "
                              "numbers for a TPU slice.)")

    # ------------------------------------------------------------------------------------------
    def to_global(self, tree, leading_axis: int = 0):
        """This process's block of a global batch (host arrays) -> global arrays with the batch
        axis over ('data', 'fsdp')."""
        return multihost.to_global(tree, self.mesh, leading_axis)

    def sampling_params(self):
        """Compute-dtype copy of the weights for decoding (halves the bytes read per token),
        replicated on every device when `setup.replicate_decode_weights` says it is cheap."""
        dtype = jnp.dtype(self.cfg.model.dtype)

        def cast(params):
            return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                                else x, params)
        copy_bytes = programs.bytes_of(programs.with_dtype(self.state.params, dtype))
        if setup.replicate_decode_weights(self.cfg, copy_bytes,
                                          setup.device_memory_limit(self.cfg, self.mesh)):
            everywhere = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            return jax.jit(cast, out_shardings=everywhere)(self.state.params)
        return cast(self.state.params)

    def generate_fn(self, options: sampling.SamplingOptions, max_new_tokens: int):
        """fn(ids, mask, key, num_samples): this process's left-padded prompts [P_local, Pb] ->
        its rows of the samples (host arrays), on the rollout engine (`cfg.engine`) or the
        static sampler.  The engine's counters of the latest call are in `self.engine_stats`."""
        params = self.sampling_params()
        cfg = self.cfg

        def static(ids, mask, key, num_samples):
            ids, mask = self.to_global((ids, mask))
            out = sampling.generate_arrays(
                self.graphdef, params, ids, mask, key, max_new_tokens=max_new_tokens,
                num_samples=num_samples, options=options, eos_ids=self.eos_ids,
                pad_id=self.pad_id, mesh=self.mesh)
            return multihost.to_host_local(out, self.mesh)

        def engine(ids, mask, key, num_samples):
            prompts = [row[m > 0].tolist() for row, m in zip(np.asarray(ids), np.asarray(mask))]
            rows = int(multihost.global_sum(len(prompts))) * num_samples
            kw = setup.engine_options(cfg, self.model_config, self.mesh,
                                      setup.free_device_memory(self.mesh), rows)
            out = inference.generate_batch(
                self.graphdef, params, prompts, num_samples=num_samples, options=options,
                max_new_tokens=max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id,
                seed_or_key=key, mesh=self.mesh, buckets=self.prompt_buckets, **kw)
            self.engine_stats = out.pop("stats")
            return out
        return engine if cfg.engine.enabled else static

    # ------------------------------------------------------------------------------------------
    @_on_mesh
    def train_step(self, records) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        options = sampling.SamplingOptions(cfg.rollout.temperature, cfg.rollout.top_k,
                                           cfg.rollout.top_p)
        key = jax.random.fold_in(jax.random.key(cfg.seed), self.step)
        ro = rollout.sample(self.generate_fn(options, cfg.rollout.max_new_tokens),
                            self.tokenizer, self.encoder, records, key,
                            group_size=cfg.rollout.group_size, buckets=self.prompt_buckets,
                            pad_id=self.pad_id)
        if cfg.rollout.permute_rewards:     # control: the same loop with uninformative rewards
            ro = rollout.permute_rewards(ro, setup.reward_permutation_rng(cfg.seed, self.step))
        t_sample = time.perf_counter()
        engine_stats, self.engine_stats = self.engine_stats, None
        if self.should_stop is not None and self.should_stop():   # preemption hook
            raise Preempted(self.step)
        rngs = setup.group_rngs(cfg.seed, self.step, jax.process_index() * len(records),
                                len(records))
        ctx = batches_lib.build_contexts(cfg.method, ro, self.encoder, rngs,
                                         hint_source=cfg.teacher.correct_privileged_hint_source,
                                         k_max=cfg.teacher.k_max)
        metrics = evaluation.rollout_metrics(ro, len(ctx.kept), self.source_names)
        metrics.update(_global_hint_stats(ctx.stats, cfg.method))
        loss_metrics, counts, times = [], {}, {"score": 0.0, "update": 0.0}
        if multihost.global_sum(len(ctx.kept)):
            loss_metrics, counts = self._update(ro, ctx, times)
            self.state = dataclasses.replace(self.state, train_step=self.state.train_step + 1)
        else:
            logging.info("step %d: every rollout was dropped; no update", self.step)
        metrics.update(evaluation.update_metrics(loss_metrics))
        metrics.update(counts)
        if engine_stats:
            metrics.update(engine_metrics(engine_stats))
        tokens = int(multihost.global_sum(ro.lengths.sum()))
        total = time.perf_counter() - t0
        metrics.update({"time/sample": t_sample - t0, "time/score": times["score"],
                        "time/update": times["update"], "time/step": total,
                        "perf/tokens_per_s": tokens / max(total, 1e-9),
                        "train/num_updates": float(len(loss_metrics)),
                        "train/skipped_steps": float(jax.device_get(self.state.skipped))})
        self.step += 1
        return metrics

    def _update(self, ro, ctx, times) -> tuple[list[dict], dict]:
        """Old log-probs of every rollout, then per mini-batch: teacher scoring and the gradient
        of each micro-batch, one optimizer step.  Returns (one metrics dict per mini-batch, the
        step's scoring token counters: student/tokens_computed ...).

        With `train.share_teacher_prefixes` the student and teacher scoring run each distinct
        prefix once (`shared_passes`) and hand the update host arrays; otherwise each
        micro-batch's full rows are scored on device."""
        cfg, spec = self.cfg, self.spec
        share = cfg.train.share_teacher_prefixes
        chunks = batches_lib.minibatch_rows(ctx.kept, self.local_minibatch_rows)
        # Every process takes part in every mini-batch; one with fewer survivors adds empty
        # (zero-mask) blocks.  Mini-batch j is the union of the processes' j-th blocks.
        empty = np.zeros(0, np.int64)
        chunks += [empty] * (multihost.global_max(len(chunks)) - len(chunks))
        plans, pos = [], 0
        for rows in chunks:
            positions = np.arange(pos, pos + len(rows))
            pos += len(rows)
            plans.append((rows, positions, self._micro_batches(ro, ctx, rows, positions)))
        t = time.perf_counter()
        counters = dict.fromkeys(("student/tokens_computed", "student/tokens_useful",
                                  "teacher/tokens_computed", "teacher/tokens_useful"), 0.0)
        old = self._shared_old_logprobs(ro, ctx.kept, counters) if share else None
        if not share:       # useful tokens as the shared pass counts them: each prompt once
            counters["student/tokens_useful"] += (1 + self.need_ref) * shared_scoring.useful_tokens(
                shared_scoring.student_rows(ro, ctx.kept, batches_lib.prompt_ids))
        students = []      # old / ref log-probs at the weights that sampled (§1.6)
        for rows, positions, micro in plans:
            students.append([self._student(ro, rows, positions, mb, old, counters)
                             for mb in micro])
        jax.block_until_ready(students)
        times["score"] += time.perf_counter() - t
        out, truncated_tokens = [], []
        for (rows, positions, micro), sbs in zip(plans, students):
            lr = np.float32(state_lib.learning_rate(int(jax.device_get(self.state.train_step)),
                                                    cfg.train.lr, cfg.train.warmup_steps))
            token_total = np.float32(multihost.global_sum(ro.lengths[rows].sum()))
            t1 = time.perf_counter()
            shared_teacher, truncated = None, 0
            if share and spec.teacher_mode is not None:
                shared_teacher, truncated = self._shared_teacher(ro, ctx, rows, positions,
                                                                 counters)
            times["score"] += time.perf_counter() - t1
            grads = update_lib.zero_grads(self.state.params)
            per_micro, diagnostics = [], []
            for mb, sb in zip(micro, sbs):
                t1 = time.perf_counter()
                teacher = {}
                if shared_teacher is not None:
                    teacher = self.to_global(shared_passes.micro_batch_slice(
                        shared_teacher, mb.rows, mb.local_rows, mb.response_width))
                elif spec.teacher_mode is not None:
                    if mb is micro[0]:      # each distinct prefix once per mini-batch
                        counters["teacher/tokens_useful"] += shared_scoring.useful_tokens(
                            shared_scoring.teacher_rows(ro, ctx, rows, positions,
                                                        max_len=cfg.train.teacher_max_len))
                    teacher, n = self._teacher(ro, ctx, rows, positions, mb, sb, counters)
                    truncated += n
                    jax.block_until_ready(teacher)
                t2 = time.perf_counter()
                grads, mets = update_lib.accumulate_grads(
                    self.graphdef, self.state.params, grads, sb, teacher, token_total, spec=spec)
                per_micro.append(dict(jax.device_get(mets)))
                diagnostics.append(jax.device_get(_student_diagnostics(sb)))
                times["score"] += t2 - t1
                times["update"] += time.perf_counter() - t2
            t2 = time.perf_counter()
            nan = int(jax.device_get(self.state.opt_step)) + 1 == cfg.train.inject_nonfinite_grad_at
            self.state, applied = update_lib.apply_grads(self.state, grads, lr, np.asarray(nan),
                                                         spec=spec)
            mets = update_lib.combine_metrics(per_micro)
            mets.update(_token_means(diagnostics))
            mets.update({k: float(v) for k, v in jax.device_get(applied).items()})
            mets["micro_batches"] = float(len(micro))
            out.append(mets)
            truncated_tokens.append(truncated)
            times["update"] += time.perf_counter() - t2
        keys = sorted(counters)         # one collective per step, not one per mini-batch
        totals = multihost.global_sum(np.asarray([counters[k] for k in keys] + truncated_tokens))
        if spec.teacher_mode is not None:
            for mets, total in zip(out, totals[len(keys):]):
                mets["teacher_prompt_truncated_tokens"] = float(total)
        return out, {k: float(v) for k, v in zip(keys, totals[:len(keys)])}

    def _micro_batches(self, ro, ctx, rows, positions):
        s_len, r_len = batches_lib.student_lengths(ro, rows)
        t_len = None
        if self.spec.teacher_mode is not None and not self.cfg.train.share_teacher_prefixes:
            t_len = batches_lib.teacher_lengths(ctx, positions, r_len,
                                                max_len=self.cfg.train.teacher_max_len)
        return microbatch.plan(s_len, t_len, r_len, budget=self.cfg.train.micro_batch_tokens,
                               devices_per_process=setup.batch_devices_per_process(self.mesh),
                               buckets=self.teacher_buckets,
                               split=setup.split_minibatches(self.cfg),
                               # the reference's grouping counts the teacher rows
                               contexts=ctx, positions=positions)

    def _shared_old_logprobs(self, ro, kept, counters) -> dict:
        """Old (and ref) log-probs and entropies of every kept rollout, each prompt once."""
        width = ro.tokens.shape[1]
        out, c = shared_passes.student_pass(self, ro, kept, self.state.params, width=width,
                                            entropy=True)
        arrays = {"old_logp": out["logp"], "entropy": out["entropy"]}
        if self.need_ref:
            ref, _ = shared_passes.student_pass(self, ro, kept, self.state.ref, width=width)
            arrays["ref_logp"] = ref["logp"]
        counters["student/tokens_computed"] += c["tokens_computed"] * (1 + self.need_ref)
        counters["student/tokens_useful"] += c["tokens_useful"] * (1 + self.need_ref)
        return arrays

    def _shared_teacher(self, ro, ctx, rows, positions, counters):
        """(per-rollout teacher outputs of a mini-batch, prompt tokens truncated on the left)."""
        spec, width = self.spec, ro.tokens.shape[1]
        student_ids = None
        if spec.method_spec.student_topk:     # the live student's own top-k (§3)
            ids, _ = shared_passes.student_pass(self, ro, rows, self.state.params, width=width,
                                                top_k=spec.top_k)
            student_ids = ids["topk_ids"]
        tparams = self.state.params if spec.teacher_mode == "fixed" else self.state.teacher
        arrays, c, truncated = shared_passes.teacher_pass(
            self, ro, ctx, rows, positions, tparams, width=width, student_ids=student_ids)
        counters["teacher/tokens_computed"] += c["tokens_computed"]
        counters["teacher/tokens_useful"] += c["tokens_useful"]
        return arrays, truncated

    def _student(self, ro, rows, positions, mb, old, counters) -> dict:
        """One micro-batch's student arrays on device, with old (and ref) log-probs: computed
        here from its full rows, or sliced from the shared pass's arrays `old`."""
        sb = batches_lib.student_batch(ro, rows[mb.rows], mb.local_rows, mb.student_width,
                                       mb.response_width, self.pad_id)
        if old is not None:
            sb.update(shared_passes.micro_batch_slice(old, positions[mb.rows], mb.local_rows,
                                                      mb.response_width))
            return self.to_global(sb)
        sb = self.to_global(sb)
        sb.update(update_lib.old_logprobs(self.graphdef, self.state.params, self.state.ref, sb,
                                          spec=self.spec, with_ref=self.need_ref))
        counters["student/tokens_computed"] += (mb.local_rows * mb.student_width
                                                * (1 + self.need_ref))
        return sb

    def _teacher(self, ro, ctx, rows, positions, mb, sb, counters):
        """(teacher outputs of one micro-batch from its full rows, prompt tokens truncated)."""
        spec = self.spec
        k_slots = batches_lib.num_wrong_slots(self.cfg.method, self.cfg.teacher.k_max)
        tb = batches_lib.teacher_arrays(
            ro, ctx, positions[mb.rows], rows[mb.rows], mb.local_rows, k_slots=k_slots,
            max_len=self.cfg.train.teacher_max_len, pad_id=self.pad_id, width=mb.teacher_width)
        truncated = int(np.sum(tb.pop("truncated_prompt_tokens")))
        counters["teacher/tokens_computed"] += tb["input_ids"].size
        wrong_valid = self.to_global(tb.pop("wrong_valid"))
        tb = dict(self.to_global(tb, leading_axis=1), wrong_valid=wrong_valid)
        tparams = self.state.params if spec.teacher_mode == "fixed" else self.state.teacher
        ids = (update_lib.student_topk_ids(self.graphdef, self.state.params, sb, spec=spec)
               if spec.method_spec.student_topk else None)
        teacher = update_lib.teacher_outputs(self.graphdef, tparams, tb, ids, spec,
                                             length=mb.response_width)
        return teacher, truncated

    @_on_mesh
    def warm_start(self) -> None:
        """Supervised warm start; its weights become the RL start (teacher and KL ref too)."""
        cfg = self.cfg
        records = self.train_records
        if cfg.warm_start.num_examples > 0:
            records = records[:cfg.warm_start.num_examples]
        examples = warm_start.encode_examples(records, self.encoder, self.tokenizer,
                                              self.eos_ids[0], cfg.warm_start.target)
        # Every process draws the same global batch; each contributes its block of it.
        params = warm_start.warm_start(
            self.graphdef, self.state.params, examples, steps=cfg.warm_start.steps,
            batch_size=cfg.warm_start.batch_size, lr=cfg.warm_start.lr,
            warmup_steps=cfg.warm_start.warmup_steps, schedule=cfg.warm_start.schedule,
            seed=setup.base_seed(cfg), pad_id=self.pad_id,
            buckets=self.teacher_buckets,
            put=lambda batch: self.to_global(multihost.local_block(batch)))
        self.state = state_lib.init_state(params, self.spec.tx, self.spec.teacher_mode,
                                          self.need_ref)

    # ------------------------------------------------------------------------------------------
    @_on_mesh
    def evaluate(self) -> dict:
        cfg = self.cfg
        if not self.eval_records:
            return {}
        options = sampling.SamplingOptions(cfg.eval.temperature, cfg.eval.top_k, cfg.eval.top_p)
        records = self.eval_records
        if cfg.eval.max_examples > 0:
            records = records[:cfg.eval.max_examples]
        fn = self.generate_fn(options, cfg.eval.max_new_tokens)
        # The engine takes every problem in one job (its slots bound the memory, and a long
        # row no longer holds up a chunk); the static sampler goes eval.batch_prompts at a time.
        batch = len(records) if cfg.engine.enabled else cfg.eval.batch_prompts
        out = evaluation.evaluate(fn, self.tokenizer, self.encoder, records,
                                  batch_prompts=batch, num_samples=setup.eval_samples(cfg),
                                  seed=cfg.seed + 7919, pad_id=self.pad_id,
                                  buckets=self.prompt_buckets)
        if self.engine_stats:
            out.update({f"eval/{k}": v for k, v in engine_metrics(self.engine_stats).items()})
            self.engine_stats = None
        return out


def engine_metrics(stats: dict) -> dict:
    """The rollout engine's counters of one generation job as step metrics: busy_slot_fraction
    = useful slot-steps / slot-steps decoded (1.0 = no slot idled while others worked)."""
    out = {f"engine/{k}": float(v) for k, v in stats.items()}
    out["engine/busy_slot_fraction"] = (float(stats["busy_slot_steps"])
                                        / max(float(stats["total_slot_steps"]), 1.0))
    return out


@jax.jit
def _student_diagnostics(sb: dict) -> dict:
    """Token sums over the (global) micro-batch, computed on device (`_token_means` divides)."""
    mask = sb["response_mask"].astype(jnp.float32)
    # Sampler vs trainer log-probs of the same tokens at the same weights: should be ~0
    # (fp32) / small (bf16); a large value means a mis-aligned or mismatched forward.
    return {"entropy": jnp.sum(sb["entropy"] * mask),
            "sampler_logp_abs_diff": jnp.sum(jnp.abs(sb["old_logp"] - sb["sampler_logp"]) * mask),
            "tokens": jnp.sum(mask)}


def _token_means(sums: list[dict]) -> dict:
    tokens = max(sum(float(x["tokens"]) for x in sums), 1.0)
    return {k: sum(float(x[k]) for x in sums) / tokens for k in sums[0] if k != "tokens"}


def _global_hint_stats(stats: dict, method: str) -> dict:
    """Hint / drop statistics of the whole step (each process built its groups' hints)."""
    if not stats or jax.process_count() == 1:
        return stats
    prefix = f"{method}/"
    keys = sorted(stats)
    rows = multihost.allgather(np.asarray([[stats[k] for k in keys]], np.float64))
    parts = [{k[len(prefix):]: float(v) for k, v in zip(keys, row)} for row in rows]
    return {prefix + k: v for k, v in hints_lib.merge_stats(parts).items()}
