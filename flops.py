"""The DiT's FLOPs in one edit, per mode: linear 2·(4d² + 2d² + 2d·ffn) per token and layer, self-attention 4·L_kv·d,
cross-attention 4·512·d (two FLOPs per multiply-add). bench.py sets them against the
measured times and the GPU's ceilings."""

import tape


def linear_flops_per_token(cfg):
    """A token's matmul FLOPs in one block: q, k, v, o and cross-attention's q, o
    (4·d² + 2·d²), the FFN (2·d·ffn), two FLOPs per multiply-add."""
    d = cfg.dim
    return 2 * (4 * d * d + 2 * d * d + 2 * d * cfg.ffn_dim)


def dit_flops(keep, mode, window, cfg, frames_per_chunk=3):
    """(linear, self-attention, cross-attention) FLOPs of one edit: 3 denoising steps
    and a memory step per chunk, each on the chunk's computed tokens."""
    d, n = cfg.dim, keep.shape[1] * keep.shape[2]
    per_token_linear = linear_flops_per_token(cfg)
    linear = attention = cross = 0
    for start in range(0, keep.shape[0], frames_per_chunk):
        end = start + frames_per_chunk
        queries = frames_per_chunk * n if mode == "full" else int(keep[start:end].sum())
        sink, recent = (0, keep.shape[0]) if window is None else window
        visible_frames = min(end, sink + recent)
        calls = 4 * cfg.num_layers
        linear += calls * queries * per_token_linear
        attention += calls * queries * 4 * visible_frames * n * d
        cross += calls * queries * 4 * 512 * d
    return linear, attention, cross


def tape_flops(latent_frames, n, cfg, tape_cfg, window, steps=3, frames_per_chunk=3):
    """(linear, self-attention, cross-attention) FLOPs of one TAPE edit, as dit_flops
    counts them: per chunk, each denoising step at its HighLow ratio (the selection
    blocks on every token, plus their importance scores; the blocks between on the
    kept tokens, attending to the cached frames and the kept ones), and a full memory step."""
    d, fpc = cfg.dim, frames_per_chunk
    per_token_linear = linear_flops_per_token(cfg)
    selections = len(tape_cfg.selection_blocks(cfg.num_layers))
    skipping = cfg.num_layers - selections
    sink, recent = (0, latent_frames) if window is None else window
    linear = attention = cross = 0
    for start in range(0, latent_frames, fpc):
        keys = min(start + fpc, sink + recent) * n  # cached frames and the chunk
        for ratio in tape.highlow_ratios(tape_cfg.ratio, steps, tape_cfg.delta) + [0.0]:  # + the memory step
            kept = fpc * (n - round(ratio * n))
            full_blocks, kept_blocks = (selections, skipping) if ratio > 0 else (cfg.num_layers, 0)
            linear += (full_blocks * fpc * n + kept_blocks * kept) * per_token_linear
            attention += full_blocks * fpc * n * 4 * keys * d + kept_blocks * kept * 4 * (keys - fpc * n + kept) * d
            cross += (full_blocks * fpc * n + kept_blocks * kept) * 4 * 512 * d
            if ratio > 0:
                attention += selections * 2 * min(tape_cfg.score_queries or fpc * n, fpc * n) * keys * d
    return linear, attention, cross
