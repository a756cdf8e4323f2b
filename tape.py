"""TAPE beside LIPAR: temporal-aware importance pruning (arXiv 2605.17837), as a mode.

LIPAR prunes the tokens that repeat the previous frame and recovers them exactly.
TAPE prunes the tokens that receive little attention: every `every` blocks (a
*selection* block, computed on every token) it scores each token by the attention it
receives, smooths that score over time, keeps the top (1 − r) of every frame, and the
blocks up to the next selection compute the kept tokens only. A skipped token is not
discarded: its hidden state passes those blocks unchanged, keeps its position, and
goes through the head like any other token.

The paper's text beyond its abstract could not be read here (only its abstract is
stored), so the exact equations and defaults below are this project's reading of
the method's three parts; each choice is marked as ours and documented in the README:

- importance (EViT-style): the softmax attention a token receives, averaged over
  heads and over queries. The plain path averages over every query; the fast path
  over a fixed, evenly spaced subsample of `score_queries` queries (tests give the
  rank correlation between the two);
- temporal smoothing, as TAPE's paper states it: s̃_f = α s_f + (1 − α) s̃_{f−1} at
  each spatial location, over the chunk's frames in order, starting from the previous
  chunk's last frame: a smaller α leans more on the previous frame (steadier
  background, less flicker), a larger one trusts the current frame (our α = 0.5, the
  middle of the five values of the paper's sensitivity table);
- reselection: the paper reselects "every 10 layers", and chose 5 reselections over
  HunyuanVideo's 60 blocks; on Wan's 30 blocks the first rule gives 3 selections,
  the second every 6 blocks. We follow the stated rule (every 10 blocks); a count
  (`selections`) gives the other reading;
- HighLow budget over the denoising steps: linear from r + δ to r − δ (our δ = 0.1),
  so its mean is the target r; here the three editing steps take r + δ, r, r − δ.

Where the causal, KV-cached model has no counterpart in TAPE's bidirectional design:
- the memory step (t = 0, which writes the clean keys/values later chunks attend to)
  runs on every token: a skipped token would leave a stale key in the cache for ever;
- in a skipping block the kept queries attend to the cached frames and to the kept
  tokens of their own chunk; the skipped tokens have no key in that block;
- the smoothing reaches across a chunk boundary through the previous chunk's last
  frame's smoothed score at the same selection block, from its last denoising step.
"""

from dataclasses import dataclass

import torch

from graphs import StaticInputs
from model import attention, rope_angles, rotate_keys


@dataclass
class TapeConfig:
    """ratio: the target prune ratio r (the mean over the denoising steps); alpha: the
    smoothing weight α on the current frame; delta: the HighLow half-range δ; every:
    blocks from one selection to the next, or selections: how many selections the
    blocks hold, evenly spaced (when given, it sets the spacing); score_queries: the
    queries the fast importance averages over (None: all of them, exact). Defaults
    are ours (see above)."""
    ratio: float = 0.3
    alpha: float = 0.5
    delta: float = 0.1
    every: int = 10
    selections: int | None = None
    score_queries: int | None = 256

    def selection_blocks(self, blocks):
        """The selection blocks of a model of `blocks` blocks: 0, every, 2·every, ... or
        `selections` of them spread evenly from block 0."""
        if self.selections is None:
            return set(range(0, blocks, self.every))
        return {k * blocks // self.selections for k in range(self.selections)}


def highlow_ratios(ratio, steps, delta):
    """The prune ratio of each denoising step: linear from ratio + δ to ratio − δ,
    centred on `ratio`, clipped to [0, 0.95] (one step: `ratio`)."""
    if steps == 1:
        return [ratio]
    return [min(0.95, max(0.0, ratio + delta * (1 - 2 * i / (steps - 1)))) for i in range(steps)]


def smooth_scores(scores, previous, alpha):
    """scores [F, N] (one row a frame) → s̃ with s̃_f = α s_f + (1 − α) s̃_{f−1}; frame
    0 blends with `previous` [N] (the previous chunk's last smoothed frame) or, with
    none, is its own score. α = 1: no smoothing."""
    out, last = [], previous
    for frame in scores:
        last = frame if last is None else alpha * frame + (1 - alpha) * last
        out.append(last)
    return torch.stack(out)


def received_attention(q, k, chunk_keys, score_queries=None):
    """Importance of the chunk's tokens: the attention each receives, averaged over
    heads and queries. q [B, T, H, Dh] the chunk's (rotated) queries, k [B, K, H, Dh]
    every key they attend to, chunk_keys [T]: the rows of k holding the chunk's own
    tokens. score_queries: None for every query (exact), else that many evenly spaced
    ones (the fast path). Returns [T], float32."""
    if score_queries is not None and score_queries < q.shape[1]:
        q = q[:, torch.linspace(0, q.shape[1] - 1, score_queries, device=q.device).round().long()]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    weights = scores.softmax(dim=-1)[..., chunk_keys]  # [B, H, Tq, T]
    return weights.mean(dim=(0, 1, 2))


def keep_top(scores, ratio):
    """The kept tokens [n] (ascending flat indices) of scores [F, N]: in every frame the
    same count, N − round(ratio · N), of the highest scores (no frame-wise imbalance)."""
    frames, n = scores.shape
    keep = n - round(ratio * n)
    top = scores.topk(keep, dim=1).indices + torch.arange(frames, device=scores.device)[:, None] * n
    return top.flatten().sort().values


class TapeForward:
    """TAPE as the forward a sample.ChunkEditor runs (model.CausalWanModel.forward_chunk's
    arguments): the denoising steps of a chunk skip tokens at their HighLow ratios, the
    memory step runs in full and closes the chunk's scores (see above). With a
    graphs.GraphRunner (and its KV cache) every step replays a CUDA graph, as LIPAR's
    do: a step's kept count is fixed by its ratio, so its shapes are too."""

    def __init__(self, dit, cfg, steps=3, runner=None):
        self.dit, self.cfg, self.state, self.step, self.runner = dit, cfg, TapeState(), 0, runner
        self.ratios = highlow_ratios(cfg.ratio, steps, cfg.delta)

    def __call__(self, x, t, cache, start_frame, memory_step=False, plan=None):
        if memory_step:
            self.state.commit()
            self.step = 0
            return self.memory_step(x, t, cache, start_frame)
        ratio, self.step = self.ratios[self.step], self.step + 1
        if self.runner is None:
            return forward_chunk(self.dit, x, t, cache, start_frame, ratio, self.state, self.cfg)
        return self.replayed(x, t, cache, start_frame, ratio)

    def memory_step(self, x, t, cache, start_frame):
        """The memory step alone, on every token (prompts.py re-caches with it)."""
        forward = self.dit.forward_chunk if self.runner is None else self.runner.forward_chunk
        return forward(x, t, cache, start_frame, memory_step=True)

    def replayed(self, x, t, cache, start_frame, ratio):
        """One denoising step through the runner: the step's bookkeeping (slots, positions)
        eagerly, then run_step on static buffers (the runner keeps them, per graph key: the
        step's inputs and the previous chunk's scores of each selection block)."""
        step = self.dit.chunk_step(x, cache, start_frame)
        previous = self.state.last_frame
        key = ("tape", id(cache), tuple(x.shape), ratio, step.visible, tuple(sorted(previous)))
        inputs, last_frame = self.runner.buffers(key, lambda: (StaticInputs(x, t, step, None),
                                                               {i: torch.empty_like(p) for i, p in previous.items()}))
        inputs.fill(x, t, step)
        for i, p in previous.items():
            last_frame[i].copy_(p)

        def run():
            state = TapeState()
            state.last_frame = last_frame
            v = run_step(self.dit, inputs.x, inputs.t, cache, inputs.step, ratio, state, self.cfg)
            return (v, *(state.pending[i] for i in sorted(state.pending)))
        v, *pending = self.runner.launch(key, run)
        blocks = sorted(self.cfg.selection_blocks(len(self.dit.blocks))) if ratio > 0 else []
        self.state.pending = dict(zip(blocks, pending))
        return v


class TapeState:
    """What TAPE carries from chunk to chunk: per selection block, the previous chunk's
    last frame of smoothed scores (from its last denoising step)."""

    def __init__(self):
        self.last_frame, self.pending = {}, {}

    def commit(self):
        """After a chunk's last denoising step: its scores become the next chunk's past."""
        self.last_frame, self.pending = self.pending, {}


@torch.no_grad()
def forward_chunk(dit, x, t, cache, start_frame, ratio, state, cfg, kept_log=None):
    """model.forward_chunk with TAPE's skipping: velocity [B, 16, F, H, W] of one
    denoising step of a chunk. ratio: this step's prune ratio; state: the clip's
    TapeState; cfg: a TapeConfig (alpha, every, score_queries). kept_log, a list,
    receives (block, kept indices) for each selection (the tests read it). The memory
    step is model.forward_chunk itself."""
    return run_step(dit, x, t, cache, dit.chunk_step(x, cache, start_frame), ratio, state, cfg, kept_log)


def run_step(dit, x, t, cache, step, ratio, state, cfg, kept_log=None):
    """forward_chunk after the chunk's model.ChunkStep is made: every shape here follows
    from the step and the ratio, and nothing waits for the GPU, so a CUDA graph can
    record it (TapeForward.replayed)."""
    tokens, grid = dit.patchify(x)
    frames, n = grid[0], grid[1] * grid[2]
    rope = rope_angles(step.positions, dit.cfg.head_dim, dit.cfg.rope_theta)
    keys_values = cache.keys_values(step, rope)
    e, e0 = dit.embed_time(t)
    impl, selecting = dit.attn_impl, cfg.selection_blocks(len(dit.blocks))
    kept = rows = None
    for i, block in enumerate(dit.blocks):
        if i in selecting:  # a selection block: every token, then re-rank
            q, k, v = block.before_attention(tokens, e0, rope)
            k_all, v_all, key_mask = keys_values(i)(k, v)
            tokens = block.after_attention(tokens, attention(q, k_all, v_all, key_mask, impl), e0,
                                           cache.context_kvs[i], impl)
            if ratio > 0:  # k_all is the cache's visible prefix as stored (TAPE's cache has no holes)
                score = received_attention(q, k_all, step.slots, cfg.score_queries).view(frames, n)
                smoothed = smooth_scores(score, state.last_frame.get(i), cfg.alpha)
                state.pending[i] = smoothed[-1]
                kept, rows = keep_top(smoothed, ratio), None
                if kept_log is not None:
                    kept_log.append((i, kept))
            continue
        if kept is None:  # nothing skipped (ratio 0): the block as model.forward_chunk runs it
            tokens = block(tokens, e0, rope, keys_values(i), cache.context_kvs[i], impl)
            continue
        if rows is None:  # once per selection: the rows the kept queries read
            rope_kept, rows = tuple(r[kept] for r in rope), attended_rows(step, kept)
        q, k, v = block.before_attention(tokens[:, kept], e0, rope_kept)
        k_all, v_all = write_kept(cache, i, step, kept, k, v, rope_kept)
        attended = attention(q, k_all[:, rows], v_all[:, rows], None, impl)
        tokens = tokens.index_copy(1, kept, block.after_attention(tokens[:, kept], attended, e0,
                                                                  cache.context_kvs[i], impl))
    return dit.unpatchify(dit.head(tokens, e), grid)


def write_kept(cache, layer, step, kept, k, v, rope_kept):
    """A skipping block's keys: the kept tokens' keys/values written to their slots
    (rotated to their positions); returns every cached key/value of the visible prefix."""
    slots = step.slots[kept]
    cache.k[layer].index_copy_(1, slots, rotate_keys(k, rope_kept))
    cache.v[layer].index_copy_(1, slots, v)
    return cache.k[layer][:, :step.visible], cache.v[layer][:, :step.visible]


def attended_rows(step, kept):
    """The cache rows [P] a skipping block's queries read, ascending: the cached frames'
    and the chunk's kept tokens' (a skipped token holds a stale key, or none, in this
    block). Gathered rather than masked (SDPA's flash kernel takes no mask); found by a
    stable sort of the chunk's rows to the end, whose count is known, not by nonzero(),
    which would wait for the GPU."""
    in_chunk = torch.zeros(step.visible, dtype=torch.uint8, device=kept.device).index_fill_(0, step.slots, 1)
    cached = in_chunk.sort(stable=True).indices[: step.visible - step.slots.numel()]
    return torch.cat([cached, step.slots[kept]]).sort().values
