"""`python -m benchmarks.teacher_tokens [--seeds 0,1,2] [--topology v5p-16] [--out RESULTS.md]`.

Teacher-scoring work of one RLCSD training step on a simulated reference workload:
how many tokens full-row scoring computes against shared-prefix rows (`trainer.shared_scoring`),
and with --topology the planner's roofline time of both paths for Qwen3-1.7B
(`trainer.shared_programs` vs programs.build's full-row "score/teacher").

The workload (per step, the reference config: 64 prompts x G = 8, 16-prompt mini-batches,
k_max = 4 wrong hints, self-rollout hints, teacher_max_len = micro_batch_tokens = 40,960):
  * student prompt tokens (chat template + problem + instruction): log-normal, median 220,
    sigma 0.45, clipped to [100, 600] (DeepMath-style problems);
  * response tokens: log-normal with median 2,400 and mean 3,400 before the cap
    (sigma = sqrt(2 ln(3400/2400)) = 0.835), capped at 16,384 (about 1% of rows reach it);
  * per-prompt probability of a correct rollout ~ Beta(0.8, 0.9), so some groups are all-correct
    or all-wrong (dropped by the hint rules); a rollout at the cap is wrong and has no \\boxed
    answer (it can be a target but never a wrong hint); every other rollout has a box.  (Beta
    chosen so a step has 1,441-1,711 contexts and 355-402 distinct prefixes);
  * a teacher prompt = the student prompt + TEMPLATE_TOKENS (the teacher message's fixed text,
    the chat template, the hint's answer line) + the hint rollout's response tokens.
Hints come from the trainer's own code: `batches.build_contexts` (-> `hints.build_hints` with
`setup.group_rngs`, single_wrong=False for rlcsd), with an encoder that maps each teacher message
to a token-id tuple of the length above (unique per group and hint rollout).  Scoring rows are
`shared_scoring.teacher_rows` (prompts left-truncated to teacher_max_len as full-row scoring
does) of each mini-batch (`batches.minibatch_rows` of the kept rows), as the trainer runs them.

Counted per step:
  useful       each distinct prefix once per step + every valid context's response tokens;
  full, rows   every kept rollout x (1 + K) slots (empty wrong slots hold a copy, as
               `teacher_batch.pack_teacher_batch` fills them), each row padded to its bucket
               (`data.packing.bucket_length`); "pow2" the same with power-of-two buckets (the
               rule before the 2,048-token steps above 8k); "no pad" without padding;
  full, trainer  `microbatch.plan` of each mini-batch (8 devices, 40,960 tokens per device):
               C x rows x width of every micro-batch, what `teacher/tokens_computed` counts;
  full, as filed  full-sequence scoring as it was when shared-prefix scoring was asked for:
               each mini-batch one [1 + K, rows, T] batch, T the power of two above its
               longest teacher row, every slot computed (61-69M tokens on these seeds: the
               "63-73M tokens per step today" the request counted);
  shared       `shared_scoring.plan(rows, shards=8, budget=40960).counters()` per mini-batch,
               as the trainer runs it, with where its padding goes: the ends of packed rows,
               the empty rows of each mini-batch's last call, and prefixes computed twice (a
               group cut into two pieces, or split between two mini-batches);
  tiles        the share of attention tiles (512 x 512) the two passes of the packed rows
               compute (`shared_programs.tile_density` over every call's rows).
FLOPs are `planner.flops` model FLOPs of Qwen3-1.7B (a continuation over a prefix of P tokens:
the attention of the last T queries of a causal row of P + T).  --topology compiles the full-row
"score/teacher" of `programs.build` (sharing off) and `trainer.shared_programs` with the
simulated plans' numbers (`typical_from`), for roofline seconds of the teacher-scoring phase
per step and memory per device (`compile_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import re
import time
import types

import numpy as np

from rlcsd_jax.data.packing import bucket_length
from rlcsd_jax.planner import flops as flops_lib
from rlcsd_jax.trainer import batches as batches_lib
from rlcsd_jax.trainer import microbatch, setup
from rlcsd_jax.trainer import shared_programs
from rlcsd_jax.trainer import shared_scoring as shared

PROMPTS, GROUP, MINIBATCH_PROMPTS, K_MAX = 64, 8, 16, 4
CAP, TEACHER_MAX_LEN, BUDGET, SHARDS = 16384, 40960, 40960, 8
PROMPT_MEDIAN, PROMPT_SIGMA, PROMPT_MIN, PROMPT_MAX = 220, 0.45, 100, 600
RESPONSE_MEDIAN, RESPONSE_MEAN = 2400, 3400
CORRECT_BETA = (0.8, 0.9)
TEMPLATE_TOKENS = shared_programs.TEMPLATE_TOKENS


@dataclasses.dataclass
class Workload:
    """One simulated step: student prompt and response lengths, rewards, boxed answers."""

    prompt_len: np.ndarray       # [P]
    response_len: np.ndarray     # [P * G]
    rewards: np.ndarray          # [P * G]
    boxed: np.ndarray            # [P * G]


def simulate(seed: int, prompts: int = PROMPTS, group: int = GROUP) -> Workload:
    rng = np.random.default_rng([19, seed])
    plen = np.clip(np.round(np.exp(rng.normal(np.log(PROMPT_MEDIAN), PROMPT_SIGMA, prompts))),
                   PROMPT_MIN, PROMPT_MAX).astype(np.int64)
    sigma = math.sqrt(2 * math.log(RESPONSE_MEAN / RESPONSE_MEDIAN))
    n = np.exp(rng.normal(math.log(RESPONSE_MEDIAN), sigma, prompts * group))
    n = np.clip(np.round(n), 1, CAP).astype(np.int64)
    p = np.repeat(rng.beta(*CORRECT_BETA, prompts), group)
    correct = (rng.random(prompts * group) < p) & (n < CAP)
    return Workload(plen, n, correct.astype(np.float32), n < CAP)


class _Encoder:
    """Teacher message -> a token-id tuple: student prompt + template + the hint's response,
    the same tuple object for the same (group, hint rollout)."""

    def __init__(self, w: Workload, group: int):
        self.w, self.group, self.cache = w, group, {}

    def text_ids(self, text: str):
        g, i = map(int, re.search(r"\[R(\d+)_(\d+)\]", text).groups())
        key = (g, i)
        if key not in self.cache:
            length = int(self.w.prompt_len[g]) + TEMPLATE_TOKENS + int(
                self.w.response_len[g * self.group + i])
            self.cache[key] = (1 + g * self.group + i,) * length
        return self.cache[key]


class _Rollouts:
    """The fields of `rollout.Rollouts` that build_contexts / teacher_rows read."""

    def __init__(self, w: Workload, group: int):
        self.w = w
        n_prompts = len(w.prompt_len)
        self.records = [types.SimpleNamespace(problem=f"problem {g}", ground_truth=f"a{g}",
                                              solution=None) for g in range(n_prompts)]
        self.texts = [f"[R{r // group}_{r % group}] ..." + (
            f" \\boxed{{{'a' if w.rewards[r] > 0 else 'w'}{r}}}" if w.boxed[r] else "")
            for r in range(n_prompts * group)]
        self.rewards = w.rewards
        self._responses = {}

    @property
    def group_size(self) -> int:
        return len(self.texts) // len(self.records)

    def response_ids(self, row: int):
        if row not in self._responses:
            self._responses[row] = (-1 - row,) * int(self.w.response_len[row])
        return self._responses[row]


def shared_stats(mcfg, plans: list, pad_id: int = 0) -> dict:
    """Tokens, where the padding goes, tile density and padded model FLOPs of a step's plans."""
    out = dict(computed=0.0, calls=0, row_end=0.0, empty_rows=0.0, pieces=0, tiles=[],
               widths=[], scored=[], flops=0.0)
    for p in plans:
        out["computed"] += p.counters()["tokens_computed"]
        for call in p.calls:
            out["calls"] += 1
            out["widths"].append(p.width)
            out["scored"].append(call.scored)
            arrays, _ = shared.call_arrays(call, p, pad_id)
            used = (arrays["segment_ids"] != 0).sum(-1)
            filled = [m for m in call.packed if m]
            out["pieces"] += sum(len(m) for m in filled)
            out["row_end"] += float(sum(p.width - u for u, m in zip(used, call.packed) if m))
            out["empty_rows"] += float(sum(p.width for m in call.packed if not m))
            density = shared_programs.tile_density(
                arrays["segment_ids"], arrays["prefix_q_seg"], arrays["prefix_k_seg"])
            out["tiles"].append(density)
            if mcfg is not None:
                rows = len(call.packed)
                linear = 2.0 * flops_lib.body_matmul_params(mcfg) * p.width * rows
                head = 2.0 * flops_lib.head_params(mcfg) * call.scored * rows
                # both passes, each the computed share of the full square of tiles
                square = 2.0 * flops_lib.attention_flops(mcfg, rows, p.width)
                out["flops"] += linear + head + 2 * density * square
    out["tile_density"] = float(np.mean(out["tiles"])) if out["tiles"] else 0.0
    return out


def count_step(seed: int, mcfg=None, *, step: int = 0, shards: int = SHARDS,
               budget: int = BUDGET, k_max: int = K_MAX) -> dict:
    """Every counter of one simulated step (see the module doc)."""
    w = simulate(seed)
    ro, enc = _Rollouts(w, GROUP), _Encoder(w, GROUP)
    rngs = setup.group_rngs(seed, step, 0, PROMPTS)
    ctx = batches_lib.build_contexts("rlcsd", ro, enc, rngs, hint_source="self_rollout",
                                     k_max=k_max)
    kept = np.asarray(ctx.kept)
    chunks = batches_lib.minibatch_rows(kept, MINIBATCH_PROMPTS * GROUP)
    out = dict(seed=seed, rollouts=len(w.response_len), kept=len(kept),
               minibatches=len(chunks), response_mean=float(w.response_len.mean()),
               response_p50=float(np.median(w.response_len)),
               at_cap=int((w.response_len >= CAP).sum()),
               prompt_mean=float(w.prompt_len.mean()))
    all_rows, plans, pos = [], [], 0
    full = dict(full_rows=0.0, full_pow2=0.0, full_nopad=0.0, full_valid_nopad=0.0,
                full_trainer=0.0, full_trainer_pow2=0.0, full_filed=0.0, flops_full_rows=0.0,
                flops_full_valid=0.0, flops_full_trainer=0.0, flops_full_filed=0.0)
    pow2_buckets = tuple(1 << i for i in range(4, 17))
    for rows in chunks:
        positions = np.arange(pos, pos + len(rows))
        pos += len(rows)
        trows = shared.teacher_rows(ro, ctx, rows, positions, max_len=TEACHER_MAX_LEN)
        all_rows += trows
        plans.append(shared.plan(trows, shards=shards, budget=budget))
        # full, as filed: one [1 + K, rows, T] batch per mini-batch at its pow2 width
        width = bucket_length(max(len(r.prefix) + len(r.response) for r in trows), pow2_buckets)
        head = bucket_length(max(len(r.response) for r in trows), pow2_buckets)
        full["full_filed"] += (1 + k_max) * len(rows) * width
        if mcfg is not None:
            full["flops_full_filed"] += flops_lib.forward_flops(
                mcfg, (1 + k_max) * len(rows), width, head_tokens=head)
        # full rows: 1 + K slots per rollout, empty wrong slots filled with a copy
        by_rollout: dict = {}
        for r in trows:
            by_rollout.setdefault(r.rollout, []).append(r)
        for rs in by_rollout.values():
            n = len(rs[0].response)
            slots = rs + [rs[1] if len(rs) > 1 else rs[0]] * (1 + k_max - len(rs))
            for r in slots:
                length = len(r.prefix) + n
                full["full_rows"] += bucket_length(length)
                full["full_pow2"] += bucket_length(length, pow2_buckets)
                full["full_nopad"] += length
                if mcfg is not None:
                    full["flops_full_rows"] += flops_lib.forward_flops(
                        mcfg, 1, bucket_length(length), head_tokens=n)
            for r in rs:
                full["full_valid_nopad"] += len(r.prefix) + n
                if mcfg is not None:
                    full["flops_full_valid"] += flops_lib.forward_flops(
                        mcfg, 1, len(r.prefix) + n, head_tokens=n)
        # what the trainer's full-row path computes: micro-batches of the mini-batch
        s_len, r_len = batches_lib.student_lengths(_StudentLengths(w, GROUP), rows)
        t_len = batches_lib.teacher_lengths(ctx, positions, r_len, max_len=TEACHER_MAX_LEN)
        for mb in microbatch.plan(s_len, t_len, r_len, budget=budget,
                                  devices_per_process=shards):
            full["full_trainer"] += (1 + k_max) * mb.local_rows * mb.teacher_width
            if mcfg is not None:
                full["flops_full_trainer"] += flops_lib.forward_flops(
                    mcfg, (1 + k_max) * mb.local_rows, mb.teacher_width,
                    head_tokens=mb.response_width)
        for mb in microbatch.plan(s_len, t_len, r_len, budget=budget,
                                  devices_per_process=shards, buckets=pow2_buckets):
            full["full_trainer_pow2"] += (1 + k_max) * mb.local_rows * mb.teacher_width
    out.update(full)
    prefixes = {r.prefix for r in all_rows}
    out["contexts"] = len(all_rows)
    out["prefixes"] = len(prefixes)
    out["useful"] = shared.useful_tokens(all_rows)
    out["useful_prefix"] = float(sum(len(p) for p in prefixes))
    out["useful_cont"] = out["useful"] - out["useful_prefix"]
    out["shared"] = shared_stats(mcfg, plans)
    sh = out["shared"]
    # prefix tokens computed more than once: pieces beyond one per distinct prefix
    piece_prefix = sum(len(pc.prefix) for p in plans for c in p.calls for m in c.packed
                       for pc in m)
    sh["duplicated_prefix"] = float(piece_prefix - out["useful_prefix"])
    if mcfg is not None:
        out["flops_useful"] = (
            sum(shared_programs.prefix_flops(mcfg, 1, len(p)) for p in prefixes)
            + sum(shared_programs.continuation_flops(mcfg, 1, len(r.prefix), len(r.response))
                  for r in all_rows))
    return out


class _StudentLengths:
    """`batches.student_lengths` reads prompt_mask, group_size and lengths."""

    def __init__(self, w: Workload, group: int):
        self.prompt_mask = (np.arange(PROMPT_MAX)[None] < w.prompt_len[:, None]).astype(np.int32)
        self.group_size, self.lengths = group, w.response_len


# ----------------------------------------------------------------------------------------------
# Typical shapes and the compiled programs (--topology)
# ----------------------------------------------------------------------------------------------


def typical_from(results: list[dict], mcfg) -> shared_programs.SharedTypical:
    """`shared_programs.SharedTypical` of the simulated steps: the most common row width and
    scored width, calls per step (mean), useful tokens and model FLOPs per call (per-step
    means over the calls), the mean tile density."""
    def mode(key):
        values = [v for r in results for v in r["shared"][key]]
        return max(set(values), key=values.count)

    mean = lambda f: float(np.mean([f(r) for r in results]))  # noqa: E731
    calls = mean(lambda r: r["shared"]["calls"])
    return shared_programs.SharedTypical(
        width=mode("widths"), scored=mode("scored"), calls=calls,
        tokens=mean(lambda r: r["useful"]) / calls,
        model_flops=mean(lambda r: r["flops_useful"]) / calls,
        tile_density=mean(lambda r: r["shared"]["tile_density"]),
        source="simulated plans")


def compile_report(cfg, topology_name: str, results: list[dict]) -> tuple[list[str], dict]:
    """Compile the shared teacher program (largest shape, typical twin from the simulation)
    and the full-row "score/teacher" for the slice; roofline seconds of the teacher-scoring
    phase per step, memory per device against the compiler's budget."""
    from rlcsd_jax import plan as plan_mod
    from rlcsd_jax.distributed import sharding
    from rlcsd_jax.planner import compile as compile_lib, topology
    from rlcsd_jax.trainer import programs as programs_lib

    sl = topology.get_slice(topology_name)
    mesh = sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor,
                              devices=sl.devices)
    rs = plan_mod.run_setup_for(cfg, mesh)
    mcfg = rs.model_config
    budget = topology.hbm_budget(sl)
    mean_len = int(round(np.mean([r["response_mean"] for r in results])))
    memo: dict = {}

    def measure(p):
        key = compile_lib._signature(p)
        if key not in memo:
            t0 = time.perf_counter()
            memo[key] = compile_lib.measure(p, budget)
            print(f"compiled {p.name} [{p.what}] in {time.perf_counter() - t0:.0f}s", flush=True)
        return memo[key]

    lines = [f"Compiled for {sl.describe()} (libtpu, abstract shapes), Qwen3-1.7B, mesh "
             f"{dict(mesh.shape)}, compiler HBM budget {budget / 2**30:.2f} GiB per device; "
             f"roofline = max(FLOPs / {sl.chip.peak_flops / 1e12:.0f} TFLOP/s, bytes / "
             f"{sl.chip.hbm_bandwidth / 1e9:.0f} GB/s) per device, loops counted "
             f"(`planner.hlo_cost`, splash priced at its tile density); per step = Σ calls × "
             f"seconds per call of the typical twins.", "",
             "| path | program | typical shape (largest) | calls / step | TFLOP / call | GB / call "
             "| compute s / call | memory s / call | bound | roofline s / step | compute-only s "
             "/ step | memory / device, largest (typical) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    numbers: dict = {}

    def gib(m):
        return f"{m.total_bytes / 2**30:.2f} GiB" + ("" if m.fits else " (does NOT fit)")

    def phase(label, progs):
        total = compute = 0.0
        for p in progs:
            big, typ = measure(p), measure(p.typical)
            if typ.cost is None:
                raise RuntimeError(f"{p.typical.name}: {typ.error or 'does not fit'}")
            flops, nbytes, roof = typ.per_call(sl.chip)
            calls = p.typical.calls_per_step
            total += calls * roof.seconds
            compute += calls * roof.compute_s
            numbers.setdefault(label, {})[p.name] = dict(
                largest=p.what, largest_gib=big.total_bytes / 2**30, fits=big.fits,
                typical=p.typical.what, calls=calls, seconds=roof.seconds, flops=flops,
                bytes=nbytes, compute_s=roof.compute_s, memory_s=roof.memory_s,
                typical_gib=typ.total_bytes / 2**30)
            lines.append(f"| {label} | {p.name} | {p.typical.what} ({p.what}) | {calls:.1f} | "
                         f"{flops / 1e12:.1f} | {nbytes / 1e9:.0f} | {roof.compute_s:.3f} | "
                         f"{roof.memory_s:.3f} | {roof.bound} | {calls * roof.seconds:.2f} | "
                         f"{calls * roof.compute_s:.2f} | {gib(big)} "
                         f"({typ.total_bytes / 2**30:.2f} GiB) |")
        numbers.setdefault("step_seconds", {})[label] = total
        numbers.setdefault("step_compute_seconds", {})[label] = compute
        return total

    # full rows: programs.build's "score/teacher" with sharing off, at the simulated mean length
    off = cfg.copy_and_resolve_references()
    off.train.share_teacher_prefixes = False
    rs_off = programs_lib.run_setup(off, mesh, eos_ids=rs.eos_ids, pad_id=rs.pad_id,
                                    model_config=mcfg)
    full = [p for p in programs_lib.build(rs_off, mean_response_len=mean_len)
            if p.name == "score/teacher"]
    t_full = phase("full rows (planner)", full)
    fp = full[0].typical
    typical_flops = flops_lib.forward_flops(
        mcfg, fp.args[2]["input_ids"].shape[0] * fp.args[2]["input_ids"].shape[1],
        fp.args[2]["input_ids"].shape[2], head_tokens=fp.kwargs["length"])
    per_flop = numbers["full rows (planner)"]["score/teacher"]["seconds"] / typical_flops
    t_trainer = per_flop * float(np.mean([r["flops_full_trainer"] for r in results]))
    numbers["step_seconds"]["full rows (simulated micro-batches)"] = t_trainer
    filed_flops = float(np.mean([r["flops_full_filed"] for r in results]))
    t_filed = per_flop * filed_flops
    numbers["step_seconds"]["full rows (as filed)"] = t_filed
    typ = typical_from(results, mcfg)
    t_shared = phase("shared-prefix rows", shared_programs.standalone(
        rs, mean_response_len=mean_len, typical=typ))
    comp = numbers["step_compute_seconds"]
    c_full, c_shared = comp["full rows (planner)"], comp["shared-prefix rows"]
    sim_pf = np.mean([r["flops_full_trainer"] for r in results]) / 1e15
    useful_pf = np.mean([r["flops_useful"] for r in results]) / 1e15
    floor = useful_pf * 1e15 / (sl.chip.peak_flops * mesh.size)
    numbers["useful_seconds"] = floor
    lines += ["", f"Teacher-scoring phase per step (roofline): full rows as the planner models "
              f"them (`programs.build`'s typical twin at mean response {mean_len:,} × its "
              f"calls) **{t_full:.1f} s**; full rows at the simulated micro-batches (that "
              f"program's seconds per model FLOP × the simulated {sim_pf:.0f} PFLOP) "
              f"**{t_trainer:.1f} s**; shared-prefix rows **{t_shared:.1f} s** "
              f"({t_full / t_shared:.1f}× less than the planner's full rows, "
              f"{t_trainer / t_shared:.1f}× less than the simulated ones).  Full-sequence "
              f"scoring as filed (one pow2-wide batch per mini-batch, every slot; "
              f"{filed_flops / 1e15:.0f} PFLOP at the same seconds per model FLOP, an "
              f"optimistic price: it ran dense attention, which does not fit a chip at these "
              f"widths) "
              f"**{t_filed:.1f} s**: shared rows take {t_filed / t_shared:.1f}× less.  "
              f"Compute term only: "
              f"full rows {c_full:.1f} s, shared {c_shared:.1f} s ({c_full / c_shared:.1f}×).  "
              f"The useful work alone ({useful_pf:.0f} PFLOP at peak on {mesh.size} devices) "
              f"takes {floor:.1f} s: no plan can be more than {t_full / floor:.1f}× faster "
              f"than the planner's full rows."]
    return lines, numbers


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _m(x: float) -> str:
    return f"{x / 1e6:.2f}M"


def _pf(x: float) -> str:
    return f"{x / 1e15:.0f}"


def table(results: list[dict]) -> list[str]:
    lines = ["| seed | kept rollouts | contexts | distinct prefixes | useful | full rows "
             "(bucket) | full rows (pow2) | full, no pad | full, trainer micro-batches "
             "(bucket / pow2) | full, as filed | shared-prefix rows | shared / useful | "
             "trainer / shared | as filed / shared |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        sh = r["shared"]["computed"]
        lines.append(
            f"| {r['seed']} | {r['kept']} / {r['rollouts']} | {r['contexts']:,} | "
            f"{r['prefixes']} | {_m(r['useful'])} | {_m(r['full_rows'])} | {_m(r['full_pow2'])}"
            f" | {_m(r['full_nopad'])} | {_m(r['full_trainer'])} / "
            f"{_m(r['full_trainer_pow2'])} | {_m(r['full_filed'])} | {_m(sh)} | "
            f"**{sh / r['useful']:.3f}** | {r['full_trainer'] / sh:.1f}× | "
            f"{r['full_filed'] / sh:.1f}× |")
    return lines


def flops_table(results: list[dict]) -> list[str]:
    lines = ["| seed | useful | full rows (bucket) | full valid contexts, no pad | full, trainer "
             "micro-batches | full, as filed | shared-prefix rows (tiles at their density) | "
             "trainer / shared | as filed / shared |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['seed']} | {_pf(r['flops_useful'])} | {_pf(r['flops_full_rows'])} | "
            f"{_pf(r['flops_full_valid'])} | {_pf(r['flops_full_trainer'])} | "
            f"{_pf(r['flops_full_filed'])} | {_pf(r['shared']['flops'])} | "
            f"{r['flops_full_trainer'] / r['shared']['flops']:.1f}× | "
            f"{r['flops_full_filed'] / r['shared']['flops']:.1f}× |")
    return lines


def details(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        s = r["shared"]
        out.append(
            f"- seed {r['seed']}: responses mean {r['response_mean']:,.0f} / p50 "
            f"{r['response_p50']:,.0f} tokens, {r['at_cap']} at the cap; prompts mean "
            f"{r['prompt_mean']:.0f}; {r['minibatches']} mini-batches; useful prefix / response "
            f"tokens {_m(r['useful_prefix'])} / {_m(r['useful_cont'])}.  Shared-prefix rows: "
            f"{s['calls']} calls of {SHARDS} rows (widths {sorted(set(s['widths']))}), "
            f"{s['pieces']} pieces; padding {_m(s['row_end'] + s['empty_rows'])} (row ends "
            f"{_m(s['row_end'])}, empty rows of last calls {_m(s['empty_rows'])}); prefixes "
            f"computed twice {_m(s['duplicated_prefix'])}; attention tiles computed "
            f"{s['tile_density']:.3f} of each pass's square (causal alone: 0.5)")
    return out


def format_section(results: list[dict], args, compiled: list[str] | None) -> str:
    seeds = ",".join(str(r["seed"]) for r in results)
    cmd = f"python -m benchmarks.teacher_tokens --seeds {seeds}"
    if args.topology:
        cmd += f" --topology {args.topology}"
    lines = [f"## {datetime.datetime.now():%Y-%m-%d %H:%M} · teacher scoring: shared-prefix "
             f"rows vs full rows · simulated reference workload", "",
             f"- command: {cmd}",
             f"- workload per step: {PROMPTS} prompts × G={GROUP}, {MINIBATCH_PROMPTS}-prompt "
             f"mini-batches, rlcsd, k_max={K_MAX}, self-rollout hints (`batches.build_contexts` "
             f"with `setup.group_rngs`), teacher_max_len {TEACHER_MAX_LEN:,}, "
             f"micro_batch_tokens {BUDGET:,}, {SHARDS} device blocks (v5p-16)",
             f"- student prompts log-normal median {PROMPT_MEDIAN}, σ {PROMPT_SIGMA}, clipped "
             f"[{PROMPT_MIN}, {PROMPT_MAX}]; responses log-normal median {RESPONSE_MEDIAN:,} / "
             f"mean {RESPONSE_MEAN:,} before the {CAP:,} cap; P(correct) per prompt "
             f"~ Beta{CORRECT_BETA}; rows at the cap wrong and unboxed; teacher prefix = "
             f"prompt + {TEMPLATE_TOKENS} template tokens + the hint rollout's response",
             "- tokens per step. useful = each distinct prefix once per step + each valid "
             "context's response; full rows = every kept rollout × 5 slots, each row padded to "
             "its bucket (pow2: power-of-two buckets, the rule before 2,048-token steps); "
             "trainer = `microbatch.plan` micro-batches, C × rows × width (what "
             "`teacher/tokens_computed` counts with sharing off); as filed = one [5, rows, "
             "pow2 width] batch per mini-batch, the path shared-prefix scoring replaced; "
             "shared = `shared_scoring."
             "plan(rows, shards=8, budget=40960).counters()` per mini-batch as the trainer runs "
             "it (`teacher/tokens_computed` with sharing on)", ""]
    lines += table(results)
    if "flops_useful" in results[0]:
        lines += ["", "Model PFLOP per step, Qwen3-1.7B (`planner.flops`; a continuation = the "
                  "last T queries of a causal row of P + T; shared-prefix rows: every computed "
                  "token's matmuls, the LM head on scored tokens, both attention passes at "
                  "their measured tile density):", ""]
        lines += flops_table(results)
    lines += [""] + details(results)
    if compiled:
        lines += [""] + compiled
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.teacher_tokens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--topology", default="", help="also compile the teacher-scoring programs "
                   "for this slice (e.g. v5p-16; needs libtpu)")
    p.add_argument("--config", default="configs/qwen3_1p7b.py")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"),
                   help="append the section here ('' = print only)")
    p.add_argument("--json", default="", help="also write the numbers here")
    args = p.parse_args(argv)
    if args.topology:
        from rlcsd_jax.planner import topology
        topology.ensure_compile_only_env()
    cfg = load_config(args.config)
    mcfg = setup.model_config(cfg)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        results.append(count_step(seed, mcfg))
        print(f"seed {seed}: counted in {time.perf_counter() - t0:.1f}s", flush=True)
    print("\n".join(table(results) + [""] + flops_table(results) + [""] + details(results)),
          flush=True)
    compiled, numbers = None, {}
    if args.topology:
        compiled, numbers = compile_report(cfg, args.topology, results)
    section = format_section(results, args, compiled)
    print(section)
    if args.json:
        import json
        slim = [{k: v for k, v in r.items() if k != "shared"} | {
            "shared": {k: v for k, v in r["shared"].items() if k not in ("tiles",)}}
            for r in results]
        with open(args.json, "w") as f:
            json.dump({"steps": slim, "compiled": numbers}, f, indent=1, default=str)
    if args.out:
        from benchmarks import report
        report.ResultsFile(args.out).write(section)
    return results, numbers


def load_config(path: str = "configs/qwen3_1p7b.py"):
    """The config file's rlcsd config, checked (teacher_max_len resolved)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_teacher_tokens_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.method = "rlcsd"
    setup.check_config(cfg)
    return cfg


if __name__ == "__main__":
    main()
