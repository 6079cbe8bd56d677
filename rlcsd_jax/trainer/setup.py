"""Building what a run needs from its config: mesh, tokenizer, model, data, step spec.

Config semantics are resolved here, once: method defaults (teacher mode, grad clip,
aggregation; algorithm.md §3, §4.0, §4.9), the tiny random model, K&K generation.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlcsd_jax import losses, models
from rlcsd_jax.inference import kv_budget_tokens_for_bytes
from rlcsd_jax.trainer import state as state_lib
from rlcsd_jax.trainer import train_config
from rlcsd_jax.distributed import multihost, sharding
from rlcsd_jax.data import prompts as prompts_lib
from rlcsd_jax.data import readers
from rlcsd_jax.data.records import Record
from rlcsd_jax.data.tokenizer import build_tiny_tokenizer, stop_token_ids
from rlcsd_jax.trainer import microbatch
from rlcsd_jax.trainer.update import StepSpec

# "reference_micro_batch": the reference's micro-batches, each normalised on its own and
# weighted by its rollouts / M (`microbatch.ReferenceRule`, `update._loss`).
ALLOWED_AGGREGATIONS = ("per_rollout", "batch", "reference_micro_batch")


def check_config(cfg) -> None:
    methods = losses.names()
    if cfg.method not in methods:
        raise ValueError(f"config.method={cfg.method!r}; allowed: {', '.join(methods)}")
    if cfg.train.loss_aggregation not in ("",) + ALLOWED_AGGREGATIONS:
        raise ValueError(f"config.train.loss_aggregation={cfg.train.loss_aggregation!r}; "
                         f"allowed: '' (method default), {', '.join(ALLOWED_AGGREGATIONS)}")
    if cfg.teacher.mode not in ("", "fixed", "ema", "snapshot"):
        raise ValueError(f"config.teacher.mode={cfg.teacher.mode!r}; allowed: '' (method "
                         "default), fixed, ema, snapshot")
    if cfg.rollout.prompts_per_step % cfg.train.minibatch_prompts:
        raise ValueError(f"config.rollout.prompts_per_step={cfg.rollout.prompts_per_step} must "
                         f"be a multiple of config.train.minibatch_prompts="
                         f"{cfg.train.minibatch_prompts}")
    check_values(cfg)
    resolve_config(cfg)


# Values the reference silently maps (§4.0, §8; docs/reference_differences.md):
# here they are errors that name the key.
def check_values(cfg) -> None:
    """Hyper-parameters outside their domain: a ValueError naming the key and what the
    reference would have done with the value instead."""
    for name, method in losses.METHODS.items():     # each method's block (the table's check)
        if method.check_hparams is not None:
            method.check_hparams(cfg[name], f"config.{name}")
    if cfg.teacher.k_max < 1:
        raise ValueError(f"config.teacher.k_max={cfg.teacher.k_max} must be >= 1: the number "
                         "of wrong hints per rollout (the reference reads 0 as its default 4, "
                         "and a negative value as 1)")
    if cfg.rollout.temperature < 0:
        raise ValueError(f"config.rollout.temperature={cfg.rollout.temperature} must be >= 0 "
                         "(0: greedy)")
    if cfg.model.param_dtype not in PARAM_DTYPES:
        raise ValueError(f"config.model.param_dtype={cfg.model.param_dtype!r}; allowed: "
                         f"{', '.join(PARAM_DTYPES)}")


PARAM_DTYPES = ("float32", "bfloat16")


def resolve_config(cfg) -> None:
    """Fills, in place, the keys whose default depends on the method (known only once the
    command line is applied): `train.teacher_max_len` < 0 becomes the reference's budget for
    the task, model preset and method (`train_config.reference_token_budget`)."""
    if cfg.train.teacher_max_len < 0:
        cfg.train.teacher_max_len = train_config.reference_token_budget(
            cfg.data.task, cfg.model.preset, cfg.method, max_prompt_len=cfg.data.max_prompt_len,
            max_response_len=cfg.rollout.max_new_tokens)
        logging.info("train.teacher_max_len = %d (the reference's budget for %s / %s / %s)",
                     cfg.train.teacher_max_len, cfg.data.task, cfg.model.preset or "-",
                     cfg.method)


def teacher_mode(cfg) -> str | None:
    default = losses.METHODS[cfg.method].teacher_mode
    if default is None:
        return None
    return cfg.teacher.mode or default


def aggregation(cfg) -> str:
    return cfg.train.loss_aggregation or losses.METHODS[cfg.method].aggregation


def step_spec(cfg, response_len: int) -> StepSpec:
    hp = dict(cfg[cfg.method])
    grad_clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else losses.METHODS[
        cfg.method].grad_clip
    return StepSpec(
        method=cfg.method, hparams=tuple(sorted(hp.items())), aggregation=aggregation(cfg),
        response_len=response_len, chunk=cfg.train.score_chunk,
        minibatch_rows=cfg.train.minibatch_prompts * cfg.rollout.group_size,
        top_k=cfg.train.distill_top_k,
        teacher_mode=teacher_mode(cfg), ema_decay=cfg.teacher.ema_decay,
        sync_interval=cfg.teacher.sync_interval, grad_clip=grad_clip,
        adam=(cfg.train.b1, cfg.train.b2, cfg.train.eps, cfg.train.weight_decay),
        rollout_is=((cfg.train.rollout_is_mode, cfg.train.rollout_is_threshold)
                    if cfg.train.rollout_is else None),
        temperature=training_temperature(cfg))


def training_temperature(cfg) -> float:
    """The T of every training log-prob (old, current, reference, teacher): log-softmax of
    logits / T at the rollout temperature, as the sampler's own log-probs (§1.3);
    greedy rollouts (T = 0) are scored at T = 1, as the sampler scores them."""
    t = float(cfg.rollout.temperature)
    return t if t > 0 else 1.0


def make_mesh(cfg):
    return sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor)


def tokenizer_dir(cfg, workdir: str) -> str:
    """The tokenizer folder; a random-init model without one gets the tiny tokenizer."""
    path = cfg.tokenizer or cfg.model.checkpoint
    if path:
        return path
    path = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        if jax.process_index() == 0:
            build_tiny_tokenizer(path, vocab_size=cfg.tiny_tokenizer_vocab)
        multihost.sync("tiny tokenizer written")
    return path


def model_options(cfg) -> dict:
    """The run's model settings (dtypes, remat, layer scan, attention) as keyword arguments of
    `models.load`, `models.config_for` and `models.get_preset`."""
    return dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                remat_policy=cfg.model.remat_policy, scan_layers=cfg.model.scan_layers,
                attention_impl=cfg.model.attention_impl)


def build_model(cfg, tokenizer, mesh):
    """Load the checkpoint (HF or converted folder) or randomly initialise the preset."""
    kw = model_options(cfg)
    if cfg.model.checkpoint:
        return models.load(cfg.model.checkpoint, mesh=mesh, **kw)
    if not cfg.model.preset:
        raise ValueError("set config.model.checkpoint (an HF or converted folder) or "
                         "config.model.preset for a randomly initialised model")
    mcfg = models.get_preset(cfg.model.preset, vocab_size=len(tokenizer), **kw)
    logging.info("random init of %s with vocab %d (%d params)", cfg.model.preset,
                 mcfg.vocab_size, models.num_params(mcfg))
    return sharding.shard_model(random_init(mcfg, base_seed(cfg)), mesh)


def random_init(mcfg, seed: int):
    """A random init made in float32 and rounded to `mcfg.param_dtype`: a bf16 model is the
    bf16 copy of the float32 one of the same seed (as a bf16 checkpoint of the same weights)."""
    import dataclasses

    if jnp.dtype(mcfg.param_dtype) == jnp.float32:
        return models.build(mcfg, seed=seed)
    full = nnx.state(models.build(dataclasses.replace(mcfg, param_dtype="float32"), seed=seed))
    rounded = jax.tree.map(lambda x: x.astype(mcfg.param_dtype)
                           if jnp.issubdtype(x.dtype, jnp.floating) else x, full)
    return nnx.merge(nnx.split(models.abstract_model(mcfg))[0], rounded)


def base_seed(cfg) -> int:
    """Seed of the base model (random init, warm start): ``cfg.base_seed``, or ``cfg.seed``."""
    return cfg.base_seed if cfg.base_seed >= 0 else cfg.seed


def read_split(spec: str, cfg, num_generated: int, seed_offset: int) -> list[Record]:
    """Comma-separated parquet / jsonl paths or generated K&K names."""
    records: list[Record] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        records += readers.read_records(part, num_examples=num_generated or None,
                                        seed=cfg.data.generator_seed + seed_offset,
                                        kk_name_pool=cfg.data.kk_name_pool or None)
    return records


def load_data(cfg, tokenizer):
    """(train records, eval records) after dropping prompts longer than max_prompt_len."""
    if not cfg.data.train:
        raise ValueError("config.data.train is empty: give parquet / jsonl paths or a K&K name")
    train = read_split(cfg.data.train, cfg, cfg.data.num_generated_train, 0)
    evals = read_split(cfg.data.eval, cfg, cfg.data.num_generated_eval, 1) if cfg.data.eval else []
    out = []
    for name, recs in (("train", train), ("eval", evals)):
        kept, dropped = prompts_lib.filter_long_prompts(
            recs, tokenizer, cfg.data.max_prompt_len, enable_thinking=cfg.data.enable_thinking)
        if dropped:
            logging.warning("%s: dropped %d of %d prompts longer than %d tokens", name, dropped,
                            len(recs), cfg.data.max_prompt_len)
        out.append(kept)
    return out[0], out[1]


def stop_ids(cfg, tokenizer, tok_dir: str) -> list[int]:
    return stop_token_ids(tok_dir if os.path.isdir(tok_dir) else tokenizer)


def pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def split_model(model):
    graphdef, params = nnx.split(model)
    return graphdef, params


def eval_samples(cfg) -> int:
    if cfg.eval.num_samples > 0:
        return cfg.eval.num_samples
    return 12 if cfg.data.task == "math" else 1


def device_memory_limit(cfg, mesh) -> float | None:
    """Bytes one device may use: the backend's own limit (TPU, GPU), else
    `train.memory_limit_gb` (0 = unknown: no check)."""
    device = mesh.devices.flat[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics (CPU)
        stats = {}
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    return cfg.train.memory_limit_gb * 2**30 or None


def free_device_memory(mesh) -> float | None:
    """Bytes a device of `mesh` has free now (its limit minus what is in use), or None where
    the backend reports no limit (CPU)."""
    try:
        stats = mesh.devices.flat[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics (CPU)
        stats = {}
    if not stats.get("bytes_limit"):
        return None
    return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def replicate_decode_weights(cfg, copy_bytes: float, memory_limit: float | None) -> bool:
    """Whether the engine decodes with a replicated weight copy (`engine.replicate_weights_
    fraction`): an FSDP-sharded copy is all-gathered at every decode step, which on a small
    slot count per device reads several times the weights' bytes per token; a replicated one
    costs `copy_bytes` (the whole copy) on every device instead."""
    frac = float(cfg.engine.replicate_weights_fraction)
    return bool(cfg.engine.enabled and frac > 0 and memory_limit
                and copy_bytes <= frac * memory_limit)


def engine_options(cfg, model_config, mesh, free_bytes_per_device: float | None,
                   rows: int) -> dict:
    """`inference.generate_batch` keywords for a job of `rows` output rows (`cfg.engine`).

    free_bytes_per_device: memory a device has left for the page pool (the backend's limit
    minus what is in use; None where it reports none).  Slots: engine.max_slots, at most the
    rows rounded up to the batch shards; a job that fits in one wave keeps its slots to the
    end (one decode program).  The pool holds engine.kv_budget_tokens, or kv_memory_fraction
    of the free memory, or (neither known) every slot at the longest row."""
    e = cfg.engine
    shards = int(mesh.shape["data"] * mesh.shape["fsdp"]) if mesh is not None else 1
    slots = min(int(e.max_slots), -(-int(rows) // shards) * shards)
    budget = int(e.kv_budget_tokens) or None
    if budget is None and free_bytes_per_device:
        budget = kv_budget_tokens_for_bytes(model_config, e.kv_memory_fraction
                                            * free_bytes_per_device, mesh)
    return dict(max_slots=slots, min_slots=slots if rows <= slots else None,
                page_size=int(e.page_size), steps_per_call=int(e.steps_per_call),
                kv_budget_tokens=budget)


def split_minibatches(cfg) -> bool | microbatch.ReferenceRule:
    """How mini-batches are cut into micro-batches (`microbatch.plan`'s `split`): by the token
    budget (True), but not for a batch-aggregated loss that is not one token-mean (rlcsd, srpo),
    which needs its whole mini-batch at once (False); under reference_micro_batch aggregation,
    the reference's rule with its budget `train.teacher_max_len` (a `ReferenceRule`)."""
    agg = aggregation(cfg)
    if agg == "reference_micro_batch":
        budget = cfg.train.teacher_max_len
        if budget <= 0:          # not resolved yet (check_config resolves it)
            budget = train_config.reference_token_budget(
                cfg.data.task, cfg.model.preset, cfg.method,
                max_prompt_len=cfg.data.max_prompt_len, max_response_len=cfg.rollout.max_new_tokens)
        return microbatch.reference_rule(
            cfg.method, budget=budget,
            minibatch_rows=cfg.train.minibatch_prompts * cfg.rollout.group_size,
            has_teacher=teacher_mode(cfg) is not None)
    return agg == "per_rollout" or losses.METHODS[cfg.method].token_mean_loss


def batch_devices_per_process(mesh) -> int:
    """Devices of the batch mesh axes ('data' x 'fsdp') that one process feeds."""
    return mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count()


def check_mesh_batch(mesh, rows: int, what: str) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % n:
        raise ValueError(f"{what} has {rows} rows, not divisible by data x fsdp = {n}")


def check_processes(cfg, mesh) -> None:
    """Multi-host: the mesh spans every host, and every process owns whole prompts of every
    step and mini-batch."""
    count = jax.process_count()
    if count > 1 and mesh.devices.size != jax.device_count():
        raise ValueError(f"config.mesh ({dict(mesh.shape)}) uses {mesh.devices.size} of the "
                         f"{jax.device_count()} devices of a {count}-process job; a multi-host "
                         "mesh must use all of them (set one mesh axis to -1)")
    for key in ("rollout.prompts_per_step", "train.minibatch_prompts", "eval.batch_prompts",
                "warm_start.batch_size"):
        section, name = key.split(".")
        if cfg[section][name] % count:
            raise ValueError(f"config.{key}={cfg[section][name]} must be a multiple of the "
                             f"{count} processes (each process owns whole prompts)")


def reward_permutation_rng(seed: int, step: int) -> np.random.Generator:
    """The `rollout.permute_rewards` control's shuffle for one step: a stream of its own (its
    own spawn key), so it never repeats a group's hint draws from `group_rngs`."""
    return np.random.default_rng(np.random.SeedSequence([seed, step], spawn_key=(1,)))


def group_rngs(seed: int, step: int, first_group: int, num_groups: int):
    """One generator per prompt group (hint choice), keyed by the group's index in the GLOBAL
    batch: the draws do not depend on how the batch is split over hosts."""
    return [np.random.default_rng([seed, step, first_group + i]) for i in range(num_groups)]


def model_config(cfg, vocab_size: int | None = None):
    """The architecture a run will use, without loading weights."""
    kw = model_options(cfg)
    path = os.path.expanduser(cfg.model.checkpoint)
    if cfg.model.checkpoint and os.path.exists(os.path.join(path, "config.json")):
        return models.config_for(path, **kw)
    if vocab_size is not None:
        kw["vocab_size"] = vocab_size
    return models.get_preset(cfg.model.preset, **kw)


def abstract_build(cfg) -> dict:
    """Shapes and shardings of the whole train state on the configured mesh (no memory):
    catches config typos, mesh / divisibility problems and per-chip sizes before a TPU job."""
    check_config(cfg)
    mesh = make_mesh(cfg)
    mcfg = model_config(cfg)
    graphdef, params = nnx.split(models.abstract_model(mcfg))
    shardings = sharding.param_shardings(params, mesh)
    spec = step_spec(cfg, cfg.rollout.max_new_tokens)
    state = jax.eval_shape(
        lambda p: state_lib.init_state(p, spec.tx, spec.teacher_mode, spec.need_ref), params)

    def nbytes(tree):
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    return dict(model_config=mcfg, spec=spec, mesh=mesh, state=state, shardings=shardings,
                num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
                param_bytes=nbytes(params), opt_state_bytes=nbytes(state.opt_state))
