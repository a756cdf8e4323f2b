"""split_attention.py (the keys cut into parts, merged by their log-sum-exps) against
model.attention's plain softmax formula, and a chunk with no kept token (model.KVCache.
write_duplicates) against Eq. 3 written with complex numbers. Float64 on the CPU: the
merge is exact algebra, so what remains is float64 rounding (~1e-15 relative)."""

import pytest
import torch

import lipar
import model as M
import sample
import split_attention as S


def softmax_attention(q, k, v, key_mask=None):
    """float64 softmax(q kᵀ/√Dh) v over [B, T, H, Dh], a loop over heads."""
    out = torch.empty_like(q)
    for head in range(q.shape[2]):
        scores = q[:, :, head] @ k[:, :, head].transpose(1, 2) / q.shape[-1] ** 0.5
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        out[:, :, head] = torch.softmax(scores, dim=-1) @ v[:, :, head]
    return out


def test_split_count_fills_the_multiprocessors_with_equal_parts():
    assert S.split_count(12, 10920, 132) == 10        # 11 parts would not divide 10,920 keys: 10 of 1,092
    assert S.split_count(12, 4680, 132) == 9          # 520 keys a part
    assert S.split_count(288, 10920, 132) == 1        # 288 programs already fill 132 units
    assert S.split_count(12, 1000, 132) == 1          # two parts of 500 would be shorter than 512
    assert S.split_count(12, 1000, 132, min_part=100) == 10


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_split_attention_equals_the_plain_softmax(parts):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 7 * 6, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k[:, :6] *= 4  # one part far more relevant than the rest: its weight dominates the merge
    expected = softmax_attention(q, k, v)
    got = S.split_attention(q, k, v, parts)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-12


def test_split_kv_splits_few_queries_and_leaves_the_rest_to_sdpa():
    g = torch.Generator().manual_seed(1)
    impl = S.SplitKV(units=8, query_block=4, min_part=4)
    k, v = (torch.randn(1, 24, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    few, many = torch.randn(1, 3, 2, 8, dtype=torch.float64), torch.randn(1, 40, 2, 8, dtype=torch.float64)
    for q in (few, many):
        assert (impl(q, k, v) - softmax_attention(q, k, v)).abs().max().item() < 1e-12
    mask = torch.rand(24, generator=g) > 0.3
    assert (impl(few, k, v, mask) - softmax_attention(few, k, v, mask)).abs().max().item() < 1e-12
    assert impl.calls == {"split": 1, "sdpa": 2}  # many queries, and a mask, went to SDPA


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    dit = M.CausalWanModel(M.DiTConfig.tiny()).double().eval().requires_grad_(False)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.2)
    return dit


def test_an_edit_with_split_attention_equals_the_plain_formula():
    """Most chunks nearly all pruned: their few queries attend over the window in parts.
    model.attention's "math" computes in float32: the edits agree to float32 rounding
    of the scores (~1e-7 relative), amplified a little through 2 layers and 4 chunks."""
    g = torch.Generator().manual_seed(2)
    dit = tiny_dit()
    x = torch.randn(1, 16, 12, 8, 10, generator=g, dtype=torch.float64)
    keep = torch.rand(12, 4, 5, generator=g) > 0.9
    keep[0] = True
    context = torch.randn(1, 5, 48, generator=g, dtype=torch.float64)
    dit.attn_impl = "math"
    expected = sample.edit_latents(dit, x, context, keep, "lipar", (1, 6), seed=3, progress=False)
    dit.attn_impl = impl = S.SplitKV(units=16, query_block=4, min_part=4)
    got = sample.edit_latents(dit, x, context, keep, "lipar", (1, 6), seed=3, progress=False)
    assert impl.calls["split"] > 0
    assert (got - expected).abs().max().item() < 1e-5


def rotated(k, cos, sin):
    """RoPE as complex multiplication: each pair (x, y) of k [..., T, H, Dh] times e^{iθ}."""
    pairs = torch.view_as_complex(k.reshape(*k.shape[:-1], -1, 2).contiguous())
    turn = torch.complex(cos, sin)[:, None, :]  # [T, 1, Dh/2]
    return torch.view_as_real(pairs * turn).flatten(-2)


def test_a_chunk_without_kept_tokens_runs_no_block_and_writes_copies_of_the_memory():
    g = torch.Generator().manual_seed(4)
    dit = tiny_dit(5)
    h, w = 3, 4
    x = torch.randn(1, 16, 6, 2 * h, 2 * w, generator=g, dtype=torch.float64)
    keep = torch.rand(6, h, w, generator=g) > 0.5
    keep[0], keep[3:] = True, False  # the second chunk prunes everything
    context = torch.randn(1, 5, 48, generator=g, dtype=torch.float64)
    cache = M.KVCache(dit, context, (h, w), (1, 3))
    first, second = lipar.chunk_plans(keep, "lipar")
    t = torch.full((1, 1), 700.0, dtype=torch.float64)
    dit.forward_chunk(x[:, :, :3], t, cache, 0, plan=first)
    dit.forward_chunk(x[:, :, :3], t * 0, cache, 0, memory_step=True, plan=first)
    memory_k, memory_v = cache.memory_k.clone(), cache.memory_v.clone()
    blocks_run = []
    dit.blocks[0].register_forward_hook(lambda *_: blocks_run.append(1))
    for memory_step in (False, True):
        out = dit.forward_chunk(x[:, :, 3:], t * (not memory_step), cache, 3, memory_step=memory_step, plan=second)
        assert (out == 0).all()
    assert not blocks_run
    n = h * w
    # the cache's angles are float32 tables (model.rope_angles' default): the same angles here
    cos, sin = (a.double() for a in M.rope_angles(M.grid_positions(3, h, w, start_frame=3), dit.cfg.head_dim,
                                                  dit.cfg.rope_theta))
    slots = torch.cat([torch.arange(n) + n * cache.slot_of(f) for f in range(3, 6)])
    for layer in range(dit.cfg.num_layers):
        copies_k, copies_v = memory_k[layer].repeat(1, 3, 1, 1), memory_v[layer].repeat(1, 3, 1, 1)  # every frame
        assert (cache.k[layer][:, slots] - rotated(copies_k, cos, sin)).abs().max().item() < 1e-12
        assert torch.equal(cache.v[layer][:, slots], copies_v)
    assert torch.equal(cache.memory_k, memory_k) and torch.equal(cache.memory_v, memory_v)
