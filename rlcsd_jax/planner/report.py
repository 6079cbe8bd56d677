"""The planner's report: a row per program, the step-time estimate by phase, and what to change
when a program does not fit."""

from __future__ import annotations

import dataclasses

from rlcsd_jax.planner import roofline as roofline_lib
from rlcsd_jax.planner.compile import Measured
from rlcsd_jax.planner.topology import ChipSpec

GIB = 2**30

# What makes each kind of program smaller, in the order worth trying.
_ADVICE = {
    "rollout": ("the rows decoded at once and their KV cache: on the rollout engine fewer "
                "slots (engine.max_slots) or a smaller page pool (engine.kv_memory_fraction, "
                "engine.kv_budget_tokens); on the static sampler fewer prompts per step "
                "(rollout.prompts_per_step); a shorter response cap (rollout.max_new_tokens), or "
                "more chips on fsdp (rows shard over data x fsdp)"),
    "eval": ("the rows decoded at once and their KV cache: on the rollout engine fewer slots "
             "(engine.max_slots) or a smaller page pool (engine.kv_memory_fraction, "
             "engine.kv_budget_tokens); on the static sampler fewer prompts per call "
             "(eval.batch_prompts) or samples (eval.num_samples); a shorter cap "
             "(eval.max_new_tokens), or more chips on fsdp"),
    "score": ("the tokens scored per device at once: a smaller token budget "
              "(train.micro_batch_tokens: micro-batch rows and shared-prefix row width), "
              "fewer teacher contexts (teacher.k_max), shorter teacher rows "
              "(train.teacher_max_len, train.teacher_buckets), or more chips on fsdp"),
    "update": ("the mini-batch's activations and gradients: fewer rows per mini-batch "
               "(train.minibatch_prompts), remat (model.remat_policy=full), or more chips on fsdp"),
}


def refusal(name: str, need_gib: float, budget_gib: float, what_shrinks: str,
            reason: str | None = None) -> str:
    if reason:            # it compiles and fits, but cannot run (the engine's KV pool)
        return (f"{name} does NOT fit: {reason} (needs {need_gib:.1f} GiB per device with "
                f"that pool, the budget is {budget_gib:.1f} GiB). What shrinks it: "
                f"{what_shrinks}.")
    return (f"{name} does NOT fit: needs {need_gib:.1f} GiB per device, the budget is "
            f"{budget_gib:.1f} GiB ({need_gib / budget_gib:.1f}x). What shrinks it: "
            f"{what_shrinks}.")


def refusals(measured: list[Measured]) -> str:
    """One paragraph per program that does not fit (empty when all do)."""
    return "\n".join(refusal(m.program.name, m.total_bytes / GIB, m.budget_bytes / GIB,
                             advice(m), m.program.refusal)
                     for m in measured if m.fits is False)


def advice(m: Measured) -> str:
    kind = m.program.name.split("/")[0]
    return _ADVICE.get(kind, _ADVICE["update"] if m.program.phase == "update" else
                       _ADVICE["score"])


@dataclasses.dataclass
class Row:
    name: str
    phase: str
    what: str
    fits: bool | None
    argument_gib: float
    temp_gib: float
    resident_gib: float
    total_gib: float
    budget_gib: float | None
    calls_per_step: float
    gflop_per_call: float | None = None
    gbytes_per_call: float | None = None
    seconds_per_call: float | None = None
    bound: str | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    error: str | None = None
    advice: str | None = None
    refusal: str | None = None    # why an engine job cannot run although its programs fit
    # engine decode programs: bytes accessed per generated token (every slot busy) and the
    # floor (compute-dtype weights per device / its slots + live KV read per token), per device
    bytes_per_token: float | None = None
    floor_bytes_per_token: float | None = None
    floor_ratio: float | None = None
    floor_terms: dict | None = None


def rows(measured: list[Measured], chip: ChipSpec, num_devices: int) -> list[Row]:
    out = []
    for m in measured:
        p = m.program
        r = Row(p.name, p.phase, p.what, m.fits, m.argument_bytes / GIB, m.temp_bytes / GIB,
                m.resident_bytes / GIB, m.total_bytes / GIB,
                None if m.budget_bytes is None else m.budget_bytes / GIB, p.calls_per_step,
                error=m.error)
        if m.refused_need_bytes is not None:
            r.temp_gib = m.refused_need_bytes / GIB
        if m.fits is False:
            r.advice = advice(m)
            r.refusal = p.refusal
        timed = m.typical or m       # time at the mean lengths where the program has a twin
        if timed.cost is not None:
            flops, nbytes, roof = timed.per_call(chip)
            r.gflop_per_call, r.gbytes_per_call = flops / 1e9, nbytes / 1e9
            r.seconds_per_call, r.bound = roof.seconds, roof.bound
            tp = timed.program
            r.tokens_per_s = (tp.tokens_per_call / roof.seconds
                              if roof.seconds and tp.tokens_per_call else None)
            r.mfu = roofline_lib.mfu(tp.model_flops_per_call / num_devices, roof.seconds, chip)
            r.calls_per_step = tp.calls_per_step
            if m.typical is not None:
                r.what += f"; timed at {tp.what}"
            floor = tp.decode_floor
            if floor is not None:
                r.bytes_per_token = nbytes / (floor.slots * floor.steps_per_call)
                r.floor_bytes_per_token = floor.bytes_per_token
                r.floor_ratio = r.bytes_per_token / floor.bytes_per_token
                r.floor_terms = dict(weight_bytes=floor.weight_bytes, slots=floor.slots,
                                     kv_bytes_per_token=floor.kv_bytes_per_token,
                                     mean_kv_len=tp.mean_kv_len)
        out.append(r)
    return out


def step_estimate(table: list[Row]) -> dict:
    """Seconds of one training step by phase (sample / score / update), and of one evaluation
    call; None for a phase with a program that did not compile."""
    phases: dict[str, float | None] = {"sample": 0.0, "score": 0.0, "update": 0.0, "eval": 0.0}
    for r in table:
        if phases[r.phase] is None:
            continue
        if r.seconds_per_call is None:
            phases[r.phase] = None
        else:
            phases[r.phase] += r.calls_per_step * r.seconds_per_call
    train = [phases[k] for k in ("sample", "score", "update")]
    phases["step"] = None if None in train else sum(train)
    return phases


def _fmt(x, spec: str) -> str:
    """format(x, spec), or a dash as wide as the spec's width when x is None."""
    if x is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(x, spec)


def format_table(title: str, table: list[Row], estimate: dict, mean_response_len: int) -> str:
    lines = [title, ""]
    head = (f"{'program':<20} {'fits':<5} {'args':>7} {'temp':>9} {'resid':>6} {'total':>9} "
            f"{'HBM':>6}  {'GFLOP':>10} {'GB':>9} {'s/call':>8} {'bound':<7} {'tok/s':>9} "
            f"{'MFU':>5} {'calls':>5}")
    lines += [head, "-" * len(head)]
    for r in table:
        fits = {True: "yes", False: "NO", None: "ERR"}[r.fits]
        lines.append(
            f"{r.name:<20} {fits:<5} {r.argument_gib:7.2f} {r.temp_gib:9.2f} "
            f"{r.resident_gib:6.2f} {r.total_gib:9.2f} {_fmt(r.budget_gib, '6.1f')}  "
            f"{_fmt(r.gflop_per_call, '10.1f')} {_fmt(r.gbytes_per_call, '9.2f')} "
            f"{_fmt(r.seconds_per_call, '8.3f')} {r.bound or '-':<7} "
            f"{_fmt(r.tokens_per_s, '9.0f')} {_fmt(None if r.mfu is None else 100 * r.mfu, '4.0f')}% "
            f"{r.calls_per_step:5.0f}")
    lines += ["", "memory in GiB per device at the largest shape: args (inputs), temp (the "
              "compiler's temporaries; for a refused program its reported need), resid (train "
              "state held in HBM but not an input), total vs HBM (the compiler's budget).  "
              "FLOPs, bytes and time per call at the mean lengths (micro-batch programs) or the "
              "largest shape (the others); calls per training step.", ""]
    for r in table:
        lines.append(f"  {r.name}: {r.what}")
    decode = [r for r in table if r.floor_ratio is not None]
    if decode:
        lines += ["", "decode bytes per generated token (every slot busy; the paged attention "
                  "kernel priced at the mean live KV) vs the floor = compute-dtype weights per "
                  "device / slots per device + live KV read per token:"]
    mb = 1e6
    for r in decode:
        t = r.floor_terms
        lines.append(
            f"  {r.name}: {r.bytes_per_token / mb:.2f} MB/token vs floor "
            f"{r.floor_bytes_per_token / mb:.2f} MB = {t['weight_bytes'] / mb:.0f} MB / "
            f"{t['slots']} slots + {t['kv_bytes_per_token'] / mb:.2f} MB KV at "
            f"{t['mean_kv_len']:.0f} tokens: ratio {r.floor_ratio:.2f}")
    for r in table:
        if r.error:
            lines.append(f"\n{r.name}: COMPILE ERROR (not a memory problem): {r.error}")
        elif r.fits is False:
            lines.append("\n" + refusal(r.name, r.total_gib, r.budget_gib, r.advice,
                                         r.refusal))
    fmt = lambda k: "n/a" if estimate[k] is None else f"{estimate[k]:.1f} s"  # noqa: E731
    lines += ["", f"one training step at a mean response of {mean_response_len} tokens "
              f"(roofline): {fmt('step')}  = sample {fmt('sample')} + score {fmt('score')} + "
              f"update {fmt('update')};  one evaluation call: {fmt('eval')}"]
    return "\n".join(lines)
