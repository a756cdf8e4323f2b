"""
The Wan VAE (vae.py) in channels-last memory: NDHWC for clips, NHWC for frames.

cuDNN's convolution kernels work on channels-last data: given NCDHW activations, it
transposes each conv's input to NDHWC and the output back, two extra passes over the
largest tensors of the VAE for every conv. `channels_last(vae)` converts the conv
weights; encode and decode then bring their input into the weights' format
(WanVAE._weights_format), every layer of vae.py keeps its input's format from one conv
to the next (the causal cache's pad and cat, the per-frame view, the resamplers, the
residual adds), and the norm + SiLU before each causal conv reads channels-last rows
directly (triton_ops.rms_silu). So run it within model.fusion(triton_ops.Kernels()):
op by op, PyTorch's broadcasting kernels for x / rms(x) · γ are slow in this layout.
The decoder's 2x nearest upsampling becomes `RepeatPixels`, a broadcast and one copy
in channels-last memory (half the time of PyTorch's upsampling kernel there, same
values).

At full resolution, where the VAE is narrowest (96 channels) and its frames largest,
cuDNN's 3x3x3 conv3d ran at under half the wider layers' rate on the H200 (254 against
521-580 TFLOP/s, BENCHMARKS.md). There each causal conv
becomes a `TapCausalConv3d`: the kernel's three temporal slices stacked into one 2-D
conv over the chunk's frames, whose outputs ("taps") `sum_taps` adds across
consecutive frames with the bias, and with the shortcut in the residual blocks
(`TapResidualBlock`), in one pass (a Triton kernel within the fusion). Its cache holds
what the chunk's last two frames contribute to the next two, not the input frames.
The other residual blocks become `FoldedResidualBlock`s: PyTorch adds a conv's bias in a
pass of its own over the output, so their convs leave it out and the passes after them
add it (the norm + SiLU kernel, and one kernel for the residual add with the second
conv's and a 1x1 shortcut's biases), with the same roundings: on CUDA the same numbers
bit for bit (bench.py --vae-layout), on the CPU, where oneDNN adds a bias within the
conv, the same up to float rounding.
sample.py runs the Wan VAE this way on CUDA (1.27x the channels-last VAE without taps
or folding, 1.03x of that from the folding; BENCHMARKS.md).

The numbers are those of the NCDHW VAE up to float rounding, and the convolutions meet
channels-last inputs only (tests/test_vae_layout.py, `conv_inputs_off_channels_last`);
bench.py's vae_layout_bench times both layouts on the GPU.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import vae as V
from model import fused

# The memory format each convolution's input should be in, by the name of its function
# (mkldnn_convolution: vae.CausalConv3d's own call on the CPU).
CONV_INPUT_FORMAT = {"conv2d": torch.channels_last, "conv3d": torch.channels_last_3d,
                     "mkldnn_convolution": torch.channels_last_3d}


class RepeatPixels(nn.Module):
    """nn.Upsample(scale_factor=2, mode="nearest-exact") on frames [N, C, H, W]: each pixel
    repeated 2x2. The channels-last view [N, H, W, C] broadcast to [N, H, 2, W, 2, C] and
    copied once: the result is channels-last, whatever x's layout."""

    def forward(self, frames):
        N, C, H, W = frames.shape
        pixels = frames.permute(0, 2, 3, 1)[:, :, None, :, None, :]  # [N, H, 1, W, 1, C]
        return pixels.expand(N, H, 2, W, 2, C).reshape(N, 2 * H, 2 * W, C).permute(0, 3, 1, 2)


@fused
def sum_taps(taps, carry, bias, residual=None):
    """The temporal sum of a causal conv split into taps (TapCausalConv3d).

    taps [N, T, 3, C, H, W]: taps[:, s, k] is input frame s through the kernel's temporal
    slice k, a term of output frame s + 2 - k (slice 2 meets the present frame).
    carry [N, 2, C, H, W] or None: the terms the frames before the chunk left for its
    first two output frames (None: the clip starts, a zero past).
    residual [N, C, T, H, W] or None: added to the output (a residual block's shortcut).
    Returns (the output [N, C, T, H, W] = its terms + bias (+ residual), the next chunk's
    carry: the terms for output frames T and T + 1). Sums in float32 (float64), each
    result rounded once."""
    N, T, _, C, H, W = taps.shape
    # Output frames 0 .. T + 1 in channels-last memory [N, T + 2, H, W, C], read as [N, T + 2, C, H, W].
    terms = torch.zeros(N, T + 2, H, W, C, device=taps.device, dtype=V.at_least_fp32(taps.dtype)).permute(0, 1, 4, 2, 3)
    if carry is not None:
        terms[:, :2] += carry
    for k in range(3):
        terms[:, 2 - k:2 - k + T] += taps[:, :, k]
    out = terms[:, :T] + bias.view(C, 1, 1)
    if residual is not None:
        out += residual.transpose(1, 2)
    out = out.to(taps.dtype).transpose(1, 2)
    return out, terms[:, T:].to(taps.dtype, copy=True)


def shell(cls, *sizes):
    """cls(*sizes) built on the meta device: a module whose parameters from_conv/from_block
    replace with the original's at once, so their random initialisation (about 1 s for the
    VAE's 384-channel convs on the CPU) is never computed. channels_last checks that none
    is left on meta."""
    with torch.device("meta"):
        return cls(*sizes)


class TapCausalConv3d(V.CausalConv3d):
    """A CausalConv3d (kernel 3 x kh x kw, the same weight and bias) run as one 2-D conv and a sum.

    Output frame t is W_0 * x[t-2] + W_1 * x[t-1] + W_2 * x[t] + b, W_k the kernel's k-th
    temporal slice. One conv2d of the chunk's frames with the three slices stacked as
    3·C_out output channels (`taps_weight`, made from `weight` when converted: convert
    after loading weights) computes every term at once; sum_taps adds them up. cache.past
    holds the carry (sum_taps) in place of the last two input frames: the same
    numbers as CausalConv3d's, chunk by chunk, up to the rounding of the terms."""

    @classmethod
    def from_conv(cls, conv):
        tap = shell(cls, conv.in_channels, conv.out_channels, conv.kernel_size)
        tap.weight, tap.bias = conv.weight, conv.bias
        C_out, C_in, kt, kh, kw = conv.weight.shape
        taps_weight = conv.weight.detach().permute(2, 0, 1, 3, 4).reshape(kt * C_out, C_in, kh, kw)  # row k·C_out + o
        tap.register_buffer("taps_weight", taps_weight.contiguous(memory_format=torch.channels_last), persistent=False)
        return tap

    def forward(self, x, cache, residual=None):
        N, C, T, H, W = x.shape
        # The chunk's frames [N·T, C, H, W]: a view of channels-last x, with exactly channels-last strides.
        frames = x.permute(0, 2, 3, 4, 1).reshape(N * T, H, W, C).permute(0, 3, 1, 2)
        taps = F.conv2d(frames, self.taps_weight, padding=self.padding[1:])  # [N·T, 3·C_out, H, W]
        out, cache.past[self] = sum_taps(taps.unflatten(0, (N, T)).unflatten(2, (3, -1)), cache.past.get(self),
                                         self.bias, residual)
        return out


class TapResidualBlock(V.ResidualBlock):
    """A ResidualBlock whose second conv is a TapCausalConv3d: the shortcut joins its output in
    sum_taps's pass instead of a pass of its own over the block's largest tensor."""

    @classmethod
    def from_block(cls, block):
        tap = shell(cls, block.residual[2].in_channels, block.residual[6].out_channels)
        tap.residual, tap.shortcut = block.residual, block.shortcut
        return tap

    def forward(self, x, cache):
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(norm1.silu(x), cache)
        return conv2(norm2.silu(h), cache, residual=self.shortcut(x))


class BiasLaterCausalConv3d(V.CausalConv3d):
    """A CausalConv3d whose output leaves out its bias, for the pass after it to add
    (FoldedResidualBlock). The bias stays its parameter: the state dict is unchanged."""

    @classmethod
    def from_conv(cls, conv):
        later = shell(cls, conv.in_channels, conv.out_channels, conv.kernel_size)
        later.weight, later.bias = conv.weight, conv.bias
        return later

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight, None)


@fused
def biased_rms_norm_silu(x, bias, gamma):
    """vae.rms_norm_silu(x + bias), x + bias rounded to x's dtype first as a conv's own bias
    add rounds it."""
    return F.silu(V.rms_norm(x + bias.view(-1, 1, 1, 1), gamma))


@fused
def biased_residual(shortcut, shortcut_bias, out, bias):
    """(shortcut + shortcut_bias) + (out + bias), each sum rounded to out's dtype as the
    op-by-op block rounds it (shortcut_bias None: an identity shortcut)."""
    if shortcut_bias is not None:
        shortcut = shortcut + shortcut_bias.view(-1, 1, 1, 1)
    return shortcut + (out + bias.view(-1, 1, 1, 1))


class FoldedResidualBlock(V.ResidualBlock):
    """A ResidualBlock whose convs leave their biases to the passes that follow them: the
    first conv's joins the norm + SiLU before the second conv, the second's and a 1x1
    shortcut's join the residual add (one Triton kernel each within the fusion). Each bias
    add of its own was a pass over the block's output: two fewer, three with a 1x1 shortcut."""

    @classmethod
    def from_block(cls, block):
        folded = shell(cls, block.residual[2].in_channels, block.residual[6].out_channels)
        folded.residual, folded.shortcut = block.residual, block.shortcut
        for i in (2, 6):
            folded.residual[i] = BiasLaterCausalConv3d.from_conv(block.residual[i])
        return folded

    def forward(self, x, cache):
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(norm1.silu(x), cache)
        h = conv2(biased_rms_norm_silu(h, conv1.bias, norm2.gamma.detach()), cache)
        if isinstance(self.shortcut, nn.Conv3d):  # 1x1x1, no cache
            return biased_residual(F.conv3d(x, self.shortcut.weight), self.shortcut.bias, h, conv2.bias)
        return biased_residual(x, None, h, conv2.bias)


def fold_biases(module):
    """Replace the ResidualBlocks in module (not the TapResidualBlocks) by FoldedResidualBlock."""
    for name, child in module.named_children():
        if type(child) is V.ResidualBlock:
            setattr(module, name, FoldedResidualBlock.from_block(child))
        else:
            fold_biases(child)


def split_into_taps(module, widest):
    """Replace the 3x3x3 causal convs in module with at most `widest` channels in and out by
    TapCausalConv3d, and the residual blocks whose second conv that makes by TapResidualBlock."""
    def narrow(conv):
        return conv.kernel_size == (3, 3, 3) and max(conv.in_channels, conv.out_channels) <= widest

    for name, child in module.named_children():
        if type(child) is V.CausalConv3d and narrow(child):
            setattr(module, name, TapCausalConv3d.from_conv(child))
            continue
        if type(child) is V.ResidualBlock and narrow(child.residual[6]):
            child = TapResidualBlock.from_block(child)
            setattr(module, name, child)
        split_into_taps(child, widest)


def channels_last(vae, taps=True, fold=True):
    """Convert vae's conv weights in place (Conv3d: channels_last_3d, Conv2d: channels_last),
    put RepeatPixels in place of its 2x upsamplers, with `taps` make the full-resolution
    causal convs (vae.cfg.base_dim channels) TapCausalConv3d, with `fold` the other residual
    blocks FoldedResidualBlock, and return vae. (vae.to(memory_format=...) cannot: it gives
    every 4-D and 5-D parameter one format, and the frames' convs and the 3D norms' gains
    [C, 1, 1, 1] are 4-D.)"""
    for module in vae.modules():
        if isinstance(module, nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        elif isinstance(module, nn.Sequential) and isinstance(module[0], nn.Upsample):
            assert module[0].scale_factor == 2.0 and module[0].mode == "nearest-exact", module[0]
            module[0] = RepeatPixels()
    if taps:
        split_into_taps(vae, vae.cfg.base_dim)
    if fold:
        fold_biases(vae)
    on_meta = [name for name, t in [*vae.named_parameters(), *vae.named_buffers()] if t.is_meta]
    assert not on_meta, f"a shell kept its own tensors: {on_meta[:3]}"
    return vae


def has_channels_last_strides(x, memory_format):
    """Whether x's strides are exactly those `memory_format` gives its shape. (Stricter than
    x.is_contiguous(memory_format=...), which ignores the strides of size-1 dims: a view can
    leave a batch of 1 with a stride by which PyTorch's pad, cat and 1x1 convs then read the
    tensor as NCDHW.)"""
    return x.stride() == torch.empty(x.shape, memory_format=memory_format, device="meta").stride()


class _ConvInputs(TorchFunctionMode):
    """Within it, the shape of every conv2d / conv3d input not laid out channels-last lands in `off`."""

    def __init__(self):
        super().__init__()
        self.off = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        wanted = CONV_INPUT_FORMAT.get(getattr(func, "__name__", None))
        if wanted is not None and not has_channels_last_strides(args[0], wanted):
            self.off.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def conv_inputs_off_channels_last(run):
    """Call run() and return the shapes of the convolution inputs in it that were not laid
    out channels-last: empty when the activations stayed channels-last from conv to conv.
    (It sees the tensors the convs get, the causal cache's concatenations included; a layer
    falling back to NCDHW shows here, and on the GPU costs cuDNN its transposes again.)"""
    with _ConvInputs() as watch:
        run()
    return watch.off
