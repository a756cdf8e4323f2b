"""
Demo assets: the generated demo clip, tiny random-weight models that behave like
trained ones where LIPAR looks (the demo and the tests run without downloads), random
weights written in weights.md's layout, and synthetic masks and latents for the bench
and the tests.
"""

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import video as io
from model import CausalWanModel, DiTConfig
from text_encoder import T5Config, UMT5Encoder
from tiny_vae import MemBlock, TinyVAE, TinyVAEConfig
from vae import LATENT_MEAN, LATENT_STD, AttentionBlock, Resample, ResidualBlock, VAEConfig, WanVAE
from weights import vae_config_to_diffusers

DEFAULT_PROMPT = "a watercolor painting of a red ball rolling across a wooden table, soft brush strokes"
DEMO_FRAMES, DEMO_FPS = 57, 16  # 57 = 12·5 − 3 frames: 15 latent frames, 5 chunks, 3.6 s


def demo_frames(height=480, width=832, frames=DEMO_FRAMES):
    """A still textured background, a still block, and a ball rolling across: the case
    LIPAR is made for (most patches repeat the previous frame, a few move). uint8 [T, H, W, 3]."""
    y, x = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    wood = 0.5 + 0.25 * torch.sin(x / 9 + 3 * torch.sin(y / 40)) + 0.1 * torch.sin(y / 3)
    background = torch.stack([150 * wood + 60, 100 * wood + 40, 60 * wood + 20], dim=-1)
    background[height // 8:height // 3, width * 2 // 3:width * 5 // 6] = torch.tensor([40.0, 70.0, 160.0])
    clip = []
    for i in range(frames):
        cx, cy = width * (0.1 + 0.5 * i / frames), height * (0.6 + 0.15 * math.sin(i / 6))
        ball = ((x - cx) ** 2 + (y - cy) ** 2 < (height / 10) ** 2)[..., None]
        shade = 0.8 + 0.2 * torch.cos((x - cx + y - cy) / 15)[..., None]
        clip.append(torch.where(ball, torch.tensor([210.0, 30.0, 30.0]) * shade, background))
    return torch.stack(clip).round().clamp(0, 255).to(torch.uint8)


def random_tiny_vae():
    """A narrow random-weight TAEHV (tiny_vae.py) for the demo and the tests, made, like
    random_demo_vae, to behave as a trained one where LIPAR looks: each MemBlock's last
    convolution at zero (every block passes its input on: latents follow the picture),
    and the last encoder convolution scaled to latents of zero mean and unit spread on
    the demo scene."""
    torch.manual_seed(0)
    vae = TinyVAE(TinyVAEConfig.tiny())
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, MemBlock):
                module.conv[4].weight.zero_()
                module.conv[4].bias.zero_()
        z = vae.encode(io.to_model(demo_frames(64, 112, 9)))
        m, s = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
        last = vae.encoder[-1]
        last.weight /= s.view(-1, 1, 1, 1)
        last.bias.sub_(m).div_(s)
    return vae


def random_demo_vae():
    """A tiny Wan VAE whose encoder does what a trained one does where LIPAR looks: a
    latent says what the picture holds at its place and changes only when that does.

    Its encoder is fixed, not random: each latent is a fixed mix of the mean colour of
    its 8x8 pixels (the colour's direction, through the head's RMS norm, plus a
    constant channel that keeps grey pixels finite) in the latest video frame of its
    group. So the demo's still table and block give latents identical from frame to
    frame (pruned) and the rolling ball changes those it crosses (kept). Random
    encoder weights mix the whole small frame and the first frames' zero padding into
    every latent, which prunes everything or nothing. The posterior-mean projection
    is then rescaled so that the demo scene's latents have zero mean and unit spread
    per channel, as LIPAR's thresholds expect. The decoder is random, its residual
    branches and attention at zero: the pixels it decodes are not an edit.
    """
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.tiny())

    def diagonal(conv, tap):
        """conv passes channel i to channel i through one kernel tap, and nothing else."""
        conv.weight.zero_()
        conv.bias.zero_()
        for i in range(min(conv.weight.shape[:2])):
            conv.weight[(i, i, *tap)] = 1.0

    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResidualBlock):  # every residual branch and attention output at zero
                last_conv = [m for m in module.residual.modules() if isinstance(m, torch.nn.Conv3d)][-1]
                last_conv.weight.zero_()
                last_conv.bias.zero_()
            elif isinstance(module, AttentionBlock):
                module.proj.weight.zero_()
                module.proj.bias.zero_()
        encoder = vae.encoder
        diagonal(encoder.conv1, (2, 1, 1))  # RGB into channels 0-2: the pixel itself, in the present frame
        encoder.conv1.bias[3] = 1.0
        for module in encoder.modules():
            if isinstance(module, ResidualBlock) and not isinstance(module.shortcut, torch.nn.Identity):
                diagonal(module.shortcut, (0, 0, 0))
            elif isinstance(module, Resample):
                conv = module.resample[1]  # after its one-pixel pad: the mean of each 2x2 block
                diagonal(conv, (0, 0))
                for i in range(conv.weight.shape[0]):
                    conv.weight[i, i, :2, :2] = 0.25
                if module.temporal:
                    diagonal(module.time_conv, (2, 0, 0))  # the later frame of each pair
        head = encoder.head[2]
        head.weight.zero_()
        head.bias.zero_()
        head.weight[:, :4, 2, 1, 1] = torch.randn(head.weight.shape[0], 4, generator=torch.Generator().manual_seed(1))
        diagonal(vae.conv1, (0, 0, 0))
        z = vae.encode(io.to_model(demo_frames(64, 112, 9)))
        m, s = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
        mean, std = torch.tensor(LATENT_MEAN), torch.tensor(LATENT_STD)
        z_dim = len(mean)  # mu' = mean + std·(z − m)/s, with z = (mu − mean)/std and mu = W·h + b
        vae.conv1.weight[:z_dim] /= s.view(-1, 1, 1, 1, 1)
        vae.conv1.bias[:z_dim] = (vae.conv1.bias[:z_dim] - mean - std * m) / s + mean
    return vae


def write_random_weights(folder, dit=None, vae=None, text_encoder=None, tiny_vae=None):
    """Random-weight models saved in the layout of weights.md: the demo's and the tests'
    stand-ins (tiny ones unless given; bench.py passes real-shape ones)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(folder)
    torch.manual_seed(0)
    text_dim = (text_encoder.cfg if text_encoder else T5Config.tiny()).dim
    dit = dit or CausalWanModel(DiTConfig(**{**vars(DiTConfig.tiny()), "text_dim": text_dim}))
    vae = vae or random_demo_vae()
    text_encoder = text_encoder or UMT5Encoder(T5Config.tiny())
    tiny_vae = tiny_vae or random_tiny_vae()
    for name, module in (("dit", dit), ("vae", vae), ("text_encoder", text_encoder), ("tiny_vae", tiny_vae)):
        (folder / name).mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  str(folder / name / "model.safetensors"))
    cfg = dit.cfg
    (folder / "dit" / "config.json").write_text(json.dumps(
        {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "num_heads": cfg.num_heads,
         "num_layers": cfg.num_layers, "in_dim": cfg.in_channels, "out_dim": cfg.out_channels,
         "text_dim": cfg.text_dim}))
    (folder / "vae" / "config.json").write_text(json.dumps(vae_config_to_diffusers(vae.cfg)))
    (folder / "tiny_vae" / "config.json").write_text(json.dumps(asdict(tiny_vae.cfg)))
    words = sorted(set(DEFAULT_PROMPT.replace(",", "").split()))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    (folder / "tokenizer").mkdir()
    tokenizer.save(str(folder / "tokenizer" / "tokenizer.json"))
    return folder


def coherent_mask(latent_frames, h, w, ratio, seed=0):
    """A realistic keep-mask [L, h, w] with `ratio` of the tokens after frame 0 pruned.

    Real masks prune large still regions, not scattered tokens: threshold a smooth
    random field (coarse noise, upsampled, drifting slowly from frame to frame) at
    its per-frame quantile. Frame 0 is always kept.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(latent_frames, 1, max(h // 6, 2), max(w // 6, 2), generator=g)
    for f in range(1, latent_frames):  # slow temporal drift
        coarse[f] = 0.9 * coarse[f - 1] + 0.45 * coarse[f]
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[:, 0]
    keep = torch.ones(latent_frames, h, w, dtype=torch.bool)
    if ratio > 0:
        threshold = torch.quantile(field[1:].flatten(1), ratio, dim=1)
        keep[1:] = field[1:] > threshold[:, None, None]
    return keep


def realistic_latents(latent_frames, height, width, seed=0):
    """Normalised latents [L, 16, height, width] that behave like a real clip's where the
    mask looks: a still textured background, two textured objects moving 1-2 latent
    pixels a frame, a camera pan (the background slides 2 pixels a frame) over frames
    10-14, and a little per-frame jitter as a VAE leaves on still content. A random
    VAE's latents do not (they prune everything or nothing): this is the bench's
    "clip mask"."""
    g = torch.Generator().manual_seed(seed)

    def texture(h, w):
        coarse = torch.randn(1, 16, max(h // 4, 2), max(w // 4, 2), generator=g)
        smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
        return smooth + 0.3 * torch.randn(16, h, w, generator=g)

    scene = texture(height, width + 64)  # wider than the frame: the pan reveals the rest
    side = max(2, height // 6)
    objects = [(texture(2 * side, 3 * side), (height // 4, width // 8), (0, 2)),  # (texture, start, velocity)
               (texture(side, side), (height // 2, width // 2), (1, -1))]
    frames, offset = [], 0
    for t in range(latent_frames):
        if 10 <= t <= 14:
            offset += 2
        frame = scene[:, :, offset:offset + width].clone()
        for tex, (r0, c0), (dr, dc) in objects:
            r = min(max(r0 + dr * t, 0), height - tex.shape[1])
            c = min(max(c0 + dc * t, 0), width - tex.shape[2])
            frame[:, r:r + tex.shape[1], c:c + tex.shape[2]] = tex
        frames.append(frame + 0.03 * torch.randn(16, height, width, generator=g))
    return torch.stack(frames)
