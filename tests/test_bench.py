"""The benchmark harness: its smoke mode runs, its masks and FLOP counts are right."""

import torch

import bench
import model as M


def test_smoke_mode_runs_every_config(tmp_path):
    results = bench.main(["--smoke", "--markdown", str(tmp_path / "table.md")])
    assert {"full", "lipar 0%", "lipar 20%", "lipar 35%", "lipar 50%", "lipar (clip mask)"} <= set(results)
    assert all(r["dit_ms"] > 0 and r["e2e_ms"] > r["dit_ms"] for r in results.values())
    assert "| lipar 35% |" in (tmp_path / "table.md").read_text()


def test_coherent_masks_hit_their_ratio_and_keep_frame_0():
    for ratio in (0.0, 0.2, 0.35, 0.5):
        keep = bench.coherent_mask(21, 30, 52, ratio)
        assert keep[0].all()
        assert abs((~keep[1:]).float().mean().item() - ratio) < 0.01
    # spatially coherent: far fewer kept/pruned boundaries than independent coin flips
    keep = bench.coherent_mask(21, 30, 52, 0.35)
    edges = (keep[1:, 1:] != keep[1:, :-1]).float().mean().item()
    assert edges < 0.15


def test_dit_flops_follow_spec_section_5():
    """Full mode, 81 frames at 480x832: 7 chunks x 4 calls x 30 layers x 4680 tokens, per token
    2(4d² + 2d² + 2d·ffn) linear, 4·L_kv·d self-attention with L_kv the frames so far, 4·512·d cross."""
    cfg = M.DiTConfig()
    keep = torch.ones(21, 30, 52, dtype=torch.bool)
    linear, attention, cross = bench.dit_flops(keep, "full", None, cfg)
    d, ffn, n = 1536, 8960, 1560
    assert linear == 7 * 4 * 30 * 3 * n * 2 * (6 * d * d + 2 * d * ffn)
    assert cross == 7 * 4 * 30 * 3 * n * 4 * 512 * d
    assert attention == sum(4 * 30 * 3 * n * 4 * (3 * (c + 1) * n) * d for c in range(7))
    # the M-degree window (1, 6) caps the keys at 7 frames; pruning cuts the queries
    _, windowed, _ = bench.dit_flops(keep, "lipar", (1, 6), cfg)
    assert windowed == sum(4 * 30 * 3 * n * 4 * (min(3 * (c + 1), 7) * n) * d for c in range(7))


def test_clip_mask_row_uses_a_clip_that_prunes_like_a_real_one():
    """Neither everything nor nothing: still background pruned, moving objects and the
    pan segment (frames 10-14) kept; the authors' windows prune more than causal ones."""
    import lipar

    z = bench.realistic_latents(21, 30, 52)
    ratios = {}
    for lookahead in (0, 1):
        keep = lipar.prune_mask(z, lookahead=lookahead)
        assert keep[10:15].all()  # the pan moves every token
        ratios[lookahead] = lipar.prune_ratio(keep)
        assert 0.2 < ratios[lookahead] < 0.8
    assert ratios[1] > ratios[0]
