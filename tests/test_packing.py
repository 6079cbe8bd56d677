"""Teacher batch packing and the per-row alignment rule (algorithm.md §2.4, §2.5, §9)."""

import numpy as np
import pytest

from helpers import references
from rlcsd_jax.data import packing as tb

V = 50


def bigram_logits(input_ids, table):
    """A toy causal LM: the logits at position s depend only on the token AT s. The true
    log-prob of a response token is therefore log_softmax(table[previous token])[token],
    whatever the padding or layout, so any misalignment shows up as a wrong value."""
    return table[input_ids]


def true_response_logprobs(prompt, response, table):
    ls = table - np.log(np.exp(table).sum(-1, keepdims=True))
    prev = [prompt[-1]] + list(response[:-1])
    return np.array([ls[p, y] for p, y in zip(prev, response)])


@pytest.fixture
def table():
    return np.random.default_rng(0).normal(size=(V, V)) * 2.0


def ids(rng, n):
    return rng.integers(1, V, size=n).tolist()


def test_shapes_layout_and_invalid_slots():
    r = np.random.default_rng(1)
    correct = [ids(r, 5), ids(r, 9), ids(r, 3)]
    wrong = [[ids(r, 7), ids(r, 4)], [], [ids(r, 2), ids(r, 6), ids(r, 8), ids(r, 3)]]
    resp = [ids(r, 4), ids(r, 11), ids(r, 1)]
    b = tb.pack_teacher_batch(correct, wrong, resp, k_max=4, pad_id=0)
    assert b.input_ids.shape == (5, 3, 32)  # longest row 9 + 11 = 20 → next power of two
    assert b.attention_mask.shape == (5, 3, 32) and b.prompt_lens.shape == (5, 3)
    assert b.response_lens.tolist() == [4, 11, 1]
    assert b.wrong_valid.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert b.num_slots == 5 and b.active_slots == 5
    for i in range(3):
        prompts = [correct[i]] + wrong[i] + [(wrong[i] or [correct[i]])[0]] * (4 - len(wrong[i]))
        for s, p in enumerate(prompts):
            row = b.input_ids[s, i]
            lp, n = len(p), len(p) + len(resp[i])
            assert b.prompt_lens[s, i] == lp
            assert row[:lp].tolist() == p  # prompt first ...
            assert row[lp:n].tolist() == resp[i]  # ... then the student's ids, verbatim
            assert np.all(row[n:] == 0)  # right padding
            assert b.attention_mask[s, i].tolist() == [1] * n + [0] * (32 - n)
    # Invalid slots are copies of slot 1 (the first wrong prompt), or of the correct prompt.
    assert np.array_equal(b.input_ids[3, 0], b.input_ids[1, 0])
    assert np.array_equal(b.input_ids[4, 0], b.input_ids[1, 0])
    for s in range(1, 5):
        assert np.array_equal(b.input_ids[s, 1], b.input_ids[0, 1])
    assert b.prompt_tokens_truncated.sum() == 0


def test_buckets_and_batch_padding():
    b = tb.pack_teacher_batch([[1, 2, 3]], [[[4]]], [[5, 6]], k_max=2, buckets=[4, 8, 64],
                              batch_size=4)
    assert b.input_ids.shape == (3, 4, 8)
    assert b.response_lens.tolist() == [2, 0, 0, 0] and b.prompt_lens[:, 1:].sum() == 0
    assert b.attention_mask[:, 1:].sum() == 0 and not b.wrong_valid[1:].any()
    assert b.active_slots == 2  # only one wrong slot is ever valid: slot 2 can be skipped
    with pytest.raises(ValueError, match="bucket"):
        tb.pack_teacher_batch([[1] * 70], [[]], [[5]], k_max=1, buckets=[8, 64])
    # powers of two up to 8192, then steps of 2048: a 33k-token row pads to 34,816, not 65,536
    assert [tb.bucket_length(n) for n in (1, 17, 64, 65, 8192, 8193, 33000)] == [
        16, 32, 64, 128, 8192, 10240, 34816]
    with pytest.raises(ValueError, match="k_max"):
        tb.pack_teacher_batch([[1]], [[[2], [3]]], [[4]], k_max=1)
    with pytest.raises(ValueError, match="batch_size"):
        tb.pack_teacher_batch([[1], [2]], [[], []], [[4], [5]], k_max=1, batch_size=1)


def test_left_truncation_keeps_last_prompt_tokens_never_the_response():
    prompt = list(range(1, 21))  # 20 tokens
    wrong = list(range(30, 36))  # 6 tokens
    resp = [40, 41, 42, 43, 44, 45, 46, 47]
    b = tb.pack_teacher_batch([prompt], [[wrong]], [resp], k_max=1, max_len=16)
    assert b.prompt_lens[:, 0].tolist() == [8, 6]
    assert b.input_ids[0, 0, :16].tolist() == prompt[-8:] + resp
    assert b.input_ids[1, 0, :14].tolist() == wrong + resp  # fits: untouched
    assert b.prompt_tokens_truncated[:, 0].tolist() == [12, 0]
    assert b.input_ids.shape[-1] == 16
    with pytest.raises(ValueError, match="never truncated"):
        tb.pack_teacher_batch([prompt], [[]], [list(range(16))], k_max=1, max_len=16)
    assert tb.truncate_prompt_left([1, 2, 3], 5, None) == ([1, 2, 3], 0)


def test_response_ids_from_mask_keeps_pad_valued_tokens():
    # pad id 0 == a real generated token (e.g. an eos used as pad): the mask decides (§12.14).
    responses = np.array([[5, 0, 7, 0, 0], [3, 3, 0, 9, 0]])
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    assert tb.response_ids_from_mask(responses, mask) == [[5, 0, 7], [3, 3, 0, 9]]


def test_positions_rule():
    pos = references.response_logprob_positions(np.array([[3, 7]]), 4)
    assert pos.tolist() == [[[2, 3, 4, 5], [6, 7, 8, 9]]]
    assert references.response_logprob_positions(np.array([3, 7]), 4, seq_len=9)[1].tolist() == [6, 7,
                                                                                         8, 8]


def test_alignment_per_row_with_mixed_lengths(table):
    """Rows with different prompt AND response lengths; the longest response sits in a row
    that does not have the longest prompt. Every row, every slot, must read Lp − 1 + j."""
    r = np.random.default_rng(2)
    correct = [ids(r, 12), ids(r, 3), ids(r, 7), ids(r, 5)]
    wrong = [[ids(r, 4)], [ids(r, 10), ids(r, 2)], [], [ids(r, 6)]]
    resp = [ids(r, 2), ids(r, 9), ids(r, 5), ids(r, 1)]
    T = 9
    b = tb.pack_teacher_batch(correct, wrong, resp, k_max=2)
    for s in range(b.num_slots):
        logits = bigram_logits(b.input_ids[s], table)
        got = references.gather_response_logprobs(logits, b.input_ids[s], b.prompt_lens[s],
                                          b.response_lens, T, is_logits=True)
        for i in range(4):
            prompt = b.input_ids[s, i, : b.prompt_lens[s, i]].tolist()
            np.testing.assert_allclose(got[i, : len(resp[i])],
                                       true_response_logprobs(prompt, resp[i], table),
                                       rtol=1e-12)
            assert np.all(got[i, len(resp[i]):] == 0.0)  # past L: filled with 0


def test_alignment_reads_each_rows_own_window(table):
    """A micro-batch without the batch's longest response: per-row reading stays correct,
    while a rule taking the window start from the micro-batch's longest response (token j
    would get the value of token j + d, d = global − local longest response) does not."""
    r = np.random.default_rng(3)
    prompts = [ids(r, 6), ids(r, 4), ids(r, 8)]
    resp = [ids(r, 3), ids(r, 12), ids(r, 5)]  # row 1 holds the global longest response
    b = tb.pack_teacher_batch(prompts, [[], [], []], resp, k_max=0)
    ids0, plen = b.input_ids[0], b.prompt_lens[0]
    logp_full = bigram_logits(ids0, table)
    logp_full = logp_full - np.log(np.exp(logp_full).sum(-1, keepdims=True))
    T = max(len(x) for x in resp)
    full = references.gather_response_logprobs(logp_full, ids0, plen, b.response_lens, T)
    micro = [0, 2]  # rows selected without trimming the padded width
    sub = references.gather_response_logprobs(logp_full[micro], ids0[micro], plen[micro],
                                      b.response_lens[micro], T)
    np.testing.assert_array_equal(sub, full[micro])
    d = T - max(len(resp[i]) for i in micro)  # 12 − 5 = 7
    S = ids0.shape[1]
    for k, i in enumerate(micro):
        expected = true_response_logprobs(prompts[i], resp[i], table)
        np.testing.assert_allclose(sub[k, : len(resp[i])], expected, rtol=1e-12)
        old = [logp_full[i, p, ids0[i, p + 1]] if p + 1 < S else 0.0
               for p in (plen[i] - 1 + j + d for j in range(len(resp[i])))]
        assert not np.allclose(old, expected)
