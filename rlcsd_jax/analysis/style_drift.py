"""Which tokens carry the distillation signal?  The paper's Figure 1a analysis.

    python -m rlcsd_jax.analyze_style --config=configs/tiny.py --out=DIR [--num_prompts=8]
        [--checkpoint=HF_OR_CONVERTED_DIR] [--warm_start_steps=0] [--group_size=0]
        [--max_new_tokens=0] [--hint_source=auto] [--min_count=3] [--num_top=10]
        [--split=train] [--seed=0] [--row=-1] [--workdir=DIR] [--config.KEY=VALUE ...]

For G rollouts of each of N prompts, the rlcsd hint contexts are built and scored with the
trainer's own code (`batches.build_contexts` / `teacher_arrays`, `update.teacher_outputs`,
`update.old_logprobs`), and `losses.signal_diagnostics` gives two per-token signals:

    e_c   = lp_T(y | correct hint) − lp_S(y)              (the OPD / RLSD-style signal)
    e_ctr = lp_T(y | correct) − log mean_k p_T(y | wrong_k)   (the RLCSD contrast, algorithm.md §4.8)

Style tokens (formatting, connectives) move e_c a lot because any hint changes the teacher's
style, but they cancel in e_ctr, where the correct and wrong hints share the template.  Per
decoded token string we report the mean |e_c| and mean |e_ctr| (tokens seen fewer than
`min_count` times are left out) and write

    DIR/style_tokens.md    two markdown tables: top tokens by mean |e_c| and by mean |e_ctr|
    DIR/style_tokens.json  the same numbers for every token, plus which hint source was used
    DIR/style_drift.png    one response, tokens coloured by e_c (top row) and e_ctr (bottom)

(the reports themselves are built by `rlcsd_jax.analysis.style_report`).

Hint sources (`--hint_source=auto`): self_rollout hints (the method's default) first; if every
rollout is dropped (e.g. an untrained model gets everything wrong) the GT solution becomes the
correct hint (gt_cot); if that still leaves nothing (no wrong rollout has a \\boxed{} answer, so
no wrong hint exists) only e_c is computed, against the GT-solution teacher.  The source used
is logged and written into both outputs.  With no --checkpoint the config's model is used
(the tiny random model for configs/tiny.py; add --warm_start_steps=300 to warm-start it first).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile

import numpy as np

from rlcsd_jax import hints, sampling
from rlcsd_jax import losses
from rlcsd_jax.data import storage
from rlcsd_jax.analysis.style_report import (pick_row, render_png, render_table, token_stats,
                                    top_tokens)
from rlcsd_jax.data.packing import bucket_length
from rlcsd_jax.rewards import last_boxed
from rlcsd_jax.trainer import batches, rollout, setup, update

log = logging.getLogger("rlcsd_jax.analysis.style_drift")

HINT_SOURCES = ("auto", "self_rollout", "gt_cot")
SOURCE_CORRECT_ONLY = "gt_cot (correct hint only: e_c without e_ctr)"


# ---------------------------------------------------------------------------------------------
# Signals (device work through the trainer's code)
# ---------------------------------------------------------------------------------------------

def collect_signals(trainer, records, *, group_size: int = 0, max_new_tokens: int = 0,
                    seed: int = 0, hint_source: str = "auto", k_max: int = 0,
                    generate_fn=None) -> dict:
    """Sample G rollouts per record and compute per-token e_c / e_ctr on the kept rollouts.

    trainer: a `trainer.loop.Trainer` (its weights are the student; its teacher weights, or
    the same weights before any update, are the teacher).  group_size / max_new_tokens /
    k_max: 0 = the trainer's config.  generate_fn: the sampler (default: the trainer's, with
    the config's rollout sampling options).

    Returns a dict: source (hint source used, or "none"), message (what happened, including
    fallbacks; "" when none was needed), rows [R'] (kept rollout indices), token_ids / mask /
    e_c / e_ctr [R', N] (e_ctr is NaN when no wrong hint existed), rewards [R'], texts (kept
    rows), has_e_ctr, num_rollouts, stats (drop statistics per source tried), rollouts,
    contexts.
    """
    import jax


    cfg = trainer.cfg
    g = group_size or cfg.rollout.group_size
    n_new = max_new_tokens or cfg.rollout.max_new_tokens
    k_max = k_max or cfg.teacher.k_max
    if hint_source not in HINT_SOURCES:
        raise ValueError(f"hint_source={hint_source!r}; allowed: {', '.join(HINT_SOURCES)}")
    if generate_fn is None:
        options = sampling.SamplingOptions(cfg.rollout.temperature, cfg.rollout.top_k,
                                           cfg.rollout.top_p)
        generate_fn = trainer.generate_fn(options, n_new)
    ro = rollout.sample(generate_fn, trainer.tokenizer, trainer.encoder, list(records),
                        jax.random.key(seed), group_size=g, buckets=sampling.DEFAULT_BUCKETS,
                        pad_id=trainer.pad_id)
    n_rows = len(ro.texts)

    def group_rngs():   # the trainer's per-group hint draws (as at training step 0)
        return setup.group_rngs(seed, 0, 0, len(ro.records))

    first = hints.normalize_hint_source(
        cfg.teacher.correct_privileged_hint_source if hint_source == "auto" else hint_source)
    order = [first] + (["gt_cot"] if hint_source == "auto" and first != "gt_cot" else [])
    notes, stats, ctx, source = [], {}, None, "none"
    for src in order:
        try:
            ctx = batches.build_contexts(signal_method(True), ro, trainer.encoder,
                                         group_rngs(), hint_source=src, k_max=k_max)
        except ValueError as e:         # gt_cot without a dataset solution
            notes.append(f"{src} hints unavailable: {e}")
            ctx = None
            continue
        stats[src] = ctx.stats
        if len(ctx.kept):
            source = src
            break
        notes.append(f"every rollout was dropped under {src} hints ({_why_dropped(ro, ctx)})")
        ctx = None
    has_ctr = ctx is not None
    if ctx is None and hint_source == "auto":
        try:   # the GT-solution teacher keeps every rollout: e_c is still defined
            ctx = batches.build_contexts(signal_method(False), ro, trainer.encoder,
                                         group_rngs(), hint_source="gt_cot", k_max=k_max)
            source = SOURCE_CORRECT_ONLY
        except ValueError as e:
            notes.append(f"GT-solution hints unavailable: {e}")
    if ctx is not None and source != order[0]:
        notes.append(f"falling back to {source}")
    message = "; ".join(notes)
    for note in notes:
        log.warning("%s", note)
    log.info("hint source used: %s (%d of %d rollouts kept)", source,
             0 if ctx is None else len(ctx.kept), n_rows)
    out = dict(source=source, message=message, has_e_ctr=has_ctr, num_rollouts=n_rows,
               stats=stats, rollouts=ro, contexts=ctx, group_size=g)
    if ctx is None:
        empty = np.zeros((0, ro.tokens.shape[1]))
        return dict(out, rows=np.zeros(0, np.int64), token_ids=empty.astype(np.int32),
                    mask=empty.astype(np.int32), e_c=empty, e_ctr=empty,
                    rewards=np.zeros(0, np.float32), texts=[])
    with jax.set_mesh(trainer.mesh):
        e_c, e_ctr = _score_signals(trainer, ro, ctx, k_max=k_max, with_ctr=has_ctr)
    rows = np.asarray(ctx.kept)
    return dict(out, rows=rows, token_ids=ro.tokens[rows].astype(np.int32),
                mask=ro.response_mask()[rows], e_c=e_c, e_ctr=e_ctr,
                rewards=ro.rewards[rows], texts=[ro.texts[r] for r in rows])


def _why_dropped(ro, ctx) -> str:
    g = ro.group_size
    groups = ro.rewards.reshape(-1, g) > 0
    boxed = sum(last_boxed(t) is not None for t in ro.texts)
    return (f"{int(groups.all(1).sum())} all-correct, {int((~groups).all(1).sum())} all-wrong "
            f"of {len(groups)} groups; {boxed} of {len(ro.texts)} rollouts have a \\boxed{{}} "
            f"answer; kept {len(ctx.kept)}")


def signal_method(with_ctr: bool) -> str:
    """The method whose contexts and teacher log-probs give the signals (from the method
    table): with e_ctr, self-rollout contexts with up to k_max wrong hints (rlcsd); e_c alone,
    the GT-solution context (rlsd)."""
    if with_ctr:
        return losses.find(teacher_context="self_rollout", wrong_hints="k_max",
                           teacher_scoring="logp")
    return losses.find(teacher_context="gt_solution", teacher_scoring="logp")


def _score_signals(trainer, ro, ctx, *, k_max: int, with_ctr: bool):
    """e_c, e_ctr [R', N] for the kept rows, in mini-batches of the trainer's nominal size."""
    import jax


    method = signal_method(with_ctr)
    n = ro.tokens.shape[1]
    spec = dataclasses.replace(trainer.spec, method=method, response_len=n)
    m = trainer.minibatch_rows
    put = trainer.to_global
    state = trainer.state
    tparams = getattr(state, "teacher", None)
    tparams = state.params if tparams is None else tparams
    k_slots = batches.num_wrong_slots(method, k_max)
    max_len, buckets = trainer.cfg.train.teacher_max_len, trainer.teacher_buckets
    e_c, e_ctr, pos = [], [], 0
    for rows in batches.minibatch_rows(np.asarray(ctx.kept), m):
        positions = np.arange(pos, pos + len(rows))
        s_len, r_len = batches.student_lengths(ro, rows)
        t_len = batches.teacher_lengths(ctx, positions, r_len, max_len=max_len)
        sb = put(batches.student_batch(ro, rows, m, bucket_length(int(s_len.max()), buckets),
                                       n, trainer.pad_id))
        logp = update.old_logprobs(trainer.graphdef, state.params, None, sb, spec=spec,
                                   with_ref=False)["old_logp"]
        tb = batches.teacher_arrays(ro, ctx, positions, rows, m, k_slots=k_slots,
                                    max_len=max_len, pad_id=trainer.pad_id,
                                    width=bucket_length(int(t_len.max()), buckets))
        tb.pop("truncated_prompt_tokens", None)
        wrong_valid = put(tb.pop("wrong_valid"))
        tb = dict(put(tb, leading_axis=1), wrong_valid=wrong_valid)
        teacher = update.teacher_outputs(trainer.graphdef, tparams, tb, None, spec, length=n)
        if not with_ctr:    # one dummy wrong slot equal to the correct one: e_ctr = 0, unused
            tc = teacher["teacher_logp"]
            teacher = dict(teacher_correct_logp=tc, teacher_wrong_logp=tc[:, None, :],
                           wrong_valid=np.ones((m, 1), np.int32))
        diag = losses.signal_diagnostics(
            logp=logp, teacher_correct_logp=teacher["teacher_correct_logp"],
            teacher_wrong_logp=teacher["teacher_wrong_logp"],
            wrong_valid=teacher["wrong_valid"], mask=sb["response_mask"])
        diag = jax.device_get(diag)
        e_c.append(np.asarray(diag["e_c"])[:len(rows)])
        e_ctr.append(np.asarray(diag["e_ctr"])[:len(rows)])
        pos += len(rows)
    e_c, e_ctr = np.concatenate(e_c).astype(np.float64), np.concatenate(e_ctr).astype(np.float64)
    if not with_ctr:
        e_ctr = np.full_like(e_ctr, np.nan)
    return e_c, e_ctr


# ---------------------------------------------------------------------------------------------
# The whole analysis
# ---------------------------------------------------------------------------------------------

def build_trainer(cfg, workdir: str, *, checkpoint: str = "", warm_start_steps: int = 0):
    """A Trainer for `cfg` (`checkpoint` = any HF / converted folder overrides the model),
    warm-started for `warm_start_steps` steps (-1: the config's warm_start.steps; never with a
    checkpoint unless asked explicitly)."""
    from rlcsd_jax.trainer.rl_trainer import Trainer

    if checkpoint:
        cfg.model.checkpoint = checkpoint
    steps = cfg.warm_start.steps if warm_start_steps < 0 and not checkpoint else warm_start_steps
    tr = Trainer(cfg, workdir)
    if steps > 0:
        cfg.warm_start.steps = steps
        log.info("warm start: %d steps", steps)
        tr.warm_start()
    return tr


def pick_records(trainer, num_prompts: int, *, split: str = "train", seed: int = 0) -> list:
    """`num_prompts` records of the train or eval split, drawn with `seed`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; allowed: train, eval")
    pool = trainer.train_records if split == "train" else trainer.eval_records
    if not pool:
        raise ValueError(f"the {split} split of this config is empty")
    idx = np.random.default_rng([seed, 7]).choice(len(pool), size=min(num_prompts, len(pool)),
                                                  replace=False)
    return [pool[int(i)] for i in idx]


def analyze(cfg, out: str, *, workdir: str | None = None, checkpoint: str = "",
            warm_start_steps: int = 0, num_prompts: int = 8, group_size: int = 0,
            max_new_tokens: int = 0, hint_source: str = "auto", min_count: int = 3,
            num_top: int = 10, split: str = "train", seed: int = 0, row: int = -1,
            trainer=None) -> dict:
    """Build (or reuse) a trainer, collect the signals, write the three outputs to `out`.

    Returns dict(signals, stats (per token), top_e_c, top_e_ctr, table (markdown), paths,
    trainer)."""
    if group_size:
        cfg.rollout.group_size = group_size
    if max_new_tokens:
        cfg.rollout.max_new_tokens = max_new_tokens
    if trainer is None:
        workdir = workdir or tempfile.mkdtemp(prefix="rlcsd_style_")
        trainer = build_trainer(cfg, workdir, checkpoint=checkpoint,
                                warm_start_steps=warm_start_steps)
    records = pick_records(trainer, num_prompts, split=split, seed=seed)
    signals = collect_signals(trainer, records, group_size=group_size,
                              max_new_tokens=max_new_tokens, seed=seed, hint_source=hint_source)
    tok = trainer.tokenizer
    stats = token_stats(signals, tok, min_count=min_count)
    top_c = top_tokens(signals, tok, by="e_c", k=num_top, stats=stats)
    top_ctr = top_tokens(signals, tok, by="e_ctr", k=num_top, stats=stats)
    n_tokens = int(np.asarray(signals["mask"]).sum())
    table = render_table(top_c, top_ctr, source=signals["source"], message=signals["message"],
                         num_rollouts=signals["num_rollouts"], num_kept=len(signals["rows"]),
                         num_tokens=n_tokens, min_count=min_count)
    # `out` may be gs://...: every file goes through rlcsd_jax.data.storage (epath).
    paths = {"table": storage.join(out, "style_tokens.md"),
             "json": storage.join(out, "style_tokens.json"),
             "png": storage.join(out, "style_drift.png")}
    storage.write_text(paths["table"], table)
    drawn = -1 if not len(signals["rows"]) else (pick_row(signals) if row < 0 else row)
    with tempfile.TemporaryDirectory(prefix="rlcsd_style_png_") as scratch:
        local_png = render_png(signals, tok, os.path.join(scratch, "style_drift.png"), row=drawn)
        with open(local_png, "rb") as f:
            storage.write_bytes(paths["png"], f.read())
    storage.write_text(paths["json"], json.dumps(
        {"source": signals["source"], "message": signals["message"],
         "has_e_ctr": signals["has_e_ctr"], "num_rollouts": signals["num_rollouts"],
         "num_kept": len(signals["rows"]), "num_tokens": n_tokens,
         "min_count": min_count, "drawn_rollout": (int(signals["rows"][drawn])
                                                   if drawn >= 0 else None),
         "hint_stats": signals["stats"], "top_e_c": _json_safe(top_c),
         "top_e_ctr": _json_safe(top_ctr), "tokens": _json_safe(stats)}, indent=1))
    log.info("wrote %s, %s and %s (hint source: %s)", paths["table"], paths["json"],
             paths["png"], signals["source"])
    return dict(signals=signals, stats=stats, top_e_c=top_c, top_e_ctr=top_ctr, table=table,
                paths=paths, trainer=trainer)


def _json_safe(rows: list[dict]) -> list[dict]:
    """NaN (e_ctr without a wrong hint) -> null, so the file is strict JSON."""
    return [{k: (None if isinstance(v, float) and not np.isfinite(v) else v)
             for k, v in d.items()} for d in rows]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _flags(argv: list[str]):
    """Flags on a private FlagValues: importing this module never collides with train.py's or
    evaluate.py's global --config, and tests can call `main(argv)` in-process (`argv` is where
    the --config.KEY=VALUE overrides are read from)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Path to a config file (e.g. "
                                    "configs/tiny.py).", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_string("out", None, "Output folder for style_tokens.md / .json and "
                        "style_drift.png.", flag_values=fv)
    flags.DEFINE_string("checkpoint", "", "HF or converted model folder (sets "
                        "config.model.checkpoint); empty = the config's model.", flag_values=fv)
    flags.DEFINE_string("workdir", "", "Scratch folder (tiny tokenizer); empty = a temp dir.",
                        flag_values=fv)
    flags.DEFINE_integer("num_prompts", 8, "Prompts to sample.", flag_values=fv)
    flags.DEFINE_integer("group_size", 0, "Rollouts per prompt (0 = config).", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 0, "Response budget (0 = config).", flag_values=fv)
    flags.DEFINE_integer("warm_start_steps", 0, "Supervised warm-start steps before sampling "
                         "(-1 = config.warm_start.steps).", flag_values=fv)
    flags.DEFINE_enum("hint_source", "auto", list(HINT_SOURCES), "Correct-hint source; auto = "
                      "self_rollout, falling back to gt_cot when every rollout is dropped.",
                      flag_values=fv)
    flags.DEFINE_integer("min_count", 3, "Least occurrences for a token to be ranked.",
                         flag_values=fv)
    flags.DEFINE_integer("num_top", 10, "Rows per table.", flag_values=fv)
    flags.DEFINE_enum("split", "train", ["train", "eval"], "Which records to sample.",
                      flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling / prompt choice / hint seed.", flag_values=fv)
    flags.DEFINE_integer("row", -1, "Kept rollout to draw (-1 = first correct).",
                         flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0 on success, 1 when no rollout could be analysed, 2 on bad usage."""
    from rlcsd_jax import cli

    argv = list(sys.argv if argv is None else argv)
    fv = _flags(argv)
    status = cli.parse_flags(fv, argv, __doc__, required=("config", "out"))
    if status is not None:
        return status
    res = analyze(fv.config, fv.out, workdir=fv.workdir or None, checkpoint=fv.checkpoint,
                  warm_start_steps=fv.warm_start_steps, num_prompts=fv.num_prompts,
                  group_size=fv.group_size, max_new_tokens=fv.max_new_tokens,
                  hint_source=fv.hint_source, min_count=fv.min_count, num_top=fv.num_top,
                  split=fv.split, seed=fv.seed, row=fv.row)
    sig = res["signals"]
    print(res["table"], flush=True)
    if not len(sig["rows"]):
        print(f"error: no rollout could be analysed: {sig['message']}", file=sys.stderr)
        return 1
    return 0

