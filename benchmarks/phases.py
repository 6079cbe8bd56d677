"""Per-model orchestration: rows, inputs, the HF phase, then the JAX phase.

Order per model: HF inference (decode dynamic/static, scoring, multi-context scoring), HF train
(+ largest-B search), `torch.cuda.empty_cache()`, then JAX inference and JAX train (+ search).
JAX goes last because its allocator keeps what it grew (torch could not get it back) and its train
step donates the master weights.  Every measurement goes through `guarded`: its dict, or
{"error": "OOM: …"}, lands in the row, and the results file is rewritten.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import traceback

import numpy as np

from benchmarks import flops, jax_side, measure, suites
from rlcsd_jax import models


def guarded(run, row: dict | None, side: str, fn, *, flops_count=None, free=None) -> dict:
    """Run one measurement; store its dict (or {"error"}) in row[side] and save the file."""
    t0 = time.perf_counter()
    try:
        out = fn()
        if flops_count is not None:
            out["flops"] = flops_count
    except Exception as e:  # noqa: BLE001  (one failure must not end the run)
        if not isinstance(e, measure.NotApplicable):
            traceback.print_exc(limit=3, file=sys.stderr)
        out = {"error": measure.short_error(e)}
        if free:
            free()
    label = f"{row['model']} {row['kind']}" if row is not None else "(setup)"
    print(f"[benchmarks] {label} {side}: {time.perf_counter() - t0:.1f} s"
          + (f" ({out['error']})" if "error" in out else ""), file=sys.stderr)
    if row is not None:
        row[side] = out
        run.save()
    return out


def search_batches(s: suites.Shapes) -> list[int]:
    """2B, 4B, … up to train_max_batch (empty when the search is off)."""
    out, b = [], s.train_batch * 2
    while s.train_max_batch and b <= s.train_max_batch:
        out.append(b)
        b *= 2
    return out


class ModelRun:
    """One model: its config, shapes, shared numpy inputs and table rows."""

    def __init__(self, run, args, name: str, torch_device: str):
        self.run, self.args, self.name, self.device = run, args, name, torch_device
        self.s = s = dataclasses.replace(suites.default_shapes(args.suite, name), **{
            f.name: getattr(args, f.name) for f in dataclasses.fields(suites.Shapes)
            if getattr(args, f.name, None) is not None})
        self.cfg = cfg = suites.model_config(
            name, dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
            attention_impl=args.attention_impl, scan_layers=not args.no_scan)
        v = cfg.vocab_size
        self.dec = suites.decode_inputs(s, v, args.seed)
        self.sc = suites.score_inputs(s.score_batch, s.score_seq, v, args.seed + 1)
        self.cx = suites.score_inputs(s.contexts * s.ctx_batch, s.score_seq, v, args.seed + 3)
        self.train_np = suites.train_inputs(s.train_batch, s.train_seq, s, v, args.seed + 2)
        t_score, t_train = s.score_seq - s.response_start, s.train_seq - s.response_start
        self.flops = dict(
            score=flops.forward_flops(cfg, s.score_batch, s.score_seq, t_score),
            ctx=flops.forward_flops(cfg, s.contexts * s.ctx_batch, s.score_seq, t_score),
            train=flops.train_flops(cfg, s.train_batch, s.train_seq, t_train))
        self.hf_logp0 = None
        self.rows = self._make_rows()

    def _make_rows(self) -> dict:
        s, want, run, n = self.s, set(self.args.kinds), self.run, self.name
        rows = {}
        if "decode" in want:
            shape = f"{s.decode_batch} × {s.prompt_len} → +{s.new_tokens}"
            rows["dyn"] = run.row(n, "decode vs HF dynamic cache", shape)
            rows["static"] = run.row(n, "decode vs HF static cache", shape)
        if "scoring" in want:
            rows["score"] = run.row(n, "scoring", f"{s.score_batch} × {s.score_seq}")
            rows["ctx"] = run.row(n, f"scoring, {s.contexts} contexts",
                                  f"[{s.contexts}, {s.ctx_batch}, {s.score_seq}]")
        if "train" in want:
            rows["train"] = run.row(n, "train step (rlcsd)", f"{s.train_batch} × {s.train_seq}")
            if search_batches(s):
                rows["maxb"] = run.row(n, "train step, largest B",
                                       f"B ≤ {s.train_max_batch} × {s.train_seq}")
        for side in ("jax", "hf"):
            if side not in self.args.side_list:
                for r in rows.values():
                    r[side] = {"error": "n/a: skipped (--sides)"}
        kv = models.KVCache.num_bytes(self.cfg, s.decode_batch, s.prompt_len + s.new_tokens)
        run.details.append(
            f"{n}: {models.num_params(self.cfg) / 1e6:,.1f}M params, N_matmul (no embeddings, "
            f"with LM head) {flops.matmul_params(self.cfg) / 1e6:,.1f}M, vocab "
            f"{self.cfg.vocab_size}; decode KV cache {kv / 2**20:,.1f} MiB; "
            f"{', '.join(f'{k}={v}' for k, v in dataclasses.asdict(s).items())}")
        run.save()
        return rows

    def free(self):
        from benchmarks import hf_side

        hf_side.free(self.device)

    # ------------------------------------------------------------------------------------------
    def execute(self):
        _, self.graphdef, self.params = jax_side.build(self.cfg, self.args.seed)
        if "hf" in self.args.side_list:
            self.hf_inference()
            if "train" in self.rows:
                self.hf_train()
        if "jax" in self.args.side_list:
            self.jax_inference()
            if "train" in self.rows:
                self.jax_train()

    def hf_inference(self):
        from benchmarks import hf_side

        rows, s, a, dev = self.rows, self.s, self.args, self.device
        if not ({"dyn", "score"} & set(rows)):
            return
        built = guarded(self.run, None, "hf", lambda: {"m": hf_side.build(
            self.cfg, self.params, a.dtype, dev)}, free=self.free)
        if "m" not in built:
            for key in ("dyn", "static", "score", "ctx"):
                if key in rows:
                    rows[key]["hf"] = built
            return
        model = built["m"]
        self._logit_parity(model)
        if "dyn" in rows:
            guarded(self.run, rows["dyn"], "hf", lambda: hf_side.decode(
                model, *self.dec, s.new_tokens, a.decode_repeats, dev), free=self.free)
            guarded(self.run, rows["static"], "hf", lambda: self._hf_static(model),
                    free=self.free)
        if "score" in rows:
            out = guarded(self.run, rows["score"], "hf", lambda: hf_side.score(
                model, *self.sc, s, a.repeats, dev), flops_count=self.flops["score"],
                free=self.free)
            self.hf_logp0 = out.pop("logp_row0", None)
            guarded(self.run, rows["ctx"], "hf", lambda: hf_side.score(
                model, *self.cx, s, a.repeats, dev), flops_count=self.flops["ctx"],
                free=self.free).pop("logp_row0", None)
        model = built = None  # drop the last reference before emptying the cache
        self.free()

    def _logit_parity(self, hf_model):
        from benchmarks import hf_side

        probe = self.sc[0][:2, :min(64, self.s.score_seq)]
        try:
            d = np.abs(jax_side.logits(self.graphdef, self.params, probe)
                       - hf_side.logits(hf_model, probe, self.device))
            self.run.details.append(
                f"{self.name}: logit parity on {list(probe.shape)} (identical weights, "
                f"{self.args.dtype} compute): max abs Δ {d.max():.3g}, mean abs Δ {d.mean():.3g}")
        except Exception as e:  # noqa: BLE001
            self.run.details.append(f"{self.name}: logit parity failed: {measure.short_error(e)}")

    def _hf_static(self, model):
        from benchmarks import hf_side

        a, dyn = self.args, self.rows["dyn"]["hf"]
        if a.no_hf_static:
            raise measure.NotApplicable("skipped (--no-hf-static)")
        if not self.device.startswith("cuda") and "seconds" in dyn:
            est = dyn["seconds"] * (a.decode_repeats + 1)
            if est > a.hf_static_budget_s:
                raise measure.NotApplicable(
                    f"eager static cache on CPU would take ~{est:.0f} s "
                    f"(> --hf-static-budget-s {a.hf_static_budget_s:.0f})")
        return hf_side.decode(model, *self.dec, self.s.new_tokens, a.decode_repeats,
                              self.device, cache="static")

    def hf_train(self):
        from benchmarks import hf_side

        a, s, dev = self.args, self.s, self.device
        autocast = None if a.dtype == "float32" else a.dtype
        built = guarded(self.run, None, "hf", lambda: {"m": hf_side.build(
            self.cfg, self.params, a.param_dtype, dev)}, free=self.free)
        if "m" not in built:
            self.rows["train"]["hf"] = built
            return
        model = built.pop("m")
        opt = hf_side.prepare_train(model, dev)
        base = guarded(self.run, self.rows["train"], "hf", lambda: hf_side.train_step(
            model, opt, self.train_np, s, a.repeats, dev, autocast),
            flops_count=self.flops["train"], free=self.free)
        if "maxb" in self.rows:
            self._search("hf", base, lambda b: hf_side.train_step(
                model, opt, self._train_batch(b), s, 1, dev, autocast))
        model = opt = None
        self.free()

    # ------------------------------------------------------------------------------------------
    def jax_inference(self):
        rows, s, a = self.rows, self.s, self.args
        infer = jax_side.infer_params(self.params, self.cfg, a.infer_params)
        if "dyn" in rows:
            out = guarded(self.run, rows["dyn"], "jax", lambda: jax_side.decode(
                self.graphdef, infer, *self.dec, s.new_tokens, a.decode_repeats))
            rows["static"]["jax"] = out
            self._decode_breakdown()
            self.run.save()
        if "score" in rows:
            out = guarded(self.run, rows["score"], "jax", lambda: jax_side.score(
                self.graphdef, infer, self.sc[0][None], self.sc[1][None], s, a.repeats),
                flops_count=self.flops["score"])
            jl = out.pop("logp_row0", None)
            if jl is not None and self.hf_logp0 is not None:
                self.run.details.append(
                    f"{self.name}: scoring log-prob parity, row 0 (JAX vs HF): max abs Δ "
                    f"{np.abs(jl - self.hf_logp0).max():.3g}")
            cx = [x.reshape(s.contexts, s.ctx_batch, -1) for x in self.cx]
            guarded(self.run, rows["ctx"], "jax", lambda: jax_side.score(
                self.graphdef, infer, *cx, s, a.repeats),
                flops_count=self.flops["ctx"]).pop("logp_row0", None)

    def _decode_breakdown(self):
        parts = []
        for side in ("jax", "hf"):
            r = self.rows["dyn"].get(side) or {}
            if r.get("prefill_s") is not None and r.get("step_ms") is not None:
                parts.append(f"{side.upper()} prefill {1e3 * r['prefill_s']:.1f} ms + "
                             f"{r['step_ms']:.2f} ms/step")
        if parts:
            self.run.details.append(f"{self.name}: decode time split (dynamic cache for HF): "
                                    + "; ".join(parts))

    def jax_train(self):
        a, s = self.args, self.s
        state = jax_side.TrainState(self.cfg, self.params, jax_side.optimizer(), a.seed)
        self.params = None  # donated by the first step
        limit = measure.jax_bytes_limit()
        base = guarded(self.run, self.rows["train"], "jax", lambda: jax_side.train_step(
            state, self.graphdef, self.train_np, s, a.repeats, limit),
            flops_count=self.flops["train"])
        if "maxb" in self.rows:
            self._search("jax", base, lambda b: jax_side.train_step(
                state, self.graphdef, self._train_batch(b), s, 1, limit))

    # ------------------------------------------------------------------------------------------
    def _train_batch(self, b: int) -> dict:
        return suites.train_inputs(b, self.s.train_seq, self.s, self.cfg.vocab_size,
                                   self.args.seed + 2)

    def _search(self, side: str, base: dict, step_fn):
        """Double B from train_batch until an error/OOM or train_max_batch; the row keeps the
        largest B that ran."""
        s, row = self.s, self.rows["maxb"]
        if "error" in base:
            row[side] = {"error": f"n/a: B={s.train_batch} already failed"}
            self.run.save()
            return
        best, tried = base, []
        for b in search_batches(s):
            def attempt(b=b):
                out = step_fn(b)
                out["flops"] = flops.train_flops(self.cfg, b, s.train_seq,
                                                 s.train_seq - s.response_start)
                return out

            res = guarded(self.run, None, side, attempt,
                          free=self.free if side == "hf" else None)
            tried.append(f"B={b}: " + (res["error"] if "error" in res
                                        else f"{res['tok_s']:,.0f} tok/s"))
            if "error" in res:
                break
            best = res
        row[side] = best
        row["notes"].append(f"{side.upper()} max B={best['batch']}")
        self.run.details.append(f"{self.name} {side.upper()} train batch search "
                                f"(S={s.train_seq}): " + ("; ".join(tried) or "not run"))
        self.run.save()
