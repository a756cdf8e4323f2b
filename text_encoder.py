"""
The umT5-XXL text encoder that conditions the DiT (the encoder half of google/umt5-xxl,
as Wan 2.1 runs it) and its tokenizer. Module names follow Wan's native checkpoint
(models_t5_umt5-xxl-enc-bf16); weights.py reads either release into them.

Shapes: B batch, L tokens (512), H heads, Dh head dim.
"""

import html
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from model import RMSNorm


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
    """The umT5 SentencePiece tokenizer (a `tokenizers.Tokenizer` read from tokenizer.json
    by weights.load_tokenizer), as Wan calls it.

    Matches transformers' T5 tokenizer with add_special_tokens=True, truncation=True,
    padding='max_length', max_length=text_len: the text's tokens are cut to
    text_len − 1, then </s> is appended, then <pad> fills up to text_len. We encode
    without special tokens and append </s> ourselves, so a tokenizer.json with or
    without a post-processor that appends </s> gives the same ids.
    """

    def __init__(self, tokenizer, text_len=512):
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.text_len = text_len
        self.eos = self.tokenizer.token_to_id("</s>")
        self.pad = self.tokenizer.token_to_id("<pad>")
        if self.eos is None or self.pad is None:
            raise ValueError("the tokenizer has no '</s>' or '<pad>' token: it is not a T5 tokenizer")

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

    def token_count(self, prompt):
        """How many tokens the prompt takes before it is cut to text_len (with </s>)."""
        return len(self.tokenizer.encode(clean_prompt(prompt), add_special_tokens=False).ids) + 1


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
