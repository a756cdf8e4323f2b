"""Component tests of LIPAR's pruning mask: the Eq. 1 distance, the smoothing, the
cleanup and the substitute bound, step by step (the whole mask's properties are
claims of the paper, in test_lipar.py).

Independent references are numpy/scipy (float64) or hand-written arrays; scipy is a
test-only oracle and never imported by lipar.py.
"""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import lipar
from tests.clips import np_patches, np_robust_l1, over_time, randn


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
    np.testing.assert_array_equal(over_time(torch.from_numpy(x), lipar.median3, past=2, ahead=0).numpy(), ref)


def test_median_with_lookahead_is_the_authors_filter():
    """lookahead=1 repeats the authors' median_blur: two edge frames padded before the
    clip, scipy's 3x3x3 median (mode "nearest"), the first two outputs dropped."""
    x = np.random.default_rng(5).normal(size=(6, 4, 5))
    padded = np.pad(x, ((2, 0), (0, 0), (0, 0)), mode="edge")
    ref = ndimage.median_filter(padded, mode="nearest", size=(3, 3, 3))[2:]
    np.testing.assert_array_equal(over_time(torch.from_numpy(x), lipar.median3, past=1, ahead=1).numpy(), ref)


def test_causal_median_hand_case():
    # per-frame constants 0, 10, 20, 30, 40: frame t takes the median of t-2..t
    x = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 3, 3) * 10
    out = over_time(x, lipar.median3, past=2, ahead=0)
    assert out[:, 1, 1].tolist() == [0, 0, 10, 20, 30]
    # a spike in frame 3 alone never shows (majority vote), and never reaches frames 0-2
    x = torch.zeros(5, 3, 3)
    x[3] = 100
    assert not over_time(x, lipar.median3, past=2, ahead=0).any()


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
    out = over_time(torch.from_numpy(x), lipar.causal_gaussian3, past=1, ahead=0).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)


def test_causal_gaussian_impulse():
    x = torch.zeros(4, 5, 5, dtype=torch.float64)
    x[1, 2, 2] = 1
    out = over_time(x, lipar.causal_gaussian3, past=1, ahead=0)
    a = math.exp(-1 / 4.5)  # one step at sigma 1.5
    z = (1 + a) * (1 + 2 * a) ** 2  # sum of the 18 causal weights
    assert out[1, 2, 2].item() == pytest.approx(1 / z)
    assert out[2, 2, 2].item() == pytest.approx(a / z)  # the next frame sees it
    assert out[1, 1, 1].item() == pytest.approx(a * a / z)
    assert not out[0].any() and not out[3].any()  # the past and t+2 never do
    c = torch.full((3, 4, 4), 0.7, dtype=torch.float64)
    torch.testing.assert_close(over_time(c, lipar.causal_gaussian3, past=1, ahead=0), c)


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
    out = over_time(mask, lipar.dilate, past=1, ahead=0, pad="zero")
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
    np.testing.assert_array_equal(over_time(torch.from_numpy(masks), lipar.dilate, past=1, ahead=0, pad="zero").numpy(), ref)


def test_dilation_with_lookahead_is_the_authors_box():
    """lookahead=1 repeats the authors' dilation: a (3, 5, 5) box with its time slice 2
    zeroed, in scipy; by the convention above that keeps offsets 0 and -1, frames t and t+1."""
    masks = np.random.default_rng(4).random((6, 9, 11)) < 0.05
    structure = np.ones((3, 5, 5), bool)
    structure[2] = False
    ref = ndimage.binary_dilation(masks, structure)
    np.testing.assert_array_equal(over_time(torch.from_numpy(masks), lipar.dilate, past=0, ahead=1, pad="zero").numpy(), ref)


# ---------------------------------------------------------------- substitute bound (Eq. 5-6)

def test_substitute_bound_memory_hand_case():
    # one token whose 5 values all equal v_t, so the robust L1 is |v_t - memory|
    v = torch.tensor([0.0, 0.0, 1.0, 1.1, 1.2, 1.35, 1.2, 0.9, 1.0], dtype=torch.float64)
    patches = v[:, None, None, None].expand(9, 1, 1, 5)
    keep = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)[:, None, None]
    bound = lipar.SubstituteBound(theta2=0.3)
    out = torch.stack([bound(t, p, k) for t, (p, k) in enumerate(zip(patches, keep))])[:, 0, 0]
    # memory after chunk 0 = frame 2 (last kept of 0..2): frames 3, 4 within 0.3, frame 5 not;
    # memory after chunk 1 = frame 5 (1.35): frame 7 (0.45) and frame 8 (0.35) are too far --
    # frame 8 is measured against that memory, not against frame 7 kept in the same chunk
    assert out.tolist() == [True, False, True, False, False, True, False, True, True]
    assert torch.equal(keep[:, 0, 0], torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool))


# ---------------------------------------------------------------- the mask as a stream

@pytest.mark.parametrize("lookahead", [0, 1])
def test_mask_stream_in_any_pieces_equals_the_whole_clip_mask(lookahead):
    """Frames pushed one at a time, or in uneven groups, give the mask of the whole clip
    bit for bit, each frame as soon as the frames it depends on have arrived."""
    from tests.clips import authors_mask, drifting_clip
    z = drifting_clip(7, L=17, amax=0.25)
    whole = lipar.prune_mask(z, lookahead=lookahead)
    if lookahead:  # the whole-clip mask itself is the authors' with the bound walked again
        assert torch.equal(lipar.prune_mask(z, theta2=float("inf")), authors_mask(z, theta2=float("inf")))
    for sizes in ([1] * 17, [4, 1, 5, 7], [17]):
        stream = lipar.MaskStream(lookahead=lookahead)
        pieces, start = [], 0
        for size in sizes:
            pieces.append(stream.push(z[start:start + size]))
            start += size
            # frame 0 is final at once (always kept), frame t >= 1 once frame t + 3a has arrived
            assert sum(len(p) for p in pieces) == 1 + max(0, start - 1 - 3 * lookahead)
        pieces.append(stream.finish())
        assert torch.equal(torch.cat(pieces), whole), sizes


def test_mask_stream_holds_a_few_frames_whatever_the_length():
    stream = lipar.MaskStream()
    z = randn(1, 16, 8, 12)
    for t in range(200):
        stream.push(z + 0.01 * t)
        held = max(len(s.held) for s in (stream.patches, stream.distance, stream.median, stream.bounded,
                                         stream.cleaned, stream.final))
        assert held <= 7, (t, held)


# ---------------------------------------------------------------- the recipes' masks

@pytest.mark.parametrize("recipe", ["authors", "paper"])
def test_the_authors_releases_masks_equal_their_code_re_derived(recipe):
    """--recipe authors / paper: no substitute bound after the cleanup, and the paper
    release's whole (3, 5, 5) dilation box (t-1 .. t+1): bit-equal to the authors'
    steps re-derived in numpy/scipy (tests/clips.py), whole clip and streamed."""
    from tests.clips import authors_mask, drifting_clip
    r = lipar.RECIPES[recipe]
    options = {"dilation_frames": r.dilation_frames, "bound_after_cleanup": r.bound_after_cleanup}
    for z in (drifting_clip(7, L=17, amax=0.25), drifting_clip(2, L=14, amax=0.4)):
        whole = lipar.prune_mask(z, **options)
        assert torch.equal(whole, authors_mask(z, full_box=recipe == "paper"))
        stream = lipar.MaskStream(**options)
        streamed = torch.cat([stream.push(z[:5]), stream.push(z[5:6]), stream.push(z[6:]), stream.finish()])
        assert torch.equal(streamed, whole)
    assert not torch.equal(authors_mask(z, full_box=True), authors_mask(z))  # the two boxes differ on this clip


def test_the_three_frame_dilation_hand_case():
    """One kept token in cleaned frame 4 (frames 1..): the 2-frame window t..t+1 keeps
    its 5x5 neighbourhood in frames 3 and 4, the paper's t-1..t+1 in frames 3, 4 and 5."""
    cleaned = torch.zeros(6, 7, 7, dtype=torch.bool)
    cleaned[3, 3, 3] = True  # frame 4 (cleaned frames start at frame 1)
    two = lipar.over_frames(cleaned, lipar.dilate, past=0, ahead=1, pad="zero")
    three = lipar.over_frames(cleaned, lipar.dilate, past=1, ahead=1, pad="zero")
    assert [f + 1 for f in range(6) if two[f].any()] == [3, 4]
    assert [f + 1 for f in range(6) if three[f].any()] == [3, 4, 5]
    assert three[3, 1:6, 1:6].all() and three[3].sum() == 25
