"""Tests of LIPAR's latent inter-frame pruning mask (lipar.prune_mask and its steps).

Independent references are numpy/scipy (float64) or hand-written arrays; scipy is a
test-only oracle and never imported by lipar.py.
"""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import lipar

INF = float("inf")
THETA, THETA2 = 0.149, 0.3


# ---------------------------------------------------------------- clips

def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def moving_square_clip(L=12, H=32, W=48):
    """Still random texture; a textured 8x8-latent (4x4-token) square moves 1 token right per frame.

    Returns latents [L, 16, H, W] and the square's token footprint [L, H/2, W/2].
    """
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, H, W, generator=g).repeat(L, 1, 1, 1)
    square = torch.randn(16, 8, 8, generator=g)
    footprint = torch.zeros(L, H // 2, W // 2, dtype=torch.bool)
    for t in range(L):
        z[t, :, 12:20, 4 + 2 * t:12 + 2 * t] = square
        footprint[t, 6:10, 2 + t:6 + t] = True
    return z, footprint


def drifting_clip(seed, L=12, H=16, W=24, amax=0.3):
    """Random walk per latent value with a blocky amplitude map: small frame-to-frame
    steps in some regions, large ones in others, so thresholds, cleanup and the
    substitute bound all have something to do."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(16, H, W, generator=g)
    amp = torch.rand(1, 1, H // 4, W // 4, generator=g) * amax
    amp = torch.nn.functional.interpolate(amp, size=(H, W), mode="nearest")[0]
    steps = amp * torch.randn(L, 16, H, W, generator=g)
    steps[0] = 0
    return base + steps.cumsum(0)


# ---------------------------------------------------------------- numpy references

def np_patches(z):
    """[L, C, H, W] -> [L, H/2, W/2, 4C] in float64, written with explicit slicing."""
    z = np.asarray(z, dtype=np.float64)
    L, C, H, W = z.shape
    blocks = [z[:, :, dy::2, dx::2] for dy in range(2) for dx in range(2)]  # 4 x [L, C, H/2, W/2]
    return np.concatenate(blocks, axis=1).transpose(0, 2, 3, 1)


def np_robust_l1(a, b):
    """Eq. 1 in float64 on 64-value patches: mean of the 13th..51st smallest |a-b|."""
    x = np.sort(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), axis=-1)
    assert x.shape[-1] == 64
    return x[..., 12:51].mean(-1)


def memory_walk_violations(z, keep, theta2, chunk_frames=3):
    """Pruned tokens (chunks >= 1) whose robust L1 to their memory exceeds theta2.

    Memory = latent of the last kept frame at that location up to the end of the
    previous chunk (what the KV cache holds there), re-derived here in float64.
    """
    p, k = np_patches(z), keep.numpy()
    memory = p[0].copy()
    bad = []
    for start in range(0, len(p), chunk_frames):
        frames = range(start, min(start + chunk_frames, len(p)))
        if start > 0:
            for t in frames:
                far = np_robust_l1(p[t], memory) > theta2 + 1e-5  # float32 slack
                bad += [(t, i, j) for i, j in zip(*np.nonzero(far & ~k[t]))]
        for t in frames:
            memory[k[t]] = p[t][k[t]]
    return bad


def authors_mask(z, theta=THETA, theta2=THETA2):
    """The authors' rlt_prune (DennisMenn/lipar, src/utils/rlt_prune.py) re-derived in
    float64 numpy/scipy, step for step: Eq. 1 distances, their median_blur (two edge
    frames padded before the clip, scipy's centred median, the first two outputs
    dropped), their causal Gaussian, the threshold, their bound_diff walk, the
    median again, OpenCV's 3x3 opening then closing, their dilation (a (3, 5, 5)
    box with time slice 2 zeroed) and frame 0 kept. No substitute bound afterwards."""
    p = np_patches(z)
    d = np_robust_l1(p[1:], p[:-1])

    def median_blur(x):
        padded = np.pad(x, ((2, 0), (0, 0), (0, 0)), mode="edge")
        return ndimage.median_filter(padded, mode="nearest", size=(3, 3, 3))[2:]

    padded = np.pad(median_blur(d), ((1, 0), (1, 1), (1, 1)), mode="edge")
    weights = {(dt, dy, dx): math.exp(-(dt * dt + dy * dy + dx * dx) / 4.5)
               for dt in (-1, 0) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    T, h, w = d.shape
    smooth = sum(wt * padded[1 + dt:1 + dt + T, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                 for (dt, dy, dx), wt in weights.items()) / sum(weights.values())
    keep = np.concatenate([np.ones((1, h, w), bool), smooth > theta])
    if theta2 != INF:
        last = 2 - np.argmax(keep[:3][::-1], axis=0)  # the last kept of frames 0-2
        memory = np.take_along_axis(p[:3], last[None, ..., None], axis=0)[0]
        pending = memory.copy()
        for t in range(3, len(p)):
            keep[t] |= np_robust_l1(memory, p[t]) > theta2
            pending[keep[t]] = p[t][keep[t]]
            if t % 3 == 2:
                memory = pending.copy()
    m = median_blur(keep[1:].astype(np.float64)) > 0.5
    square = np.ones((3, 3), bool)
    opened_closed = []
    for frame in m:
        frame = ndimage.binary_dilation(ndimage.binary_erosion(frame, square, border_value=1), square, border_value=0)
        frame = ndimage.binary_erosion(ndimage.binary_dilation(frame, square, border_value=0), square, border_value=1)
        opened_closed.append(frame)
    structure = np.ones((3, 5, 5), bool)
    structure[2] = False
    m = ndimage.binary_dilation(np.stack(opened_closed), structure)
    return torch.from_numpy(np.concatenate([np.ones((1, h, w), bool), m]))


# ---------------------------------------------------------------- whole mask


@pytest.mark.parametrize("clip", ["square", "drift", "realistic"])
def test_default_mask_is_the_authors_plus_the_final_bound(clip):
    """Without the substitute bound the two masks are identical. With it, ours only adds
    tokens, and only where the authors' mask leaves a pruned token farther than theta2
    from its substitute."""
    import bench

    if clip == "square":
        z, _ = moving_square_clip()
        z = z + 0.3 * drifting_clip(1, L=12, H=32, W=48, amax=0.4)
    elif clip == "drift":
        z = drifting_clip(3, L=15)
    else:
        z = bench.realistic_latents(15, 24, 40)
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


def whole_frame_clip(frames, seed=0):
    """[L, 16, 16, 24] latents: independent random frames (every token far from the one before)."""
    return torch.stack([randn(16, 16, 24, seed=seed + 100 * f) for f in frames])


def kept_frames(keep):
    return [t for t in range(keep.shape[0]) if keep[t].any()]


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


# ---------------------------------------------------------------- Eq. 1 distance

def test_patchify_matches_token_layout():
    z = randn(3, 16, 6, 8).double()
    np.testing.assert_array_equal(np.sort(lipar.patchify(z).numpy(), -1), np.sort(np_patches(z), -1))


def test_robust_l1_matches_numpy_percentiles():
    a, b = randn(2, 5, 7, 64).double()
    # "the values between the 20th and 80th percentile": with method='inverted_cdf' and
    # n = 64 the percentiles are the 13th and 52nd smallest value, so p20 <= x < p80
    # selects the 13th..51st smallest (continuous data: no ties)
    x = np.abs(a.numpy() - b.numpy())
    lo = np.percentile(x, 20, axis=-1, method="inverted_cdf", keepdims=True)
    hi = np.percentile(x, 80, axis=-1, method="inverted_cdf", keepdims=True)
    sel = (x >= lo) & (x < hi)
    assert (sel.sum(-1) == 39).all()
    ref = (x * sel).sum(-1) / 39
    out = lipar.robust_patch_l1(a, b).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    np.testing.assert_allclose(out, np_robust_l1(a, b), rtol=1e-12)


def test_robust_l1_hand_cases():
    # n = 10: ranks 10//5 = 2 .. 4*10//5 - 1 = 7 of |d| = 0..9 -> mean(2..7) = 4.5
    a = torch.tensor([3.0, -9.0, 0.0, 7.0, -1.0, 5.0, 2.0, -8.0, 6.0, 4.0])
    assert lipar.robust_patch_l1(a, torch.zeros(10)).item() == pytest.approx(4.5)
    # n = 64: 12 zeros and 13 huge values are trimmed away, the 39 ones remain
    d = torch.tensor([0.0] * 12 + [1.0] * 39 + [1000.0] * 13)
    d = d[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    assert lipar.robust_patch_l1(d, torch.zeros(64)).item() == pytest.approx(1.0)
    # ... one more huge value and it starts to count
    d2 = torch.tensor([0.0] * 12 + [1.0] * 38 + [1000.0] * 14)
    assert lipar.robust_patch_l1(d2, torch.zeros(64)).item() == pytest.approx((38 + 1000) / 39)


# ---------------------------------------------------------------- smoothing

def test_causal_median_matches_scipy_with_explicit_padding():
    x = np.random.default_rng(0).normal(size=(5, 4, 6))
    padded = np.pad(x, ((2, 0), (1, 1), (1, 1)), mode="edge")  # 2 past frames, 1 pixel around
    # centred 3x3x3 median on the padded array; output t sits at padded index t+1,
    # whose window is padded frames t..t+2 = original frames t-2..t
    ref = ndimage.median_filter(padded, size=3)[1:-1, 1:-1, 1:-1]
    np.testing.assert_array_equal(lipar.median3(torch.from_numpy(x), lookahead=0).numpy(), ref)


def test_median_with_lookahead_is_the_authors_filter():
    """lookahead=1 repeats the authors' median_blur: two edge frames padded before the
    clip, scipy's 3x3x3 median (mode "nearest"), the first two outputs dropped."""
    x = np.random.default_rng(5).normal(size=(6, 4, 5))
    padded = np.pad(x, ((2, 0), (0, 0), (0, 0)), mode="edge")
    ref = ndimage.median_filter(padded, mode="nearest", size=(3, 3, 3))[2:]
    np.testing.assert_array_equal(lipar.median3(torch.from_numpy(x), lookahead=1).numpy(), ref)


def test_causal_median_hand_case():
    # per-frame constants 0, 10, 20, 30, 40: frame t takes the median of t-2..t
    x = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 3, 3) * 10
    out = lipar.median3(x, lookahead=0)
    assert out[:, 1, 1].tolist() == [0, 0, 10, 20, 30]
    # a spike in frame 3 alone never shows (majority vote), and never reaches frames 0-2
    x = torch.zeros(5, 3, 3)
    x[3] = 100
    assert not lipar.median3(x, lookahead=0).any()


def test_causal_gaussian_matches_hand_weights():
    x = np.random.default_rng(1).normal(size=(4, 5, 6))
    padded = np.pad(x, ((1, 0), (1, 1), (1, 1)), mode="edge")
    ref = np.zeros_like(x)
    total = 0.0
    for dt in (-1, 0):  # no weight on frame t+1
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                w = math.exp(-(dt * dt + dy * dy + dx * dx) / (2 * 1.5 ** 2))
                total += w
                ref += w * padded[1 + dt:5 + dt, 1 + dy:6 + dy, 1 + dx:7 + dx]
    ref /= total
    out = lipar.causal_gaussian3(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)


def test_causal_gaussian_impulse():
    x = torch.zeros(4, 5, 5, dtype=torch.float64)
    x[1, 2, 2] = 1
    out = lipar.causal_gaussian3(x)
    a = math.exp(-1 / 4.5)  # one step at sigma 1.5
    z = (1 + a) * (1 + 2 * a) ** 2  # sum of the 18 causal weights
    assert out[1, 2, 2].item() == pytest.approx(1 / z)
    assert out[2, 2, 2].item() == pytest.approx(a / z)  # the next frame sees it
    assert out[1, 1, 1].item() == pytest.approx(a * a / z)
    assert not out[0].any() and not out[3].any()  # the past and t+2 never do
    c = torch.full((3, 4, 4), 0.7, dtype=torch.float64)
    torch.testing.assert_close(lipar.causal_gaussian3(c), c)


# ---------------------------------------------------------------- cleanup

def grid(text):
    return torch.tensor([[c == "#" for c in row.split()] for row in text.strip().splitlines()])


def test_open_close_hand_case():
    before = grid("""
        # . . . . . . .
        . . . . . . . .
        . . # # # . . .
        . . # # # . # #
        . . # # # . # #
        . . . . . . . .
        . . . . . # # #
        . . . . . # # #
    """)
    # the lone token and the 2x2 blob go (opening); the 3x3 block stays, and so does
    # the 2x3 block in the corner: the frame border does not erode it
    after = grid("""
        . . . . . . . .
        . . . . . . . .
        . . # # # . . .
        . . # # # . . .
        . . # # # . . .
        . . . . . . . .
        . . . . . # # #
        . . . . . # # #
    """)
    assert torch.equal(lipar.open_close(before[None])[0], after)


def test_open_close_fills_holes_and_gaps():
    before = grid("""
        . . . . . . . . . . .
        . . . . . . . . . . .
        . . # # # # # # # . .
        . . # # # # # # # . .
        . . # # # # # # # . .
        . . # # # . # # # . .
        . . # # # # # # # . .
        . . # # # # # # # . .
        . . # # # # # # # . .
        . . . . . . . . . . .
        . . . . . . . . . . .
    """)
    after = before.clone()
    after[5, 5] = True  # the pinhole is closed
    assert torch.equal(lipar.open_close(before[None])[0], after)
    bars = torch.zeros(11, 13, dtype=torch.bool)
    bars[2:9, 2:5] = True
    bars[2:9, 6:9] = True  # two 3-wide bars with a 1-column gap
    bridged = bars.clone()
    bridged[2:9, 5] = True
    assert torch.equal(lipar.open_close(bars[None])[0], bridged)
    # a 1-token strip between a region and the frame edge is closed as well
    edge = bars.clone()
    edge[2:9, 0] = False
    edge[2:9, 1:5] = True
    closed = lipar.open_close(edge[None])[0]
    assert closed[2:9, 0].all() and closed[2:9, 5].all()


def test_open_close_matches_scipy():
    masks = torch.from_numpy(np.random.default_rng(2).random((6, 12, 14)) < 0.55)
    out = lipar.open_close(masks)
    for m, o in zip(masks.numpy(), out):
        sq = np.ones((3, 3), bool)
        # outside the frame is neutral: 1 for erosion, 0 for dilation (OpenCV's default)
        erode = lambda a: ndimage.binary_erosion(a, sq, border_value=1)
        dilate = lambda a: ndimage.binary_dilation(a, sq, border_value=0)
        ref = erode(dilate(dilate(erode(m))))
        np.testing.assert_array_equal(o.numpy(), ref)


def test_causal_dilate_hand_case():
    mask = torch.zeros(3, 7, 7, dtype=torch.bool)
    mask[1, 3, 3] = True
    mask[0, 0, 0] = True
    out = lipar.dilate(mask, lookahead=0)
    corner = torch.zeros(7, 7, dtype=torch.bool)
    corner[:3, :3] = True
    centre = torch.zeros(7, 7, dtype=torch.bool)
    centre[1:6, 1:6] = True
    assert torch.equal(out[0], corner)  # frame 0 gets nothing from frame 1
    assert torch.equal(out[1], corner | centre)  # frame 0's token persists one frame
    assert torch.equal(out[2], centre)


def test_causal_dilate_matches_scipy():
    masks = np.random.default_rng(3).random((6, 9, 11)) < 0.05
    # scipy dilates by out[x] = OR_s in[x - s] over the structure's offsets s (centre
    # index 1 = offset 0), so offsets t in {0, +1} -- frames t and t-1 -- are slices 1, 2
    structure = np.ones((3, 5, 5), bool)
    structure[0] = False
    ref = ndimage.binary_dilation(masks, structure)
    np.testing.assert_array_equal(lipar.dilate(torch.from_numpy(masks), lookahead=0).numpy(), ref)


def test_dilation_with_lookahead_is_the_authors_box():
    """lookahead=1 repeats the authors' dilation: a (3, 5, 5) box with its time slice 2
    zeroed, in scipy; by the convention above that keeps offsets 0 and -1, frames t and t+1."""
    masks = np.random.default_rng(4).random((6, 9, 11)) < 0.05
    structure = np.ones((3, 5, 5), bool)
    structure[2] = False
    ref = ndimage.binary_dilation(masks, structure)
    np.testing.assert_array_equal(lipar.dilate(torch.from_numpy(masks), lookahead=1).numpy(), ref)


# ---------------------------------------------------------------- substitute bound (Eq. 5-6)

def test_substitute_bound_memory_hand_case():
    # one token whose 5 values all equal v_t, so the robust L1 is |v_t - memory|
    v = torch.tensor([0.0, 0.0, 1.0, 1.1, 1.2, 1.35, 1.2, 0.9, 1.0], dtype=torch.float64)
    patches = v[:, None, None, None].expand(9, 1, 1, 5)
    keep = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)[:, None, None]
    out = lipar.substitute_bound(patches, keep, theta2=0.3)[:, 0, 0]
    # memory after chunk 0 = frame 2 (last kept of 0..2): frames 3, 4 within 0.3, frame 5 not;
    # memory after chunk 1 = frame 5 (1.35): frame 7 (0.45) and frame 8 (0.35) are too far --
    # frame 8 is measured against that memory, not against frame 7 kept in the same chunk
    assert out.tolist() == [True, False, True, False, False, True, False, True, True]
    assert torch.equal(keep[:, 0, 0], torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool))


def scalar_drift_walk(L, step, theta2, chunk_frames=3):
    """Kept frames of one token drifting by `step` per frame when Eq. 1 keeps nothing."""
    kept, memory = [], 0.0
    for start in range(chunk_frames, L, chunk_frames):
        frames = [t for t in range(start, min(start + chunk_frames, L)) if t * step - memory > theta2]
        kept += frames
        memory = frames[-1] * step if frames else memory
    return kept


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
