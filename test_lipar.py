"""LIPAR's claims as tests, to be read next to the paper (Eq. numbers of arXiv 2604.23858).

1. Attention recovery (Eq. 3): when every pruned token's key/value is an exact copy of
   its memory token, attention over the kept queries and the recovered keys equals
   attention over the full, unpruned sequence -- in the plain softmax reference and
   in the model's SDPA + KV-cache path, through the whole stack, for the denoising and
   the memory steps. Naive pruning (dropping the keys) does not have this property.
2. The M-degree window (Eq. 4) omits exactly the far frames' terms.
3. Restoration fills pruned latents from the memory.
4. The ablations (lipar, noisy_dup, naive) differ only in where keys come from.
5. The pruning mask (Eq. 1, 5-6): a static clip is pruned and noise is kept; moving
   regions are kept and still ones pruned; the mask is causal without look-ahead and
   reads three latent frames ahead with it; every pruned token is within theta2 of
   the memory that replaces it (a scene cut included); and it is the authors' mask
   plus that guarantee.

References are written independently of lipar.py: RoPE as complex multiplication,
attention as explicit float64 softmax sums, the mask's steps in numpy/scipy. Component
tests of each module are in tests/.
"""

import pytest
import torch

import demo
import lipar
import model as M
from tests.clips import (INF, THETA2, authors_mask, drifting_clip, kept_frames, memory_walk_violations,
                         moving_square_clip, randn, scalar_drift_walk, whole_frame_clip)

# ================================================================ attention recovery (Eq. 3-4), restoration

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
    cache = M.KVCache(dit, context, (h, w), window=(1, 6))
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
    cache = M.KVCache(dit, context, (h, w), window)
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



def test_chained_restoration_takes_the_frame_before():
    """The paper release's restoration: a token kept in frame 1 of a chunk and pruned in
    frame 2 takes frame 1's x0; pruned in frames 0, 1 and 2 it takes the memory in all
    three; kept in frame 0 only, frames 1 and 2 both take frame 0's."""
    x0 = torch.arange(3.0)[None, None, :, None, None].expand(1, 1, 3, 2, 6).clone() + 10  # frame f holds 10 + f
    memory = torch.full((1, 1, 2, 6), -1.0)
    keep = torch.tensor([[[False, True, True]], [[False, False, True]], [[False, False, False]]])  # [F=3, 1, 3]
    restored = lipar.restore(x0, keep, memory, chained=True)[0, 0, :, 0, ::2]  # one latent pixel per token
    assert restored.tolist() == [[-1, 10, 10], [-1, 10, 11], [-1, 10, 11]]
    assert lipar.restore(x0, keep, memory)[0, 0, :, 0, ::2].tolist() == [[-1, 10, 10], [-1, -1, 11], [-1, -1, -1]]

# ================================================================ the pruning mask (Eq. 1, 5-6)

@pytest.mark.parametrize("clip", ["square", "drift", "realistic"])
def test_default_mask_is_the_authors_plus_the_final_bound(clip):
    """Without the substitute bound the two masks are identical. With it, ours only adds
    tokens, and only where the authors' mask leaves a pruned token farther than theta2
    from its substitute."""
    if clip == "square":
        z, _ = moving_square_clip()
        z = z + 0.3 * drifting_clip(1, L=12, H=32, W=48, amax=0.4)
    elif clip == "drift":
        z = drifting_clip(3, L=15)
    else:
        z = demo.realistic_latents(15, 24, 40)
    assert torch.equal(lipar.prune_mask(z, theta2=INF), authors_mask(z, theta2=INF))
    ours, theirs = lipar.prune_mask(z), authors_mask(z)
    assert not (theirs & ~ours).any()
    assert memory_walk_violations(z, ours, THETA2) == []
    added = (ours & ~theirs).sum().item()
    assert (added > 0) == (memory_walk_violations(z, theirs, THETA2) != [])

def test_static_clip_prunes_everything_after_frame0():
    z = randn(1, 16, 16, 24).repeat(9, 1, 1, 1)
    keep = lipar.prune_mask(z.bfloat16())
    assert keep.dtype == torch.bool and keep.shape == (9, 8, 12)
    assert keep[0].all()
    assert not keep[1:].any()
    assert lipar.prune_ratio(keep) == 1.0
    assert lipar.chunk_prune_ratios(keep) == pytest.approx([2 / 3, 1.0, 1.0])


def test_independent_noise_keeps_everything():
    keep = lipar.prune_mask(randn(9, 16, 16, 24))
    assert keep.all()
    assert lipar.prune_ratio(keep) == 0.0


def test_moving_square_keeps_its_path_and_prunes_still_background():
    z, footprint = moving_square_clip()
    keep = lipar.prune_mask(z)
    L, h, w = keep.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for t in range(1, L):
        assert keep[t][footprint[t]].all(), f"square not covered at frame {t}"
        # Chebyshev distance of every token to the square's footprints of frames t-3..t
        recent = footprint[max(0, t - 3):t + 1].any(0)
        dist = torch.maximum((rows[..., None] - rows[recent]).abs(),
                             (cols[..., None] - cols[recent]).abs()).min(-1).values
        far = dist > 4
        assert far.sum() > h * w // 2
        assert not keep[t][far].any(), f"still background kept at frame {t}"
    assert 0.5 < lipar.prune_ratio(keep) < 0.9


def test_higher_theta_never_keeps_more_without_bound():
    pairs = [(0.05, 0.1), (0.1, 0.149), (0.149, 0.25), (0.25, 0.5)]
    strict = 0
    for seed in range(4):
        z = drifting_clip(seed, amax=0.5)
        for lo, hi in pairs:
            keep_lo = lipar.prune_mask(z, theta=lo, theta2=INF)
            keep_hi = lipar.prune_mask(z, theta=hi, theta2=INF)
            assert not (keep_hi & ~keep_lo).any(), (seed, lo, hi)
            strict += int((keep_lo & ~keep_hi).any())
    assert strict >= 8  # the thresholds matter on these clips


@pytest.mark.parametrize("t", [1, 2, 3, 4, 6, 8])
def test_mask_is_causal_without_lookahead(t):
    z, _ = moving_square_clip()
    z = z + 0.3 * drifting_clip(1, L=12, H=32, W=48, amax=0.4)
    keep = lipar.prune_mask(z, lookahead=0)
    changed = z.clone()
    changed[t:] = randn(*changed[t:].shape, seed=t)
    keep_changed = lipar.prune_mask(changed, lookahead=0)
    assert torch.equal(keep_changed[:t], keep[:t])
    assert not torch.equal(keep_changed[t:], keep[t:])


@pytest.mark.parametrize("t", [0, 1, 2, 4, 5])
def test_mask_with_lookahead_reads_three_frames_ahead(t):
    """The two medians and the dilation each see one frame ahead, so the mask of frame
    t depends on latent frames up to t + 3 and no further."""
    z, _ = moving_square_clip()
    z = z + 0.3 * drifting_clip(1, L=12, H=32, W=48, amax=0.4)
    keep = lipar.prune_mask(z)
    changed = z.clone()
    changed[t + 4:] = randn(*changed[t + 4:].shape, seed=t)
    assert torch.equal(lipar.prune_mask(changed)[:t + 1], keep[:t + 1])






@pytest.mark.parametrize("lookahead,last_kept", [(1, 6), (0, 9)])
def test_kept_regions_end_sooner_after_motion_stops_with_lookahead(lookahead, last_kept):
    """Every token changes in frames 1-5 (the end of chunk 1), then the clip stands still.
    The authors' windows: d's centred median is high through frame 5, the causal
    Gaussian carries it into 6 (0.44 of it), the centred cleanup median keeps 1-6 and
    the dilation (frames t, t+1) adds nothing after. Causal windows lag each median by
    a frame and the dilation adds the frame after: kept through 9, three frames longer."""
    z = whole_frame_clip([0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5])
    keep = lipar.prune_mask(z, lookahead=lookahead)
    assert all(keep[t].all() for t in kept_frames(keep))
    assert kept_frames(keep) == list(range(last_kept + 1))


def test_a_one_frame_change_below_theta2_is_voted_away():
    """A step of 0.2 (between theta and theta2) in frame 4 only: d exceeds theta in that
    single frame, the median's majority vote drops it, and nothing else keeps it."""
    z = randn(1, 16, 16, 24).repeat(12, 1, 1, 1)
    z[4:] += 0.2
    assert lipar.robust_patch_l1(lipar.patchify(z[4:5]), lipar.patchify(z[3:4])).min() > 0.149
    for lookahead in (0, 1):
        assert kept_frames(lipar.prune_mask(z, lookahead=lookahead)) == [0]


@pytest.mark.parametrize("cut", [6, 7, 8])
def test_a_scene_cut_keeps_the_cut_and_prunes_the_still_frames_after_it(cut):
    """Scene A still until the cut, scene B still after it. Eq. 1 sees one frame of change
    and the median votes it away; the substitute bound keeps the new scene until its
    chunk ends (its memory is still scene A), and is applied again after the cleanup,
    whose median would otherwise vote the cut away and paint scene A over scene B."""
    z = whole_frame_clip([0] * cut + [1] * (12 - cut))
    keep = lipar.prune_mask(z)
    assert keep[cut].all()
    chunk_end = cut // 3 * 3 + 2
    assert keep[cut:chunk_end + 1].all() and not keep[chunk_end + 1:].any()
    assert lipar.prune_mask(z, theta2=INF)[1:].sum() == 0  # without the bound nothing is kept
    if cut == 8:  # the bound keeps only the cut frame, and the authors' cleanup median drops it:
        assert not authors_mask(z)[1:].any()  # their mask would restore scene A over all of scene B


def test_slow_drift_of_one_token_is_caught_by_the_bound():
    L, step = 21, 0.045  # every neighbour distance is 0.045 < theta
    z = randn(1, 16, 16, 24).repeat(L, 1, 1, 1)
    z[:, :, 6:8, 10:12] += step * torch.arange(L, dtype=torch.float32)[:, None, None, None]
    assert lipar.prune_mask(z, theta2=INF)[1:].sum() == 0
    keep = lipar.prune_mask(z)
    expected = scalar_drift_walk(L, step, THETA2)
    assert expected == [7, 8, 15, 16, 17]  # drift 0.315 > 0.3 first at frame 7 (chunk 2)
    frames, rows, cols = torch.nonzero(keep[1:], as_tuple=True)
    assert (frames + 1).tolist() == expected
    assert set(rows.tolist()) == {3} and set(cols.tolist()) == {5}


def test_slow_drift_of_whole_frame_is_caught_by_the_bound():
    L, step = 21, 0.045
    z = randn(1, 16, 16, 24) + step * torch.arange(L, dtype=torch.float32)[:, None, None, None]
    keep = lipar.prune_mask(z, lookahead=0)
    assert not keep[1:7].any()
    assert keep[7].all()  # the first frame whose drift from the memory exceeds theta2
    assert memory_walk_violations(z, keep, THETA2) == []
    # Whole frames, so the cleanup has its say.  The first walk keeps 7, 8 and 15, 16, 17.
    # The causal median (majority of frames t-2..t) turns that into 8, 9 and 16, 17, 18,
    # the causal dilation adds the frame after each: 8-10 and 16-19.  The final walk
    # restores 7 (0.315 from the memory, frame 0) but not 15 (its memory is now frame
    # 10: 0.225 away).
    assert all(keep[t].all() for t in kept_frames(keep))
    assert kept_frames(keep) == [0, 7, 8, 9, 10, 16, 17, 18, 19]
    # The authors' windows: the centred median leaves 7, 8 and 15, 16, 17 as they are,
    # the dilation (frames t, t+1) adds the frame before each: 6-8 and 14-17, all
    # within theta2 of their memory.
    keep = lipar.prune_mask(z)
    assert memory_walk_violations(z, keep, THETA2) == []
    assert all(keep[t].all() for t in kept_frames(keep))
    assert kept_frames(keep) == [0, 6, 7, 8, 14, 15, 16, 17]


@pytest.mark.parametrize("seed", range(5))
def test_every_pruned_token_is_within_theta2_of_its_memory(seed):
    z = drifting_clip(seed, L=15)
    if seed == 4:
        square, _ = moving_square_clip(L=15, H=16 * 2, W=24 * 2)
        z = square[:, :, ::2, ::2] + z
    keep = lipar.prune_mask(z)
    assert keep[0].all()
    assert memory_walk_violations(z, keep, THETA2) == []
    # not vacuous: Eq. 1 alone leaves violations that the bound had to fix
    assert memory_walk_violations(z, lipar.prune_mask(z, theta2=INF), THETA2) != []
    assert 0.05 < lipar.prune_ratio(keep) < 1.0
