"""Clips and float64 numpy/scipy references shared by the mask tests (test_lipar.py and
tests/test_prune_mask.py). scipy is a test-only oracle, never imported by lipar.py."""

import math

import numpy as np
import torch
from scipy import ndimage

import lipar

INF = float("inf")
THETA, THETA2 = 0.149, 0.3


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


def over_time(x, op, past, ahead, pad="edge"):
    """One of lipar's per-frame filters applied to every frame of a whole series x [T, ...],
    each frame reading frames t-past .. t+ahead through MaskStream's own windows (lipar.Frames)."""
    frames = lipar.Frames()
    for frame in x:
        frames.add(frame)
    frames.end = len(x)
    return torch.stack([op(frames.window(t - past, t + ahead + 1, pad)) for t in range(len(x))])


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


def authors_mask(z, theta=THETA, theta2=THETA2, full_box=False):
    """The authors' rlt_prune (DennisMenn/lipar, src/utils/rlt_prune.py) re-derived in
    float64 numpy/scipy, step for step: Eq. 1 distances, their median_blur (two edge
    frames padded before the clip, scipy's centred median, the first two outputs
    dropped), their causal Gaussian, the threshold, their bound_diff walk, the
    median again, OpenCV's 3x3 opening then closing, their dilation (a (3, 5, 5)
    box with time slice 2 zeroed; with full_box the whole box, as their first release
    df28874 has it) and frame 0 kept. No substitute bound afterwards."""
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
    if not full_box:
        structure[2] = False
    m = ndimage.binary_dilation(np.stack(opened_closed), structure)
    return torch.from_numpy(np.concatenate([np.ones((1, h, w), bool), m]))

def whole_frame_clip(frames, seed=0):
    """[L, 16, 16, 24] latents: independent random frames (every token far from the one before)."""
    return torch.stack([randn(16, 16, 24, seed=seed + 100 * f) for f in frames])


def kept_frames(keep):
    return [t for t in range(keep.shape[0]) if keep[t].any()]


def scalar_drift_walk(L, step, theta2, chunk_frames=3):
    """Kept frames of one token drifting by `step` per frame when Eq. 1 keeps nothing."""
    kept, memory = [], 0.0
    for start in range(chunk_frames, L, chunk_frames):
        frames = [t for t in range(start, min(start + chunk_frames, L)) if t * step - memory > theta2]
        kept += frames
        memory = frames[-1] * step if frames else memory
    return kept
