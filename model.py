"""
The Wan 2.1 T2V 1.3B diffusion transformer as Self-Forcing runs it: causal, chunk by
chunk, with a KV cache of earlier chunks' clean keys and values, and LIPAR's Eq. 3
gather that completes a pruned chunk's keys. Read from the parts up: norms and RoPE,
attention (plain softmax beside SDPA), the block, the model, the cache.
weights.py loads it from the published files; graphs.py replays it as CUDA graphs.

Shapes: B batch, F latent frames, N tokens per latent frame, T tokens, D model dim,
H heads, Dh head dim (128).
"""

import contextvars
import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Configuration and the fused elementwise regions


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


_fusing = contextvars.ContextVar("fusing", default=None)


@contextmanager
def fusion(how="compile"):
    """Within this block, functions marked @fused run as generated kernels on CUDA.

    how: "compile" (torch.compile, in this process), a callable `how(fn, *args)` that
    runs fn with hand-fused kernels (triton_ops.Kernels: sample.py's default), or None
    (as written). On the CPU they run as written."""
    token = _fusing.set(how)
    try:
        yield
    finally:
        _fusing.reset(token)


def fusing():
    """How @fused functions run now: None (as written), "compile" or the kernels' callable."""
    return _fusing.get()


def fused(fn):
    """Run `fn` as generated kernels inside `fusion()` when its tensors are on CUDA.

    The float32 islands of a block (norms, adaLN modulation, gated residuals, RoPE)
    are chains of cheap elementwise ops: one op at a time they cost as much GPU time
    as the matrix products. Each block is fused as two regions around its KV-cache
    write, as are `rotate_keys` and the VAE's norm + SiLU (vae.rms_norm_silu);
    triton_ops.py writes them as hand-fused kernels. torch.compile recompiles once
    when a size (the kept-token count) changes, with that dimension dynamic."""
    compiled = None  # made on the first CUDA call: CPU-only runs never load the compiler

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        how = _fusing.get()
        if how is None:
            return fn(*args)
        if how != "compile":
            return how(fn, *args)  # it runs fn as written where its kernels cannot serve the call
        if not next(a for a in args if isinstance(a, torch.Tensor)).is_cuda:
            return fn(*args)
        if compiled is None:  # the VAE's norm meets ~20 variants; past 8 Dynamo would run them op by op
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
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the weights' dtype, as Wan does."""

    def forward(self, x):
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
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


MAX_POSITIONS = 1024  # Wan's RoPE table


@functools.lru_cache(maxsize=None)
def rope_tables(head_dim, theta, device, dtype, max_position=MAX_POSITIONS):
    """Per axis (frame, row, col): cos and sin [max_position, d/2] of position × frequency.

    Formed once in float64 and rounded once: position × frequency reaches ~10³ rad,
    where a float32 product would already be off by ~1e-4."""
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

    key_mask (bool, broadcastable to [Tq, Tk]) marks the keys a query may see, or is a
    BlockCausal. impl="math" is the plain float32 formula, the reference the tests
    read; "sdpa" hands the same computation to PyTorch's fused kernels (flash / cuDNN)."""
    if isinstance(key_mask, BlockCausal):  # each run of queries over its own prefix of the keys: no mask
        return torch.cat([attention(q[:, a:b], k[:, :e], v[:, :e], None if key_mask.valid is None
                                    else key_mask.valid[:e], impl) for a, b, e in key_mask.runs], dim=1)
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


@dataclass
class BlockCausal:
    """A key mask in runs: queries [a, b) see keys [0, e) (the `valid` ones, if given) for
    each (a, b, e): chunks in one pass, each seeing itself and those before it (prompts.py)."""

    runs: list
    valid: torch.Tensor | None = None


class Projections(nn.Module):
    """Wan's q, k, v, o projections with RMS norms on q and k (both attentions have them)."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)


class SelfAttention(Projections):
    def project(self, x, rope):
        """x [B, T, D] → queries (rotated to their positions), keys and values (not yet
        rotated: the KV cache and LIPAR's recovery work on pre-RoPE keys), [B, T, H, Dh]."""
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(x)).unflatten(-1, heads)
        return apply_rope(q, rope), k, self.v(x).unflatten(-1, heads)


class CrossAttention(Projections):
    """Tokens attend to the 512 prompt embeddings (no RoPE, no mask: Wan's T2V model
    sees the zero-padded prompt embedding in full)."""

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
        self.eps, self.head = cfg.eps, nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
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
    runs it. Both share every weight and every line of the blocks."""

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

    def run_blocks(self, tokens, t, frame_of_token, rope, keys_values, context_kvs, keys_only=False):
        """The transformer proper, for any subset of tokens: tokens [B, T, D] → head output [B, T, 64].

        frame_of_token [T] picks each token's per-frame timestep (None when t is [B, 1]);
        keys_values(layer) gives the self-attention's key/value source of that layer.
        keys_only (a re-cache): the last block stops once its keys/values are written; None."""
        e, e0 = self.embed_time(t)
        if frame_of_token is not None:
            e, e0 = e[:, frame_of_token], e0[:, frame_of_token]
        for i, block in enumerate(self.blocks):
            if keys_only and i == len(self.blocks) - 1:
                keys_values(i)(*block.before_attention(tokens, e0, rope)[1:])
                return None
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
        keys_values = lambda layer: lambda k, v: (apply_rope(k, rope), v, key_mask)  # noqa: E731  no cache
        out = self.run_blocks(tokens, t, frame_of_token, rope, keys_values, self.context_kvs(context))
        return self.unpatchify(out, (f, h, w))

    def forward_chunk(self, x, t, cache, start_frame, memory_step=False, plan=None):
        """Velocity for one chunk, attending to the cached clean frames and to itself.

        x [B, 16, F, H, W] the chunk's latents (F = frames_per_chunk), t [B, F] or [B, 1]
        its timesteps; start_frame its first latent frame in the video. The chunk's
        keys/values are written into `cache` (a memory step, t = 0, writes the clean
        ones that later chunks read). With a LIPAR `plan` (lipar.RecoveryPlan) only its
        kept tokens are computed; their velocity is returned in place, pruned ones zero."""
        step = self.chunk_step(x, cache, start_frame, memory_step, plan)
        if step.absent_keys:  # gathered away: SDPA's fused kernels take no mask (the one GPU sync of a step)
            step.present = cache.key_valid[: step.visible].nonzero().squeeze(1)
        return self.run_chunk(x, t, cache, step)

    def chunk_step(self, x, cache, start_frame, memory_step=False, plan=None):
        """The ChunkStep of one forward_chunk call: which tokens run, where their keys go,
        which cached keys they read. Claims the chunk's slots in `cache` (host-side
        bookkeeping and a few small device ops; nothing waits for the GPU)."""
        f, h, w = (x.shape[2 + i] // p for i, p in enumerate(self.cfg.patch_size))
        slots, visible, absent_keys = cache.claim(start_frame, f, None if plan is None else plan.key_valid(memory_step))
        return ChunkStep(positions=grid_positions(f, h, w, cache.position_of(start_frame), device=x.device),
                         kept=None if plan is None else plan.kept, slots=slots,
                         source=None if plan is None else plan.source(memory_step),
                         visible=visible, absent_keys=absent_keys, memory_step=memory_step)

    def run_chunk(self, x, t, cache, step):
        """forward_chunk's tensor work for a prepared ChunkStep: no host-side decisions
        past the step's ints, so graphs.py can capture it once and replay it."""
        rope_chunk = rope_angles(step.positions, self.cfg.head_dim, self.cfg.rope_theta)  # every token, for the cache
        if step.kept is not None and step.kept.numel() == 0:  # nothing to compute: Eq. 3 alone fills the cache
            cache.write_duplicates(step, rope_chunk)
            return torch.zeros_like(x)
        tokens, grid = self.patchify(x)
        rope, positions = rope_chunk, step.positions
        if step.kept is not None:  # LIPAR: only the kept tokens run through the blocks
            tokens, positions, rope = tokens[:, step.kept], positions[step.kept], tuple(r[step.kept] for r in rope_chunk)
        frame_of_token = None if t.shape[1] == 1 else positions[:, 0] - step.positions[0, 0]
        out = self.run_blocks(tokens, t, frame_of_token, rope, cache.keys_values(step, rope_chunk), cache.context_kvs,
                              step.keys_only)
        if step.kept is not None and out is not None:  # back in place; pruned positions are zero
            out = out.new_zeros(out.shape[0], step.positions.shape[0], out.shape[2]).index_copy_(1, step.kept, out)
        return None if out is None else self.unpatchify(out, grid)


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
    absent_keys           some of those rows hold no key (LIPAR's first chunk, naive pruning)
    present [P] or None   then: the rows that do, gathered before attention;
    key_mask [visible]    or the same as a mask (graphs.py: a fixed key count)
    memory_step           t = 0: also store this chunk's last frame as the next memory
    keys_only             only the cache is written, no velocity returned (a re-cache)
    """

    positions: torch.Tensor
    kept: torch.Tensor | None
    slots: torch.Tensor
    source: torch.Tensor | None
    visible: int
    absent_keys: bool
    memory_step: bool
    present: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    keys_only: bool = False


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
    was trained on frame positions 0..20 only, so a chunk past frame 20 is placed at
    frames 18..20 and every cached non-sink key is rotated back by as many frames
    (their distances to the chunk stay true). A stream can run for ever. With
    rolled_positions=False (the authors' first release) every frame keeps its
    absolute index as its position, up to the 1,024 of the RoPE table.

    With memory (LIPAR; `full` never reads it) it keeps each layer's pre-RoPE keys/values
    of the previous chunk's last frame, from which pruned tokens are recovered (Eq. 3–4)."""

    def __init__(self, model, context, grid_hw, window=None, rolled_positions=True, memory=True):
        cfg = model.cfg
        param = model.head.head.weight
        self.tokens_per_frame = n = grid_hw[0] * grid_hw[1]
        self.sink, self.recent = (0, cfg.trained_frames) if window is None else window
        if self.recent < cfg.frames_per_chunk:
            raise ValueError(f"the attention window must cover the current chunk: m_recent={self.recent} "
                             f"< {cfg.frames_per_chunk} frames per chunk")
        self.trained_frames, self.head_dim, self.rope_theta = cfg.trained_frames, cfg.head_dim, cfg.rope_theta
        self.rolled_positions = rolled_positions
        self.num_slots = self.sink + self.recent
        shape = (cfg.num_layers, context.shape[0], self.num_slots * n, cfg.num_heads, cfg.head_dim)
        self.k, self.v = (torch.zeros(shape, device=param.device, dtype=param.dtype) for _ in "kv")
        self.key_valid = torch.ones(self.num_slots * n, dtype=torch.bool, device=param.device)
        memory_shape = (cfg.num_layers, context.shape[0], n if memory else 0, cfg.num_heads, cfg.head_dim)
        self.memory_k, self.memory_v = (torch.zeros(memory_shape, device=param.device, dtype=param.dtype) for _ in "kv")
        self.context, self.context_kvs = context, model.context_kvs(context)  # the prompt in force
        self.slot_has_holes = [False] * self.num_slots  # host-side copy: no sync to decide on a mask
        self.shift = 0  # frames by which the non-sink positions sit below the frames' true indices
        self.ring_start = self.sink  # the frame in the ring's first slot (prompts.py moves it to re-cache)
        self.duplicated = None  # the source of the copies write_duplicates wrote last

    def reset(self, model, context, context_kvs=None):
        """Start a new clip in the same storage (graphs.py's graphs point at it); context_kvs if computed."""
        for (k, v), (new_k, new_v) in zip(self.context_kvs, context_kvs or model.context_kvs(context)):
            k.copy_(new_k), v.copy_(new_v)
        self.key_valid.fill_(True)
        self.memory_k.zero_(), self.memory_v.zero_()
        self.slot_has_holes = [False] * self.num_slots
        self.shift, self.ring_start, self.duplicated, self.context = 0, self.sink, None, context

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
        ring = self.sink + (frame - self.ring_start) % self.recent
        return torch.where(frame < self.sink, frame, ring) if torch.is_tensor(frame) else (
            frame if frame < self.sink else ring)

    def claim(self, start_frame, frames, chunk_valid=None):
        """Give the chunk of `frames` frames from `start_frame` its slots.

        chunk_valid [F·N] or None: which of the chunk's keys will exist (a plan's
        key_valid). Returns (slots [F·N], visible, absent_keys): the cache rows the
        chunk writes, how many rows its queries read, and whether some of those hold
        no key (then `key_valid[:visible]` says which do)."""
        n = self.tokens_per_frame
        device = self.k.device
        if not self.rolled_positions and start_frame + frames > MAX_POSITIONS:
            raise ValueError(f"absolute positions end at latent frame {MAX_POSITIONS - 1} (RoPE's table)")
        shift = max(0, start_frame + frames - self.trained_frames) if self.rolled_positions else 0
        if shift > self.shift:  # a new chunk past frame 20: positions roll (see the class)
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
        end = start_frame + frames
        visible = end if end <= self.sink else min(self.sink + end - self.ring_start, self.num_slots)
        return slots, visible * n, any(self.slot_has_holes[:visible])

    def write_duplicates(self, step, rope):
        """A chunk without kept tokens: every key/value is a copy of the memory (Eq. 3),
        written for all layers at once, and once for all of the chunk's steps (they share
        one source: lipar.recovery_plan); no block runs, its velocity is zero."""
        if step.source is self.duplicated:
            return
        self.duplicated = step.source
        k, v = self.memory_k.index_select(2, step.source), self.memory_v.index_select(2, step.source)
        if step.memory_step:  # k, v [layers, B, F·N, H, Dh]; the last frame is the next memory
            self.memory_k.copy_(k[:, :, -self.tokens_per_frame:]), self.memory_v.copy_(v[:, :, -self.tokens_per_frame:])
        self.k.index_copy_(2, step.slots, rotate_keys(k.flatten(0, 1), rope).unflatten(0, k.shape[:2]))
        self.v.index_copy_(2, step.slots, v)

    def keys_values(self, step, rope):
        """Per-layer key/value sources for a chunk step; rope: (cos, sin) of every token of the chunk.

        Each layer's source completes the chunk's pre-RoPE k/v (its kept tokens', with
        LIPAR) with recovered ones, rotates them to their positions, writes them into the
        chunk's slots and returns every cached key/value the chunk may attend to."""
        n = self.tokens_per_frame

        def keys_values(layer):
            def write_and_read(k, v):
                if step.source is not None:  # Eq. 3: complete the chunk with duplicated clean keys/values
                    k = complete_chunk(self.memory_k[layer], k, step.source)
                    v = complete_chunk(self.memory_v[layer], v, step.source)
                    if step.memory_step:  # the next chunk's memory: this chunk's clean last frame
                        self.memory_k[layer].copy_(k[:, -n:]), self.memory_v[layer].copy_(v[:, -n:])
                self.k[layer].index_copy_(1, step.slots, rotate_keys(k, rope))
                self.v[layer].index_copy_(1, step.slots, v)
                k_all, v_all = self.k[layer][:, : step.visible], self.v[layer][:, : step.visible]
                if step.present is not None:
                    k_all, v_all = k_all[:, step.present], v_all[:, step.present]
                return k_all, v_all, step.key_mask
            return write_and_read

        return keys_values
