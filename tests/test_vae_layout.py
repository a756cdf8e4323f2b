"""vae_layout.py on the CPU: the Wan VAE with channels-last weights gives the NCDHW VAE's
numbers (whole clip, chunked and streamed with a CausalCache) while its convolutions meet
channels-last inputs only; and triton_ops.rms_silu on channels-last input, in Triton's
interpreter, alone and inside the VAE.

The CPU's conv3d (slow_conv3d; oneDNN only above a size these clips stay under) returns
NCDHW whatever its input, where cuDNN returns a channels-last input's result channels-last.
`CudnnLayout` plays cuDNN's part for the convs that call conv3d (the causal convs call
oneDNN themselves on the CPU, which keeps the layout as cuDNN does), so what the layout
checks here test is every op of vae.py between two convs, and the way into the weights'
format at encode and decode. That cuDNN
keeps the layout itself shows on the GPU only (bench.py's vae_layout_bench runs the same
check there)."""

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

import model as M
import vae as V
import vae_layout

CHANNELS_LAST_3D = torch.channels_last_3d


class CudnnLayout(TorchFunctionMode):
    """Within it, conv3d returns its result channels-last when its input is, as cuDNN does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", None) == "conv3d" and args[0].is_contiguous(memory_format=CHANNELS_LAST_3D):
            out = out.contiguous(memory_format=CHANNELS_LAST_3D)
        return out


def random_vae(dtype, seed=0):
    """The tiny VAE with every parameter drawn from N(0, 0.1): no gain left at 1, no bias at 0."""
    generator = torch.Generator().manual_seed(seed)
    vae = V.WanVAE(V.VAEConfig.tiny()).to(dtype).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.1, generator=generator)
    return vae


def inputs(dtype, frames=9, height=16, width=24):
    """A video [1, 3, frames, H, W] in [-1, 1] and latents [1, 16, 1 + (frames - 1) / 4, H / 8, W / 8] to decode."""
    generator = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, frames, height, width, generator=generator, dtype=dtype) * 2 - 1
    latents = torch.randn(1, 16, 1 + (frames - 1) // 4, height // 8, width // 8, generator=generator, dtype=dtype)
    return video, latents


def streamed(code, x, piece_frames):
    """code(piece, cache=...) over consecutive pieces of x (in time) with one CausalCache, as
    sample.edit_chunks runs encode and decode; the outputs concatenated in time."""
    cache, outputs, start = V.CausalCache(), [], 0
    for frames in piece_frames:
        outputs.append(code(x[:, :, start:start + frames], cache=cache))
        start += frames
    return torch.cat(outputs, dim=2)


def every_path(vae, video, latents):
    """Encode and decode whole (one pass), chunked (the default) and streamed in pieces."""
    first, later = vae.chunk_frames(2, True), vae.chunk_frames(1, False)  # 5 + 4 of the 9 frames
    return {
        "encode whole": vae.encode(video, chunked=False),
        "encode chunked": vae.encode(video),
        "encode streamed": streamed(vae.encode, video, [first, later]),
        "decode whole": vae.decode(latents, chunked=False),
        "decode chunked": vae.decode(latents),
        "decode streamed": streamed(vae.decode, latents, [2, 1]),
    }


def largest_relative_difference(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


# float64 rounds at 1.1e-16: 1e-12 leaves room for any summation order. float32 rounds at
# u = 6e-8; a channels-last conv sums its up to 64 · 27 = 1728 products in another order,
# which moves a sum by about sqrt(1728) · u = 2.5e-6 of its terms' size at worst in
# practice, and the norms between the ~40 layers keep such differences from compounding:
# 1e-5 of the largest value (measured: 2e-7 to 4e-7). A misread layout moves values by O(1).
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_channels_last_gives_the_ncdhw_numbers_and_stays_channels_last(dtype, tolerance):
    ncdhw = random_vae(dtype)
    channels_last = vae_layout.channels_last(copy.deepcopy(ncdhw))
    convs = [m for m in channels_last.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert all(m.weight.is_contiguous(memory_format=CHANNELS_LAST_3D if m.weight.dim() == 5 else torch.channels_last)
               for m in convs)
    assert not channels_last.encoder.conv1.weight.is_contiguous()  # a 3x3x3 kernel: really moved
    taps = [m for m in channels_last.modules() if isinstance(m, vae_layout.TapCausalConv3d)]
    # Full resolution (base_dim channels): the encoder's first conv and 2 blocks, the decoder's 3 blocks and head.
    assert len(taps) == 1 + 2 * 2 + 3 * 2 + 1 and channels_last.decoder.head[2] in taps
    assert sum(isinstance(m, vae_layout.TapResidualBlock) for m in channels_last.modules()) == 2 + 3
    # Every other residual block leaves its convs' biases to the passes after them: the
    # encoder's 3 lower levels' 2 and its middle 2, the decoder's middle 2 and 3 levels' 3.
    folded = [m for m in channels_last.modules() if type(m) is vae_layout.FoldedResidualBlock]
    assert len(folded) == 3 * 2 + 2 + 2 + 3 * 3 and not any(type(m) is V.ResidualBlock for m in channels_last.modules())
    assert channels_last.state_dict().keys() == ncdhw.state_dict().keys()  # the biases stay where they were
    video, latents = inputs(dtype)
    expected, got = every_path(ncdhw, video, latents), {}
    assert (expected["decode chunked"].abs() < 1).float().mean() > 0.9  # mostly inside decode's clamp
    with CudnnLayout():
        off = vae_layout.conv_inputs_off_channels_last(lambda: got.update(every_path(channels_last, video, latents)))
    assert off == []
    for path, reference in expected.items():
        assert got[path].is_contiguous(memory_format=CHANNELS_LAST_3D), path  # and the outputs stay so
        error = largest_relative_difference(got[path], reference)
        assert error < tolerance, (path, error)


def test_taps_false_keeps_the_causal_convs():
    vae = vae_layout.channels_last(random_vae(torch.float32), taps=False)
    assert not any(isinstance(m, vae_layout.TapCausalConv3d) for m in vae.modules())


@pytest.mark.parametrize("channels", [3, 20])
def test_sum_taps_adds_each_frames_terms_across_chunks(channels):
    """triton_ops.sum_taps (Triton's interpreter) and vae_layout.sum_taps as written, chained
    over chunks of 1, 3 and 2 frames through their carry, against each output frame's terms
    summed in float64 over the whole clip: frame t = bias + taps[t-2, 0] + taps[t-1, 1] +
    taps[t, 2] (+ the residual's frame t), frames before 0 absent. Each output is at most 5
    float32 values of size < 6, summed and rounded (the carry once on the way): within
    5 · 6 · 6e-8 < 2e-6."""
    triton_ops = pytest.importorskip("triton_ops", reason="Triton is not installed (requirements-dev.txt has it)")
    generator = torch.Generator().manual_seed(3)
    N, frames, H, W = 2, 6, 3, 5
    taps = torch.randn(N, frames, 3, channels, H, W, generator=generator)
    bias = torch.randn(channels, generator=generator)
    residual = torch.randn(N, channels, frames, H, W, generator=generator).contiguous(memory_format=CHANNELS_LAST_3D)
    expected = torch.stack([bias.double().view(-1, 1, 1) + sum(taps[:, t - 2 + k, k].double() for k in range(3)
                                                               if t - 2 + k >= 0) for t in range(frames)], dim=2)
    for sum_taps, with_residual in [(triton_ops.sum_taps, False), (triton_ops.sum_taps, True),
                                    (vae_layout.sum_taps, False), (vae_layout.sum_taps, True)]:
        carry, outputs, start = None, [], 0
        for chunk in (1, 3, 2):
            out, carry = sum_taps(taps[:, start:start + chunk], carry, bias,
                                  residual[:, :, start:start + chunk] if with_residual else None)
            assert out.shape == (N, channels, chunk, H, W) and out.is_contiguous(memory_format=CHANNELS_LAST_3D)
            outputs.append(out)
            start += chunk
        torch.testing.assert_close(torch.cat(outputs, dim=2).double(), expected + residual.double() * with_residual,
                                   rtol=0, atol=2e-6)


def test_the_layout_check_sees_convs_fed_ncdhw():
    """Without CudnnLayout the CPU's conv3d returns NCDHW, and the check reports the convs after
    it; so does it for the NCDHW VAE."""
    ncdhw = random_vae(torch.float64)
    channels_last = vae_layout.channels_last(copy.deepcopy(ncdhw))
    video, latents = inputs(torch.float64, frames=5)
    assert len(vae_layout.conv_inputs_off_channels_last(lambda: channels_last.decode(latents))) > 10
    assert len(vae_layout.conv_inputs_off_channels_last(lambda: ncdhw.encode(video))) > 10


def test_rms_silu_reads_and_writes_channels_last_rows():
    """Clips and frames in channels-last memory: odd channel counts (masked lanes), two batches,
    and positions spanning several programs; against float64 written another way (the norm
    as a vector norm, SiLU through exp). Tolerance as in tests/test_triton_ops.py."""
    triton_ops = pytest.importorskip("triton_ops", reason="Triton is not installed (requirements-dev.txt has it)")
    generator = torch.Generator().manual_seed(2)
    for shape, memory_format in [((2, 20, 3, 5, 7), CHANNELS_LAST_3D), ((2, 20, 5, 7), torch.channels_last),
                                 ((1, 96, 2, 6, 10), CHANNELS_LAST_3D)]:
        channels = shape[1]
        x = torch.randn(shape, generator=generator).contiguous(memory_format=memory_format)
        gamma = torch.randn(channels, *[1] * (len(shape) - 2), generator=generator)
        bias = torch.randn(channels, generator=generator)
        for b in (None, bias):  # with a bias: x + bias normed (vae_layout.biased_rms_norm_silu)
            out = triton_ops.rms_silu(x, gamma, b)
            assert out.is_contiguous(memory_format=memory_format) and not out.is_contiguous(), shape
            xd = x.double() if b is None else x.double() + b.double().view(-1, *[1] * (len(shape) - 2))
            normed = xd * (channels ** 0.5 / torch.linalg.vector_norm(xd, dim=1, keepdim=True)) * gamma.double()
            torch.testing.assert_close(out.double(), normed / (1 + torch.exp(-normed)), rtol=2e-6, atol=2e-6)


def test_biased_residual_adds_as_the_block_rounds_it():
    """triton_ops.biased_residual against vae_layout.biased_residual as written, in float32:
    the same three roundings of the same sums, so bit for bit; with and without a shortcut
    bias, 20 channels (masked lanes), two batches, and a shortcut given in NCDHW (copied)."""
    triton_ops = pytest.importorskip("triton_ops", reason="Triton is not installed (requirements-dev.txt has it)")
    generator = torch.Generator().manual_seed(4)
    shortcut, out = (torch.randn(2, 20, 3, 5, 7, generator=generator) for _ in range(2))
    out = out.contiguous(memory_format=CHANNELS_LAST_3D)
    bias, shortcut_bias = torch.randn(20, generator=generator), torch.randn(20, generator=generator)
    for given in (shortcut, shortcut.contiguous(memory_format=CHANNELS_LAST_3D)):
        for sb in (None, shortcut_bias):
            got = triton_ops.biased_residual(given, sb, out, bias)
            assert got.is_contiguous(memory_format=CHANNELS_LAST_3D)
            assert torch.equal(got, vae_layout.biased_residual(given, sb, out, bias))
    expected = shortcut.double() + shortcut_bias.double().view(-1, 1, 1, 1) + out.double() + bias.double().view(-1, 1, 1, 1)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)  # and it is that sum


def test_the_channels_last_vae_with_the_kernel_computes_what_ncdhw_does_op_by_op():
    """Every norm + SiLU through the kernel, on channels-last rows, the convs fed channels-last.
    (1e-5 as in the first test: the kernel's float32 sums are one more reordering.)"""
    triton_ops = pytest.importorskip("triton_ops", reason="Triton is not installed (requirements-dev.txt has it)")
    ncdhw = random_vae(torch.float32)
    channels_last = vae_layout.channels_last(copy.deepcopy(ncdhw))
    video, latents = inputs(torch.float32, frames=5)
    kernels, got = triton_ops.Kernels(device_type="cpu"), {}

    def encode_and_decode():
        got.update(latents=channels_last.encode(video), video=channels_last.decode(latents))

    with CudnnLayout(), M.fusion(kernels):
        off = vae_layout.conv_inputs_off_channels_last(encode_and_decode)
    assert off == []
    assert kernels.calls["kernels"] > 0 and kernels.calls["plain"] == 0
    assert largest_relative_difference(got["latents"], ncdhw.encode(video)) < 1e-5
    assert largest_relative_difference(got["video"], ncdhw.decode(latents)) < 1e-5


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_repeat_pixels_is_nearest_exact_upsampling_bit_for_bit_and_channels_last(layout):
    frames = torch.randn(2, 5, 3, 4).contiguous(memory_format=layout)
    upsampled = vae_layout.RepeatPixels()(frames)
    assert torch.equal(upsampled, torch.nn.Upsample(scale_factor=2.0, mode="nearest-exact")(frames))
    assert upsampled[1, 4, 5, 7] == frames[1, 4, 2, 3]  # pixel (5, 7) repeats pixel (5 // 2, 7 // 2)
    assert vae_layout.has_channels_last_strides(upsampled, torch.channels_last)


def test_channels_last_puts_repeat_pixels_in_every_upsampler():
    vae = vae_layout.channels_last(random_vae(torch.float32))
    upsamplers = [m for m in vae.modules() if isinstance(m, torch.nn.Upsample)]
    assert not upsamplers and sum(isinstance(m, vae_layout.RepeatPixels) for m in vae.modules()) == 3
