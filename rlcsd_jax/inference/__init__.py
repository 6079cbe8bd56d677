"""The rollout engine: continuous batching over a paged KV cache (docs/engine.md).

    pages.py            page pool array, budget from bytes, host allocator (refcounts)
    paged_attention.py  in-place token writes, decode attention (gather / TPU Pallas)
    paged_kv.py         the views of the pool the model's attention layers write / read
    selection.py        temperature / top-k / top-p, log-probs, per-request RNG streams
    programs.py         jitted prefill, page copy, multi-step decode
    scheduler.py        host refill loop: queue, slots, page reservation, preemption
    engine.py           the loop tying them together; `generate_batch`
    plan.py             the programs' abstract arguments for the planner
"""

from rlcsd_jax.inference.engine import Engine, EngineConfig, generate_batch
from rlcsd_jax.inference.pages import kv_budget_tokens_for_bytes, kv_bytes_per_token
from rlcsd_jax.inference.selection import SamplingOptions

__all__ = ["Engine", "EngineConfig", "SamplingOptions", "generate_batch",
           "kv_budget_tokens_for_bytes", "kv_bytes_per_token"]
