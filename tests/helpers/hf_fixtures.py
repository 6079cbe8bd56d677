"""Tiny random HF checkpoints built in-process (no downloads) for parity tests."""

from __future__ import annotations

import os

import numpy as np
import pytest

YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
        "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1}


def qwen3_config(tied=True, **kw):
    from transformers import Qwen3Config

    args = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                tie_word_embeddings=tied, rms_norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    args.update(kw)
    return Qwen3Config(**args)


def olmo3_config(num_kv_heads=2, **kw):
    from transformers import Olmo3Config

    args = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=num_kv_heads, sliding_window=16,
                rope_scaling=dict(YARN), rope_theta=5e5, max_position_embeddings=512,
                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=2,
                pad_token_id=0)
    args.update(kw)
    return Olmo3Config(**args)


def save_hf_model(config, out_dir, seed=0, max_shard_size=None, scale_norms=True):
    """Random-init an HF model (eager attention, fp32), perturb norm weights so a wrong norm
    placement cannot hide behind all-ones weights, and save it as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    if scale_norms:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, safe_serialization=True, **kw)
    return model


def hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None, positions=None,
              hidden=False):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=None if mask is None else torch.tensor(mask),
                    position_ids=None if positions is None else torch.tensor(positions),
                    output_hidden_states=hidden)
    if hidden:
        return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]
    return out.logits.float().numpy()


def padded_batch(seqs, width, side):
    """Rows padded on `side` to `width` -> (ids [B, width], mask [B, width])."""
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


def real_rows(logits, seqs, width, side):
    """The unpadded part of each row of `logits` [B, width, ...]."""
    return [logits[i, :len(s)] if side == "right" else logits[i, width - len(s):]
            for i, s in enumerate(seqs)]


def files(d):
    return sorted(os.listdir(d))


# ----------------------------------------------------------------------------------------------
# Generation parity (tests/test_sampling.py, tests/test_engine.py)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["qwen3", "olmo3"])
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    cfg = qwen3_config(tied=True) if request.param == "qwen3" else olmo3_config(
        max_position_embeddings=256)
    hf = save_hf_model(cfg, d)
    from rlcsd_jax import models

    return hf, models.load_pretrained(str(d))


def hf_greedy(hf, prompts, max_new, eos):
    """HF `generate` greedy continuations [B, max_new] of left-padded `prompts`."""
    import torch

    from rlcsd_jax import sampling

    ids, mask = sampling.left_pad(prompts, max(map(len, prompts)))
    out = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                      do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


def strip(row, eos):
    """`row` up to and including its first token in `eos`."""
    row = list(row)
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row
