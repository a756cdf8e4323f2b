"""The benchmark harness: its smoke mode runs (as a user runs it), its masks and FLOP
counts are right."""

import subprocess
import sys
from pathlib import Path

import torch

import demo
import flops
import model as M

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_mode_runs_every_config(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--smoke", "--markdown", str(tmp_path / "table.md")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "table.md").read_text()
    header, *rows = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    column = {name.strip(): i for i, name in enumerate(header)}
    rows = {row[0].strip(): row for row in rows if row[0].strip() != "---"}
    assert {"full", "lipar 0%", "lipar 20%", "lipar 35%", "lipar 50%", "lipar (clip mask)"} <= set(rows)
    for row in rows.values():  # the edit end to end is slower than its DiT stage alone
        dit_fps, e2e_fps = float(row[column["DiT frames/s"]]), float(row[column["end-to-end frames/s"]])
        assert float(row[column["DiT ms"]]) > 0 and e2e_fps < dit_fps


def test_coherent_masks_hit_their_ratio_and_keep_frame_0():
    for ratio in (0.0, 0.2, 0.35, 0.5):
        keep = demo.coherent_mask(21, 30, 52, ratio)
        assert keep[0].all()
        assert abs((~keep[1:]).float().mean().item() - ratio) < 0.01
    # spatially coherent: far fewer kept/pruned boundaries than independent coin flips
    keep = demo.coherent_mask(21, 30, 52, 0.35)
    edges = (keep[1:, 1:] != keep[1:, :-1]).float().mean().item()
    assert edges < 0.15


def test_dit_flops_follow_spec_section_5():
    """Full mode, 81 frames at 480x832: 7 chunks x 4 calls x 30 layers x 4680 tokens, per token
    2(4d² + 2d² + 2d·ffn) linear, 4·L_kv·d self-attention with L_kv the frames so far, 4·512·d cross."""
    cfg = M.DiTConfig()
    keep = torch.ones(21, 30, 52, dtype=torch.bool)
    linear, attention, cross = flops.dit_flops(keep, "full", None, cfg)
    d, ffn, n = 1536, 8960, 1560
    assert linear == 7 * 4 * 30 * 3 * n * 2 * (6 * d * d + 2 * d * ffn)
    assert cross == 7 * 4 * 30 * 3 * n * 4 * 512 * d
    assert attention == sum(4 * 30 * 3 * n * 4 * (3 * (c + 1) * n) * d for c in range(7))
    # the M-degree window (1, 6) caps the keys at 7 frames; pruning cuts the queries
    _, windowed, _ = flops.dit_flops(keep, "lipar", (1, 6), cfg)
    assert windowed == sum(4 * 30 * 3 * n * 4 * (min(3 * (c + 1), 7) * n) * d for c in range(7))


def test_clip_mask_row_uses_a_clip_that_prunes_like_a_real_one():
    """Neither everything nor nothing: still background pruned, moving objects and the
    pan segment (frames 10-14) kept; the authors' windows prune more than causal ones."""
    import lipar

    z = demo.realistic_latents(21, 30, 52)
    ratios = {}
    for lookahead in (0, 1):
        keep = lipar.prune_mask(z, lookahead=lookahead)
        assert keep[10:15].all()  # the pan moves every token
        ratios[lookahead] = lipar.prune_ratio(keep)
        assert 0.2 < ratios[lookahead] < 0.8
    assert ratios[1] > ratios[0]
