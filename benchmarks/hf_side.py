"""The HF transformers (PyTorch) side: the same three measurements on the same device and shapes.

The HF model is `AutoModelForCausalLM.from_config` of `models.to_hf_config(cfg)` (sdpa
attention), filled with the JAX model's random weights through `hf_io.hf_tensors` (the exporter
`save_pretrained` uses), so logits can be compared.  Inference runs with weights in the compute
dtype; the train step keeps fp32 weights under `torch.autocast(bf16)` on GPU (plain fp32 on CPU),
gradient checkpointing on, fused/foreach AdamW.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flax import nnx

from benchmarks import measure
from benchmarks.suites import Shapes
from rlcsd_jax import models
from rlcsd_jax.models import hf_io


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(cfg: models.ModelConfig, jax_params, dtype: str, device: str):
    """HF model with the JAX model's weights (jax_params: nnx State of fp32 params)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = models.to_hf_config(cfg)
    hf.pop("architectures", None)
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa")
    state = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for name, arr in hf_io.hf_tensors(cfg, nnx.to_pure_dict(jax_params)):
            state[name].copy_(torch.from_numpy(np.array(arr, copy=True)))
            loaded.add(name)
    missing = set(state) - loaded - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing:
        raise KeyError(f"HF weights not filled from the JAX model: {sorted(missing)[:5]}")
    return model.eval()


class _Memory:
    """Peak memory of a block: CUDA max_memory_allocated, else sampled RSS delta."""

    def __init__(self, device: str):
        self.device, self.bytes, self.method = device, None, "n/a"

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            self._rss = measure.RssPeak().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.bytes, self.method = torch.cuda.max_memory_allocated(), "max_memory_allocated"
        else:
            self._rss.__exit__(*exc)
            self.bytes = self._rss.delta
            self.method = "RSS delta" if self.bytes is not None else "n/a"
        return False


def logits(model, ids: np.ndarray, device: str) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long().to(device))
    return out.logits.float().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# 1. decode
# ----------------------------------------------------------------------------------------------


def decode(model, ids: np.ndarray, mask: np.ndarray, new_tokens: int, repeats: int, device: str,
           cache: str = "dynamic") -> dict:
    """`model.generate(do_sample, T=1, top_p=.95, top_k=20, min_new_tokens=max_new_tokens)`.

    cache 'dynamic': warm-up with a 4-token call, first_s = 0 (nothing to compile).
    cache 'static': `cache_implementation="static"`; first_s is the first full call (torch.compile
    on CUDA; transformers does not auto-compile on CPU, so there it runs eagerly).
    prefill_s: a 1-new-token call, so step_ms = (total - prefill) / (new_tokens - 1).
    """
    ids_t = torch.from_numpy(ids).long().to(device)
    mask_t = torch.from_numpy(mask).long().to(device)
    extra = {"cache_implementation": "static"} if cache == "static" else {}

    def gen(n):
        out = model.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=True,
                             temperature=1.0, top_p=0.95, top_k=20, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0, **extra)
        _sync(device)
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"HF generate produced {out.shape[1] - ids.shape[1]} of {n} tokens")

    with torch.no_grad(), _Memory(device) as mem:
        if cache == "dynamic":
            gen(min(4, new_tokens))
            timing = measure.time_calls(lambda: gen(new_tokens), repeats, first=False)
            prefill = measure.time_calls(lambda: gen(1), repeats, first=False).median
        else:
            timing = measure.time_calls(lambda: gen(new_tokens), repeats)
            prefill = None
    tokens = ids.shape[0] * new_tokens
    out = dict(tokens=tokens, seconds=timing.median, tok_s=tokens / timing.median,
               cores=timing.cores,
               first_s=timing.first if cache == "static" else None,
               compile_s=timing.compile if cache == "static" else None,
               mem_bytes=mem.bytes, mem_method=mem.method)
    if prefill is not None:
        out.update(prefill_s=prefill,
                   step_ms=1e3 * (timing.median - prefill) / max(new_tokens - 1, 1))
    if cache == "static" and not device.startswith("cuda"):
        out["note"] = "static cache run eagerly (transformers auto-compiles only on cuda/xpu/tpu)"
    return out


# ----------------------------------------------------------------------------------------------
# 2. scoring
# ----------------------------------------------------------------------------------------------


def response_logprobs(model, ids, mask, start: int, length: int, chunk: int, checkpoint=False):
    """Per-token log-probs [N, T] of ids[:, start:start+T] given the prefix (fp32 log_softmax).

    Hidden states come from one forward of the base model; the LM head + log_softmax + gather run
    over T positions in chunks of `chunk` (under torch checkpointing when training), so [N, S, V]
    is never materialised.
    """
    h = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()

    def piece(hc, tgt):
        logp = torch.log_softmax(head(hc).float(), dim=-1)
        return logp.gather(-1, tgt[..., None])[..., 0]

    out = []
    for c0 in range(0, length, chunk):
        c1 = min(c0 + chunk, length)
        hc, tgt = h[:, start - 1 + c0:start - 1 + c1], ids[:, start + c0:start + c1]
        if checkpoint:
            out.append(torch.utils.checkpoint.checkpoint(piece, hc, tgt, use_reentrant=False))
        else:
            out.append(piece(hc, tgt))
    return torch.cat(out, dim=1)


def score(model, ids: np.ndarray, mask: np.ndarray, s: Shapes, repeats: int, device: str) -> dict:
    """Forward + chunked fp32 log_softmax gather on rows [N, S]; tokens = N * S."""
    ids_t = torch.from_numpy(ids).long().to(device)
    mask_t = torch.from_numpy(mask).long().to(device)
    length = ids.shape[1] - s.response_start
    last = {}

    def call():
        with torch.no_grad():
            last["logp"] = response_logprobs(model, ids_t, mask_t, s.response_start, length,
                                             min(s.chunk, length))
        _sync(device)

    with _Memory(device) as mem:
        timing = measure.time_calls(call, repeats)
    logp = last["logp"].cpu().numpy()
    if not np.isfinite(logp).all():
        raise FloatingPointError("non-finite HF log-probs")
    tokens = ids.size
    return dict(tokens=tokens, seconds=timing.median, tok_s=tokens / timing.median,
                cores=timing.cores,
                first_s=timing.first, compile_s=None, mem_bytes=mem.bytes,
                mem_method=mem.method, logp_row0=logp[0])


# ----------------------------------------------------------------------------------------------
# 3. train step
# ----------------------------------------------------------------------------------------------


def prepare_train(model, device: str):
    """Training mode, gradient checkpointing on, AdamW (fused on CUDA) with clip 1.0 in the step."""
    model.train()
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    fused = device.startswith("cuda")
    return torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, fused=fused,
                             foreach=None if fused else True)


def train_step(model, opt, batch_np: dict, s: Shapes, repeats: int, device: str,
               autocast_dtype: str | None) -> dict:
    """forward + backward of -mean(logp of the response tokens) + clip + AdamW; tokens = B * S."""
    ids = torch.from_numpy(batch_np["input_ids"]).long().to(device)
    mask = torch.from_numpy(batch_np["attention_mask"]).long().to(device)
    rmask = torch.from_numpy(batch_np["mask"]).to(device)
    length = ids.shape[1] - s.response_start
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    seen = []

    def call():
        with torch.autocast(dev_type, dtype=getattr(torch, autocast_dtype or "float32"),
                            enabled=autocast_dtype is not None):
            logp = response_logprobs(model, ids, mask, s.response_start, length,
                                     min(s.chunk, length), checkpoint=True)
            loss = -(logp * rmask).sum() / rmask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        seen.append(float(loss.detach()))

    with _Memory(device) as mem:
        timing = measure.time_calls(call, repeats)
    if not all(math.isfinite(x) for x in seen):
        raise FloatingPointError(f"non-finite HF train loss {seen}")
    tokens = ids.numel()
    return dict(tokens=tokens, seconds=timing.median, tok_s=tokens / timing.median,
                cores=timing.cores,
                first_s=timing.first, compile_s=None, mem_bytes=mem.bytes,
                mem_method=mem.method, loss=seen[-1], batch=ids.shape[0])


def free(device: str):
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
