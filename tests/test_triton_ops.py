"""triton_ops.py on the CPU, through Triton's interpreter: every kernel against float64
math written differently, and the fused regions against model.py's own, through the DiT
and the VAE. On the GPU the same kernels are compiled; bench.py --kernels checks them
there against the plain path at real shapes.

Tolerances: the kernels and the plain code compute in float32 with their reductions in
another order (a row of D values summed in a tree instead of PyTorch's order), so they
differ by a few float32 roundings: relative 2e-6 on values of order one, far below any
error of meaning and far above a wrong index or a missing term."""

import pytest
import torch

triton_ops = pytest.importorskip("triton_ops", reason="Triton is not installed (requirements-dev.txt has it)")

import model as M  # noqa: E402
import vae as V  # noqa: E402
from test_graphs import run_clip, tiny_dit  # noqa: E402

F32 = dict(rtol=2e-6, atol=2e-6)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_layer_norm_rows_with_and_without_the_residual_before_it():
    x, y = rand(2, 5, 48, seed=1), rand(2, 5, 48, seed=2)
    gate, mult, shift = rand(2, 1, 48, seed=3), rand(2, 1, 48, seed=4), rand(2, 1, 48, seed=5)
    xd, yd, gd, md, sd = (t.double() for t in (x, y, gate, mult, shift))
    for given_y, given_gate in ((False, False), (True, False), (True, True)):
        summed = xd + (yd * (gd if given_gate else 1) if given_y else 0)
        var = ((summed - summed.sum(-1, keepdim=True) / 48) ** 2).sum(-1, keepdim=True) / 48
        expected = (summed - summed.mean(-1, keepdim=True)) / (var + 1e-6).sqrt() * md + sd
        x_out, out = triton_ops.layer_norm_rows(x, mult, shift, 1e-6, y=y if given_y else None,
                                                gate=gate if given_gate else None)
        torch.testing.assert_close(out.double(), expected, **F32)
        if given_y:
            torch.testing.assert_close(x_out.double(), summed, **F32)
        else:
            assert x_out is None


def test_rms_rope_rows_rotates_each_heads_pairs_by_its_tokens_angles():
    x, weight = rand(2, 6, 3, 8, seed=1), rand(24, seed=2)  # 2 batches of 6 tokens, 3 heads of 8: 4 pairs each
    angles = rand(6, 4, seed=3)
    cos, sin = angles.cos(), angles.sin()
    xd = x.double().reshape(2, 6, 24)
    normed = (xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * weight.double()).reshape(2, 6, 3, 4, 2)
    a, b = normed[..., 0], normed[..., 1]
    c, s = cos.double()[None, :, None], sin.double()[None, :, None]
    rotated = torch.stack([a * c - b * s, a * s + b * c], -1).reshape(2, 6, 3, 8)
    torch.testing.assert_close(triton_ops.rms_rope_rows(x, weight, 1e-6, (cos, sin)).double(), rotated, **F32)
    torch.testing.assert_close(triton_ops.rms_rope_rows(x, weight, 1e-6).double(), normed.reshape(2, 6, 3, 8),
                               **F32)
    plain = x.double().reshape(2, 6, 3, 4, 2)
    a, b = plain[..., 0], plain[..., 1]
    torch.testing.assert_close(triton_ops.rms_rope_rows(x, rope=(cos, sin)).double(),
                               torch.stack([a * c - b * s, a * s + b * c], -1).reshape(2, 6, 3, 8), **F32)


def test_gated_residual_and_the_vaes_rms_silu():
    x, y, gate = rand(1, 7, 40, seed=1), rand(1, 7, 40, seed=2), rand(1, 1, 40, seed=3)
    torch.testing.assert_close(triton_ops.gated_residual(x, y, gate).double(),
                               x.double() + y.double() * gate.double(), **F32)
    video, gamma = rand(1, 20, 3, 5, 7, seed=4), rand(20, 1, 1, 1, seed=5)
    vd = video.double()
    normed = vd / vd.pow(2).sum(1, keepdim=True).div(20).sqrt() * gamma.double()
    torch.testing.assert_close(triton_ops.rms_silu(video, gamma).double(), normed * torch.sigmoid(normed), **F32)


def test_quantize_rows_scales_each_row_by_its_largest_magnitude():
    """Scales and scaled values against float64. The conversion to e4m3 itself is the GPU's
    instruction: Triton's interpreter converts differently (seen: -7.88 → -4), so here the
    kernel keeps the values before it, in float32; on the GPU bench.py --kernels bounds
    the fp8 edit's error against the bf16 one."""
    x = rand(6, 300, seed=1) * torch.logspace(-3, 2, 6)[:, None]
    values, scale = triton_ops.quantize_rows(x, dtype=torch.float32)
    xd = x.double()
    expected_scale = xd.abs().amax(1, keepdim=True) / 448
    torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(values.double(), xd / expected_scale, rtol=1e-6, atol=1e-6)
    assert values.abs().amax(1).sub(448).abs().max() < 1e-3  # each row's largest lands on e4m3's largest


@pytest.mark.parametrize("mode,window", [("full", None), ("lipar", (1, 3))])
def test_the_fused_regions_compute_what_the_blocks_compute(mode, window):
    """A clip of two chunks (denoising and memory steps), and with lipar a third one wholly
    pruned (its keys rotated for every layer at once): outputs and cache. (Small: the
    interpreter runs each row's program in numpy.)"""
    dit = tiny_dit()
    g = torch.Generator().manual_seed(0)
    frames = 6 if mode == "full" else 9
    x, context = torch.randn(1, 16, frames, 4, 6, generator=g), torch.randn(1, 5, 48, generator=g)
    keep = torch.rand(frames, 2, 3, generator=g) > 0.4
    keep[0], keep[6:] = True, False
    kernels = triton_ops.Kernels(device_type="cpu")
    runs = []
    with torch.no_grad():
        for how in (None, kernels):
            with M.fusion(how):
                runs.append(run_clip(dit.forward_chunk, lambda c, hw: M.KVCache(dit, c, hw, window), x, keep, mode,
                                     context, 0))
    (plain, plain_cache), (fused, fused_cache) = runs
    assert kernels.calls["kernels"] > 0 and kernels.calls["plain"] == 0
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # two layers deep: a few roundings more
    torch.testing.assert_close(fused_cache.k, plain_cache.k, rtol=1e-5, atol=1e-5)


def test_the_vae_with_the_kernel_encodes_and_decodes_as_written():
    torch.manual_seed(0)
    vae = V.WanVAE(V.VAEConfig.tiny()).eval()
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    kernels = triton_ops.Kernels(device_type="cpu")
    with torch.no_grad():
        plain = vae.encode(video)
        with M.fusion(kernels):
            fused = vae.encode(video)
            decoded = vae.decode(fused)
        plain_decoded = vae.decode(plain)
    assert kernels.calls["kernels"] > 0
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decoded, plain_decoded, rtol=1e-4, atol=1e-4)


def test_what_no_kernel_serves_runs_as_written():
    dit = tiny_dit()
    block = dit.blocks[0]
    x, e = rand(1, 4, 64, seed=1), rand(1, 1, 6, 64, seed=2)
    rope = (rand(4, 16, seed=3), rand(4, 16, seed=4))
    on_the_gpu = triton_ops.Kernels()  # device_type "cuda": these CPU tensors are not its
    with torch.no_grad(), M.fusion(on_the_gpu):
        out = block.before_attention(x, e, rope)
        block.before_attention(x[:, :0], e, tuple(r[:0] for r in rope))
    with torch.no_grad():
        expected = M.Block.before_attention.__wrapped__(block, x, e, rope)
    assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))
    assert on_the_gpu.calls == {"kernels": 0, "plain": 2}
    cpu = triton_ops.Kernels(device_type="cpu")
    with torch.no_grad(), M.fusion(cpu):
        block.before_attention(x[:, :0], e, tuple(r[:0] for r in rope))  # no token: nothing to launch
        dit.double().blocks[0].before_attention(x.double(), e.double(), rope)  # float64: not a kernel dtype
    assert cpu.calls == {"kernels": 0, "plain": 2}
