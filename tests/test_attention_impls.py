"""Every attention implementation equals the dense `xla` reference in value and gradient (fp32,
1e-5) on the layouts the code produces: grouped-query heads, left and right padding, packed
segments, Olmo-3's sliding window across its boundary, a query block over a KV cache (T != S),
lengths that are not a multiple of the block, and shared-prefix rows (two passes merged)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcsd_jax.models import attention_impls, flash

B, H, KV, D = 2, 4, 2, 16
TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(t, s, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, t, H, D)), jax.random.normal(ks[1], (B, s, KV, D)),
            jax.random.normal(ks[2], (B, s, KV, D)))


def right_padded(t, lengths):
    seg = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    pos = np.broadcast_to(np.arange(t), (len(lengths), t)).astype(np.int32)
    return pos, seg


def left_padded(t, lengths):
    seg = (np.arange(t)[None] >= t - np.asarray(lengths)[:, None]).astype(np.int32)
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
    return pos, seg


def packed(t, lengths):
    """Row b holds sequences of the given lengths back to back (segment ids 1, 2, ...)."""
    pos, seg = np.zeros((len(lengths), t), np.int32), np.zeros((len(lengths), t), np.int32)
    for b, parts in enumerate(lengths):
        start = 0
        for i, n in enumerate(parts):
            pos[b, start:start + n] = np.arange(n)
            seg[b, start:start + n] = i + 1
            start += n
    return pos, seg


LAYOUTS = {
    "right": lambda t: right_padded(t, [t, t - 37]),
    "left": lambda t: left_padded(t, [t - 5, t - 61]),
    "packed": lambda t: packed(t, [[70, 60, t - 140], [t - 9]]),
}


def _check(impl, t, pos, seg, window, **kw):
    q, k, v = _qkv(t, t)
    args = (jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(seg))
    real = jnp.asarray(seg != 0)[:, :, None, None]
    cot = jax.random.normal(jax.random.key(9), q.shape)

    def loss(f, q, k, v):   # only real queries: padding queries' outputs are unspecified
        return jnp.sum(jnp.where(real, f(q, k, v, *args, window=window) * cot, 0.0))

    ref_fn = functools.partial(loss, attention_impls.xla_attention)
    got_fn = functools.partial(loss, functools.partial(impl, **kw))
    np.testing.assert_allclose(got_fn(q, k, v), ref_fn(q, k, v), **TOL)
    out_ref = attention_impls.xla_attention(q, k, v, *args, window=window)
    out = impl(q, k, v, *args, window=window, **kw)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, out_ref, 0), **TOL)
    for g, r in zip(jax.grad(got_fn, (0, 1, 2))(q, k, v), jax.grad(ref_fn, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, r, **TOL)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("window", [None, 48])
def test_blockwise_equals_reference(layout, window):
    t = 200                               # not a multiple of the 64-token blocks
    pos, seg = LAYOUTS[layout](t)
    _check(flash.blockwise_attention, t, pos, seg, window, q_block=64, kv_block=64)


def test_blockwise_over_a_cache():
    """T = 8 new queries over S = 200 cache slots, some empty (a decode / chunked prefill)."""
    t, s = 8, 200
    q, k, v = _qkv(t, s, seed=3)
    k_seg = np.zeros((B, s), np.int32)
    k_seg[0, :150], k_seg[1, 20:120] = 1, 1                      # row 1 left-padded by 20
    k_pos = np.maximum(np.cumsum(k_seg, 1) - 1, 0).astype(np.int32)
    q_pos = np.stack([np.arange(142, 150), np.arange(92, 100)]).astype(np.int32)
    q_seg = np.ones((B, t), np.int32)
    args = [jnp.asarray(x) for x in (q_pos, k_pos, q_seg, k_seg)]
    for window in (None, 16):
        ref = attention_impls.xla_attention(q, k, v, *args, window=window)
        got = flash.blockwise_attention(q, k, v, *args, window=window, q_block=8, kv_block=64)
        np.testing.assert_allclose(got, ref, **TOL)


def test_fully_masked_queries_are_finite_and_keys_beyond_every_query_skipped():
    t = 128
    pos, seg = right_padded(t, [0, 40])                       # row 0 is all padding
    q, k, v = _qkv(t, t)
    out = flash.blockwise_attention(q, k, v, jnp.asarray(pos), jnp.asarray(pos),
                                    jnp.asarray(seg), jnp.asarray(seg), q_block=32, kv_block=32)
    assert np.isfinite(np.asarray(out)).all() and not np.asarray(out)[0].any()
    need = flash._needed(*[flash._blocks(jnp.asarray(x), 4, 1) for x in (pos, seg, pos, seg)],
                         flash._NONE)
    # causal: block i needs key blocks 0..i only, and nothing past the 40 real tokens of row 1
    assert np.asarray(need).tolist() == [[True, False, False, False], [True, True, False, False],
                                         [False] * 4, [False] * 4]


@pytest.mark.parametrize("layout", ["right", "left", "packed"])
@pytest.mark.parametrize("window", [None, 100])
def test_splash_interpret_equals_reference(layout, window):
    """The TPU kernel itself, run by Pallas' interpreter on CPU (256 tokens, 128-token blocks)."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    t = 256
    pos, seg = LAYOUTS[layout](t)
    _check(attention_impls.splash_attention, t, pos, seg, window)


@pytest.mark.parametrize("window", [None, 48])
def test_cudnn_path_masks_like_the_reference(window):
    """cuDNN's masking (causal + per-row lengths + window) through jax.nn.dot_product_attention's
    XLA implementation on CPU; left-padded rows fall back to blockwise."""
    t = 96
    pos, seg = right_padded(t, [t, 50])
    _check(attention_impls.cudnn_attention, t, pos, seg, window, right_padded=True,
           implementation="xla")
    pos, seg = left_padded(t, [t, 50])
    _check(attention_impls.cudnn_attention, t, pos, seg, window)     # falls back


def shared_prefix_row(t, groups):
    """A row packing groups (prefix length, [response lengths]) back to back, then padding:
    (positions, segment ids with each prefix and response its own segment, prefix pass q / k
    ids, the dense visibility [T, T] a response sees: its group's prefix and itself)."""
    pos, seg, pq, pk = (np.zeros(t, np.int32) for _ in range(4))
    group_of, prefix_tok = np.zeros(t, np.int32), np.zeros(t, bool)
    at, next_seg = 0, 1
    for g, (p, responses) in enumerate(groups, start=1):
        pos[at:at + p], seg[at:at + p], pk[at:at + p] = np.arange(p), next_seg, g
        group_of[at:at + p], prefix_tok[at:at + p] = g, True
        at, next_seg = at + p, next_seg + 1
        for n in responses:
            pos[at:at + n], seg[at:at + n], pq[at:at + n] = np.arange(p, p + n), next_seg, g
            group_of[at:at + n] = g
            at, next_seg = at + n, next_seg + 1
    same_group = (group_of[:, None] == group_of[None, :]) & (group_of[:, None] != 0)
    own = (seg[:, None] == seg[None, :]) | prefix_tok[None, :]
    visible = same_group & own & (pos[None, :] <= pos[:, None])
    return pos, seg, pq, pk, visible


@pytest.mark.parametrize("impl", ["xla", "blockwise", "splash"])
@pytest.mark.parametrize("window", [None, 40])
def test_shared_prefix_rows_equal_the_dense_rule(impl, window):
    """Groups [prefix | r1 | r2 ...] packed in a row: each response sees its group's prefix and
    itself (two passes merged by log-sum-exp) exactly as a dense mask of that rule says; splash
    in interpret mode (its windowed layers go through blockwise)."""
    if impl == "splash":
        pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    t = 256
    rows = [shared_prefix_row(t, [(50, [30, 45]), (20, [40, 11])]),
            shared_prefix_row(t, [(100, [60]), (7, [3, 5, 9])])]
    pos, seg, pq, pk, vis = (np.stack(x) for x in zip(*rows))
    if window is not None:
        vis &= pos[:, None, :] > pos[:, :, None] - window
    q, k, v = _qkv(t, t, seed=5)
    d = q.shape[-1]
    scores = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, H // KV, axis=2)) * d ** -0.5
    probs = jax.nn.softmax(jnp.where(vis[:, None], scores, -jnp.inf), axis=-1)
    ref = jnp.einsum("bhts,bshd->bthd", jnp.nan_to_num(probs), jnp.repeat(v, H // KV, axis=2))
    a = [jnp.asarray(x) for x in (pos, pos, seg, seg, pq, pk)]
    got = attention_impls.shared_prefix_attention(impl, q, k, v, *a, window=window)
    real = (seg != 0)[:, :, None, None]
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0), **TOL)


def test_blockwise_skips_tiles_between_packed_sequences():
    """Tiles whose query and key segment ranges do not meet are skipped, not just masked."""
    t = 128
    pos, seg = packed(t, [[32, 32, 32, 32]])
    args = [flash._blocks(jnp.asarray(x), 4, 1) for x in (pos, seg, pos, seg)]
    need = np.asarray(flash._needed(*args, flash._NONE))
    np.testing.assert_array_equal(need, np.eye(4, dtype=bool))


@pytest.mark.parametrize("impl", ["xla", "blockwise", "splash"])
def test_shared_prefix_rows_with_a_padding_block_stay_finite(impl):
    """A row whose last query block is all padding (every tile of it skipped in both passes)
    gives finite outputs everywhere: NaN there would reach the real tokens' values in the next
    layer (0 * NaN)."""
    if impl == "splash":
        pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    t = 256
    rows = [shared_prefix_row(t, [(60, [40, 20])]), shared_prefix_row(t, [(120, [8])])]
    pos, seg, pq, pk, _ = (np.stack(x) for x in zip(*rows))
    q, k, v = _qkv(t, t, seed=6)
    a = [jnp.asarray(x) for x in (pos, pos, seg, seg, pq, pk)]
    got = attention_impls.shared_prefix_attention(impl, q, k, v, *a)
    assert np.isfinite(np.asarray(got)).all()


def test_splash_marks_the_tiles_between_packed_sequences_empty():
    """With segment skipping (the shared-prefix passes), a 512-token row of four 128-token
    sequences keeps only the 4 diagonal tiles of the causal kernel's 10 (128-token tiles)."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    from rlcsd_jax.models import splash

    kernel = splash._kernel(1, 512, 512, None, 128, 128, True, True)
    seg = jnp.asarray(np.repeat([1, 2, 3, 4], 128), jnp.int32)
    static = np.asarray(kernel.fwd_mask_info.block_mask)
    dynamic = np.asarray(splash._skip_by_segments(kernel, seg, seg, 128, 128)
                         .fwd_mask_info.block_mask)
    assert (static != 0).sum() == 10 and (dynamic != 0).sum() == 4
