"""
Fused kernels without compiling in the user's command: the elementwise chains of the
DiT's blocks and of the VAE's norm + SiLU, written once in Triton. sample.py uses them
by default on CUDA (`--fusion triton`).

torch.compile (`--fusion compile`) fuses the same chains, but a fresh process pays
Dynamo's tracing and guards for every variant again, seconds even with Inductor's disk
cache warm (BENCHMARKS.md): more than fusion saves on one clip. Triton keeps what it
compiles in its own disk cache (~/.triton/cache, or $TRITON_CACHE_DIR), keyed by the
kernel's source, its constants and the GPU, so a later process only loads a few
small binaries. The first process on a machine compiles them (seconds, once). Row
counts are not specialised on (`do_not_specialize`): a kept-token count that changes
from chunk to chunk makes no new variant to compile or to load. On an
H200 the DiT ran at 101 % of torch.compile's speed with them (BENCHMARKS.md).

Each kernel makes one pass over a row (a token's 1536 channels) where the plain code
makes several in float32, and rounds to the output dtype exactly where the plain code
does, so the two agree to within the order of a float32 reduction:
    layer_norm_rows   LN(x [+ y·gate]) · mult + shift: adaLN (mult = 1 + scale) and
                      norm3 (mult = weight, shift = bias), with the residual before it
    rms_rope_rows     RMSNorm over the row, then RoPE on each head's pairs (q), or
                      either alone (k, the cross-attention's q; the cache's key rotation)
    gated_residual    x + y·gate
    rms_silu          the VAE's SiLU(x / rms(x) · γ) over the channels of [B, C, ...],
                      in NCDHW or channels-last memory
    sum_taps          the temporal sum of the VAE's tap-split causal convs (vae_layout.py):
                      each output frame's three terms, the carry and the bias, in one pass
    quantize_rows     --fp8's per-token e4m3 quantisation of a product's input
The blocks' two regions are written out below with these kernels and the block's own
layers (fast_before_attention, fast_after_attention): model.Block's methods with the
chains replaced, line for line; tests/test_triton_ops.py holds them equal to model.py.

Usage: `with model.fusion(triton_ops.Kernels()): ...`: model.fused hands each call of
a region here; what no kernel serves (tensors off the GPU, an odd dtype) runs as written.
"""

import torch
import triton
import triton.language as tl

import model as M

# -----------------------------------------------------------------------------
# The kernels: one program per row (a token), the row held in registers


@triton.jit(do_not_specialize=["rows_per_batch"])
def _layer_norm_rows(X, Y, GATE, MULT, SHIFT, X_OUT, OUT, rows_per_batch, D, eps,
                     HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    batch = row // rows_per_batch
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    x = tl.load(X + row * D + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_Y:  # the residual first: x + y·gate, rounded to x's dtype as the plain code rounds it
        y = tl.load(Y + row * D + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(GATE + batch * D + cols, mask=inside, other=0.0)
        x = (x + y).to(X_OUT.dtype.element_ty)
        tl.store(X_OUT + row * D + cols, x, mask=inside)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    mult = tl.load(MULT + batch * D + cols, mask=inside, other=0.0)
    shift = tl.load(SHIFT + batch * D + cols, mask=inside, other=0.0)
    tl.store(OUT + row * D + cols, (centred * rstd * mult + shift).to(OUT.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["T"])
def _rms_rope_rows(X, WEIGHT, COS, SIN, OUT, T, D, eps, HEAD_HALF: tl.constexpr,
                   HAS_RMS: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK: tl.constexpr):
    """A row of D = heads · 2·HEAD_HALF values as pairs (even, odd); RoPE turns pair i of
    every head by angle i of the row's token."""
    row = tl.program_id(0)
    pairs = tl.arange(0, BLOCK)
    inside = pairs < D // 2
    even = tl.load(X + row * D + 2 * pairs, mask=inside, other=0.0).to(tl.float32)
    odd = tl.load(X + row * D + 2 * pairs + 1, mask=inside, other=0.0).to(tl.float32)
    dtype = OUT.dtype.element_ty
    if HAS_RMS:  # (x · rsqrt(mean x² + eps)) rounded, then · weight rounded: model.rms_norm's two steps
        rstd = 1.0 / tl.sqrt((tl.sum(even * even, axis=0) + tl.sum(odd * odd, axis=0)) / D + eps)
        w_even = tl.load(WEIGHT + 2 * pairs, mask=inside, other=0.0).to(tl.float32)
        w_odd = tl.load(WEIGHT + 2 * pairs + 1, mask=inside, other=0.0).to(tl.float32)
        even = ((even * rstd).to(dtype).to(tl.float32) * w_even).to(dtype).to(tl.float32)
        odd = ((odd * rstd).to(dtype).to(tl.float32) * w_odd).to(dtype).to(tl.float32)
    if HAS_ROPE:
        angle = (row % T) * HEAD_HALF + pairs % HEAD_HALF  # the row's token: the same angles in every batch
        cos = tl.load(COS + angle, mask=inside, other=1.0)
        sin = tl.load(SIN + angle, mask=inside, other=0.0)
        even, odd = even * cos - odd * sin, even * sin + odd * cos
    tl.store(OUT + row * D + 2 * pairs, even.to(dtype), mask=inside)
    tl.store(OUT + row * D + 2 * pairs + 1, odd.to(dtype), mask=inside)


@triton.jit(do_not_specialize=["rows_per_batch"])
def _gated_residual(X, Y, GATE, OUT, rows_per_batch, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    x = tl.load(X + row * D + cols, mask=inside, other=0.0).to(tl.float32)
    y = tl.load(Y + row * D + cols, mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(GATE + (row // rows_per_batch) * D + cols, mask=inside, other=0.0)
    tl.store(OUT + row * D + cols, (x + y * gate).to(OUT.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["S"])
def _rms_silu(X, BIAS, GAMMA, OUT, C, S, HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_S: tl.constexpr):
    """x [B, C, S] (S: every position of a frame or clip): per position, (with HAS_BIAS
    x + bias, rounded), x / rms over C, rounded, · γ, rounded, then SiLU, as
    vae.rms_norm_silu rounds them. In memory x is [B, C, S] (NCDHW), or [B, S, C] with
    CHANNELS_LAST: then a position's C channels are one contiguous row, and the block is
    BLOCK_S rows."""
    batch = tl.program_id(1)
    positions = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    channels = tl.arange(0, BLOCK_C)
    inside = (channels[:, None] < C) & (positions[None, :] < S)
    if CHANNELS_LAST:
        offsets = batch * C * S + positions[None, :] * C + channels[:, None]
    else:
        offsets = batch * C * S + channels[:, None] * S + positions[None, :]
    x = tl.load(X + offsets, mask=inside, other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + channels, mask=channels < C, other=0.0).to(tl.float32)
        x = (x + bias[:, None]).to(dtype).to(tl.float32)
    rms = tl.maximum(tl.sqrt(tl.sum(x * x, axis=0) / C), 1e-12).to(dtype).to(tl.float32)
    gamma = tl.load(GAMMA + channels, mask=channels < C, other=0.0).to(tl.float32)
    y = (x / rms[None, :]).to(dtype).to(tl.float32)
    y = (y * gamma[:, None]).to(dtype).to(tl.float32)
    tl.store(OUT + offsets, (y * tl.sigmoid(y)).to(dtype), mask=inside)


@triton.jit
def _biased_residual(SHORTCUT, SHORTCUT_BIAS, OUT_IN, BIAS, OUT, rows, C, HAS_SHORTCUT_BIAS: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """vae_layout.biased_residual on rows [rows, C] (channels-last: a position's channels
    contiguous): (shortcut (+ shortcut bias), rounded) + (out + bias, rounded), rounded."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    channels = tl.arange(0, BLOCK_C)
    inside = (r[:, None] < rows) & (channels[None, :] < C)
    at = r[:, None] * C + channels[None, :]
    out = tl.load(OUT_IN + at, mask=inside, other=0.0)
    dtype = out.dtype
    bias = tl.load(BIAS + channels, mask=channels < C, other=0.0).to(tl.float32)
    out = (out.to(tl.float32) + bias[None, :]).to(dtype).to(tl.float32)
    shortcut = tl.load(SHORTCUT + at, mask=inside, other=0.0).to(tl.float32)
    if HAS_SHORTCUT_BIAS:
        shortcut_bias = tl.load(SHORTCUT_BIAS + channels, mask=channels < C, other=0.0).to(tl.float32)
        shortcut = (shortcut + shortcut_bias[None, :]).to(dtype).to(tl.float32)
    tl.store(OUT + at, (shortcut + out).to(dtype), mask=inside)


@triton.jit(do_not_specialize=["T", "P"])
def _sum_taps(TAPS, CARRY, BIAS, RESIDUAL, OUT, NEXT, T, P, C, HAS_CARRY: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """vae_layout.sum_taps in channels-last memory: TAPS [N, T, P, 3, C] (P = H·W pixels),
    CARRY and NEXT [N, 2, P, C], OUT and RESIDUAL [N, T, P, C]. Program (pixels, j, n) sums
    the terms of output frame j in 0 .. T + 1: the carry's (j < 2) and taps[s, k] for
    s + 2 - k = j; frames j < T go to OUT with the bias (and the residual), j = T, T + 1 to NEXT."""
    j = tl.program_id(1)
    n = tl.program_id(2)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.arange(0, BLOCK_C)
    inside = (pixels[:, None] < P) & (channels[None, :] < C)
    terms = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    frame = tl.full((BLOCK_P, 1), 0, tl.int32) + j  # j as a block, for masks (a scalar condition is no mask)
    if HAS_CARRY:
        terms += tl.load(CARRY + ((n * 2 + j) * P + pixels[:, None]) * C + channels[None, :],
                         mask=inside & (frame < 2), other=0.0).to(tl.float32)
    for k in tl.static_range(3):
        s = frame - 2 + k  # the input frame whose slice-k term lands on output frame j
        terms += tl.load(TAPS + (((n * T + s) * P + pixels[:, None]) * 3 + k) * C + channels[None, :],
                         mask=inside & (s >= 0) & (s < T), other=0.0).to(tl.float32)
    if j < T:
        terms += tl.load(BIAS + channels, mask=channels < C, other=0.0).to(tl.float32)[None, :]
        at = ((n * T + j) * P + pixels[:, None]) * C + channels[None, :]
        if HAS_RESIDUAL:
            terms += tl.load(RESIDUAL + at, mask=inside, other=0.0).to(tl.float32)
        tl.store(OUT + at, terms.to(OUT.dtype.element_ty), mask=inside)
    else:
        tl.store(NEXT + ((n * 2 + j - T) * P + pixels[:, None]) * C + channels[None, :],
                 terms.to(NEXT.dtype.element_ty), mask=inside)


@triton.jit
def _quantize_rows(X, Q, SCALE, K, BLOCK: tl.constexpr):
    """fp8.quantize_rows: per row, scale = max |x| / 448, then x / scale in e4m3 (two
    passes over the row: its largest magnitude, then the values)."""
    row = tl.program_id(0)
    largest = tl.zeros((), tl.float32)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(X + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        largest = tl.maximum(largest, tl.max(tl.abs(x), axis=0))
    scale = tl.maximum(largest, 1e-12) / 448.0
    tl.store(SCALE + row, scale)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(X + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        tl.store(Q + row * K + cols, tl.minimum(tl.maximum(x / scale, -448.0), 448.0).to(Q.dtype.element_ty),
                 mask=cols < K)


# -----------------------------------------------------------------------------
# The kernels as functions of tensors


def _block(n):
    return triton.next_power_of_2(n)


def layer_norm_rows(x, mult, shift, eps, y=None, gate=None):
    """LN over the last dim of x [B, T, D] (after x + y·gate when y is given), · mult + shift
    ([B or 1, 1, D] or [D], float32). Returns (the residual sum or None, the normed rows)."""
    x = x.contiguous()
    B, T, D = x.shape
    vector = lambda v: v.float().expand(B, 1, D).contiguous()  # noqa: E731  [B, 1, D] float32
    out = torch.empty_like(x)
    x_out = torch.empty_like(x) if y is not None else None
    _layer_norm_rows[(B * T,)](x, x if y is None else y.contiguous(), x if gate is None else vector(gate),
                               vector(mult), vector(shift), out if x_out is None else x_out, out, T, D, eps,
                               HAS_Y=y is not None, HAS_GATE=gate is not None, BLOCK=_block(D))
    return x_out, out


def rms_rope_rows(x, weight=None, eps=0.0, rope=None):
    """x [B, T, H, Dh] or [B, T, D]: RMSNorm over H·Dh (with weight), then RoPE by rope =
    (cos, sin) [T, Dh/2] on each head's pairs; either may be left out."""
    x = x.contiguous()
    B, T = x.shape[:2]
    D = x[0, 0].numel()
    head_half = rope[0].shape[-1] if rope is not None else 1
    cos, sin = (r.float().contiguous() for r in rope) if rope is not None else (x, x)
    out = torch.empty_like(x)
    _rms_rope_rows[(B * T,)](x, x if weight is None else weight, cos, sin, out, T, D, eps, HEAD_HALF=head_half,
                             HAS_RMS=weight is not None, HAS_ROPE=rope is not None, BLOCK=_block(D // 2))
    return out


def gated_residual(x, y, gate):
    """(x + y·gate) in float32, rounded to x's dtype; gate [B, 1, D]."""
    x = x.contiguous()
    B, T, D = x.shape
    out = torch.empty_like(x)
    _gated_residual[(B * T,)](x, y.contiguous(), gate.float().expand(B, 1, D).contiguous(), out, T, D,
                              BLOCK=_block(D))
    return out


CHANNELS_LAST_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}  # frames [B, C, H, W], clips [B, C, T, H, W]


def rms_silu(x, gamma, bias=None):
    """vae.rms_norm_silu: x [B, C, ...] (+ bias [C]) normed over C, · γ [C, 1, ...], SiLU.
    Channels-last x (vae_layout.py) is read where it lies and the output made channels-last
    too (empty_like keeps x's strides); other strides are copied to NCDHW first."""
    layout = CHANNELS_LAST_FORMAT.get(x.dim())
    channels_last = layout is not None and x.is_contiguous(memory_format=layout)
    if not channels_last:
        x = x.contiguous()
    B, C = x.shape[:2]
    S = x[0, 0].numel()
    out = torch.empty_like(x)
    block_s = max(16, min(128, 8192 // _block(C)))
    _rms_silu[(triton.cdiv(S, block_s), B)](x, gamma if bias is None else bias, gamma.reshape(C).contiguous(), out, C,
                                             S, HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last,
                                             BLOCK_C=_block(C), BLOCK_S=block_s)
    return out


def biased_residual(shortcut, shortcut_bias, out, bias):
    """vae_layout.biased_residual: shortcut and out [B, C, T, H, W], biases [C] or
    shortcut_bias None -> the sum, channels-last. Read where they lie in channels-last
    memory (as vae_layout's blocks make them), copied there otherwise."""
    shortcut, out = (t.contiguous(memory_format=torch.channels_last_3d) for t in (shortcut, out))
    C = out.shape[1]
    rows = out.numel() // C
    result = torch.empty_like(out)
    block_c = _block(C)
    block_r = max(1, min(64, 4096 // block_c)) if out.is_cuda else _block(rows)  # the interpreter: one program
    _biased_residual[(triton.cdiv(rows, block_r),)](shortcut, bias if shortcut_bias is None else shortcut_bias, out,
                                                    bias, result, rows, C, HAS_SHORTCUT_BIAS=shortcut_bias is not None,
                                                    BLOCK_R=block_r, BLOCK_C=block_c)
    return result


def sum_taps(taps, carry, bias, residual=None):
    """vae_layout.sum_taps: taps [N, T, 3, C, H, W], carry [N, 2, C, H, W] or None, bias [C],
    residual [N, C, T, H, W] or None ->
    (out [N, C, T, H, W] channels-last, next carry [N, 2, C, H, W], in channels-last memory).
    Taps from a channels-last conv2d ([N·T, H, W, 3·C] in memory) are read where they lie."""
    N, T, _, C, H, W = taps.shape
    taps = taps.permute(0, 1, 4, 5, 2, 3).contiguous()  # [N, T, H, W, 3, C]: no copy for a channels-last conv's taps
    out = torch.empty(N, T, H, W, C, device=taps.device, dtype=taps.dtype)
    next_carry = torch.empty(N, 2, H, W, C, device=taps.device, dtype=taps.dtype)
    carry = carry.permute(0, 1, 3, 4, 2).contiguous() if carry is not None else next_carry
    residual = residual.permute(0, 2, 3, 4, 1).contiguous() if residual is not None else out  # [N, T, H, W, C]
    block_c = _block(C)
    # A tile of at most 4096 values on the GPU; in Triton's interpreter (the CPU tests), where each
    # program costs Python calls, one program per frame.
    block_p = max(1, min(64, 4096 // block_c)) if taps.is_cuda else _block(H * W)
    _sum_taps[(triton.cdiv(H * W, block_p), T + 2, N)](taps, carry, bias, residual, out, next_carry, T, H * W,
                                                         C, HAS_CARRY=carry is not next_carry,
                                                         HAS_RESIDUAL=residual is not out, BLOCK_C=block_c,
                                                         BLOCK_P=block_p)
    return out.permute(0, 4, 1, 2, 3), next_carry.permute(0, 1, 4, 2, 3)


def quantize_rows(x, dtype=torch.float8_e4m3fn):
    """fp8.quantize_rows in one kernel: x [M, K] → (e4m3 values [M, K], float32 scales [M, 1]).
    (dtype: float32 keeps the scaled values before their conversion, for the CPU test.)"""
    x = x.contiguous()
    values = torch.empty(x.shape, device=x.device, dtype=dtype)
    scale = torch.empty(x.shape[0], 1, device=x.device, dtype=torch.float32)
    _quantize_rows[(x.shape[0],)](x, values, scale, x.shape[1], BLOCK=min(2048, _block(x.shape[1])))
    return values, scale


# -----------------------------------------------------------------------------
# The block's regions with the kernels (model.Block.before_attention / after_attention)


def fast_before_attention(block, x, e, rope):
    shift1, scale1 = (block.modulation + e).unbind(2)[:2]
    attn = block.self_attn
    _, h = layer_norm_rows(x, 1 + scale1, shift1, block.eps)
    heads = (attn.num_heads, -1)
    q = rms_rope_rows(attn.q(h), attn.norm_q.weight, attn.norm_q.eps, rope).unflatten(-1, heads)
    k = rms_rope_rows(attn.k(h), attn.norm_k.weight, attn.norm_k.eps).unflatten(-1, heads)
    return q, k, attn.v(h).unflatten(-1, heads)


def fast_after_attention(block, x, attended, e, context_kv, impl):
    _, _, gate1, shift2, scale2, gate2 = (block.modulation + e).unbind(2)
    cross = block.cross_attn
    x, normed = layer_norm_rows(x, block.norm3.weight, block.norm3.bias, block.norm3.eps,
                                y=block.self_attn.o(attended.flatten(2)), gate=gate1)
    q = rms_rope_rows(cross.q(normed), cross.norm_q.weight, cross.norm_q.eps).unflatten(-1, (cross.num_heads, -1))
    x, h = layer_norm_rows(x, 1 + scale2, shift2, block.eps, y=cross.o(M.attention(q, *context_kv, impl=impl).flatten(2)))
    return gated_residual(x, block.ffn(h), gate2)


REGIONS = {
    "Block.before_attention": fast_before_attention,
    "Block.after_attention": fast_after_attention,
    "apply_rope": lambda k, rope: rms_rope_rows(k, rope=rope),  # model.rotate_keys
    "rms_norm_silu": rms_silu,                                   # vae.rms_norm_silu
    "biased_rms_norm_silu": lambda x, bias, gamma: rms_silu(x, gamma, bias),  # vae_layout.biased_rms_norm_silu
    "biased_residual": biased_residual,                          # vae_layout.biased_residual
    "sum_taps": sum_taps,                                        # vae_layout.sum_taps
    "quantize_rows": quantize_rows,                              # fp8.quantize_rows (--fp8)
}


class Kernels:
    """For model.fusion: called as kernels(fn, *args) by model.fused, it runs fn's region
    with the Triton kernels when its tensors are on `device_type` ("cuda"; the CPU tests
    run Triton's interpreter) in a dtype they take, else fn as written."""

    DTYPES = (torch.bfloat16, torch.float16, torch.float32)

    def __init__(self, device_type="cuda"):
        self.device_type = device_type
        self.calls = {"kernels": 0, "plain": 0}

    def __call__(self, fn, *args):
        fast = REGIONS.get(fn.__qualname__)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if fast is None or any(t.device.type != self.device_type or t.dtype not in self.DTYPES for t in tensors) \
                or any(t.numel() == 0 for t in tensors):
            self.calls["plain"] += 1
            return fn(*args)
        self.calls["kernels"] += 1
        return fast(*args)

