"""
`--fp8`: the DiT's feed-forward projections in float8 (e4m3) through torch._scaled_mm.

The FFN's two products (1536 → 8960 → 1536) are two thirds of a block's matrix work.
On Hopper an fp8 product runs at twice bf16's rate; what it costs is the quantisation
of its input on every call. Measured at the DiT's shapes (BENCHMARKS.md) the FFN's
products gain 1.2–1.45× with it counted, while the 1536 × 1536 projections (q, k, v,
o, cross-attention) do not gain, so they stay in bf16.

Scales are per row on both sides (`torch._scaled_mm`'s rowwise mode): each output
channel of the weight has its own scale, set once from its largest magnitude, and each
token's activations get theirs on the fly. The product is
    y[m, n] = (Σ_k q_x[m, k] · q_w[n, k]) · s_x[m] · s_w[n] + b[n],
q = round_e4m3(value / scale), scale = amax / 448 (e4m3's largest finite value).
"""

import torch
import torch.nn as nn

from model import fused

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@fused
def quantize_rows(x):
    """x [M, K] → (e4m3 values [M, K], float32 scales [M, 1]) with x ≈ values · scales.
    One kernel on CUDA (triton_ops.quantize_rows)."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(nn.Module):
    """nn.Linear with its weight in e4m3 (one scale per output channel); its input is
    quantised per token on each call, the product and bias come out in the layer's dtype."""

    def __init__(self, linear):
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_e4m3", weight)                      # [N, K]
        self.register_buffer("weight_scale", scale.t().contiguous())     # [1, N]
        self.register_buffer("bias", linear.bias.detach().clone())       # [N], the layer's dtype
        self.out_features = linear.out_features

    def forward(self, x):
        # any row count; the widths (1536, 8960) are multiples of 16, as _scaled_mm requires
        values, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        out = torch._scaled_mm(values, self.weight_e4m3.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=self.bias.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_ffn(dit):
    """Swap every block's FFN projections for Fp8Linear, in place; returns the model."""
    for block in dit.blocks:
        block.ffn[0] = Fp8Linear(block.ffn[0])
        block.ffn[2] = Fp8Linear(block.ffn[2])
    return dit
