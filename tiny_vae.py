"""
TAEHV for Wan 2.1 (`taew2_1`): a tiny autoencoder that reads and writes the very
latents the DiT uses, about 20x cheaper than the Wan VAE, at a small cost in quality.
Written from the architecture of madebyollin/taehv (taehv.py) in the style of vae.py.

It is 2D convolutions applied frame by frame, plus three kinds of temporal layer:
- MemBlock: a residual block that sees its input of this frame and of the frame
  before (a one-frame memory; zeros before the first frame);
- TPool: merges `stride` consecutive frames into one (the encoder: 4 frames -> 1 latent);
- TGrow: turns one frame into `stride` frames (the decoder: 1 latent -> 4 frames).
Nothing looks ahead, so a video can be encoded and decoded piece by piece with a
CausalCache that carries each MemBlock's last input frame, exactly like the Wan VAE.

Frame counts follow the Wan VAE's: T = 4k + 1 frames <-> 1 + k latent frames. The
encoder takes frames in groups of 4 (latent i from frames 4i..4i+3; a whole clip of
4k + 1 frames is padded at its end with 3 copies of its last frame), and the decoder
turns L latents into 4L frames of which it drops the first 3. Images are in [-1, 1]
here, as for the Wan VAE (TAEHV itself works in [0, 1]); latents are not rescaled.

Shapes: B batch, C channels, T frames, H height, W width; the network works on
[B, T, C, H, W], the interface takes and returns [B, C, T, H, W] as vae.py does.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae import CausalCache, at_least_fp32

FRAMES_TO_TRIM = 3  # the decoder's first 3 frames come before the video's first frame


@dataclass(frozen=True)
class TinyVAEConfig:
    """Widths of TAEHV; the defaults are taew2_1's."""

    channels: int = 64                          # the encoder's width
    decoder_channels: tuple = (256, 128, 64, 64)  # the decoder's width per level
    latent_channels: int = 16

    @classmethod
    def tiny(cls):
        """The same network, narrow, for tests on the CPU."""
        return cls(channels=8, decoder_channels=(16, 8, 8, 8))


def conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


def per_frame(op, x):
    """A 2D operation on every frame of x [B, T, C, H, W]."""
    return op(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class Clamp(nn.Module):
    """Soft clamp of the decoder's input to about [-3, 3]: 3 tanh(x / 3)."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """ReLU(convs(cat(x_t, x_{t-1})) + x_t): a residual block that also sees its own input
    one frame earlier. The frame before a piece comes from the cache (zeros before the
    video's first frame)."""

    def __init__(self, n):
        super().__init__()
        self.conv = nn.Sequential(conv(2 * n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))

    def forward(self, x, cache):
        before = cache.past.get(self) if not cache.at_start else None
        before = torch.zeros_like(x[:, :1]) if before is None else before
        cache.past[self] = x[:, -1:]
        previous = torch.cat([before, x[:, :-1]], dim=1)
        return F.relu(per_frame(self.conv, torch.cat([x, previous], dim=2)) + x)


class TPool(nn.Module):
    """`stride` consecutive frames -> one: their channels side by side (the earliest
    first), mixed by a 1x1 convolution."""

    def __init__(self, n, stride):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n * stride, n, 1, bias=False)

    def forward(self, x):
        B, T, C, H, W = x.shape
        return per_frame(self.conv, x.reshape(B, T // self.stride, self.stride * C, H, W))


class TGrow(nn.Module):
    """One frame -> `stride` frames: a 1x1 convolution to stride x C channels, whose
    first C channels are the earliest frame."""

    def __init__(self, n, stride):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x):
        B, T, C, H, W = x.shape
        return per_frame(self.conv, x).reshape(B, T * self.stride, C, H, W)


def run(layers, x, cache):
    """Apply `layers` to x [B, T, C, H, W] in order: temporal layers on the whole piece,
    the others frame by frame."""
    for layer in layers:
        if isinstance(layer, MemBlock):
            x = layer(x, cache)
        elif isinstance(layer, (TPool, TGrow)):
            x = layer(x)
        else:
            x = per_frame(layer, x)
    return x


class TinyVAE(nn.Module):
    """TAEHV with the interface of vae.WanVAE: encode(video) -> normalised latents,
    decode(latents) -> video, both piece by piece with a CausalCache."""

    time_stride = 4

    def __init__(self, cfg=TinyVAEConfig()):
        super().__init__()
        self.cfg = cfg
        n, (d0, d1, d2, d3), z = cfg.channels, cfg.decoder_channels, cfg.latent_channels
        # Indices are those of the published state dict (encoder.4.conv.0.weight, ...):
        # 3 levels of (merge frames, halve the size, 3 MemBlocks); the frame merges are
        # 2, 2 and 1, so 4 frames make one latent and the picture shrinks 8x.
        self.encoder = nn.Sequential(
            conv(3, n), nn.ReLU(),
            TPool(n, 2), conv(n, n, stride=2, bias=False), MemBlock(n), MemBlock(n), MemBlock(n),
            TPool(n, 2), conv(n, n, stride=2, bias=False), MemBlock(n), MemBlock(n), MemBlock(n),
            TPool(n, 1), conv(n, n, stride=2, bias=False), MemBlock(n), MemBlock(n), MemBlock(n),
            conv(n, z))
        # The mirror image: 3 levels of (3 MemBlocks, double the size, grow frames 1, 2, 2).
        self.decoder = nn.Sequential(
            Clamp(), conv(z, d0), nn.ReLU(),
            MemBlock(d0), MemBlock(d0), MemBlock(d0), nn.Upsample(scale_factor=2), TGrow(d0, 1),
            conv(d0, d1, bias=False),
            MemBlock(d1), MemBlock(d1), MemBlock(d1), nn.Upsample(scale_factor=2), TGrow(d1, 2),
            conv(d1, d2, bias=False),
            MemBlock(d2), MemBlock(d2), MemBlock(d2), nn.Upsample(scale_factor=2), TGrow(d2, 2),
            conv(d2, d3, bias=False), nn.ReLU(), conv(d3, 3))

    @staticmethod
    def chunk_frames(latent_frames, first):
        """Video frames of a piece that yields `latent_frames` latents: 4 each, always."""
        return 4 * latent_frames

    @torch.no_grad()
    def encode(self, video, cache=None):
        """Video [B, 3, T, H, W] in [-1, 1] -> latents [B, 16, L, H / 8, W / 8], float32.

        A whole clip (no cache) takes T = 4k + 1 frames and gives 1 + k latents; pieces
        of a stream, encoded with one CausalCache, take 4k frames each.
        """
        T = video.shape[2]
        if cache is None:
            if (T - 1) % 4:
                raise ValueError(f"the tiny VAE takes 4k + 1 frames for a whole clip, got {T}")
            video = torch.cat([video, video[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)
            cache = CausalCache()
        elif T % 4:
            raise ValueError(f"the tiny VAE takes pieces of 4k frames, got {T}")
        weight = self.encoder[0].weight
        x = ((video.to(weight.device, weight.dtype) + 1) / 2).transpose(1, 2)  # TAEHV's [0, 1], frames first
        latents = run(self.encoder, x, cache)
        cache.at_start = False
        return latents.transpose(1, 2).to(at_least_fp32(weight.dtype))

    @torch.no_grad()
    def decode(self, latents, cache=None):
        """Latents [B, 16, L, h, w] -> video [B, 3, 1 + 4 (L - 1), 8 h, 8 w] in [-1, 1],
        float32; a later piece of a stream (same CausalCache) gives 4L frames."""
        cache = CausalCache() if cache is None else cache
        weight = self.decoder[1].weight
        x = run(self.decoder, latents.to(weight.device, weight.dtype).transpose(1, 2), cache)
        if cache.at_start:
            x = x[:, FRAMES_TO_TRIM:]
        cache.at_start = False
        return (x.transpose(1, 2).to(at_least_fp32(weight.dtype)).clamp(0, 1) * 2 - 1)
