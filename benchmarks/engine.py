"""Rollout engine vs today's static sampler on a long-tailed length workload.

    python -m benchmarks.engine                 # CPU, ~2-3 min on 2 cores; appends to RESULTS.md
    python -m benchmarks.engine --quick         # smaller workload (smoke test)
    python -m benchmarks.engine --out /tmp/r.md --prompts 256 --cap 256 --slots 32

The workload is RL's length distribution in miniature: response lengths drawn from a
log-normal with mean a quarter of the cap (sigma 1) and a few rows that hit the cap without
an EOS.  A "countdown" model makes those lengths exact: a real Qwen3-architecture CausalLM
(attention, MLP, every layer computed) whose embedding and LM head are set so that the
greedy successor of token t is t - 1 and token 1 is EOS, with attention and MLP outputs
scaled down so they cannot change the argmax.  A prompt ending in token L + 1 therefore
generates exactly L tokens (the last one EOS); L = cap + 1 runs to the cap (truncated).

Both sides run the same model, prompts and cap, greedy, after a warm-up call with the same
shapes (compiles excluded); useful tokens/s = generated tokens (up to each row's end) / wall.
GPU: the same entry point runs on a GPU host (`--device gpu` is simply JAX's default device);
no GPU was available when this was written, so no GPU numbers are recorded.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np

EOS = 1


def countdown_config(cap: int, *, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     head_dim: int = 32, mlp: int = 256, dtype: str = "float32"):
    """A Qwen3 config whose vocabulary (and width) is cap + 3 (pad 0, EOS 1, counters)."""
    from rlcsd_jax import models

    vocab = cap + 3
    return models.get_preset("qwen3-tiny", vocab_size=vocab, hidden_size=vocab,
                             intermediate_size=mlp, num_layers=layers, num_heads=heads,
                             num_kv_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=False,
                             layer_types=("full_attention",) * layers, dtype=dtype)


def countdown_model(cap: int, seed: int = 0, **kw):
    """The countdown CausalLM (module docstring): next(t) = t - 1, next(2) = EOS."""
    import jax.numpy as jnp

    from rlcsd_jax import models

    cfg = countdown_config(cap, **kw)
    model = models.build(cfg, seed=seed)
    v = cfg.vocab_size
    model.embed_tokens[...] = jnp.eye(v, dtype=model.embed_tokens[...].dtype)
    head = np.zeros((v, v), np.float32)
    head[np.arange(2, v), np.arange(1, v - 1)] = 20.0      # logit ~ 20 * sqrt(V) for t - 1
    model.lm_head[...] = jnp.asarray(head, model.lm_head[...].dtype)
    attn, mlp = model.layers.self_attn, model.layers.mlp
    attn.o_proj[...] = attn.o_proj[...] * 0.01
    mlp.down_proj[...] = mlp.down_proj[...] * 0.01
    return model


def long_tail_lengths(n: int, cap: int, rng, sigma: float = 1.0, frac_cap: float = 0.04):
    """n response lengths: log-normal, mean cap / 4, clipped to [1, cap]; a fraction frac_cap
    set to cap + 1 (no EOS within the cap: truncated rows)."""
    mean = cap / 4
    mu = np.log(mean) - sigma ** 2 / 2
    lengths = np.clip(np.round(rng.lognormal(mu, sigma, n)), 1, cap).astype(int)
    lengths[rng.random(n) < frac_cap] = cap + 1
    return lengths


def workload(num_prompts: int, cap: int, seed: int = 0, prompt_lens=(3, 24)):
    """(prompts, target lengths): random counter tokens, then the token that sets the length."""
    rng = np.random.default_rng(seed)
    targets = long_tail_lengths(num_prompts, cap, rng)
    prompts = []
    for length in targets:
        n = int(rng.integers(prompt_lens[0], prompt_lens[1] + 1))
        body = rng.integers(2, cap + 3, size=n - 1).tolist()
        prompts.append(body + [int(length) + 1])
    return prompts, targets


def expected_lengths(targets, cap: int, num_samples: int = 1):
    """Generated tokens per row (prompt-major rows): min(target, cap)."""
    return np.repeat(np.minimum(targets, cap), num_samples)


def run_engine(model, prompts, cap: int, *, num_samples=1, slots=16, page_size=16,
               steps_per_call=16, **knobs):
    from flax import nnx

    from rlcsd_jax import inference

    graphdef, params = nnx.split(model)
    t0 = time.perf_counter()
    out = inference.generate_batch(
        graphdef, params, prompts, num_samples=num_samples,
        options=inference.SamplingOptions(0.0), max_new_tokens=cap, eos_ids=[EOS], pad_id=0,
        seed_or_key=0, max_slots=slots, page_size=page_size, steps_per_call=steps_per_call,
        **knobs)
    return out, time.perf_counter() - t0


def run_static(model, prompts, cap: int, *, num_samples=1):
    """Today's sampler (`sampling.generate_arrays`): every row in one batch until the last
    ends.  Its slot-steps: rows x decode steps run (the longest row)."""
    import jax

    from rlcsd_jax import sampling
    from rlcsd_jax.data import packing

    from flax import nnx

    graphdef, params = nnx.split(model)
    width = packing.bucket_length(max(map(len, prompts)))
    ids, mask = sampling.left_pad(prompts, width)
    t0 = time.perf_counter()
    out = sampling.generate_arrays(graphdef, params, ids, mask, jax.random.key(0),
                                   max_new_tokens=cap, num_samples=num_samples,
                                   options=sampling.SamplingOptions(0.0), eos_ids=[EOS])
    out = jax.device_get(out)
    seconds = time.perf_counter() - t0
    steps = int(out["lengths"].max())
    rows = out["tokens"].shape[0]
    stats = dict(decode_steps=steps, busy_slot_steps=int(out["lengths"].sum()),
                 total_slot_steps=rows * steps)
    return dict(out, stats=stats), seconds


def compare(num_prompts=192, cap=128, slots=16, page_size=16, steps_per_call=16, seed=0,
            layers=2, num_samples=1, min_slots=None) -> dict:
    """Both sides on one workload: warm-up (compiles) then a timed run each."""
    model = countdown_model(cap, layers=layers)
    prompts, targets = workload(num_prompts, cap, seed)
    want = expected_lengths(targets, cap, num_samples)
    kw = dict(num_samples=num_samples, slots=slots, page_size=page_size,
              steps_per_call=steps_per_call, min_slots=min_slots)
    run_engine(model, prompts, cap, **kw)                    # warm-up: every program compiled
    eng, t_eng = run_engine(model, prompts, cap, **kw)
    run_static(model, prompts, cap, num_samples=num_samples)
    sta, t_sta = run_static(model, prompts, cap, num_samples=num_samples)
    for name, out in (("engine", eng), ("static", sta)):
        if not np.array_equal(np.asarray(out["lengths"]), want):
            raise AssertionError(f"{name}: generated lengths differ from the workload's")
    useful = int(want.sum())
    rows = []
    for name, out, seconds in (("engine", eng, t_eng), ("static sampler", sta, t_sta)):
        st = out["stats"]
        rows.append(dict(side=name, seconds=seconds, tok_s=useful / seconds,
                         utilization=st["busy_slot_steps"] / st["total_slot_steps"],
                         decode_steps=st["decode_steps"], total_slot_steps=st["total_slot_steps"],
                         peak_kv_tokens=st.get("peak_kv_tokens"),
                         live_at_peak=st.get("live_kv_tokens_at_peak")))
    return dict(rows=rows, useful=useful, prompts=num_prompts, cap=cap, slots=slots,
                page_size=page_size, steps_per_call=steps_per_call, layers=layers,
                mean_len=float(want.mean()), truncated=int((targets > cap).sum()),
                ratio=rows[0]["tok_s"] / rows[1]["tok_s"])


def markdown(result: dict) -> str:
    import jax

    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    r = result
    lines = [
        f"## {now} · engine vs static sampler · {jax.devices()[0].platform.upper()} "
        f"({os.cpu_count()} cores, {platform.machine()})", "",
        f"Long-tailed workload: {r['prompts']} prompts, cap {r['cap']} new tokens, mean "
        f"response {r['mean_len']:.1f} tokens, {r['truncated']} rows at the cap; countdown "
        f"Qwen3 model ({r['layers']} layers, `benchmarks/engine.py`), greedy.  Engine: "
        f"{r['slots']} slots, pages of {r['page_size']}, {r['steps_per_call']} steps per call. "
        f"Useful tokens: {r['useful']}.", "",
        "| side | wall s | useful tok/s | busy / total slot-steps | decode steps | "
        "slot-steps | peak KV tokens | live at peak |",
        "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['side']} | {row['seconds']:.2f} | {row['tok_s']:.0f} | "
                     f"{row['utilization']:.1%} | {row['decode_steps']} | "
                     f"{row['total_slot_steps']} | {row['peak_kv_tokens'] or '-'} | "
                     f"{row['live_at_peak'] or '-'} |")
    lines += ["", f"Engine / static useful tokens/s: **{r['ratio']:.2f}x** (one run, same "
              "process).", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--cap", type=int, default=None)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--steps-per-call", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    a = p.parse_args(argv)
    prompts = a.prompts or (48 if a.quick else 256)
    cap = a.cap or (64 if a.quick else 256)
    result = compare(prompts, cap, a.slots, a.page_size, a.steps_per_call, layers=a.layers)
    text = markdown(result)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n" + text)
    return result


if __name__ == "__main__":
    main()
