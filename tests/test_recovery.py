"""Attention recovery (Eq. 3-4) and restoration: exact where the paper says it is.

The references here are written independently of lipar.py: RoPE as complex
multiplication, attention as explicit float64 softmax sums over the full,
unpruned sequence.
"""

import pytest
import torch

import lipar
import model as M

HEAD_DIM = 16  # RoPE parts (8, 4, 4)


def rope64(x, positions):
    """Reference RoPE in float64: each adjacent pair is a complex number turned by e^{i·pos·freq}."""
    dims = M.rope_axis_dims(x.shape[-1])
    angles = torch.cat([positions[:, a, None].double() * 10000.0 ** (-torch.arange(0, d, 2).double() / d)
                        for a, d in enumerate(dims)], dim=1)
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)


def softmax_attention64(q, k, v):
    """Σ_j e^{q·k_j/√d} v_j / Σ_j e^{q·k_j/√d} in float64, with its two sums returned too."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    e = torch.exp(s)
    numerator, denominator = torch.einsum("bhqk,bkhd->bqhd", e, v), e.sum(-1).permute(0, 2, 1)[..., None]
    return numerator / denominator, numerator, denominator


def positions(frames, h, w, start):
    return M.grid_positions(frames, h, w, start)


def duplicated_sequence(keep, start, h, w, chained, seed):
    """Pre-RoPE keys/values of frames 0..start+F-1 in which every pruned token of the
    current chunk is an exact copy of its substitute: the memory (frame start-1, same
    location) or, chained, the same location one frame earlier."""
    g = torch.Generator().manual_seed(seed)
    frames, n = start + keep.shape[0], h * w
    k = torch.randn(1, frames * n, 2, HEAD_DIM, generator=g, dtype=torch.float64)
    v = torch.randn(1, frames * n, 2, HEAD_DIM, generator=g, dtype=torch.float64)
    for f in range(keep.shape[0]):
        for loc in range(n):
            if not keep[f].flatten()[loc]:
                source = (start - 1 if f == 0 or not chained else start + f - 1) * n + loc
                k[:, (start + f) * n + loc] = k[:, source]
                v[:, (start + f) * n + loc] = v[:, source]
    return k, v


def run_recovered(keep, start, h, w, k, v, q_all, mode, memory_step, past_frames):
    n = h * w
    plan = lipar.recovery_plan(keep, mode, has_memory=start > 0)
    chunk = slice(start * n, None)
    k_kept, v_kept = k[:, chunk][:, plan.kept], v[:, chunk][:, plan.kept]
    memory = slice((start - 1) * n, start * n)
    past = torch.cat([torch.arange(f * n, (f + 1) * n) for f in past_frames]) if past_frames else torch.arange(0)
    pos = positions(start + keep.shape[0], h, w, 0)
    rope_chunk = M.rope_angles(pos[chunk], HEAD_DIM, 10000.0, torch.float64)
    rope_q = M.rope_angles(pos[chunk][plan.kept], HEAD_DIM, 10000.0, torch.float64)
    return lipar.recovered_attention(q_all[:, chunk][:, plan.kept], k_kept, v_kept, plan, k[:, memory], v[:, memory],
                                     rope64(k[:, past], pos[past]), v[:, past], rope_q, rope_chunk, memory_step), plan


CASES = [(3, 3, 4, 0.5, 0), (6, 2, 5, 0.3, 1), (9, 4, 3, 0.7, 2), (12, 3, 3, 0.5, 3)]


@pytest.mark.parametrize("start,h,w,prune,seed", CASES)
@pytest.mark.parametrize("memory_step", [False, True])
def test_recovered_attention_is_exact_when_copies_are_exact(start, h, w, prune, seed, memory_step):
    g = torch.Generator().manual_seed(100 + seed)
    keep = torch.rand(3, h, w, generator=g) > prune
    keep[0, 0, 0] = False  # at least one pruned token in the first frame
    # denoising steps copy the memory; the memory step chains frame to frame
    k, v = duplicated_sequence(keep, start, h, w, chained=memory_step, seed=seed)
    q = torch.randn(k.shape, generator=g, dtype=torch.float64)
    pos = positions(start + 3, h, w, 0)
    full, _, _ = softmax_attention64(rope64(q, pos), rope64(k, pos), v)
    got, plan = run_recovered(keep, start, h, w, k, v, q, "lipar", memory_step, list(range(start)))
    expected = full[:, start * h * w:][:, plan.kept]
    err = (got - expected).abs().max().item()
    assert err < 1e-12, err
    # naive pruning, on the same input, simply drops the pruned keys: measurably wrong
    naive, _ = run_recovered(keep, start, h, w, k, v, q, "naive", memory_step, list(range(start)))
    assert (naive - expected).abs().max().item() > 1e-2


@pytest.mark.parametrize("m_sink,m_recent", [(1, 6), (2, 3), (0, 6)])
def test_m_degree_window_omits_exactly_the_far_frames(m_sink, m_recent):
    """Eq. 4: with a window the result differs from full attention by exactly the
    omitted frames' terms: full = (Σ_window e·v + Σ_omitted e·v) / (Z_window + Z_omitted)."""
    start, h, w = 12, 3, 3
    n = h * w
    keep = torch.rand(3, h, w, generator=torch.Generator().manual_seed(7)) > 0.5
    k, v = duplicated_sequence(keep, start, h, w, chained=False, seed=8)
    q = torch.randn(k.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    window = [f for f in range(start) if f < m_sink or f >= start + 3 - m_recent]
    omitted = [f for f in range(start) if f not in window]
    assert omitted
    windowed, plan = run_recovered(keep, start, h, w, k, v, q, "lipar", False, window)
    pos = positions(start + 3, h, w, 0)
    queries = rope64(q, pos)[:, start * n:][:, plan.kept]
    full, _, _ = softmax_attention64(queries, rope64(k, pos), v)
    # the window's and the omitted frames' sums, each over its own keys
    in_window = torch.cat([torch.arange(f * n, (f + 1) * n) for f in window] + [torch.arange(start * n, (start + 3) * n)])
    out_of_window = torch.cat([torch.arange(f * n, (f + 1) * n) for f in omitted])
    _, _, z_window = softmax_attention64(queries, rope64(k, pos)[:, in_window], v[:, in_window])
    _, s_omitted, z_omitted = softmax_attention64(queries, rope64(k, pos)[:, out_of_window], v[:, out_of_window])
    reconstructed = (windowed * z_window + s_omitted) / (z_window + z_omitted)
    assert (reconstructed - full).abs().max().item() < 1e-12
    assert (windowed - full).abs().max().item() > 1e-4  # and the omitted terms are not nothing


def test_recovery_plan_on_a_hand_checked_chunk():
    # one row of two locations, three frames; N = 2, memory rows 0-1, kept rows 2..
    keep = torch.tensor([[[True, False]], [[False, False]], [[True, True]]])
    # kept tokens in raster order: (f0,l0) row 2, (f2,l0) row 3, (f2,l1) row 4
    lipar_plan = lipar.recovery_plan(keep, "lipar", has_memory=True)
    assert lipar_plan.kept.tolist() == [0, 4, 5]
    assert lipar_plan.sources[False][0].tolist() == [2, 1, 0, 1, 3, 4]  # pruned → memory
    assert lipar_plan.sources[True][0].tolist() == [2, 1, 2, 1, 3, 4]  # chained (f1,l0) ← (f0,l0)
    assert lipar_plan.key_valid(False) is None and lipar_plan.key_valid(True) is None
    noisy = lipar.recovery_plan(keep, "noisy_dup", has_memory=True)
    assert noisy.sources[False][0].tolist() == [2, 1, 2, 1, 3, 4]
    first_chunk = lipar.recovery_plan(keep, "lipar", has_memory=False)
    assert first_chunk.key_valid(False).tolist() == [True, False, False, False, True, True]
    assert first_chunk.key_valid(True).tolist() == [True, False, True, False, True, True]
    naive = lipar.recovery_plan(keep, "naive", has_memory=True)
    assert naive.key_valid(False).tolist() == naive.key_valid(True).tolist() == keep.flatten().tolist()


def tiny_model(seed=0, silence_attention_outputs=False):
    torch.manual_seed(seed)
    dit = M.CausalWanModel(M.DiTConfig.tiny())
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.2)
        if silence_attention_outputs:
            # Self-attention outputs are zero in every layer but the last, so hidden
            # states stay token-local functions of a token's input until then: a
            # token whose input duplicates another's has the same keys/values in
            # every layer, and exactness holds by construction through the stack.
            for block in dit.blocks[:-1]:
                block.self_attn.o.weight.zero_()
                block.self_attn.o.bias.zero_()
    return dit


def test_cache_path_with_sdpa_matches_plain_recovered_attention():
    dit = tiny_model()
    h, w, n, start = 2, 3, 6, 3
    context = torch.randn(1, 5, 48)
    cache = M.KVCache(dit, context, 9, (h, w), window=(1, 6))
    torch.manual_seed(1)
    cache.k[0, :, : start * n] = torch.randn(1, start * n, 2, 32)  # the cached, rotated past
    cache.v[0, :, : start * n] = torch.randn(1, start * n, 2, 32)
    cache.memory_k[0], cache.memory_v[0] = torch.randn(2, 1, n, 2, 32)
    past_k, past_v = cache.k[0, :, : start * n].clone(), cache.v[0, :, : start * n].clone()
    memory_k, memory_v = cache.memory_k[0].clone(), cache.memory_v[0].clone()
    keep = torch.rand(3, h, w) > 0.4
    for memory_step in (False, True):
        plan = lipar.recovery_plan(keep, "lipar", has_memory=True)
        q, k, v = (torch.randn(1, len(plan.kept), 2, 32) for _ in range(3))
        pos = M.grid_positions(3, h, w, start)
        rope_q, rope_chunk = M.rope_angles(pos[plan.kept], 32, 10000.0), M.rope_angles(pos, 32, 10000.0)
        expected = lipar.recovered_attention(q, k, v, plan, memory_k, memory_v, past_k, past_v, rope_q, rope_chunk,
                                             memory_step)
        step = dit.chunk_step(torch.zeros(1, 16, 3, 2 * h, 2 * w), cache, start, memory_step, plan)
        k_all, v_all, key_mask = cache.keys_values(step, rope_chunk)(0)(k, v)
        got = M.attention(M.apply_rope(q, rope_q), k_all, v_all, key_mask, "sdpa")
        assert (got - expected).abs().max().item() < 1e-5


def chunk_loop(dit, x, keep, mode, window, context, seed=0):
    """Denoising step + memory step per chunk, returning each memory step's velocity."""
    fpc, (h, w) = 3, (x.shape[3] // 2, x.shape[4] // 2)
    cache = M.KVCache(dit, context, x.shape[2], (h, w), window)
    plans = lipar.chunk_plans(keep, mode)
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, plan in enumerate(plans):
        s = c * fpc
        chunk = x[:, :, s:s + fpc]
        dit.forward_chunk(torch.randn(chunk.shape, generator=g), torch.full((1, 1), 700.0), cache, s, plan=plan)
        out.append(dit.forward_chunk(chunk, torch.zeros(1, 1), cache, s, memory_step=True, plan=plan))
    return torch.cat(out, dim=2), cache


@pytest.mark.parametrize("window", [None, (1, 6)])
def test_all_kept_mask_reproduces_unpruned_inference(window):
    dit = tiny_model(1)
    torch.manual_seed(2)
    x, context = torch.randn(1, 16, 12, 4, 6), torch.randn(1, 5, 48)
    keep = torch.ones(12, 2, 3, dtype=torch.bool)
    with torch.no_grad():
        unpruned, _ = chunk_loop(dit, x, keep, "full", window, context)
        kept_path, _ = chunk_loop(dit, x, keep, "lipar", window, context)
    assert (kept_path - unpruned).abs().max().item() < 1e-6


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_memory_step_exact_through_the_stack_when_inputs_duplicate(impl):
    """Pruned tokens whose latents repeat the same location one frame earlier (and,
    for the chunk's first frame, the memory frame): the memory step on kept tokens
    computes what the unpruned memory step computes, keys/values of every layer included."""
    dit = tiny_model(3, silence_attention_outputs=True)
    dit.attn_impl = impl
    h, w = 3, 3
    torch.manual_seed(4)
    x, context = torch.randn(1, 16, 9, 2 * h, 2 * w), torch.randn(1, 5, 48)
    keep = torch.rand(9, h, w) > 0.5
    keep[:3] = True
    for f in range(3, 9):  # make pruned latents exact copies of the frame before
        pixels = (~keep[f]).repeat_interleave(2, 0).repeat_interleave(2, 1)
        x[0, :, f][:, pixels] = x[0, :, f - 1][:, pixels]
    with torch.no_grad():
        unpruned, dense_cache = chunk_loop(dit, x, keep, "full", None, context)
        pruned, lipar_cache = chunk_loop(dit, x, keep, "lipar", None, context)
    kept_pixels = keep.repeat_interleave(2, 1).repeat_interleave(2, 2)
    err = (pruned - unpruned)[:, :, kept_pixels].abs().max().item()
    assert err < 1e-5, err
    assert (lipar_cache.k - dense_cache.k).abs().max().item() < 1e-5
    assert (lipar_cache.v - dense_cache.v).abs().max().item() < 1e-5
    assert (pruned[:, :, ~kept_pixels] == 0).all()  # no prediction where nothing was computed


def test_restoration_fills_pruned_positions_from_memory():
    torch.manual_seed(5)
    x0, memory = torch.randn(2, 16, 3, 4, 6), torch.randn(2, 16, 4, 6)
    keep = torch.rand(3, 2, 3) > 0.5
    restored = lipar.restore(x0, keep, memory)
    for f in range(3):
        for i in range(4):
            for j in range(6):
                expected = x0[:, :, f, i, j] if keep[f, i // 2, j // 2] else memory[:, :, i, j]
                assert torch.equal(restored[:, :, f, i, j], expected)
