"""
The Wan 2.1 video VAE: a causal 3D-convolutional autoencoder that turns a video
[B, 3, T, H, W] in [-1, 1] (T = 4k + 1 frames) into normalised latents
[B, 16, 1 + (T - 1) / 4, H / 8, W / 8], and latents back into video.

"Causal" means that output frame t depends on input frames <= t only: every 3D
convolution pads the past, never the future, in time. That is what lets the VAE
run chunk by chunk, as the release does: encode takes frame 0 alone, then 4
frames at a time (each chunk yields one latent frame); decode takes one latent
frame at a time. Between chunks each causal layer keeps the last input frames
its kernel reaches back to (`CausalCache`), so the chunked result equals one
pass over the whole clip while memory stays that of a single chunk.

Module and parameter names follow the released checkpoint (Wan2.1_VAE.pth), so
its keys load unchanged; weights.py renames the diffusers layout (AutoencoderKLWan)
onto them.

Shapes: B batch, C channels, T frames, H height, W width.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import fused

# Per-channel statistics of the VAE means over Wan's training data (Wan 2.1's release). The
# DiT works on z = (mu - mean) / std, i.e. latents of roughly unit variance.
LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the VAE; the defaults are the released Wan 2.1 model."""

    base_dim: int = 96                      # channels at full resolution
    z_dim: int = 16                         # latent channels (the encoder outputs 2 * z_dim: mean and log-variance)
    dim_mult: tuple = (1, 2, 4, 4)          # channel multiplier of each resolution level
    num_res_blocks: int = 2                 # residual blocks per encoder level (the decoder has one more)
    temporal_downsample: tuple = (False, True, True)  # which level transitions also halve the frame rate

    @classmethod
    def tiny(cls):
        """The same network at 1/6 of the width, for tests on the CPU."""
        return cls(base_dim=16)

    @property
    def time_stride(self):
        """Video frames per latent frame (after frame 0): 4."""
        return 2 ** sum(self.temporal_downsample)

    @property
    def space_stride(self):
        """Pixels per latent pixel along each side: 8."""
        return 2 ** (len(self.dim_mult) - 1)


# -----------------------------------------------------------------------------
# Layers


def at_least_fp32(dtype):
    """float32 for bf16/fp16/fp32, float64 for float64: the precision of statistics and outputs."""
    return torch.promote_types(dtype, torch.float32)


class CausalCache:
    """What the causal layers carry from one chunk of a clip to the next.

    `past[layer]` holds the last input frames that `layer` saw; on its next call
    they are its past context, exactly the frames a single pass over the whole
    clip would have found before the chunk. `at_start` is True while the chunk
    being processed begins the clip (holds frame 0), which the temporal
    resamplers treat apart. One pass over a whole clip is one chunk with an
    empty cache: the causal layers then pad the past with zeros.
    """

    def __init__(self):
        self.past = {}
        self.at_start = True


def run_causal(layers, x, cache):
    """Apply `layers` in order, handing the cache to those that keep state across chunks."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)
    return x


def per_frame(op, x):
    """Apply a 2D operation to every frame of x [B, C, T, H, W]. (For channels-last x the
    frames [B*T, C, H, W] are a view, channels-last too; NCDHW x is copied into frames.)"""
    B, T = x.shape[0], x.shape[2]
    if T == 1:
        # Squeezed, not flattened: flattening B = 1 with T = 1 gives the frames' batch dim the
        # stride C, by which pad and upsample then read channels-last frames as NCHW.
        return op(x.squeeze(2)).unsqueeze(2)
    y = op(x.transpose(1, 2).flatten(0, 1))  # [B*T, C, H, W]
    return y.unflatten(0, (B, T)).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """A convolution with a 3-frame kernel that sees the present frame and the two before it.

    Space is zero-padded on both sides as usual. Time is extended on the past
    side only: with the two frames the cache kept from the previous chunk, or
    with zeros at the start of the clip.
    """

    def __init__(self, in_dim, out_dim, kernel=(3, 3, 3)):
        super().__init__(in_dim, out_dim, kernel, padding=(0, kernel[1] // 2, kernel[2] // 2))

    def forward(self, x, cache):
        past_frames = self.kernel_size[0] - 1
        past = cache.past.get(self)
        # The zero past by pad, the cached one by cat: both keep x's memory format (NCDHW or
        # channels-last); zeros made apart (new_zeros) would be NCDHW, and a cat of two formats is NCDHW.
        x = F.pad(x, (0, 0, 0, 0, past_frames, 0)) if past is None else torch.cat([past, x], dim=2)
        cache.past[self] = x[:, :, -past_frames:].clone()  # a copy, so the cache does not keep the whole chunk alive
        return super().forward(x)

    def _conv_forward(self, x, weight, bias):
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            # oneDNN, which F.conv3d picks for large inputs only: below batch 1 x channels x
            # frames x height = 20,480 (the tests' tiny VAE) it runs its own loop, 6-8x slower
            return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


def rms_norm(x, gamma):
    """x / rms(x) · gamma over the channels (dim 1), i.e. x / ||x|| · sqrt(C) · gamma.
    The mean square is accumulated in float32 (or wider): a bf16 sum of hundreds of
    squares is too coarse. (Written with the mean, not sqrt(C): a float computed from
    a shape would make torch.compile specialise on every channel count.)"""
    rms = x.to(at_least_fp32(x.dtype)).pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    return x / rms.to(x.dtype) * gamma


@fused
def rms_norm_silu(x, gamma):
    """SiLU(rms_norm(x)), the input of every causal conv in the residual blocks and heads.
    Run op by op it is five passes over the largest activations of the VAE; on CUDA
    it is compiled into one (model.fused)."""
    return F.silu(rms_norm(x, gamma))


class RMSNorm(nn.Module):
    """Scale each pixel's channel vector to unit RMS, then by a learned per-channel `gamma`.

    `spatial_dims` is 3 for video [B, C, T, H, W], 2 for frames [B, C, H, W]: it only
    shapes `gamma` as the checkpoint stores it.
    """

    def __init__(self, dim, spatial_dims):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *[1] * spatial_dims))

    def forward(self, x):
        return rms_norm(x, self.gamma)

    def silu(self, x):
        """SiLU(self(x)), fused on CUDA. (gamma is passed detached: torch.compile holds a
        parameter's shape fixed, which would tie the channel count and recompile per width.)"""
        return rms_norm_silu(x, self.gamma.detach())


class ResidualBlock(nn.Module):
    """x + (norm, SiLU, causal conv, norm, SiLU, causal conv)(x); a 1x1x1 conv adapts x's channels if needed."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        # Positions 0, 2, 3, 6 hold the checkpoint's residual.{0,2,3,6}; nn.Identity
        # stands where training applied dropout. forward applies them in this order.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3), nn.SiLU(), CausalConv3d(in_dim, out_dim),
            RMSNorm(out_dim, 3), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim))
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache):
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(norm1.silu(x), cache)
        return self.shortcut(x) + conv2(norm2.silu(h), cache)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame, with a residual connection.

    Frames do not attend to each other, so there is nothing to carry between chunks.
    """

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return x + per_frame(self._attend, x)

    def _attend(self, frames):
        N, C, H, W = frames.shape
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)   # [N, H*W, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)                       # [N, 1 head, H*W, C] each
        out = F.scaled_dot_product_attention(q, k, v)                      # [N, 1, H*W, C]
        # [N, C, H, W], a channels-last view (unflattened after the permute, N = 1 would take a stride read as NCHW)
        return self.proj(out.squeeze(1).unflatten(1, (H, W)).permute(0, 3, 1, 2))


class Resample(nn.Module):
    """Halve (encoder) or double (decoder) the frame size, and with `temporal` also the frame rate.

    Space, frame by frame: downsampling zero-pads one pixel right and bottom and
    applies a stride-2 3x3 conv; upsampling repeats each pixel 2x2 and applies a
    3x3 conv that also halves the channels. Time: see `_halve_frame_rate` and
    `_double_frame_rate`. The encoder resamples space first, then time; the
    decoder time first, then space.
    """

    def __init__(self, dim, up, temporal):
        super().__init__()
        self.up, self.temporal = up, temporal
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal and up:
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1))
        elif temporal:
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache):
        if self.temporal and self.up:
            x = self._double_frame_rate(x, cache)
        x = per_frame(self.resample, x)
        if self.temporal and not self.up:
            x = self._halve_frame_rate(x, cache)
        return x

    def _halve_frame_rate(self, x, cache):
        """1 + 2n frames -> 1 + n: frame 0 passes unchanged, output frame k >= 1 mixes input frames 2k-2, 2k-1, 2k.

        Frame 0 is coded alone, like an image. The input frame just before a
        chunk (2k - 2 for its first output) comes from the cache.
        """
        window = x if cache.at_start else torch.cat([cache.past[self], x], dim=2)
        cache.past[self] = window[:, :, -1:].clone()
        if cache.at_start and x.shape[2] == 1:  # frame 0 coded alone, as it is (a cat with nothing mixed is NCDHW)
            return x
        mixed = self.time_conv(window)
        return torch.cat([x[:, :, :1], mixed], dim=2) if cache.at_start else mixed

    def _double_frame_rate(self, x, cache):
        """1 + n frames -> 1 + 2n: frame 0 stays one frame, every later frame becomes two.

        The causal conv outputs 2C channels per frame; its two halves are two
        consecutive output frames. Its history starts after frame 0 (frame 1
        sees zeros before it, not frame 0): that is what the released decoder
        computes, so we do the same.
        """
        later = x[:, :, 1:] if cache.at_start else x
        frames = [x[:, :, :1]] if cache.at_start else []
        if later.shape[2]:
            first, second = self.time_conv(later, cache).chunk(2, dim=1)  # [B, C, n, H, W] each
            frames += [half[:, :, k:k + 1] for k in range(later.shape[2]) for half in (first, second)]
        # Frame k of `later` becomes first[k], second[k]; one cat of these frames keeps x's memory
        # format (a permute of the halves into time would copy into NCDHW).
        return torch.cat(frames, dim=2)


# -----------------------------------------------------------------------------
# The network


class Encoder(nn.Module):
    """Video [B, 3, T, H, W] -> [B, 2 * z_dim, 1 + (T - 1) / 4, H / 8, W / 8]."""

    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]  # [96, 96, 192, 384, 384]
        self.conv1 = CausalConv3d(3, dims[0])
        downsamples = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                downsamples.append(Resample(out_dim, up=False, temporal=cfg.temporal_downsample[level]))
        self.downsamples = nn.ModuleList(downsamples)
        dim = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])
        self.head = nn.Sequential(RMSNorm(dim, 3), nn.SiLU(), CausalConv3d(dim, 2 * cfg.z_dim))

    def forward(self, video, cache):
        x = self.conv1(video, cache)
        for layers in (self.downsamples, self.middle):
            x = run_causal(layers, x, cache)
        return self.head[2](self.head[0].silu(x), cache)


class Decoder(nn.Module):
    """Latents [B, z_dim, F, h, w] -> video [B, 3, 1 + 4 (F - 1), 8 h, 8 w] (not clamped)."""

    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]  # [384, 384, 384, 192, 96]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0])
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])
        upsamples = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2  # the previous level's upsampler halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                upsamples.append(Resample(out_dim, up=True, temporal=temporal_upsample[level]))
        self.upsamples = nn.ModuleList(upsamples)
        self.head = nn.Sequential(RMSNorm(dims[-1], 3), nn.SiLU(), CausalConv3d(dims[-1], 3))

    def forward(self, latents, cache):
        x = self.conv1(latents, cache)
        for layers in (self.middle, self.upsamples):
            x = run_causal(layers, x, cache)
        return self.head[2](self.head[0].silu(x), cache)


def run_chunks(network, chunks, cache):
    """Run `network` over consecutive chunks of one clip, carrying `cache`; concatenate the outputs in time."""
    outputs = []
    for chunk in chunks:
        outputs.append(network(chunk, cache))
        cache.at_start = False
    return torch.cat(outputs, dim=2)


class WanVAE(nn.Module):
    """Encoder, decoder and the two 1x1x1 convs around the latent, with the latent normalisation."""

    def __init__(self, cfg=VAEConfig()):
        super().__init__()
        if cfg.z_dim != len(LATENT_MEAN):
            raise ValueError(f"z_dim must be {len(LATENT_MEAN)}: the latent normalisation has that many channels")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = nn.Conv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # encoder output -> (mean, log-variance)
        self.conv2 = nn.Conv3d(cfg.z_dim, cfg.z_dim, 1)          # latent -> decoder input
        self.decoder = Decoder(cfg)

    @staticmethod
    def chunk_frames(latent_frames, first):
        """Video frames of a piece that yields `latent_frames` latents: frame 0 of the clip
        alone, then 4 each."""
        return 4 * latent_frames - 3 * first

    @staticmethod
    def _latent_stats(like):
        """The per-channel (mean, std), shaped [1, 16, 1, 1, 1], on like's device and dtype."""
        def column(values):
            return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
        return column(LATENT_MEAN), column(LATENT_STD)

    def _weights_format(self):
        """The memory format of the convs' weights: NCDHW as built and loaded, channels-last once
        vae_layout.channels_last converted them. encode and decode take their input into it;
        every layer keeps its input's format, so cuDNN then transposes nothing around a conv."""
        if self.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
        return torch.contiguous_format

    @torch.no_grad()
    def encode(self, video, chunked=True, cache=None):
        """Video [B, 3, T, H, W] in [-1, 1], T = 4k + 1 -> normalised latents [B, 16, 1 + k, H / 8, W / 8].

        The latents are float32 (float64 for a float64 model), whatever the weights' dtype.

        cache: a CausalCache to encode a stream piece by piece, the same cache for every
        piece: the first piece holds 4k + 1 frames, later ones 4k, and the latents of
        all pieces together equal those of the whole clip encoded at once.
        chunked=False runs the whole piece in one pass (same result, memory
        growing with T): the reference the chunked path is tested against.
        """
        cache = CausalCache() if cache is None else cache
        first = int(cache.at_start)  # frame 0 of the clip is coded alone
        T, H, W = video.shape[2:]
        stride_t, stride_s = self.cfg.time_stride, self.cfg.space_stride
        if (T - first) % stride_t or H % stride_s or W % stride_s:
            raise ValueError(f"the VAE needs {stride_t}k{' + 1' if first else ''} frames with sides divisible by "
                             f"{stride_s}, got {T} frames of {H}x{W} (video.padded_length and video.resize_crop "
                             f"produce such clips)")
        weight = self.conv1.weight
        video = video.to(weight.device, weight.dtype, memory_format=self._weights_format())
        # Frame 0 alone, then groups of 4: each chunk yields exactly one latent frame.
        groups = list(video[:, :, first:].split(stride_t, dim=2))
        chunks = ([video[:, :, :1]] if first else []) + groups if chunked else [video]
        features = run_chunks(self.encoder, chunks, cache)
        mu, _log_var = self.conv1(features).chunk(2, dim=1)  # the posterior's mean is the latent
        mu = mu.to(at_least_fp32(mu.dtype))
        mean, std = self._latent_stats(mu)
        return (mu - mean) / std

    @torch.no_grad()
    def decode(self, latents, chunked=True, cache=None):
        """Normalised latents [B, 16, F, h, w] -> video [B, 3, 1 + 4 (F - 1), 8 h, 8 w] clamped to [-1, 1].

        The video is float32 (float64 for a float64 model), whatever the weights' dtype.

        cache: a CausalCache to decode a stream piece by piece (see `encode`); a later
        piece of F latent frames gives 4F video frames.
        chunked=False decodes all latent frames in one pass (see `encode`).
        """
        weight = self.conv2.weight
        z = latents.to(weight.device, at_least_fp32(weight.dtype), memory_format=self._weights_format())
        mean, std = self._latent_stats(z)
        x = self.conv2((z * std + mean).to(weight.dtype))
        chunks = x.split(1, dim=2) if chunked else [x]  # one latent frame (4 video frames, 1 for the first) at a time
        video = run_chunks(self.decoder, chunks, CausalCache() if cache is None else cache)
        return video.to(at_least_fp32(video.dtype)).clamp(-1, 1)
