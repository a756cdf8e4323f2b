"""Batches and the evaluation (evaluate.py, metrics.py): PSNR and SSIM against hand
cases and a float64 loop over windows; a manifest with a broken clip and bad lines;
models loaded once; reruns that skip finished jobs; torchrun over two gloo processes
giving the single process's report."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import demo
import evaluate
import metrics
import sample
import video as io
import weights as W

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--height", "64", "--width", "112"]
TIMING = {"dit_seconds", "dit_fps", "end_to_end_fps", "dit_speedup", "peak_gpu_memory_gib", "peak_host_memory_gib"}


# -----------------------------------------------------------------------------
# PSNR and SSIM


def test_psnr_hand_cases():
    assert metrics.psnr(0) == float("inf")
    assert metrics.psnr(1) == pytest.approx(20 * math.log10(255))  # 48.13 dB
    assert metrics.psnr(255 ** 2) == pytest.approx(0)


def test_ssim_of_flat_frames_is_the_luminance_term():
    """Flat frames have no variance: SSIM = (2ab + C1) / (a² + b² + C1), the contrast term 1."""
    a = torch.full((2, 20, 20, 3), 100, dtype=torch.uint8)
    b = torch.full((2, 20, 20, 3), 110, dtype=torch.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1)
    assert torch.allclose(metrics.ssim(a, b).double(), torch.tensor([expected] * 2, dtype=torch.float64),
                          atol=1e-5)  # float32
    assert torch.allclose(metrics.ssim(a, a), torch.ones(2))


def ssim_by_windows(a, b, size=11, sigma=1.5, peak=255.0):
    """SSIM in float64 the long way: the 2D Gaussian weights built whole, and for every
    window position, channel and frame the weighted moments summed explicitly."""
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    weights = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma ** 2))
    weights /= weights.sum()
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    scores = []
    for t in range(a.shape[0]):
        values = []
        for c in range(a.shape[3]):
            x, y = a[t, :, :, c].double(), b[t, :, :, c].double()
            for i in range(x.shape[0] - size + 1):
                for j in range(x.shape[1] - size + 1):
                    wx, wy = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
                    mx, my = (weights * wx).sum(), (weights * wy).sum()
                    vx, vy = (weights * (wx - mx) ** 2).sum(), (weights * (wy - my) ** 2).sum()
                    cov = (weights * (wx - mx) * (wy - my)).sum()
                    values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        scores.append(torch.stack(values).mean())
    return torch.stack(scores)


def test_ssim_matches_a_float64_loop_over_windows():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 16, 19, 3), generator=g, dtype=torch.uint8)
    noise = torch.randint(-40, 41, a.shape, generator=g)
    b = (a.int() + noise).clamp(0, 255).to(torch.uint8)
    b[1, :8] = a[1, :8]  # one half identical: a different score per frame
    ours, reference = metrics.ssim(a, b).double(), ssim_by_windows(a, b)
    assert 0.2 < reference.min() and reference.max() < 0.99  # a case far from both ends
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)


def test_fidelity_over_chunks_equals_the_whole_clip_and_a_recorded_reference():
    g = torch.Generator().manual_seed(1)
    frames_full = torch.randint(0, 256, (7, 16, 16, 3), generator=g, dtype=torch.uint8)
    frames_lipar = (frames_full.int() + torch.randint(-9, 10, frames_full.shape, generator=g)).clamp(0, 255) \
        .to(torch.uint8)
    latents_full, latents_lipar = torch.randn(1, 4, 5, 4, 4, generator=g), torch.randn(1, 4, 5, 4, 4, generator=g)
    recorded = []
    fidelity = metrics.Fidelity(reference=recorded)
    for frames, latents in ((slice(0, 3), slice(0, 2)), (slice(3, 7), slice(2, 5))):  # chunks of unequal length
        fidelity.add({"full": latents_full[:, :, latents], "lipar": latents_lipar[:, :, latents]},
                     {"full": frames_full[frames], "lipar": frames_lipar[frames]})
    mse = (frames_full.double() - frames_lipar.double()).pow(2).mean().item()
    expected = {"psnr_db": 10 * math.log10(255 ** 2 / mse),
                "ssim": ssim_by_windows(frames_full, frames_lipar).mean().item(),
                "latent_rel_error": ((latents_lipar - latents_full).norm() / latents_full.norm()).item()}
    assert fidelity.stats()["lipar"] == pytest.approx(expected, rel=1e-5)
    later = metrics.Fidelity(reference=recorded)  # a sweep's run: no `full` beside it
    later.add({"lipar": latents_lipar[:, :, :2]}, {"lipar": frames_lipar[:3]})
    later.add({"lipar": latents_lipar[:, :, 2:]}, {"lipar": frames_lipar[3:]})
    assert later.stats() == fidelity.stats()


# -----------------------------------------------------------------------------
# The manifest


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three good clips (the ball rolling, a still frame, noise) and a broken one."""
    folder = tmp_path_factory.mktemp("clips")
    ball = demo.demo_frames(64, 112, 17)
    noise = torch.randint(0, 256, (9, 64, 112, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    io.write_video(folder / "ball.mp4", ball, 16)
    io.write_video(folder / "still.mp4", ball[:1].expand(13, -1, -1, -1), 16)
    io.write_video(folder / "noise.mp4", noise, 16)
    (folder / "broken.mp4").write_bytes(b"not a video at all" * 50)
    return folder


def write_manifest(path, clips, extra=()):
    lines = [{"video": str(clips / "ball.mp4"), "prompt": "a red ball"},
             {"video": str(clips / "broken.mp4"), "prompt": "a red ball"},
             {"video": str(clips / "still.mp4"), "prompt": "a still table", "seed": 3},
             {"video": str(clips / "noise.mp4"), "prompt": "a red ball", "name": "static"}, *extra]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def count_loads(monkeypatch):
    calls = {"dit": 0, "vae": 0, "text_encoder": 0}

    def counted(name, loader):
        def load(*args, **kwargs):
            calls[name] += 1
            return loader(*args, **kwargs)
        return load
    monkeypatch.setattr(W, "load_dit", counted("dit", W.load_dit))
    monkeypatch.setattr(W, "load_tiny_vae", counted("vae", W.load_tiny_vae))
    monkeypatch.setattr(W, "load_text_encoder", counted("text_encoder", W.load_text_encoder))
    return calls


def run_eval(manifest, weights, out, *flags):
    return cli.guarded(evaluate.main, ["--manifest", str(manifest), "--eval", "--weights", str(weights), "--device", "cpu",
                       "--vae", "tiny", "--out", str(out), *SIZE, *flags])


def test_manifest_eval_report_loads_once_and_rerun_skips(clips, weights, tmp_path, monkeypatch, capsys):
    manifest = write_manifest(tmp_path / "jobs.jsonl", clips)
    calls = count_loads(monkeypatch)
    out = tmp_path / "results"
    assert run_eval(manifest, weights, out, "--sweep-theta", "0.1", "0.149") == 1  # a job failed
    assert calls == {"dit": 1, "vae": 1, "text_encoder": 1}  # two distinct prompts, one load
    printed = capsys.readouterr().out
    assert "3 of 4 jobs edited" in printed and "line 2:" in printed
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["clips"]] == ["ball", "still", "static"]
    assert [f["line"] for f in report["failed"]] == [2] and "broken.mp4" in report["failed"][0]["error"]
    for clip in report["clips"]:
        assert set(clip["modes"]) == {"full", "lipar"}
        lipar_stats = clip["modes"]["lipar"]
        for key in ("prune_ratio", "prune_ratio_per_chunk", "prune_ratio_per_frame", "dit_fps", "end_to_end_fps",
                    "dit_speedup"):
            assert lipar_stats[key] is not None, key
        assert set(lipar_stats["fidelity_to_full"]) == {"psnr_db", "ssim", "latent_rel_error"}
        assert clip["peak_host_memory_gib"] > 0
        assert [p["theta"] for p in clip["sweep"]] == [0.1, 0.149]
    by_name = {c["name"]: c["modes"]["lipar"] for c in report["clips"]}
    # noise: nothing repeats, so nothing is pruned and LIPAR is the full edit exactly
    assert by_name["static"]["prune_ratio"] == 0
    assert by_name["static"]["fidelity_to_full"] == {"psnr_db": float("inf"), "ssim": 1.0, "latent_rel_error": 0.0}
    assert by_name["still"]["prune_ratio"] > 0.9 and by_name["ball"]["prune_ratio"] < by_name["still"]["prune_ratio"]
    assert 0 < by_name["ball"]["fidelity_to_full"]["latent_rel_error"]
    # the sweep's point at the job's own θ reproduces the side-by-side lipar edit (same noise, same mask)
    sweep_default = next(p for p in report["clips"][0]["sweep"] if p["theta"] == 0.149)
    assert sweep_default["prune_ratio"] == by_name["ball"]["prune_ratio"]
    assert sweep_default["fidelity_to_full"] == pytest.approx(by_name["ball"]["fidelity_to_full"])
    md = (out / "report.md").read_text()
    assert "| ball | a red ball | 17 | lipar |" in md and "line 2:" in md and "## Sweep" in md
    assert "Recipe: ours (steps 400,350,250" in md and report["videos"] == {}  # one job per video
    for name in report["plots"]:
        assert name in md and (out / name).read_bytes()[:4] == b"\x89PNG"
    assert set(report["plots"]) == {"prune_ratio_per_frame.png", "speedup_vs_prune_ratio.png",
                                    "fidelity_vs_theta.png"}

    # a rerun skips the finished jobs (no model is touched) and writes the same report
    def no_edit(*args, **kwargs):
        raise AssertionError("a finished job was edited again")
    monkeypatch.setattr(sample, "edit_video", no_edit)
    assert run_eval(manifest, weights, out, "--sweep-theta", "0.1", "0.149") == 1
    assert "finished before, skipped" in capsys.readouterr().out
    again = json.loads((out / "report.json").read_text())
    assert again["clips"] == report["clips"] and calls["dit"] == 1


def test_report_with_tape_and_without_matplotlib_says_how_to_get_plots(clips, weights, tmp_path, monkeypatch):
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"video": str(clips / "noise.mp4"), "prompt": "x"}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert run_eval(manifest, weights, tmp_path / "r", "--eval-modes", "full", "lipar", "tape") == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "pip install matplotlib" in md and "| tape | 30.0% |" in md  # TAPE in the report, at its ratio
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["plots"] is None and report["overall"]["tape"]["fidelity_to_full"]["psnr_db"] < float("inf")


def test_bad_lines_are_named_with_their_line_numbers(clips, tmp_path):
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text("video,prompt,seed,mode,colour\n"
                        f"{clips / 'ball.mp4'},a ball,1,lipar,\n"          # line 2: good
                        f"{clips / 'ball.mp4'},,1,lipar,\n"                # 3: no prompt
                        f"{clips / 'ball.mp4'},a ball,one,lipar,\n"        # 4: seed not a number
                        f"{clips / 'ball.mp4'},a ball,1,lipar,red\n"       # 5: unknown field
                        f"missing.mp4,a ball,1,lipar,\n"                   # 6: no such file
                        f"{clips / 'ball.mp4'},a ball,1,sharp,\n"          # 7: no such mode
                        f"ball.mp4,a ball,2,full,\n"                       # 8: relative to the manifest: good
                        f"{clips / 'ball.mp4'},   ,1,lipar,\n")             # 9: a blank prompt
    (tmp_path / "ball.mp4").write_bytes((clips / "ball.mp4").read_bytes())
    base = evaluate.parser().parse_args(["--manifest", str(csv_path)])
    jobs, failures = evaluate.read_manifest(csv_path, base, ["lipar"], tmp_path / "out")
    assert [(j.line, j.name) for j in jobs] == [(2, "ball"), (8, "ball_2")]
    assert jobs[1].video == str(tmp_path / "ball.mp4") and jobs[1].settings.modes == ["full"]
    assert jobs[0].out == str(tmp_path / "out" / "ball.mp4") and jobs[0].settings.seed == 1
    errors = {f["line"]: f["error"] for f in failures}
    assert sorted(errors) == [3, 4, 5, 6, 7, 9]
    assert "no prompt" in errors[3] and "no prompt" in errors[9] and "seed 'one'" in errors[4] and "'colour'" in errors[5]
    assert "missing.mp4 does not exist" in errors[6] and "'sharp'" in errors[7]

    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text('{"video": "ball.mp4", "prompt": "p", "modes": "lipar naive"}\n\n# a comment\n{oops\n[1]\n'
                     '{"video": "ball.mp4", "video_path": "ball.mp4", "prompt": "p"}\n')
    jobs, failures = evaluate.read_manifest(jsonl, base, ["lipar"], tmp_path / "out")
    assert jobs == [] and [f["line"] for f in failures] == [1, 4, 5, 6]
    assert "full among them" in failures[0]["error"] and "not JSON" in failures[1]["error"]
    assert failures[3]["error"] == "both video and video_path; give one of them"
    typed = tmp_path / "typed.jsonl"  # JSON's types are checked, not converted: 1.7 is no seed, 123 no path
    typed.write_text("".join(json.dumps(r) + "\n" for r in [
        {"video": 123, "prompt": "p"}, {"video": "ball.mp4", "prompt": "p", "out": 5},
        {"video": "ball.mp4", "prompt": "p", "seed": 1.7}, {"video": "ball.mp4", "prompt": "p", "seed": True},
        {"video": "ball.mp4", "prompt": ["p"]}, {"video": "ball.mp4", "prompt": "p", "m": [1, 6.5]},
        {"video": "ball.mp4", "prompt": "p", "theta": False},
        {"video": "ball.mp4", "prompt": "p", "seed": "3", "m": [1, 6], "theta": "0.2", "out": None}]))
    jobs, failures = evaluate.read_manifest(typed, base, ["lipar"], tmp_path / "out")
    assert [(j.line, j.settings.seed, j.settings.window, j.settings.theta) for j in jobs] == [(8, 3, (1, 6), 0.2)]
    assert [f["error"] for f in failures] == [
        "video 123 is not text; write it as a JSON string, in quotes",
        "out 5 is not text; write it as a JSON string, in quotes",
        "seed 1.7 is not a whole number", "seed True is not a whole number",
        "prompt ['p'] is not text; write it as a JSON string, in quotes",
        "m [1, 6.5] is not a window SINK,RECENT", "theta False is not a number"]
    array = tmp_path / "jobs.json"  # a .json may also hold one array of jobs
    array.write_text(json.dumps([{"video_path": "ball.mp4", "prompt": "p"}, "not a job"]))
    jobs, failures = evaluate.read_manifest(array, base, ["lipar"], tmp_path / "out")
    assert [(j.line, j.video) for j in jobs] == [(1, str(tmp_path / "ball.mp4"))] and [f["line"] for f in failures] == [2]


def test_the_authors_evaluation_list_runs_as_published(clips, weights, tmp_path, capsys):
    """A davis_prompt.json in the authors' layout (JSON lines of video_path and prompt,
    paths from their repository's root, several prompts per clip; made-up lines here)
    runs unchanged with --root: unique job names, a row per clip and prompt, and a
    table per video over its prompts."""
    repo = tmp_path / "lipar_repo"
    (repo / "data" / "davis_eval_proc").mkdir(parents=True)
    for name in ("ball", "still"):
        (repo / "data" / "davis_eval_proc" / f"{name}.mp4").write_bytes((clips / f"{name}.mp4").read_bytes())
    lines = [("ball", "a ball of wool"), ("ball", "a glass marble"), ("ball", "an orange"), ("still", "a snowy table")]
    manifest = repo / "data" / "davis_prompt.json"
    manifest.write_text("".join(json.dumps({"video_path": f"data/davis_eval_proc/{clip}.mp4", "prompt": prompt}) + "\n"
                                for clip, prompt in lines))
    base = evaluate.parser().parse_args(["--manifest", str(manifest)])
    jobs, failures = evaluate.read_manifest(manifest, base, ["full", "lipar"], tmp_path / "out")
    assert jobs == [] and "relative path starts from the manifest's folder; --root sets another" in failures[0]["error"]
    out = tmp_path / "results"
    assert run_eval(manifest, weights, out, "--root", str(repo)) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(c["name"], c["prompt"]) for c in report["clips"]] == [
        ("ball", "a ball of wool"), ("ball_2", "a glass marble"), ("ball_3", "an orange"), ("still", "a snowy table")]
    videos = report["videos"]
    assert [v["jobs"] for v in videos.values()] == [["ball", "ball_2", "ball_3"], ["still"]]
    ball = videos[str(repo / "data" / "davis_eval_proc" / "ball.mp4")]["modes"]["lipar"]
    assert ball["prune_ratio"] == pytest.approx(sum(c["modes"]["lipar"]["prune_ratio"] for c in report["clips"][:3]) / 3)
    md = (out / "report.md").read_text()
    assert "## Per video (its prompts together)" in md and "| ball | 3 | lipar |" in md
    assert "| ball_2 | a glass marble | 17 | lipar |" in md


@pytest.mark.parametrize("flags, named", [
    (["--manifest", "jobs.txt"], ".jsonl"),
    (["--manifest", "jobs.json", "--root", "nowhere"], "--root nowhere is not a folder"),
    (["--manifest", "nowhere.jsonl"], "does not exist"),
    (["--eval", "--eval-modes", "lipar", "naive"], "needs full"),
    (["--sweep-theta", "0.1"], "add --eval"),
    (["--eval", "--out", "report.mp4"], "results folder"),
    (["--eval", "--compare"], "--compare"),  # sample.py's, not evaluate.py's
    (["--eval", "--sweep-m", "1,2"], "cannot hold a chunk"),
    (["--eval", "--sweep-m", "1,30"], "--sweep-m 1,30 spans more than the 21 latent frames"),
    (["--eval", "--out", "taken"], "--out taken: taken is a file, not a folder"),
    (["--eval", "--out", "taken/r"], "--out taken/r: taken is a file, not a folder"),
])
def test_bad_batch_flags_are_refused(flags, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file where the results folder would go")
    assert cli.guarded(evaluate.main, flags) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing made, not even an empty folder


# -----------------------------------------------------------------------------
# Several processes


def strip_timing(value):
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value


def test_torchrun_splits_the_jobs_and_merges_the_same_report(clips, weights, tmp_path):
    manifest = write_manifest(tmp_path / "jobs.jsonl", clips)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # torchrun's default, for both
    flags = ["--manifest", str(manifest), "--eval", "--weights", str(weights), "--device", "cpu", "--vae", "tiny",
             *SIZE]
    single = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *flags, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 1, single.stderr[-2000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(ROOT / "evaluate.py"), *flags, "--out", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert "[rank 1]" in ranks.stdout and "3 of 4 jobs edited (2 processes)" in ranks.stdout, \
        ranks.stdout[-2000:] + ranks.stderr[-3000:]
    assert ranks.returncode == 1, ranks.stderr[-3000:]  # rank 0's: a job failed
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert strip_timing(two) == strip_timing(one)
    assert sorted(p.name for p in (tmp_path / "two").glob("*.mp4")) == \
        sorted(p.name for p in (tmp_path / "one").glob("*.mp4"))


def test_a_manifest_with_no_job_or_none_that_runs(weights, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n# nothing yet\n")
    assert cli.guarded(evaluate.main, ["--manifest", str(empty), "--weights", str(weights), "--device", "cpu"]) == 2
    assert "holds no jobs" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"video": "gone.mp4", "prompt": "x"}) + "\n")
    assert cli.guarded(evaluate.main, ["--manifest", str(bad), "--eval", "--weights", str(weights), "--device", "cpu",
                       "--out", str(tmp_path / "r")]) == 1
    md = (tmp_path / "r" / "report.md").read_text()
    assert "No job was edited" in md and "gone.mp4 does not exist" in md and "## Overall" not in md
    inside = Path(weights) / "results"  # refused before anything is made there
    assert cli.guarded(evaluate.main, ["--manifest", str(bad), "--weights", str(weights), "--device", "cpu",
                       "--out", str(inside)]) == 2
    assert "is inside the weights folder" in capsys.readouterr().err and not inside.exists()


def test_a_stopped_batch_keeps_its_finished_jobs_and_a_rerun_edits_only_the_rest(clips, weights, tmp_path):
    """SIGTERM (what torchrun sends the other ranks when one dies, or a scheduler at its
    time limit) during the last of three jobs (a long clip): exit 143 and one line; the
    finished jobs stay with their stats, the stopped one's partial videos are removed,
    so the same command again edits that one job alone."""
    import signal

    io.write_video(tmp_path / "long.mp4", demo.demo_frames(64, 112, 240), 24)
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps({"video": str(v), "prompt": "p"}) + "\n"
                                for v in (clips / "ball.mp4", clips / "still.mp4", tmp_path / "long.mp4")))
    command = [sys.executable, str(ROOT / "evaluate.py"), "--manifest", str(manifest), "--eval", "--weights",
               str(weights), "--vae", "tiny", "--device", "cpu", "--out", "r", *SIZE]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    seen = ""
    while "[2/3] still:" not in seen:
        char = process.stdout.read(1)
        assert char, f"evaluate.py ended before its second job was done: {seen}"
        seen += char
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "frame/s" not in line]
    assert process.returncode == 143, err
    assert lines == ["stopped by SIGTERM: 2 of the 3 jobs to do were edited, each kept with its stats in r (a stopped "
                     "job's partial videos are removed); the same command again edits the rest"], lines
    assert not list((tmp_path / "r").glob("long*")) and (tmp_path / "r" / "ball.json").exists()
    rerun = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.count("finished before, skipped") == 2 and "[1/1] long:" in rerun.stdout


def test_a_run_that_would_write_over_its_manifest_or_a_later_jobs_video_is_refused(clips, weights, tmp_path, capsys):
    """With --overwrite too: a job's stats (its out with .json) on the manifest, the report
    on the manifest, and one job's output on another job's video are refused before any
    work, and nothing is touched."""
    ball = clips / "ball.mp4"
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"video": str(ball), "prompt": "p", "out": str(tmp_path / "m.mp4")}) + "\n")
    before = manifest.read_bytes()
    assert run_eval(manifest, weights, tmp_path / "r", "--overwrite") == 2
    assert "would replace the manifest" in capsys.readouterr().err and manifest.read_bytes() == before
    report = tmp_path / "r2" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"video": str(ball), "prompt": "p", "out": str(tmp_path / "x.mp4")}) + "\n")
    assert run_eval(report, weights, report.parent, "--overwrite") == 2
    assert "the report" in capsys.readouterr().err
    second = tmp_path / "b_lipar.mp4"  # with --eval's two modes, job 1's lipar edit of out b.mp4
    second.write_bytes(ball.read_bytes())
    chained = tmp_path / "chain.jsonl"
    chained.write_text(json.dumps({"video": str(ball), "prompt": "p", "out": str(tmp_path / "b.mp4")}) + "\n"
                       + json.dumps({"video": str(second), "prompt": "q"}) + "\n")
    assert run_eval(chained, weights, tmp_path / "r3", "--overwrite") == 2
    assert "would replace the video of" in capsys.readouterr().err and second.read_bytes() == ball.read_bytes()
    assert not (tmp_path / "m.mp4").exists() and not (tmp_path / "x.mp4").exists()
