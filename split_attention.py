"""
Attention of a few queries over many keys, the keys split across the GPU
(flash-decoding): for the chunks that LIPAR prunes almost entirely.

A fused attention kernel gives each block of 128 queries of each head to one of the
GPU's streaming multiprocessors (132 on an H200). A chunk with a few hundred kept
tokens and 12 heads keeps a tenth of them busy while each reads every cached key:
the 100 %-pruned edit spent 42 % of its time there (BENCHMARKS.md). Here the keys
are cut into S equal parts, every (part, query block, head) is a program of its own,
each part returns its own softmax output and the log-sum-exp of its scores, and the
parts are merged exactly:

    lse = log Σ_s exp(lse_s),   out = Σ_s exp(lse_s − lse) · out_s

(the softmax over all keys is each part's softmax weighted by that part's share of
the total exp-mass). model.attention hands a call here when the model's attn_impl is
a SplitKV; calls with many queries, or with a key mask, go to SDPA unchanged.
tests/test_split_attention.py holds it equal to model.attention's plain formula.
"""

import torch

import model as M


def split_count(programs, keys, units, min_part=512):
    """How many parts to cut `keys` keys into so that `programs` (query blocks × heads ×
    batch) fill `units` multiprocessors: a divisor of `keys` (every part the same size),
    no part shorter than min_part keys; 1: no split."""
    want = -(-units // programs)
    return next((s for s in range(want, 1, -1) if keys % s == 0 and keys // s >= min_part), 1)


def attention_parts(q, k, v):
    """Softmax attention with its log-sum-exp, q [P, H, Tq, Dh], k/v [P, H, Tk, Dh] →
    out [P, H, Tq, Dh], lse [P, H, Tq] (float32; natural log, scores scaled by 1/√Dh)."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    return out, lse


def split_attention(q, k, v, parts):
    """model.attention (no mask) with the keys in `parts` equal parts: q [B, Tq, H, Dh],
    k/v [B, Tk, H, Dh] → [B, Tq, H, Dh]."""
    B, Tq, H, Dh = q.shape
    Tk = k.shape[1]
    q_parts = q.transpose(1, 2)[:, None].expand(B, parts, H, Tq, Dh).reshape(B * parts, H, Tq, Dh)
    k_parts, v_parts = (x.reshape(B * parts, Tk // parts, H, Dh).transpose(1, 2) for x in (k, v))
    out, lse = attention_parts(q_parts, k_parts, v_parts)
    lse = lse.view(B, parts, H, Tq)
    weight = torch.exp(lse - torch.logsumexp(lse, dim=1, keepdim=True))  # each part's share
    merged = (out.view(B, parts, H, Tq, Dh).to(weight.dtype) * weight[..., None]).sum(dim=1)
    return merged.transpose(1, 2).to(q.dtype)


class SplitKV:
    """A model's attn_impl: split_attention where the queries alone would leave the GPU's
    `units` multiprocessors idle (and there is no key mask), SDPA otherwise. `calls`
    counts both."""

    def __init__(self, units, query_block=128, min_part=512):
        self.units, self.query_block, self.min_part = units, query_block, min_part
        self.calls = {"split": 0, "sdpa": 0}

    @classmethod
    def for_device(cls, device):
        return cls(torch.cuda.get_device_properties(device).multi_processor_count)

    def __call__(self, q, k, v, key_mask=None):
        B, Tq, H, _ = q.shape
        programs = B * H * -(-Tq // self.query_block)
        parts = 1 if key_mask is not None else split_count(programs, k.shape[1], self.units, self.min_part)
        if parts == 1:
            self.calls["sdpa"] += 1
            return M.attention(q, k, v, key_mask)
        self.calls["split"] += 1
        return split_attention(q, k, v, parts)
