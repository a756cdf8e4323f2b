"""The benchmark harness: its smoke mode runs (as a user runs it), its masks and FLOP
counts are right."""

import json
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


def _targets(tmp_path, *flags):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), "--smoke", "--targets", *flags],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_targets_table_says_met_or_not_from_the_figures(tmp_path):
    """A figures file with every group, made by hand around each threshold: the table
    reads it without measuring anything again (the file stays as it was) and marks each
    target as the hand-checked numbers say."""
    def group(**figures):
        return {"device": "hand-made", "date": "2026-12-06 00:00 UTC", "figures": figures}
    dit = {"dit_ms triton lipar 35%": 900, "dit_ms triton full": 1600, "dit_ms off lipar 35%": 1400,
           "dit_ms off full": 2450, "dit_ms compile lipar 35%": 880, "dit_ms compile full": 1500,  # 98 %, 94 %
           "dit_ms triton + fp8 lipar 35%": 800, "dit_ms triton + fp8 full": 1500, "kernel_load_s": 0.5,
           "kernel_load_each_s": [0.4, 1.7, 0.5]}  # the median of three processes decides
    resident = [1.0, 1.3, 1.6, 1.9, 2.1, 2.2] + [2.30, 2.35, 2.31, 2.34, 2.30, 2.33]  # flat from chunk 7
    live_run = lambda switch, page, cli: {"cli_fps": cli, "page_fps": page, "switch_ms": switch,  # noqa: E731
                                          "chunk_latency_ms": 72.0, "chunk_period_ms": 160.0}
    groups = {
        "kernels": group(**dit), "floor": group(floor_ms=100.0),
        "recache": group(**{"recache lipar": {"ms": 69.0, "forwards": 2.13}, "recache full": {"ms": 230.0, "forwards": 3.2}}),
        "vae": group(wan_vae_s=1.30, wan_vae_vs_peer=2.1),
        "edit": group(**{"whole_fps Wan VAE": 36.0, "whole_fps tiny VAE": 76.0, "streamed_fps Wan VAE": 31.0,
                         "streamed_fps tiny VAE": 69.0}),
        "cli": group(cli_second_s=4.0, cli_steady_s=1.5),
        "compare": group(**{f"compare {label}": {"gpu_peak_gib": peak, "resident_gib": resident, "write_share": share}
                            for label, peak, share in (("lipar alone", 10.6, 0.02), ("full alone", 14.5, 0.01),
                                                       ("--compare --save-mask", 18.5, 0.12))}),
        # tiny: every change within 160 + 69 + 72 = 301 ms; Wan: the last one past it
        "live": group(**{"live tiny": live_run([80.0, 50.0, 240.0], 150.0, 94.0),
                         "live wan": live_run([210.0, 250.0, 302.0], 50.0, 54.0)}),
    }
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps(groups))
    before = figures.read_bytes()
    done = _targets(tmp_path, "--figures", str(figures))
    assert done.returncode == 0, done.stderr
    assert figures.read_bytes() == before  # every group was there: nothing measured, nothing rewritten
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in done.stdout.splitlines()]
    met = [cells[2] for cells in rows if len(cells) == 3 and cells[2] in ("yes", "no")]
    assert met == ["yes",  # DiT 900 / 1600 within 940 / 1700
                                  "no",   # compile's full at 94 % of Triton's speed
                                  "yes",  # kernels load in 0.5 s (one process in 1.7 s)
                                  "yes",  # whole clip 36 / 76 f/s
                                  "no",   # the tiny VAE's stream at 69 f/s
                                  "yes",  # the VAE 1.30 s, 2.1x
                                  "no",   # 4.0 / 1.5 s = 2.7x
                                  "no",   # --compare 18.5 GiB
                                  "yes",  # resident memory flat from chunk 7
                                  "no",   # writing 12 % with --compare
                                  "yes",  # the floor 100 ms
                                  "no",   # fp8 900 / 800 = 1.125x
                                  "no",   # the re-cache 2.13 forwards
                                  "no",   # Wan's third change 302 ms against 301
                                  "yes"], met  # the page 160 % / 93 %
    assert "| 0.50 s (0.40, 1.70, 0.50) |" in done.stdout
    assert "4.00 s against 1.50 s: 2.7×" in done.stdout and "| 1.12× |" in done.stdout
    assert "wan: 210, 250, 302 ms against 301" in done.stdout


def test_targets_flags_are_checked_first(tmp_path):
    alone = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--smoke", "--figures", "f.json"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert alone.returncode == 2 and "add --targets" in alone.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('["not", "figures"]')
    done = _targets(tmp_path, "--figures", str(broken))
    assert done.returncode == 2 and "not the JSON file a --targets run writes" in done.stderr
    assert broken.read_text() == '["not", "figures"]'
    done = _targets(tmp_path, "--peer-vae", str(tmp_path / "missing.py"))
    assert done.returncode == 2 and "is not a file" in done.stderr


def test_targets_run_measures_the_smoke_group_and_keeps_it(tmp_path):
    figures = tmp_path / "figures.json"
    done = _targets(tmp_path, "--figures", str(figures))
    assert done.returncode == 0, done.stderr
    groups = json.loads(figures.read_text())
    assert list(groups) == ["recache"] and groups["recache"]["device"] == "CPU (smoke)"
    assert groups["recache"]["figures"]["recache lipar"]["forwards"] > 0
    assert "not measured (kernels)" in done.stdout
    assert [line for line in done.stdout.splitlines() if line.startswith("| a prompt switch")][0].endswith(
        ("| yes |", "| no |"))
