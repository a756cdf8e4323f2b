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
values). The conv biases, the residual adds and the causal cache's copies stay
separate elementwise passes, as they are in NCDHW. sample.py runs the Wan VAE this way
on CUDA.

The numbers are those of the NCDHW VAE up to float rounding, and the convolutions meet
channels-last inputs only (tests/test_vae_layout.py, `conv_inputs_off_channels_last`);
bench.py's vae_layout_bench times both layouts on the GPU.
"""

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

# The memory format each convolution's input should be in, by the name of its function.
CONV_INPUT_FORMAT = {"conv2d": torch.channels_last, "conv3d": torch.channels_last_3d}


class RepeatPixels(nn.Module):
    """nn.Upsample(scale_factor=2, mode="nearest-exact") on frames [N, C, H, W]: each pixel
    repeated 2x2. The channels-last view [N, H, W, C] broadcast to [N, H, 2, W, 2, C] and
    copied once: the result is channels-last, whatever x's layout."""

    def forward(self, frames):
        N, C, H, W = frames.shape
        pixels = frames.permute(0, 2, 3, 1)[:, :, None, :, None, :]  # [N, H, 1, W, 1, C]
        return pixels.expand(N, H, 2, W, 2, C).reshape(N, 2 * H, 2 * W, C).permute(0, 3, 1, 2)


def channels_last(vae):
    """Convert vae's conv weights in place (Conv3d: channels_last_3d, Conv2d: channels_last),
    put RepeatPixels in place of its 2x upsamplers, and return vae. (vae.to(memory_format=...) cannot: it gives every 4-D and 5-D parameter
    one format, and the frames' convs and the 3D norms' gains [C, 1, 1, 1] are 4-D.)"""
    for module in vae.modules():
        if isinstance(module, nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        elif isinstance(module, nn.Sequential) and isinstance(module[0], nn.Upsample):
            assert module[0].scale_factor == 2.0 and module[0].mode == "nearest-exact", module[0]
            module[0] = RepeatPixels()
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
