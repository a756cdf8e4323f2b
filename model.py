"""
The Wan 2.1 T2V 1.3B diffusion transformer as Self-Forcing runs it (causal, chunk
by chunk, with a KV cache), the umT5-XXL text encoder that conditions it, and the
code that loads both from the published safetensors in either key layout.

Shapes: B batch, F latent frames, N tokens per latent frame, T tokens, D model dim,
H heads, Dh head dim (128).
"""

import functools
import html
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Weight files: one reader and one checker shared by the DiT, text encoder and VAE


class WeightsError(Exception):
    """A weight file is missing, unreadable or does not match the model."""


def read_safetensors(path, shapes_only=False):
    """Read a .safetensors file, or a folder holding one or several shards.

    Returns (tensors, config): tensors is a flat {name: tensor} dict on the CPU,
    config the parsed config.json beside the weights (or None). A folder may hold
    a single *.safetensors file or shards listed in a *.index.json, as the
    diffusers repos' transformer/, vae/ and text_encoder/ folders do. With
    shapes_only the tensors are empty `meta` tensors read from the file headers:
    enough to check names and shapes of a multi-GB checkpoint in a second.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights not found: {path} does not exist (see weights.md for what to download)")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            files = sorted({path / name for name in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"no .safetensors file in {path} (see weights.md for the expected layout)")
        if len(files) > 1 and not indexes:
            raise WeightsError(f"{path} holds several .safetensors files but no *.index.json; point to one file instead")
    else:
        if path.suffix in (".pt", ".pth", ".bin"):
            raise WeightsError(f"{path} is a pickled checkpoint; convert it once to safetensors as weights.md shows")
        files = [path]
    tensors = {}
    for file in files:
        if not file.exists():
            raise WeightsError(f"shard {file.name} listed in the index of {folder} is missing")
        try:
            if shapes_only:
                with safe_open(str(file), "pt") as f:
                    tensors.update({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()})
            else:
                tensors.update(load_file(str(file)))
        except Exception as err:  # safetensors raises several types; name the file once
            raise WeightsError(f"{file} is not a readable safetensors file ({err})") from None
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else None
    return tensors, config


def check_tensors(module, tensors, layout, what):
    """Raise one WeightsError listing the missing, unexpected and mis-shaped tensors."""
    expected = {name: p.shape for name, p in module.state_dict(keep_vars=True).items()}
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    misshaped = [f"{n} {tuple(tensors[n].shape)} != {tuple(s)}"
                 for n, s in expected.items() if n in tensors and tensors[n].shape != s]
    if missing or unexpected or misshaped:
        def first(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        problems = [f"{label} {len(items)}: {first(items)}"
                    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                    if items]
        raise WeightsError(f"{what} weights ({layout} layout detected) do not match the model: " + "; ".join(problems))


def load_into(module, tensors, layout, what, device="cpu", dtype=torch.float32):
    """Check `tensors` against `module`'s parameters, then assign them in place.

    `module` is built on the meta device, so the weights are never held twice:
    each tensor is moved to (device, dtype) and becomes the parameter itself.
    """
    check_tensors(module, tensors, layout, what)
    for name in list(tensors):
        tensor = tensors.pop(name)  # drop our reference as we go: one copy in memory
        tensors[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    module.load_state_dict(tensors, assign=True)
    return module.to(device)


def rename(tensors, rules):
    """Apply (regex, replacement) rules to every key; the first rule that matches wins."""
    renamed = {}
    for key, tensor in tensors.items():
        for pattern, repl in rules:
            new, hits = re.subn(pattern, repl, key)
            if hits:
                key = new
                break
        renamed[key] = tensor
    return renamed


# -----------------------------------------------------------------------------
# Wan 2.1 causal DiT


@dataclass
class DiTConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256  # sinusoidal timestep features
    num_heads: int = 12
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096  # umT5-XXL width
    patch_size: tuple = (1, 2, 2)  # (frames, rows, cols) of latent per token
    eps: float = 1e-6
    rope_theta: float = 10000.0
    frames_per_chunk: int = 3  # Self-Forcing denoises 3 latent frames at a time
    trained_frames: int = 21  # Self-Forcing's training clips: 21 latent frames (81 video frames)

    @property
    def head_dim(self):
        return self.dim // self.num_heads

    @classmethod
    def tiny(cls):
        """A few-thousand-parameter model for the CPU tests; same structure."""
        return cls(dim=64, ffn_dim=96, freq_dim=32, num_heads=2, num_layers=2, text_dim=48)

    @classmethod
    def from_json(cls, config):
        """Read either release's config.json: native Wan (dim, num_heads, ...) or diffusers."""
        if "num_attention_heads" in config:  # diffusers
            config = dict(config, dim=config["num_attention_heads"] * config["attention_head_dim"],
                          num_heads=config["num_attention_heads"], in_dim=config.get("in_channels"),
                          out_dim=config.get("out_channels"))
        renamed = dict(config, in_channels=config.get("in_dim"), out_channels=config.get("out_dim"))
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in renamed.items() if k in known and v is not None}
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        return cls(**values)


FUSE = True  # compile the fused regions on CUDA (sample.py: only with --compile; bench.py: both ways)


def fused(fn):
    """Run `fn` as generated kernels (torch.compile) when its tensors are on CUDA.

    The float32 islands of a block (norms, adaLN modulation, gated residuals,
    RoPE) are chains of cheap elementwise ops. Run one op at a time they cost as
    much GPU time as the matrix products, and each op costs the CPU ~20 µs to
    dispatch, which at LIPAR's token counts is more than the GPU needs. Each
    block is therefore compiled as two regions around its KV-cache write: inside
    them the chains fuse, and the CPU pays one call instead of dozens. The
    rotation of a chunk's keys for the cache (`rotate_keys`) and the VAE's
    norm + SiLU (vae.rms_norm_silu) are fused the same way. On the CPU the plain
    code runs as written (the tests read it). Shapes: the first call compiles
    for its own; when a size changes (the kept-token count from chunk to chunk),
    Dynamo recompiles once with that dimension dynamic and the others (heads,
    widths) fixed. Marking every dimension dynamic from the start would leave the
    kernels dividing by run-time sizes: the key rotation ran at 0.5 TB/s that way.
    """
    compiled = None  # made on the first CUDA call: CPU-only runs never load the compiler

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if not (FUSE and next(a for a in args if isinstance(a, torch.Tensor)).is_cuda):
            return fn(*args)
        if compiled is None:
            # Each width, frame count of 1 (specialised) and stride pattern is a compiled
            # variant; the VAE's norm meets ~20 of them. Past the default limit of 8,
            # Dynamo would silently run the rest op by op.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compiled = torch.compile(fn)
        return compiled(*args)

    return run


def rms_norm(x, weight, eps):
    """x / rms(x) · weight, statistics in float32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def norm_modulate(x, shift, scale, eps):
    """adaLN (DiT): LayerNorm without affine, then x·(1 + scale) + shift, in float32."""
    return (F.layer_norm(x.float(), x.shape[-1:], eps=eps) * (1 + scale) + shift).type_as(x)


def gated_residual(x, y, gate):
    """x + y·gate in float32: the block's gated residual connections."""
    return (x.float() + y.float() * gate).type_as(x)


class RMSNorm(nn.Module):
    """x / rms(x) · weight, statistics in float32: the DiT's q/k norm (over all heads at
    once) and T5's "LayerNorm" (no mean subtraction, no bias)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the weights' dtype, as Wan does."""

    def forward(self, x):
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


def sinusoidal_embedding(t, dim):
    """Timestep features [cos | sin] of t (in 0..1000), in float64 as Wan computes them."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.double()[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


# 3D RoPE. The head dim is split into (time, rows, cols) parts of 44/42/42 real dims
# for Dh = 128; each pair of adjacent dims is rotated by position * frequency.

def rope_axis_dims(head_dim):
    return (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))


@functools.lru_cache(maxsize=None)
def rope_tables(head_dim, theta, device, dtype, max_position=1024):
    """Per axis (frame, row, col): cos and sin [max_position, d/2] of position × frequency.

    Formed once in float64 and rounded once: position × frequency reaches ~10³ rad,
    where a float32 product would already be off by ~1e-4.
    """
    tables = []
    for d in rope_axis_dims(head_dim):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.arange(max_position, dtype=torch.float64)[:, None] * freqs
        tables.append((angles.cos().to(device, dtype), angles.sin().to(device, dtype)))
    return tables


def rope_angles(positions, head_dim, theta, dtype=torch.float32):
    """cos and sin [T, Dh/2] for integer token positions [T, 3] = (frame, row, col)."""
    tables = rope_tables(head_dim, theta, positions.device, dtype)
    cos = torch.cat([cos[positions[:, axis]] for axis, (cos, _) in enumerate(tables)], dim=1)
    sin = torch.cat([sin[positions[:, axis]] for axis, (_, sin) in enumerate(tables)], dim=1)
    return cos, sin


def apply_rope(x, rope):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, T, H, Dh] by the angles of `rope`.
    Computed in float32 (float64 for float64 inputs, as the exactness tests use)."""
    cos, sin = (r[None, :, None, :] for r in rope)
    x1, x2 = x.to(torch.promote_types(x.dtype, cos.dtype)).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def grid_positions(frames, rows, cols, start_frame=0, device=None):
    """(frame, row, col) of every token of a [frames, rows, cols] grid in raster order: [T, 3]."""
    f, h, w = torch.meshgrid(torch.arange(start_frame, start_frame + frames, device=device),
                             torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return torch.stack([f, h, w], dim=-1).reshape(-1, 3)


def attention(q, k, v, key_mask=None, impl="sdpa"):
    """softmax(q kᵀ / √Dh) v for q [B, Tq, H, Dh], k/v [B, Tk, H, Dh].

    key_mask (bool, broadcastable to [Tq, Tk]) marks the keys a query may see.
    impl="math" is the plain float32 formula, the reference the tests read; "sdpa"
    hands the same computation to PyTorch's fused kernels (flash / cuDNN on CUDA).
    """
    if impl == "math":
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float())
        return out.type_as(q)
    if key_mask is not None:
        key_mask = torch.atleast_2d(key_mask)  # SDPA wants at least [Tq or 1, Tk]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask)
    return out.transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)

    def project(self, x, rope):
        """x [B, T, D] → queries (rotated to their positions), keys and values (not yet
        rotated: the KV cache and LIPAR's recovery work on pre-RoPE keys), [B, T, H, Dh]."""
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(x)).unflatten(-1, heads)
        return apply_rope(q, rope), k, self.v(x).unflatten(-1, heads)


class CrossAttention(nn.Module):
    """Tokens attend to the 512 prompt embeddings (no RoPE, no mask: Wan's T2V model
    sees the zero-padded prompt embedding in full)."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)

    def context_kv(self, context):
        heads = (self.num_heads, -1)
        return self.norm_k(self.k(context)).unflatten(-1, heads), self.v(context).unflatten(-1, heads)

    def forward(self, x, context_kv, impl):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        return self.o(attention(q, *context_kv, impl=impl).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.eps  # of the two LayerNorms without affine around self-attention and FFN
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        # adaLN (DiT): a learned per-block offset to the six timestep-driven vectors
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, rope, keys_values, context_kv, impl):
        """x [B, T, D]; e [B, T or 1, 6, D] float32 modulation of each token's frame.
        `keys_values(k, v)` turns this call's pre-RoPE keys and values into the full set
        the queries attend to: the whole sequence, or the KV cache with this chunk
        written into it (and LIPAR's recovered keys)."""
        q, k, v = self.before_attention(x, e, rope)
        k_all, v_all, key_mask = keys_values(k, v)
        return self.after_attention(x, attention(q, k_all, v_all, key_mask, impl), e, context_kv, impl)

    @fused
    def before_attention(self, x, e, rope):
        shift1, scale1 = (self.modulation + e).unbind(2)[:2]
        return self.self_attn.project(norm_modulate(x, shift1, scale1, self.eps), rope)

    @fused
    def after_attention(self, x, attended, e, context_kv, impl):
        _, _, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(2)
        x = gated_residual(x, self.self_attn.o(attended.flatten(2)), gate1)
        x = x + self.cross_attn(self.norm3(x), context_kv, impl)
        return gated_residual(x, self.ffn(norm_modulate(x, shift2, scale2, self.eps)), gate2)


class Head(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        """x [B, T, D], e [B, T or 1, D] (the time embedding before the 6-way projection)."""
        shift, scale = (self.modulation + e[:, :, None]).unbind(2)
        return self.head(norm_modulate(x, shift, scale, self.eps))


def mlp_float32(layers, x):
    """Run a small nn.Sequential in float32 whatever its weights' dtype: Wan keeps the
    timestep path in float32 because bf16 would quantise the modulation vectors."""
    for layer in layers:
        x = F.linear(x, layer.weight.float(), layer.bias.float()) if isinstance(layer, nn.Linear) else layer(x)
    return x


class CausalWanModel(nn.Module):
    """Wan 2.1 T2V DiT with Self-Forcing's per-frame timesteps and block-causal attention.

    `forward` evaluates a whole latent video at once (chunk c attends to chunks ≤ c);
    `forward_chunk` evaluates one chunk against a KVCache, which is how the sampler
    runs it. Both share every weight and every line of the blocks.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_impl = "sdpa"  # or "math": the plain softmax formula, for reading and testing
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    def embed_time(self, t):
        """t [B, F] → e [B, F, D] (for the head) and e0 [B, F, 6, D] (for the blocks), float32."""
        e = mlp_float32(self.time_embedding, sinusoidal_embedding(t, self.cfg.freq_dim).float())
        return e, mlp_float32(self.time_projection, e).unflatten(-1, (6, self.cfg.dim))

    def patchify(self, x):
        """[B, C, F, H, W] latents → tokens [B, F·h·w, D] in raster order, and the grid (F, h, w)."""
        x = self.patch_embedding(x)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])

    def unpatchify(self, out, grid):
        """[B, T, pt·ph·pw·C] head outputs on a grid (F, h, w) → [B, C, F·pt, h·ph, w·pw]."""
        (f, h, w), (pt, ph, pw) = grid, self.cfg.patch_size
        x = out.unflatten(1, (f, h, w)).unflatten(-1, (pt, ph, pw, -1))  # B f h w pt ph pw C
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # B C f pt h ph w pw
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)

    def run_blocks(self, tokens, t, frame_of_token, rope, keys_values, context_kvs):
        """The transformer proper, for any subset of tokens: tokens [B, T, D] → head output [B, T, 64].

        frame_of_token [T] picks each token's per-frame timestep (None when t is [B, 1]);
        keys_values(layer) gives the self-attention's key/value source of that layer.
        """
        e, e0 = self.embed_time(t)
        if frame_of_token is not None:
            e, e0 = e[:, frame_of_token], e0[:, frame_of_token]
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, e0, rope, keys_values(i), context_kvs[i], self.attn_impl)
        return self.head(tokens, e)

    def context_kvs(self, context):
        """Cross-attention keys/values of the prompt for every layer: computed once per prompt."""
        context = self.text_embedding(context)
        return [block.cross_attn.context_kv(context) for block in self.blocks]

    def forward(self, x, t, context):
        """Velocity for a whole latent video. x [B, 16, F, H, W], t [B, F] (0..1000), context
        [B, L, 4096] → [B, 16, F, H, W]. Block-causal: a token of chunk c sees chunks ≤ c."""
        tokens, (f, h, w) = self.patchify(x)
        frame_of_token = torch.arange(f, device=x.device).repeat_interleave(h * w)
        chunk = frame_of_token // self.cfg.frames_per_chunk
        key_mask = chunk[None, :] <= chunk[:, None] if f > self.cfg.frames_per_chunk else None
        rope = rope_angles(grid_positions(f, h, w, device=x.device), self.cfg.head_dim, self.cfg.rope_theta)

        def keys_values(layer):
            return lambda k, v: (apply_rope(k, rope), v, key_mask)

        out = self.run_blocks(tokens, t, frame_of_token, rope, keys_values, self.context_kvs(context))
        return self.unpatchify(out, (f, h, w))

    def forward_chunk(self, x, t, cache, start_frame, memory_step=False, plan=None):
        """Velocity for one chunk, attending to the cached clean frames and to itself.

        x [B, 16, F, H, W] the chunk's latents (F = frames_per_chunk), t [B, F] or [B, 1]
        its timesteps; start_frame its first latent frame in the video. The chunk's
        keys/values are written into `cache` (a memory step, t = 0, writes the clean
        ones that later chunks read). With a LIPAR `plan` (lipar.RecoveryPlan) only
        the plan's kept tokens are computed; their velocity is returned in place and
        pruned positions are zero.
        """
        return self.run_chunk(x, t, cache, self.chunk_step(x, cache, start_frame, memory_step, plan))

    def chunk_step(self, x, cache, start_frame, memory_step=False, plan=None, mask_absent_keys=False):
        """The ChunkStep of one forward_chunk call: which tokens run, where their keys go,
        which cached keys they read. Claims the chunk's slots in `cache` (host-side
        bookkeeping and a few small device ops; nothing waits for the GPU unless keys are
        absent and mask_absent_keys is False: see KVCache.claim)."""
        f, h, w = (x.shape[2 + i] // p for i, p in enumerate(self.cfg.patch_size))
        slots, visible, present, key_mask = cache.claim(start_frame, f, None if plan is None else
                                                        plan.key_valid(memory_step), mask_absent_keys)
        return ChunkStep(positions=grid_positions(f, h, w, cache.position_of(start_frame), device=x.device),
                         kept=None if plan is None else plan.kept, slots=slots,
                         source=None if plan is None else plan.source(memory_step),
                         visible=visible, present=present, key_mask=key_mask, memory_step=memory_step)

    def run_chunk(self, x, t, cache, step):
        """forward_chunk's tensor work for a prepared ChunkStep: no host-side decisions
        past the step's two ints, so graphs.py can capture it once and replay it."""
        tokens, grid = self.patchify(x)
        n_tokens = tokens.shape[1]
        rope_chunk = rope_angles(step.positions, self.cfg.head_dim, self.cfg.rope_theta)  # every token, for the cache
        rope, positions = rope_chunk, step.positions
        if step.kept is not None:  # LIPAR: only the kept tokens run through the blocks
            # a `kept` entry equal to n_tokens is padding (graphs.py pads to a fixed
            # count): it computes a copy of the last token and lands in a spare row below
            rows = step.kept.clamp(max=n_tokens - 1)
            tokens, positions, rope = tokens[:, rows], positions[rows], tuple(r[rows] for r in rope_chunk)
        frame_of_token = None if t.shape[1] == 1 else positions[:, 0] - step.positions[0, 0]
        out = self.run_blocks(tokens, t, frame_of_token, rope, cache.keys_values(step, rope_chunk), cache.context_kvs)
        if step.kept is not None:
            out = out.new_zeros(out.shape[0], n_tokens + 1, out.shape[2]).index_copy_(1, step.kept, out)[:, :n_tokens]
        return self.unpatchify(out, grid)


rotate_keys = fused(apply_rope)  # the cache write rotates every key of the chunk in every layer: one kernel


def complete_chunk(memory, kept_rows, source):
    """Eq. 3: a chunk's rows [B, F·N, ...] picked from cat(memory, kept_rows) by `source`
    (lipar.RecoveryPlan): a kept token takes its own row, a pruned one a duplicate."""
    return torch.cat([memory, kept_rows], dim=1).index_select(1, source)


@dataclass
class ChunkStep:
    """What one forward_chunk call reads and writes besides latents and weights.

    positions [F·N, 3]    (frame, row, col) of every token of the chunk
    kept [n] or None      tokens computed (queries), ascending; None: all of them
    slots [F·N]           the cache rows the chunk's keys/values are written to
    source [F·N] or None  LIPAR recovery: each token's row in cat(memory, kept) (Eq. 3)
    visible               the queries attend to cache rows [0, visible)
    present [P] or None   the rows among those that hold a key (None: all), gathered;
    key_mask [visible]    or, the same as a mask (graphs.py: a fixed key count)
    memory_step           t = 0: also store this chunk's last frame as the next memory
    """

    positions: torch.Tensor
    kept: torch.Tensor | None
    slots: torch.Tensor
    source: torch.Tensor | None
    visible: int
    present: torch.Tensor | None
    key_mask: torch.Tensor | None
    memory_step: bool


class KVCache:
    """Self-attention keys/values of the frames a chunk may attend to, for every layer.

    One preallocated tensor per layer, updated in place (as in gpt-fast); keys are
    stored after RoPE. The cache holds a window (m_sink, m_recent) of frames: frames
    < m_sink keep their slots for ever and later frames take turns in a ring of
    m_recent slots. The slots written so far then always form a prefix, and that
    prefix holds exactly the frames of the window: attention reads `k[:, :n]`, no
    gather, and the cache never grows, however long the video. LIPAR's M-degree
    approximation is such a window; without one (`full`, Self-Forcing's causal
    cache) it is (0, trained_frames): the whole clip up to 21 latent frames (81
    video frames), and past that a rolling window of the 21 latest.

    Positions roll with the window, as in the authors' streaming code: Self-Forcing
    was trained on frame positions 0..20 only, so once a chunk would reach past
    frame 20 it is placed at frames 18..20 and every cached non-sink key is rotated
    back by the frames the chunk moved on (their distances to the chunk stay true;
    the sink stays at its own position). No position ever passes 20, so a stream
    can run for ever, far past the 1,024 positions of Wan's RoPE table.

    For LIPAR it also keeps the memory: each layer's pre-RoPE keys/values of the last
    frame of the previous chunk, from which pruned tokens are recovered (Eq. 3–4).
    """

    def __init__(self, model, context, grid_hw, window=None):
        cfg = model.cfg
        param = model.head.head.weight
        self.tokens_per_frame = n = grid_hw[0] * grid_hw[1]
        self.sink, self.recent = (0, cfg.trained_frames) if window is None else window
        if self.recent < cfg.frames_per_chunk:
            raise ValueError(f"the attention window must cover the current chunk: m_recent={self.recent} "
                             f"< {cfg.frames_per_chunk} frames per chunk")
        self.trained_frames, self.head_dim, self.rope_theta = cfg.trained_frames, cfg.head_dim, cfg.rope_theta
        self.num_slots = self.sink + self.recent
        shape = (cfg.num_layers, context.shape[0], self.num_slots * n, cfg.num_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=param.device, dtype=param.dtype)
        self.v = torch.zeros_like(self.k)
        self.key_valid = torch.ones(self.num_slots * n, dtype=torch.bool, device=param.device)
        memory_shape = (cfg.num_layers, context.shape[0], n, cfg.num_heads, cfg.head_dim)
        self.memory_k = torch.zeros(memory_shape, device=param.device, dtype=param.dtype)
        self.memory_v = torch.zeros_like(self.memory_k)
        self.context_kvs = model.context_kvs(context)
        self.slot_has_holes = [False] * self.num_slots  # host-side copy: no sync to decide on a mask
        self.shift = 0  # frames by which the non-sink positions sit below the frames' true indices

    def reset(self, model, context):
        """Start a new clip in the same storage (graphs.py replays graphs that point at it)."""
        for (k, v), (new_k, new_v) in zip(self.context_kvs, model.context_kvs(context)):
            k.copy_(new_k)
            v.copy_(new_v)
        self.key_valid.fill_(True)
        self.memory_k.zero_()
        self.memory_v.zero_()
        self.slot_has_holes = [False] * self.num_slots
        self.shift = 0

    def position_of(self, frame):
        """The RoPE time position of a non-sink frame: its index, less the rolled-back frames."""
        return frame - self.shift

    def _roll_positions(self, shift):
        """Rotate every cached non-sink key back by the frames its position moves (the time
        axis only), so that they keep their distances to a chunk placed `shift` frames early."""
        delta = shift - self.shift
        self.shift = shift
        by = torch.tensor([[delta, 0, 0]], device=self.k.device)
        cos, sin = rope_angles(by, self.head_dim, self.rope_theta)
        rows = slice(self.sink * self.tokens_per_frame, None)
        for layer_k in self.k:  # a layer at a time: a float32 copy of the whole cache would be large
            layer_k[:, rows] = apply_rope(layer_k[:, rows], (cos, -sin))

    def slot_of(self, frame):
        """A frame's slot (int, or a tensor of frames): the sink frames keep their own,
        later frames take turns in the ring."""
        ring = self.sink + (frame - self.sink) % self.recent
        if torch.is_tensor(frame):
            return torch.where(frame < self.sink, frame, ring)
        return frame if frame < self.sink else ring

    def claim(self, start_frame, frames, chunk_valid=None, mask_absent_keys=False):
        """Give the chunk of `frames` frames from `start_frame` its slots.

        chunk_valid [F·N] or None: which of the chunk's keys will exist (a plan's
        key_valid). Returns (slots [F·N], visible, present, key_mask): the cache rows
        the chunk writes, how many rows its queries read, and which of those hold a
        key. Absent keys are gathered away (`present`; SDPA's fused kernels take no
        mask, and finding them waits for the GPU) or, with mask_absent_keys, masked.
        """
        n = self.tokens_per_frame
        device = self.k.device
        shift = max(0, start_frame + frames - self.trained_frames)
        if shift != self.shift:  # a new chunk past frame 20: positions roll (see the class)
            self._roll_positions(shift)
        # slots formed on the device: a host list copied over would stall the CPU on the GPU
        frame_slots = self.slot_of(torch.arange(start_frame, start_frame + frames, device=device))
        slots = (frame_slots[:, None] * n + torch.arange(n, device=device)).flatten()
        if chunk_valid is None:  # index_fill_/index_copy_, not `[slots] = `: a Python value there waits for the GPU
            self.key_valid.index_fill_(0, slots, True)
        else:
            self.key_valid.index_copy_(0, slots, chunk_valid)
        for frame in range(start_frame, start_frame + frames):  # host-side bookkeeping, no sync
            self.slot_has_holes[self.slot_of(frame)] = chunk_valid is not None
        visible = min(start_frame + frames, self.num_slots)
        present = key_mask = None
        if any(self.slot_has_holes[:visible]):
            if mask_absent_keys:
                key_mask = self.key_valid[: visible * n]
            else:
                present = self.key_valid[: visible * n].nonzero().squeeze(1)
        return slots, visible * n, present, key_mask

    def keys_values(self, step, rope):
        """Per-layer key/value sources for a chunk step; rope: (cos, sin) of every token of the chunk.

        Each layer's source takes the chunk's pre-RoPE k/v (of its kept tokens, with
        LIPAR), completes the chunk with recovered keys/values, rotates them to their
        positions, writes them into the chunk's slots, and returns every cached
        key/value the chunk may attend to.
        """
        n = self.tokens_per_frame

        def keys_values(layer):
            def write_and_read(k, v):
                if step.source is not None:  # Eq. 3: complete the chunk with duplicated clean keys/values
                    k = complete_chunk(self.memory_k[layer], k, step.source)
                    v = complete_chunk(self.memory_v[layer], v, step.source)
                    if step.memory_step:  # the next chunk's memory: this chunk's clean last frame
                        self.memory_k[layer].copy_(k[:, -n:])
                        self.memory_v[layer].copy_(v[:, -n:])
                self.k[layer].index_copy_(1, step.slots, rotate_keys(k, rope))
                self.v[layer].index_copy_(1, step.slots, v)
                k_all, v_all = self.k[layer][:, : step.visible], self.v[layer][:, : step.visible]
                if step.present is not None:
                    k_all, v_all = k_all[:, step.present], v_all[:, step.present]
                return k_all, v_all, step.key_mask
            return write_and_read

        return keys_values


# diffusers (WanTransformer3DModel) names → native Wan names, which our modules use.
DIT_DIFFUSERS_TO_NATIVE = [
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.", r"blocks.\1.self_attn."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.", r"blocks.\1.cross_attn."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # the cross-attention norm
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]


def native_dit_tensors(tensors):
    """Bring a DiT state dict of any supported layout to native Wan names.

    Returns (tensors, layout). The Self-Forcing checkpoint holds two generators; its
    EMA weights (`generator_ema.`) are the ones the authors sample with.
    """
    if any(k.startswith("generator_ema.") for k in tensors):
        tensors = {k[len("generator_ema."):]: t for k, t in tensors.items() if k.startswith("generator_ema.")}
        layout = "Self-Forcing (generator_ema)"
    elif any(k.startswith("generator.") for k in tensors):
        tensors = {k[len("generator."):]: t for k, t in tensors.items() if k.startswith("generator.")}
        layout = "Self-Forcing (generator)"
    else:
        layout = None
    if tensors and all(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: t for k, t in tensors.items()}
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in tensors):
        return rename(tensors, DIT_DIFFUSERS_TO_NATIVE), "diffusers"
    return tensors, layout or "native Wan"


def load_dit(path, device="cpu", dtype=torch.float32):
    """Load the causal DiT from a safetensors file or folder in either layout (see weights.md).
    On device "meta" only the file headers are read: a quick check of names and shapes."""
    tensors, config = read_safetensors(path, shapes_only=str(device) == "meta")
    tensors, layout = native_dit_tensors(tensors)
    if config is not None:
        cfg = DiTConfig.from_json(config)
    else:  # infer the width from the tensors; every released model has 128-dim heads
        try:
            dim, in_channels = tensors["patch_embedding.weight"].shape[:2]
            if dim % 128:
                raise WeightsError(f"{path}: cannot infer the head count of a {dim}-wide DiT without a config.json")
            cfg = DiTConfig(dim=dim, in_channels=in_channels, num_heads=dim // 128,
                            num_layers=len({k.split(".")[1] for k in tensors if k.startswith("blocks.")}),
                            ffn_dim=tensors["blocks.0.ffn.0.weight"].shape[0],
                            freq_dim=tensors["time_embedding.0.weight"].shape[1],
                            text_dim=tensors["text_embedding.0.weight"].shape[1],
                            out_channels=tensors["head.head.weight"].shape[0] // 4)
        except KeyError as missing:
            raise WeightsError(f"{path} is not a Wan DiT checkpoint ({layout} layout detected): "
                               f"tensor {missing} is missing") from None
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    return load_into(model, tensors, layout, "DiT", device, dtype).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# umT5-XXL text encoder (the encoder half of google/umt5-xxl, as Wan 2.1 runs it)
# and its tokenizer. Module names follow Wan's native checkpoint
# (models_t5_umt5-xxl-enc-bf16); the HF/diffusers `text_encoder/` layout is renamed
# onto them.


@dataclass
class T5Config:
    vocab: int = 256384
    dim: int = 4096
    ffn: int = 10240
    heads: int = 64
    head_dim: int = 64
    layers: int = 24
    buckets: int = 32          # relative-position buckets (half for keys before the query, half after)
    max_distance: int = 128    # distances >= this share the last bucket
    eps: float = 1e-6
    text_len: int = 512        # prompts are padded / truncated to this many tokens

    @classmethod
    def tiny(cls):
        """A few-thousand-parameter umT5 for tests."""
        return cls(vocab=300, dim=32, ffn=48, heads=4, head_dim=8, layers=2)

    @classmethod
    def from_hf(cls, config):
        """From a transformers UMT5Config dict (the config.json of the diffusers text_encoder/)."""
        if config.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise WeightsError(f"text encoder config.json has feed_forward_proj={config['feed_forward_proj']!r}; "
                               "umT5 uses 'gated-gelu'")
        return cls(vocab=config["vocab_size"], dim=config["d_model"], ffn=config["d_ff"],
                   heads=config["num_heads"], head_dim=config["d_kv"], layers=config["num_layers"],
                   buckets=config.get("relative_attention_num_buckets", 32),
                   max_distance=config.get("relative_attention_max_distance", 128),
                   eps=config.get("layer_norm_epsilon", 1e-6))

    @classmethod
    def from_tensors(cls, tensors):
        """Read the sizes off native-named tensors (Wan's release ships no T5 config.json)."""
        needed = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
                  "blocks.0.pos_embedding.embedding.weight"]
        missing = [n for n in needed if n not in tensors]
        if missing:
            raise WeightsError(f"text encoder weights lack {', '.join(missing)}: cannot infer the model size")
        vocab, dim = tensors["token_embedding.weight"].shape
        buckets, heads = tensors["blocks.0.pos_embedding.embedding.weight"].shape
        layers = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
        return cls(vocab=vocab, dim=dim, ffn=tensors["blocks.0.ffn.fc1.weight"].shape[0], heads=heads,
                   head_dim=tensors["blocks.0.attn.q.weight"].shape[0] // heads, layers=layers, buckets=buckets)


def t5_position_buckets(length, buckets, max_distance, device):
    """[length, length] bucket index of the offset key − query (bidirectional T5 buckets).

    Half the buckets are for keys after the query, half for keys before it (or at it).
    In each half, offsets below half/2 get a bucket each; larger ones share buckets
    spaced logarithmically up to max_distance, and everything farther the last one.
    """
    pos = torch.arange(length, device=device)
    offset = pos[None, :] - pos[:, None]
    half = buckets // 2
    exact = half // 2
    distance = offset.abs()
    # same float32 operation order as the reference, so the integer cut-offs agree exactly
    log_bucket = exact + (torch.log(distance.clamp(min=1).float() / exact)
                          / math.log(max_distance / exact) * (half - exact)).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(distance < exact, distance, log_bucket)


class T5RelativeBias(nn.Module):
    """Learned attention bias per (bucket of key − query offset, head); umT5 has one per layer."""

    def __init__(self, buckets, heads, max_distance):
        super().__init__()
        self.max_distance = max_distance
        self.embedding = nn.Embedding(buckets, heads)

    def forward(self, length):
        buckets = t5_position_buckets(length, self.embedding.num_embeddings, self.max_distance,
                                      self.embedding.weight.device)
        return self.embedding(buckets).permute(2, 0, 1)  # [H, L, L]


def t5_attention(q, k, v, bias, mask):
    """Softmax attention with T5's conventions: no 1/sqrt(d) scaling, an additive position bias.

    q, k, v [B, H, L, Dh]; bias [H, L, L]; mask [B, L] (True/1 = real token, 0 = padding).
    Scores and softmax in float32.
    """
    scores = (q @ k.transpose(-1, -2)).float() + bias.float()
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.softmax(-1).to(v.dtype) @ v


class T5SelfAttention(nn.Module):
    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.k = nn.Linear(dim, heads * head_dim, bias=False)
        self.v = nn.Linear(dim, heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x, bias, mask):
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = t5_attention(q, k, v, bias, mask)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class T5FeedForward(nn.Module):
    """Gated GELU: fc2(GELU_tanh(gate(x)) · fc1(x)). HF names: wi_0 = gate, wi_1 = fc1, wo = fc2."""

    def __init__(self, dim, ffn):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, ffn, bias=False)
        self.fc2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.gate(x) * self.fc1(x))


class T5Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5SelfAttention(cfg.dim, cfg.heads, cfg.head_dim)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.ffn)
        self.pos_embedding = T5RelativeBias(cfg.buckets, cfg.heads, cfg.max_distance)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), self.pos_embedding(x.shape[1]), mask)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    """ids [B, L] long, mask [B, L] -> context [B, L, dim], zero past each prompt's length."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids, mask):
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        # Wan keeps only the first len tokens and the DiT pads them back with zeros:
        # zeroing the padded positions here gives the DiT the same context
        return x.masked_fill(~mask.bool()[..., None], 0)


def clean_prompt(text):
    """Wan's clean='whitespace': html-unescape twice, collapse whitespace runs, strip (ftfy left out)."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
    """The umT5 SentencePiece tokenizer from a tokenizer.json, as Wan calls it.

    Matches transformers' T5 tokenizer with add_special_tokens=True, truncation=True,
    padding='max_length', max_length=text_len: the text's tokens are cut to
    text_len − 1, then </s> is appended, then <pad> fills up to text_len. We encode
    without special tokens and append </s> ourselves, so a tokenizer.json with or
    without a post-processor that appends </s> gives the same ids.
    """

    def __init__(self, path, text_len=512):
        import tokenizers

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise WeightsError(f"tokenizer not found: {path} does not exist (see weights.md)")
        self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.text_len = text_len
        self.eos = self.tokenizer.token_to_id("</s>")
        self.pad = self.tokenizer.token_to_id("<pad>")
        if self.eos is None or self.pad is None:
            raise WeightsError(f"{path} has no '</s>' or '<pad>' token: not a T5 tokenizer")

    def __call__(self, prompts):
        """list of str -> ids [B, text_len] long, mask [B, text_len] long (1 = real token incl. </s>)."""
        encodings = self.tokenizer.encode_batch([clean_prompt(p) for p in prompts], add_special_tokens=False)
        ids = torch.full((len(prompts), self.text_len), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.text_len), dtype=torch.long)
        for i, enc in enumerate(encodings):
            tokens = enc.ids[: self.text_len - 1] + [self.eos]
            ids[i, : len(tokens)] = torch.tensor(tokens)
            mask[i, : len(tokens)] = 1
        return ids, mask


# HF / diffusers text_encoder/ names -> ours (first match wins). The HF gated FFN
# computes act(wi_0(x)) * wi_1(x): wi_0 is the GELU branch (our gate.0), wi_1 is fc1.
T5_HF_RULES = [
    (r"^shared\.", "token_embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.", r"blocks.\1.pos_embedding.embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.", r"blocks.\1.attn."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.final_layer_norm\.", "norm."),
]


def t5_to_native(tensors):
    """Detect the key layout of umT5 tensors and return (tensors under our names, layout).

    HF files hold the token embedding as `shared.weight` and/or its tied copy
    `encoder.embed_tokens.weight` (transformers ties the latter to the former). We take
    `shared.weight` when present, else the copy; if both are there they must be equal.
    """
    if any(k.startswith(("shared.", "encoder.")) for k in tensors):
        tensors = dict(tensors)
        copy = tensors.pop("encoder.embed_tokens.weight", None)
        if copy is not None:
            shared = tensors.setdefault("shared.weight", copy)
            if shared is not copy and not any(t.is_meta for t in (shared, copy)) and not (
                    shared.shape == copy.shape and torch.equal(shared, copy)):
                raise WeightsError("text encoder: shared.weight and its tied copy encoder.embed_tokens.weight differ")
        return rename(tensors, T5_HF_RULES), "hf"
    if any(k.startswith(("blocks.", "token_embedding.")) for k in tensors):
        return tensors, "native"
    raise WeightsError("text encoder weights are in no known layout (expected Wan's `blocks.N.attn.q.weight` "
                       f"or HF's `encoder.block.N...`); first keys: {', '.join(list(tensors)[:5])}")


class TextEncoder:
    """Tokenizer + umT5 encoder: encode(prompts) -> context [B, text_len, dim]."""

    def __init__(self, encoder, tokenizer):
        self.encoder = encoder
        self.tokenizer = tokenizer

    @torch.no_grad()
    def encode(self, prompts):
        ids, mask = self.tokenizer(list(prompts))
        device = self.encoder.token_embedding.weight.device
        return self.encoder(ids.to(device), mask.to(device))


def load_text_encoder(path, tokenizer_path, device="cpu", dtype=torch.float32):
    """umT5-XXL from safetensors (a file, or the diffusers text_encoder/ folder) in either layout.

    The size comes from a T5 config.json beside the weights when there is one, else
    from the tensor shapes (Wan's release folder holds the DiT's config.json, which is ignored).
    On device "meta" only the file headers are read: a quick check of names and shapes.
    """
    tensors, config = read_safetensors(path, shapes_only=str(device) == "meta")
    tensors, layout = t5_to_native(tensors)
    cfg = T5Config.from_hf(config) if config and "d_model" in config else T5Config.from_tensors(tensors)
    with torch.device("meta"):
        encoder = UMT5Encoder(cfg)
    load_into(encoder, tensors, layout, "umT5 text encoder", device=device, dtype=dtype)
    return TextEncoder(encoder.eval().requires_grad_(False), Tokenizer(tokenizer_path, cfg.text_len))
