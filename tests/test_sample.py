"""The editing sampler and the command line, end to end on tiny random-weight models."""

import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cli
import demo
import lipar
import model as M
import sample
import video as io

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--height", "64", "--width", "112"]


def test_schedule_matches_spec():
    # Self-Forcing's editing steps [400, 350, 250] on the shift-5 table → these timesteps and sigmas
    expected = [(769.23, 0.7692), (729.17, 0.7292), (625.0, 0.625)]
    for (t, sigma), (t_spec, sigma_spec) in zip(sample.editing_schedule(), expected):
        assert abs(t - t_spec) < 0.005 and abs(sigma - sigma_spec) < 5e-5


def test_the_paper_release_steps_and_every_recipe_in_the_stats(clip, weights, tmp_path, monkeypatch, capsys):
    """--recipe paper: steps 400, 300, 250 on the shift-5 table (σ(0.3) = 1.5 / 2.2),
    named with every other choice in the summary and the JSON; its edit differs from
    the default's, and --recipe authors (no bound after the cleanup) runs too."""
    t, sigma = sample.editing_schedule(lipar.RECIPES["paper"].steps)[1]
    assert sigma == pytest.approx(1.5 / 2.2, abs=1e-12) and t == pytest.approx(681.82, abs=0.005)
    monkeypatch.chdir(tmp_path)
    edits = {}
    for recipe in ("paper", "authors", "ours"):
        assert run_cli(["--video", str(clip), "--out", f"{recipe}.mp4", "--json", f"{recipe}.json", "--recipe",
                        recipe], weights) == 0
        edits[recipe] = io.read_video(tmp_path / f"{recipe}.mp4")[0]
    printed = capsys.readouterr().out
    assert ("recipe: paper (steps 400,300,250, restoration chained, dilation t-1..t+1, no Eq. 5-6 after the cleanup, "
            "positions absolute)") in printed
    stats = json.loads((tmp_path / "paper.json").read_text())
    assert stats["recipe"] == {"name": "paper", "steps": [400, 300, 250], "restoration": "chained",
                               "dilation": "t-1..t+1", "bound_after_cleanup": False, "positions": "absolute"}
    assert json.loads((tmp_path / "ours.json").read_text())["recipe"]["bound_after_cleanup"] is True
    assert not torch.equal(edits["paper"], edits["ours"])


def write_clip(path, frames):
    io.write_video(path, frames, 24.0)
    return path


def moving_clip(count=17, height=64, width=112):
    return demo.demo_frames(height, width, count)


def noise_clip(count=17, height=64, width=112):
    return torch.randint(0, 256, (count, height, width, 3), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "ball.mp4", moving_clip())


def run_cli(args, weights):
    return cli.guarded(sample.main, [*args, "--weights", str(weights), *SIZE, "--device", "cpu"])


@pytest.mark.parametrize("mode", cli.MODES)
def test_each_mode_edits_a_clip_end_to_end(mode, clip, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, stats_file = tmp_path / f"{mode}.mp4", tmp_path / "stats.json"
    assert run_cli(["--video", str(clip), "--mode", mode, "--out", str(out), "--json", str(stats_file)], weights) == 0
    frames, fps = io.read_video(out)
    assert frames.shape == (17, 64, 112, 3) and fps == pytest.approx(24.0, rel=1e-3)
    stats = json.loads(stats_file.read_text())
    for key in ("frames", "fps", "latent_frames", "theta", "theta2", "mask_lookahead", "m", "seed", "device", "dtype",
                "peak_gpu_memory_gib", "outputs", "notes", "random_weights"):
        assert key in stats
    s = stats["modes"][mode]
    for key in ("read", "encode", "mask", "text", "dit", "decode"):
        assert s["seconds"][key] >= 0
    assert len(s["prune_ratio_per_chunk"]) == 2 and s["dit_fps"] > 0 and s["end_to_end_fps"] > 0
    assert any("padded 17 frames to 21" in note for note in stats["notes"])
    if mode == "tape":  # the HighLow budget of the default --tape-ratio 0.3, --tape-delta 0.1
        assert s["prune_ratio"] == 0.3 and s["tape"]["ratio_per_step"] == pytest.approx([0.4, 0.3, 0.2])


def test_speed_and_mask_flags_are_taken(clip, weights, tmp_path, monkeypatch, capsys):
    """--mask-lookahead reaches the mask."""
    monkeypatch.chdir(tmp_path)
    runs = {}
    for lookahead in ("0", "1"):
        args = ["--video", str(clip), "--out", f"{lookahead}.mp4", "--json", f"{lookahead}.json",
                "--mask-lookahead", lookahead]
        assert run_cli(args, weights) == 0
        runs[lookahead] = json.loads(Path(f"{lookahead}.json").read_text())
        assert runs[lookahead]["mask_lookahead"] == int(lookahead)
    assert run_cli(["--video", str(clip), "--mask-lookahead", "2"], weights) == 2
    assert "--mask-lookahead" in capsys.readouterr().err


def test_compare_and_mask_outputs(clip, weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["--video", str(clip), "--compare", "--save-mask", "--json", "s.json"], weights) == 0
    stats = json.loads(Path("s.json").read_text())
    assert set(stats["outputs"]) == {"full", "lipar", "compare", "mask"}
    side_by_side, _ = io.read_video(stats["outputs"]["compare"])
    assert side_by_side.shape == (17, 64, 3 * 112, 3)
    assert isinstance(stats["psnr_full_vs_lipar_db"], float)
    printed = capsys.readouterr().out
    assert "PSNR lipar vs full" in printed and "[lipar] pruned" in printed and "frames/s" in printed


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    dit = M.CausalWanModel(M.DiTConfig.tiny())
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.2)
    return dit.eval()


def test_static_clip_prunes_everything_and_output_repeats_the_memory():
    """Latents of a still clip (every frame identical): LIPAR prunes every token after
    frame 0, and every later output frame is the restored memory, i.e. frame 0's x0."""
    dit = tiny_dit()
    frame = torch.randn(1, 16, 1, 8, 12)
    latents = frame.expand(1, 16, 9, 8, 12).contiguous()
    keep = lipar.prune_mask(latents[0].transpose(0, 1))
    assert lipar.prune_ratio(keep) > 0.9
    with torch.no_grad():
        edited = sample.edit_latents(dit, latents, torch.randn(1, 7, 48), keep, "lipar", (1, 6), seed=0,
                                     progress=False)
    pruned = ~keep.repeat_interleave(2, 1).repeat_interleave(2, 2)
    for f in range(1, 9):
        assert torch.equal(edited[0, :, f][:, pruned[f]], edited[0, :, 0][:, pruned[f]])


def test_noise_clip_keeps_everything_and_lipar_equals_full_end_to_end(weights, tmp_path, monkeypatch):
    """Two real CLI runs; the edits (the sampler's output latents) and the decoded frames
    handed to the mp4 writer must be bit-identical.

    Not the written files: in about one full-suite run in ten, libx264 (through PyAV)
    encoded the bit-identical frames of the two runs into different H.264 streams
    (decoded back, up to 22 levels apart). Reproduced outside the suite: bit-identical
    yuv420p frames, built from buffers at different memory offsets, encoded to
    different bytes in 3 of 8 tries, single-threaded too; the cause inside the encoder
    is not pinned down.
    """
    monkeypatch.chdir(tmp_path)
    clip = write_clip(tmp_path / "noise.mp4", noise_clip())
    edits, decoded = record_edits(monkeypatch)
    for mode in ("full", "lipar"):
        window = ["--m", "all"] if mode == "lipar" else []  # full always attends to the whole cache
        assert run_cli(["--video", str(clip), "--mode", mode, *window, "--out", f"{mode}.mp4",
                        "--json", f"{mode}.json"], weights) == 0
        assert len(io.read_video(tmp_path / f"{mode}.mp4")[0]) == 17
    assert json.loads((tmp_path / "lipar.json").read_text())["modes"]["lipar"]["prune_ratio"] == 0.0
    assert torch.equal(torch.cat(edits["lipar"], dim=2), torch.cat(edits["full"], dim=2))
    assert torch.equal(torch.cat(decoded["lipar"]), torch.cat(decoded["full"]))


def record_edits(monkeypatch):
    """What the CLI's edits produce, recorded as they stream: each mode's edited latents
    (a list of chunks) and the frames handed to each output (by file stem)."""
    edits, decoded = defaultdict(list), defaultdict(list)
    edit_chunk, write = sample.ChunkEditor.__call__, io.VideoWriter.write

    def recording_edit(editor, latents, keep=None):
        edits[editor.mode].append(edit_chunk(editor, latents, keep))
        return edits[editor.mode][-1]

    def recording_write(writer, frames, times=None):
        decoded[Path(writer.target).stem].append(frames.clone())
        return write(writer, frames, times)

    monkeypatch.setattr(sample.ChunkEditor, "__call__", recording_edit)
    monkeypatch.setattr(io.VideoWriter, "write", recording_write)
    return edits, decoded


def test_same_seed_gives_bit_identical_edits(clip, weights, tmp_path, monkeypatch):
    """The same command twice with one --seed: identical latents on the CPU; another seed differs."""
    monkeypatch.chdir(tmp_path)
    runs = []
    for run, seed in enumerate(("3", "3", "4")):
        edits, _ = record_edits(monkeypatch)
        assert run_cli(["--video", str(clip), "--seed", seed, "--out", f"{run}.mp4"], weights) == 0
        runs.append(torch.cat(edits["lipar"], dim=2))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def reference_edit(dit, latents, context, seed):
    """The editing procedure written out without a KV cache: every call evaluates the whole video so
    far with the block-causal forward, earlier chunks as their clean x0 at t = 0.
    Same noise protocol as the sampler: per chunk, one draw for step 5, then a fresh one per step."""
    schedule = sample.editing_schedule()
    g = torch.Generator().manual_seed(seed)
    done = []  # clean x0 of the finished chunks
    for s in range(0, latents.shape[2], 3):
        z = latents[:, :, s:s + 3]
        x_c = (1 - schedule[0][1]) * z + schedule[0][1] * torch.randn(z.shape, generator=g)
        for i, (t, sigma) in enumerate(schedule):
            video = torch.cat([*done, x_c], dim=2)
            timesteps = torch.tensor([[0.0] * s + [t] * 3])
            v = dit(video, timesteps, context)[:, :, s:]
            x0 = x_c - sigma * v
            if i + 1 < len(schedule):
                x_c = (1 - schedule[i + 1][1]) * x0 + schedule[i + 1][1] * torch.randn(x0.shape, generator=g)
        done.append(x0)
    return torch.cat(done, dim=2)


def test_full_mode_matches_the_spec_loop_without_a_cache():
    dit = tiny_dit(1)
    torch.manual_seed(2)
    latents, context = torch.randn(1, 16, 9, 4, 6), torch.randn(1, 7, 48)
    keep = torch.ones(9, 2, 3, dtype=torch.bool)
    with torch.no_grad():
        got = sample.edit_latents(dit, latents, context, keep, "full", None, seed=3, progress=False)
        expected = reference_edit(dit, latents, context, seed=3)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


# ---- bad input: one sentence, the right exit code, the input untouched ----


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_missing_file_and_non_video(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["--video", "nowhere.mp4"], weights) == 2
    assert "does not exist" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    before = digest(text)
    assert run_cli(["--video", str(text)], weights) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert digest(text) == before


def test_missing_and_mismatched_weights(clip, tmp_path, capsys):
    assert cli.guarded(sample.main, ["--video", str(clip), "--weights", str(tmp_path / "none")]) == 2
    assert "weights.md" in capsys.readouterr().err
    assert cli.guarded(sample.main, ["--check-weights", "--weights", str(tmp_path / "none")]) == 2
    capsys.readouterr()
    # a weights folder whose DiT lacks a tensor
    weights = demo.write_random_weights(tmp_path / "broken")
    dit_file = weights / "dit" / "model.safetensors"
    tensors = load_file(str(dit_file))
    del tensors["blocks.0.self_attn.q.weight"]
    save_file(tensors, str(dit_file))
    assert cli.guarded(sample.main, ["--check-weights", "--weights", str(weights)]) == 2
    assert "missing 1: blocks.0.self_attn.q.weight" in capsys.readouterr().err


def test_check_weights_passes_on_a_complete_folder(weights, capsys):
    assert cli.guarded(sample.main, ["--check-weights", "--weights", str(weights)]) == 0
    assert "as expected" in capsys.readouterr().out


def test_short_clip_odd_size_and_existing_output(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    short = write_clip(tmp_path / "short.mp4", moving_clip(count=5, height=50, width=90))
    before = digest(short)
    args = ["--video", str(short), "--mode", "lipar", "--height", "60", "--width", "100", "--device", "cpu",
            "--weights", str(weights), "--out", "edited.mp4"]
    assert cli.guarded(sample.main, args) == 0
    printed = capsys.readouterr().out
    assert "padded 5 frames to 9" in printed and "not a multiple of 16; using 64" in printed
    assert io.read_video(tmp_path / "edited.mp4")[0].shape == (5, 64, 96, 3)
    assert cli.guarded(sample.main, args) == 2  # the output now exists
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.guarded(sample.main, [*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert cli.guarded(sample.main, [*args[:-1], str(short), "--overwrite"]) == 2  # never over the input
    assert "is the input video" in capsys.readouterr().err
    assert digest(short) == before


@pytest.mark.parametrize("flags,named", [
    (["--m", "0,0"], "--m 0,0"),
    (["--m", "1,2"], "--m 1,2"),
    (["--theta", "nan"], "--theta nan"),
    (["--theta", "-1"], "--theta -1"),
    (["--theta2", "nan"], "--theta2 nan"),
    (["--height", "0"], "--height 0"),
    (["--width", "-16"], "--width -16"),
    (["--out", "edited.txt"], "--out edited.txt"),
    (["--text-device", "gpu7"], "--text-device 'gpu7'"),
    (["--mode", "tape", "--tape-ratio", "1.2"], "--tape-ratio 1.2"),
    (["--mode", "tape", "--tape-alpha", "nan"], "--tape-alpha nan"),
    (["--mode", "tape", "--tape-every", "0"], "--tape-every 0"),
    (["--mode", "tape", "--tape-selections", "0"], "--tape-selections 0 is not a count"),
    (["--mode", "tape", "--tape-selections", "5", "--tape-every", "6"], "--tape-every and --tape-selections both"),
    (["--recipe", "paper2"], "argument --recipe: invalid choice: 'paper2'"),
    (["--prompt", " "], "--prompt is empty; say what the edited video should show"),
    (["--device", "cpu:3"], "--device 'cpu:3': the CPU takes no number; give cpu"),
])
def test_bad_flags_are_refused_before_any_work(flags, named, clip, weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.guarded(sample.main, ["--video", str(clip), "--weights", str(weights), "--device", "cpu", *SIZE, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named}") and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing read, loaded or written


@pytest.mark.parametrize("flags,named", [
    (["--mode", "full", "--m", "1,6"], "--m sets the M-degree window"),
    (["--mode", "full", "--theta", "0.2"], "--theta sets LIPAR's mask, which --mode full does not compute"),
    (["--mode", "tape", "--theta2", "0.5", "--mask-lookahead", "0"], "--mask-lookahead, --theta2 set LIPAR's mask"),
    (["--tape-alpha", "0.3"], "--tape-alpha only applies to --mode tape"),
    (["--tape-selections", "5"], "--tape-selections only applies to --mode tape"),
    (["--mode", "naive", "--tape-ratio", "0.2", "--tape-every", "5"], "--tape-every, --tape-ratio only apply"),
    (["--compare", "--mode", "tape"], "--compare runs full and lipar side by side; drop --mode tape"),
    (["--prune-ratio", "0.3"], "unrecognized arguments: --prune-ratio"),
    (["--manifest", "jobs.jsonl"], "unrecognized arguments: --manifest"),
    (["--no-graphs"], "--no-graphs only changes how the models run on CUDA, and --device is cpu: drop it"),
    (["--fusion", "off"], "--fusion only changes how the models run on CUDA, and --device is cpu: drop it"),
    (["--fusion", "compile", "--no-graphs"], "--fusion, --no-graphs only change how the models run on CUDA"),
])
def test_flags_without_effect_in_the_mode_are_refused(flags, named, clip, weights, tmp_path, monkeypatch, capsys):
    """A flag the chosen mode would silently ignore is refused in one sentence, before any work."""
    monkeypatch.chdir(tmp_path)
    assert cli.guarded(sample.main, ["--video", str(clip), "--weights", str(weights), "--device", "cpu", *SIZE,
                                     *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_mask_flags_are_taken_by_full_when_it_saves_the_mask(clip, weights, tmp_path, monkeypatch):
    """--save-mask computes LIPAR's mask in any mode, so θ means something under full too."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(["--video", str(clip), "--mode", "full", "--save-mask", "--theta", "0.2", "--json", "s.json"],
                   weights) == 0
    stats = json.loads(Path("s.json").read_text())
    assert stats["theta"] == 0.2 and set(stats["outputs"]) == {"full", "mask"}


def test_cuda_asked_for_where_there_is_none(clip, weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.guarded(sample.main, ["--video", str(clip), "--weights", str(weights), "--device", "cuda"]) == 2
    assert "no usable CUDA GPU; give cpu" in capsys.readouterr().err


def test_every_problem_is_reported_at_once_and_the_video_before_the_weights(tmp_path, capsys):
    assert cli.guarded(sample.main, ["--video", str(tmp_path / "missing.mp4"), "--weights", str(tmp_path / "none"),
                       "--theta", "nan", "--m", "0,0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 problems: (1) --theta nan") and "(3) the video" in err
    assert "weights" not in err  # the cheap local checks come first; the weights are looked at after


def test_output_folder_that_cannot_be_made(clip, weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file where the output folder would go")
    assert run_cli(["--video", str(clip), "--out", "taken/edited.mp4"], weights) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create the output folder taken") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["misshaped", "truncated"])
def test_damaged_weights_are_named_in_one_sentence(damage, clip, tmp_path, monkeypatch, capsys):
    """A DiT tensor of the wrong shape, or a DiT file cut short by an interrupted download."""
    monkeypatch.chdir(tmp_path)
    weights = demo.write_random_weights(tmp_path / "weights")
    dit_file = weights / "dit" / "model.safetensors"
    if damage == "misshaped":
        tensors = load_file(str(dit_file))
        tensors["head.head.weight"] = tensors["head.head.weight"][:, :-1].contiguous()
        save_file(tensors, str(dit_file))
    else:
        dit_file.write_bytes(dit_file.read_bytes()[: dit_file.stat().st_size // 2])
    assert run_cli(["--video", str(clip), "--out", "edited.mp4"], weights) == 2
    err = capsys.readouterr().err
    expected = "mis-shaped 1: head.head.weight" if damage == "misshaped" else "is not a readable safetensors file"
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "edited.mp4").exists()


def test_ctrl_c_keeps_every_finished_chunk_in_a_playable_file_and_says_so(weights, tmp_path):
    """A real interrupt (SIGINT) once the first chunk is written, in a subprocess: exit
    code 130, one line naming the file, which holds whole chunks (9 frames, then 12 each)."""
    import signal

    clip = write_clip(tmp_path / "long.mp4", moving_clip(57))
    out = tmp_path / "out" / "edited.mp4"
    process = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--video", str(clip), "--weights",
                                str(weights), "--height", "64", "--width", "112", "--device", "cpu",
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path)
    seen = ""
    while " 9/57 " not in seen:  # the progress bar: the first chunk is written
        char = process.stderr.read(1)
        assert char, f"sample.py ended before its first chunk was written: {seen}"
        seen += char
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "frame/s" not in line
             and "?frame" not in line]
    assert process.returncode == 130, seen + err
    [line] = lines
    frames = len(io.read_video(out)[0])
    assert frames in (9, 21, 33, 45) and line == (f"interrupted: {out} holds the {frames} edited frames finished so "
                                                  f"far (every finished chunk, playable)")
    assert sorted(p.name for p in out.parent.iterdir()) == ["edited.mp4"]  # no partial file left beside it


def test_entry_point_reports_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--video", str(tmp_path / "missing.mp4"),
                             "--weights", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def buffered(**variables):
    """The environment with `variables` and print() buffering as it does by default (no
    PYTHONUNBUFFERED): what a process prints to a pipe stays in its buffer until flushed."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, **variables}


def test_demo_without_arguments_runs_end_to_end(tmp_path):
    """`python sample.py` on a fresh machine: generated clip, random models, every output. The
    entry point ends the process at once (signals.exit_at_once): what it printed to a pipe
    still arrives, and the random weights it wrote to the temporary folder are gone."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--height", "64", "--width", "112", "--device",
                             "cpu"], capture_output=True, text=True, cwd=tmp_path,
                            env=buffered(TMPDIR=str(temporary)))
    assert result.returncode == 0, result.stderr
    assert "RANDOM-weight models" in result.stdout and "pixels are not an edit" in result.stdout
    assert result.stdout.rstrip().endswith(f"wrote mask: {Path('results') / 'demo_input_mask.mp4'}")
    for kind in ("input", "input_full", "input_lipar", "input_compare", "input_mask"):
        frames, fps = io.read_video(tmp_path / "results" / f"demo_{kind}.mp4")
        assert len(frames) == demo.DEMO_FRAMES and fps == pytest.approx(demo.DEMO_FPS)
    assert [p.name for p in temporary.iterdir() if not p.name.startswith("torchinductor_")] == []  # torch's cache stays


def test_exit_at_once_flushes_what_was_printed_and_keeps_the_code(tmp_path):
    code = "import signals, sys; print('printed last'); sys.stderr.write('and an error'); signals.exit_at_once(3)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=buffered())
    assert (result.returncode, result.stdout, result.stderr) == (3, "printed last\n", "and an error")
    # the reader is gone before the flush: nothing more can be said, and no traceback either
    closed = subprocess.run(f'"{sys.executable}" -c "import signals, time; print(1); time.sleep(0.5); '
                            'signals.exit_at_once(0)" | true; echo "${PIPESTATUS[0]}"', shell=True,
                            executable="/bin/bash", capture_output=True, text=True, cwd=ROOT,
                            env=buffered())
    assert (closed.stdout, closed.stderr) == ("0\n", ""), closed


def test_half_precision_on_the_cpu_is_noted_at_once(capsys):
    """bfloat16 and float16 run through PyTorch's slow CPU fallbacks: said before any work."""
    for dtype in ("bfloat16", "float16"):
        cli.parse(["--device", "cpu", "--dtype", dtype])
        assert capsys.readouterr().err.startswith(f"note: --dtype {dtype} on the CPU runs through PyTorch's slow")
    cli.parse(["--device", "cpu", "--dtype", "float32"])
    assert capsys.readouterr().err == ""
