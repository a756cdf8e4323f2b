"""Editing as a stream (issue: streaming edits of any length): the pipeline against the
whole-clip path, long clips in flat memory, pipes, audio, and the KV cache's positions
far past the training horizon and past the 1,024 positions of Wan's RoPE table."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import demo
import lipar
import model as M
import sample
import stream
import vae as V
import video as io
from tests.test_graphs import tiny_dit
from tests.test_sample import SIZE, moving_clip, record_edits, run_cli

ROOT = Path(__file__).resolve().parents[1]


def clip_with_audio(path, frames, rate=24, audio="aac"):
    """uint8 frames [T, H, W, 3] as H.264 with a 440 Hz tone whose packets are
    interleaved with the frames they belong to (as cameras and encoders write them)."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate)
        video.height, video.width, video.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        tone = out.add_stream(audio, rate=48000, layout="stereo")
        per_frame = 48000 // rate
        for index, pixels in enumerate(frames.numpy()):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            out.mux(video.encode(frame))
            t = (np.arange(per_frame) + index * per_frame) / 48000
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            sound = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
            sound.sample_rate, sound.pts = 48000, index * per_frame
            out.mux(tone.encode(sound))
        out.mux(video.encode(None))
        out.mux(tone.encode(None))
    return path


def assert_in_sync(path, frames, fps=24):
    """Every frame is there, and the sound starts and ends with the picture (within 30 ms:
    audio packets are cut whole, 20-21 ms each here)."""
    with av.open(str(path)) as container:
        times = [frame.time for frame in container.decode(video=0)]
    with av.open(str(path)) as container:
        sound = [(frame.time, frame.samples / frame.sample_rate) for frame in container.decode(audio=0)]
    assert len(times) == frames
    assert abs(sound[0][0] - times[0]) < 0.03
    assert abs(sum(sound[-1]) - (times[-1] + 1 / fps)) < 0.03


# ---- the stream computes what the whole clip computes ----


@pytest.mark.parametrize("vae", ["wan", "tiny"])
def test_a_short_clip_streams_to_exactly_the_latents_of_the_whole_clip_path(vae, weights, tmp_path, monkeypatch):
    """The CLI's streamed edit against the whole-clip steps run by hand (mask all, edit
    all): the same latents and frames, bit for bit, with either VAE (the tiny one reads
    its pieces 12 frames at a time from the start).

    The VAE runs over the same pieces, with one causal cache, in both: a whole clip in
    one call is the same arithmetic in another order (the convolutions' float32 sums
    over a batch of another size), which on some CPUs (AMD EPYC) moves the tiny VAE's
    latents by up to 7e-7. That the pieces equal the whole clip is held in float64
    (test_vae_pieces_with_one_cache_equal_the_whole_clip, tests/test_tiny_vae.py);
    here the whole-clip mask (lipar.prune_mask, not the stream's MaskStream) and the
    whole-clip sampler (sample.edit_latents) stand against the stream, so every
    operation is the same and only bit-equality can pass."""
    monkeypatch.chdir(tmp_path)
    clip = tmp_path / "ball.mp4"
    io.write_video(clip, moving_clip(29), 24.0)  # 29 frames: padded to 33, three chunks
    edits, decoded = record_edits(monkeypatch)
    assert run_cli(["--video", str(clip), "--out", "streamed.mp4", "--vae", vae], weights) == 0
    streamed = torch.cat(edits["lipar"], dim=2)

    models = sample.Models(weights, "cpu", torch.float32, "cpu", vae=vae)
    frames, _ = io.read_video(clip)
    frames = io.resize_crop(frames, 64, 112)
    first = models.vae().chunk_frames(3, True)  # 9 frames for the Wan VAE (frame 0 alone), 12 for the tiny one
    total = first + 12 * 2  # three chunks; the end repeats the last frame, as the stream pads it
    padded = torch.cat([frames, frames[-1:].expand(total - len(frames), -1, -1, -1)])
    encoder, decoder = V.CausalCache(), V.CausalCache()
    latents = torch.cat([models.vae().encode(io.to_model(piece), cache=encoder)
                         for piece in padded.split([first, 12, 12])], dim=2)
    keep = lipar.prune_mask(latents[0].transpose(0, 1))
    after_first = keep[1:]  # frame 0 is always kept (Eq. 1 needs a previous frame)
    assert after_first.any() and not after_first.all()  # the mask has work to do: some kept, some pruned
    context = sample.encode_prompts(models.text_encoder, [demo.DEFAULT_PROMPT], "cpu", torch.float32)[demo.DEFAULT_PROMPT]
    whole = sample.edit_latents(models.dit(), latents, context, keep, "lipar", (1, 6), seed=0, progress=False)
    assert torch.equal(streamed, whole)
    video = torch.cat([models.vae().decode(whole[:, :, c:c + 3], cache=decoder) for c in (0, 3, 6)], dim=2)
    assert torch.equal(torch.cat(decoded["streamed"]), io.from_model(video)[:len(frames)])


def test_vae_pieces_with_one_cache_equal_the_whole_clip():
    torch.manual_seed(0)
    vae = V.WanVAE(V.VAEConfig(base_dim=8)).double().eval()
    video = torch.rand(1, 3, 21, 16, 16, dtype=torch.float64) * 2 - 1
    cache = V.CausalCache()
    pieces = [vae.encode(video[:, :, :9], cache=cache), vae.encode(video[:, :, 9:], cache=cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=2), vae.encode(video, chunked=False), rtol=0, atol=1e-12)
    latents = torch.cat(pieces, dim=2)
    cache = V.CausalCache()
    frames = [vae.decode(latents[:, :, :3], cache=cache), vae.decode(latents[:, :, 3:], cache=cache)]
    assert [f.shape[2] for f in frames] == [9, 12]
    torch.testing.assert_close(torch.cat(frames, dim=2), vae.decode(latents, chunked=False), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="4k frames"):
        vae.encode(video[:, :, :5], cache=cache)  # a later piece takes whole groups of 4


# ---- the stopwatch on CUDA, with stand-in events ----


class FakeGPU:
    """A GPU timeline for stream.Stopwatch's CUDA path on the CPU: events take the
    timeline's time when recorded and complete when finish() or a wait says so."""

    def __init__(self):
        self.now_ms, self.events, self.waits = 0.0, [], 0
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at, self.done = None, False

            def record(self):
                self.at = gpu.now_ms
                gpu.events.append(self)

            def query(self):
                return self.done

            def synchronize(self):  # a wait only if the event has not completed
                gpu.waits += not self.done
                gpu.finish(upto=self)

            def elapsed_time(self, end):
                assert self.done and end.done, "read before it completed"
                return end.at - self.at

        self.Event = Event

    def finish(self, upto=None):
        """Complete every event recorded so far (or up to `upto`, as the stream runs them in order)."""
        for event in self.events[: None if upto is None else self.events.index(upto) + 1]:
            event.done = True


def test_the_cuda_stopwatch_charges_each_stage_its_events_and_waits_only_when_read(monkeypatch):
    gpu, peaks = FakeGPU(), iter([1.0, 3.0, 2.0, 0.5])
    monkeypatch.setattr(torch.cuda, "Event", gpu.Event)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: next(peaks) * 2**30)
    clock = stream.Stopwatch("cuda")
    with clock("encode"):
        gpu.now_ms += 5
    with clock("dit"):  # encode's end has not completed: nothing read yet, nothing waited for
        gpu.now_ms += 20
    assert gpu.waits == 0 and len(clock._pending) == 2
    gpu.finish()
    with clock("encode"):  # the finished stages are read as the next one ends, without a wait
        gpu.now_ms += 7
    assert gpu.waits == 0 and [stage for stage, _, _ in clock._pending] == ["encode"]
    gpu.now_ms += 100  # time between stages is no stage's
    with clock("dit"):
        gpu.now_ms += 4
    assert clock.seconds == pytest.approx({"encode": 0.012, "dit": 0.024})
    assert gpu.waits == 2  # reading them waited for the two stages still in flight
    assert clock.peaks == {"encode": 2.0, "dit": 3.0}  # the largest of each stage's runs


def test_each_write_waits_for_the_copy_of_its_frames(monkeypatch):
    """On CUDA render's frames may still be on their way to the host (video.from_model,
    wait=False): stream.run records an event after each render, and the writer thread
    waits for it before writing. Here with stand-in events that complete only when waited
    for, and a clock that says CUDA while the frames stay on the CPU."""
    gpu = FakeGPU()
    monkeypatch.setattr(torch.cuda, "Event", gpu.Event)

    class HostClock:
        device, cuda = torch.device("cpu"), True

        def __call__(self, stage):
            return contextlib.nullcontext()

    class Writer:
        def __init__(self):
            self.waited = []

        def write(self, frames, times):  # the event recorded after this chunk's render is the i-th
            self.waited.append(gpu.events[len(self.waited)].done)

        def close(self):
            return None

    frames = torch.zeros(4, 16, 16, 3, dtype=torch.uint8)
    pieces = [(frames, [0.1 * i for i in range(4)]) for _ in range(3)]

    def pipeline(video):
        for piece in video:
            yield type("Chunk", (), {"frames": piece.shape[2]})()

    writer = Writer()
    stream.run(type("Reader", (), {"frame_count": 12})(), pieces, (16, 16), pipeline,
               lambda chunk, count, sources, first: {"edit": frames[:count]}, {"edit": writer}, HostClock())
    assert writer.waited == [True, True, True] and len(gpu.events) == 3


# ---- long clips: any length, flat memory ----


def edit_in_a_process(clip, out, weights, tmp_path, *flags):
    """sample.py in a fresh process; its --json stats. glibc's allocator is told to hand
    every block over 64 KiB back to the system when freed (by default it learns to keep
    them), so that the resident memory shows what is held, not the last chunk's
    activations on the CPU (otherwise it swings by ~150 MiB from chunk to chunk)."""
    stats = tmp_path / f"{Path(out).stem}.json"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--video", str(clip), "--out", str(out),
                             "--weights", str(weights), *SIZE, "--device", "cpu", "--json", str(stats), *flags],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(stats.read_text())


def test_a_200_frame_clip_streams_end_to_end_in_flat_memory_with_its_audio(weights, tmp_path):
    """A fresh process edits 200 frames: between chunks, its resident memory stays within
    a few MiB from frame 45 to frame 200 (editing the whole clip at once held every
    frame as float32 pixels: 13 MiB more per 155 frames here, before their copies and
    latents), the output has every frame, and the sound starts and ends with the picture."""
    clip = clip_with_audio(tmp_path / "clip.mkv", moving_clip(200))
    stats = edit_in_a_process(clip, tmp_path / "edit.mp4", weights, tmp_path)
    assert stats["frames"] == 200
    assert_in_sync(tmp_path / "edit.mp4", 200)
    resident = [gib * 1024 for gib in stats["stream"]["host_memory_gib_per_chunk"]]
    assert len(resident) == 17  # chunks of 9, then 12 frames
    assert max(resident[4:]) - min(resident[4:]) < 5, resident  # MiB, between chunks, from frame 45 on
    assert stats["stream"]["first_frame_s"] < stats["stream"]["wall_s"]


# ---- pipes ----


def test_standard_input_to_standard_output_with_audio(weights, tmp_path):
    """`ffmpeg ... -f matroska - | python sample.py --video - --out - > edited.mp4`: a
    fragmented mp4 on standard output with every frame and the sound; the report goes to
    standard error."""
    clip = clip_with_audio(tmp_path / "in.mkv", moving_clip(21), audio="libopus")
    with open(clip, "rb") as source:
        result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--video", "-", "--out", "-",
                                 "--weights", str(weights), *SIZE, "--device", "cpu"], stdin=source,
                                capture_output=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    (tmp_path / "edited.mp4").write_bytes(result.stdout)
    assert_in_sync(tmp_path / "edited.mp4", 21)
    assert b"wrote lipar: standard output" in result.stderr
    assert not (tmp_path / "results").exists()


def test_stats_to_standard_output(weights, tmp_path, monkeypatch, capsys):
    """--json - : standard output holds the stats and nothing else (for `| jq`); the
    summary goes to standard error."""
    monkeypatch.chdir(tmp_path)
    io.write_video(tmp_path / "in.mp4", moving_clip(9), 24)
    assert run_cli(["--video", "in.mp4", "--out", "edit.mp4", "--json", "-"], weights) == 0
    out, err = capsys.readouterr()
    stats = json.loads(out)
    assert stats["frames"] == 9 and "wrote lipar: edit.mp4" in err and not (tmp_path / "-").exists()


def test_stream_flags_are_checked(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for flags, named in [(["--video", "-", "--out", "-", "--compare"], "--out - writes one video"),
                         (["--video", "/dev/video-nonexistent"], "a camera device or - (standard input)"),
                         (["--video", "-", "--out", "-", "--json", "-"], "both name standard output"),
                         (["--video", "-", "--json", ""], "--json is empty"),
                         (["--video", ""], "--video is empty; give the path of a video file")]:
        assert run_cli(flags, weights) == 2
        assert named in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    for flags, closed, named in [("--video -", "<&-", "--video - reads standard input, which is closed"),
                                 ("--video in.mp4 --out -", ">&-", "--out - writes to standard output, which is closed"),
                                 ("--video in.mp4 --json -", ">&-", "--json - writes to standard output, which is")]:
        result = subprocess.run(["bash", "-c", f'"{sys.executable}" "{ROOT / "sample.py"}" {flags} --device cpu '
                                 f"{closed}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr, result.stderr


# ---- positions past the training horizon and past RoPE's table ----


def stream_chunks(dit, chunks, window, trained_frames=None, rolled_positions=True):
    """forward_chunk over `chunks` identical-looking chunks (the same latents each time):
    3 denoising steps and the memory step, as the sampler runs them. Returns the last
    denoising step's output of every chunk."""
    if trained_frames is not None:
        dit.cfg = M.DiTConfig(**{**vars(dit.cfg), "trained_frames": trained_frames})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 4, 4, generator=g, dtype=torch.float64)
    context = torch.randn(1, 5, dit.cfg.text_dim, generator=g, dtype=torch.float64)
    cache = M.KVCache(dit, context, (2, 2), window, rolled_positions)
    outputs = []
    for c in range(chunks):
        for t in (769.0, 729.0, 625.0):
            v = dit.forward_chunk(x, torch.full((1, 1), t, dtype=torch.float64), cache, 3 * c)
        dit.forward_chunk(x, torch.zeros(1, 1, dtype=torch.float64), cache, 3 * c, memory_step=True)
        outputs.append(v)
    return outputs, cache


def test_rolled_positions_change_nothing_without_a_sink():
    """RoPE scores depend on position differences only: a rolling window of 21 frames with
    positions rolled back after frame 20 equals the same window at the frames' true
    positions (float64 math; RoPE's cos/sin tables are float32, hence 1e-6)."""
    rolled, cache = stream_chunks(tiny_dit().double(), 12, None)
    assert (cache.sink, cache.recent, cache.shift) == (0, 21, 36 - 21)
    true_positions, _ = stream_chunks(tiny_dit().double(), 12, (0, 21), trained_frames=1000)
    for a, b in zip(rolled, true_positions):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_absolute_positions_never_roll_and_end_at_the_rope_table():
    """--recipe paper: past frame 20 a chunk keeps its own index as its position, as a
    cache whose trained range never ends would place it (the same operations: bit-equal);
    past RoPE's 1,024 positions the cache refuses, and sample.py stops reading before."""
    absolute, cache = stream_chunks(tiny_dit().double(), 9, (1, 6), rolled_positions=False)
    assert cache.shift == 0 and cache.position_of(24) == 24
    never_rolled, _ = stream_chunks(tiny_dit().double(), 9, (1, 6), trained_frames=1000)
    rolled, _ = stream_chunks(tiny_dit().double(), 9, (1, 6))
    assert all(torch.equal(a, b) for a, b in zip(absolute, never_rolled))
    assert not torch.allclose(absolute[8], rolled[8])  # chunk 8 (frames 24-26) sits elsewhere when rolled
    with pytest.raises(ValueError, match="absolute positions end at latent frame 1023"):
        cache.claim(1022, 3)


def test_the_paper_recipe_stops_reading_where_its_positions_end(weights, tmp_path, monkeypatch):
    """With RoPE's table cut to 6 positions the paper recipe edits the first 2 chunks
    (21 frames) of a 33-frame clip, and says why; the default recipe edits all 33."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(M, "MAX_POSITIONS", 6)
    io.write_video(tmp_path / "clip.mp4", moving_clip(33), 24.0)
    for recipe, frames in (("paper", 21), ("ours", 33)):
        assert run_cli(["--video", "clip.mp4", "--out", f"{recipe}.mp4", "--recipe", recipe, "--vae", "tiny",
                        "--json", f"{recipe}.json"], weights) == 0
        stats = json.loads((tmp_path / f"{recipe}.json").read_text())
        assert stats["frames"] == frames and len(io.read_video(tmp_path / f"{recipe}.mp4")[0]) == frames
        stopped = [n for n in stats["notes"] if n.startswith("stopped reading after 21 frames")]
        assert len(stopped) == (recipe == "paper") and not any("cut short" in n for n in stats["notes"])


def test_a_stream_past_1024_latent_frames_behaves_as_inside_the_trained_range():
    """Once the window is full, a chunk sees the sink at a fixed distance and the recent
    frames at their true distances, whatever its index: chunk 345 (latent frames
    1035-1037, past RoPE's 1,024 positions) gives what chunk 10 gives."""
    outputs, cache = stream_chunks(tiny_dit().double(), 346, (1, 6))
    assert cache.position_of(3 * 345) == 18  # placed at frames 18..20, as the authors' code places it
    torch.testing.assert_close(outputs[345], outputs[10], rtol=0, atol=1e-6)
    assert not torch.allclose(outputs[10], outputs[3], atol=1e-3)  # before the roll, the sink was nearer


def test_an_input_pipe_cut_short_edits_what_arrived(weights, tmp_path):
    """The program feeding standard input dies part-way: the frames that arrived are
    edited and written, and a note says the input ended early."""
    clip = clip_with_audio(tmp_path / "in.mkv", moving_clip(40))
    data = clip.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[:len(data) * 3 // 5])
    with open(cut, "rb") as source:
        result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--video", "-", "--out", "out.mp4",
                                 "--weights", str(weights), *SIZE, "--device", "cpu"], stdin=source,
                                capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    frames = len(io.read_video(tmp_path / "out.mp4")[0])
    assert 9 <= frames < 40 and f"{frames} frames at 112x64" in result.stdout


def test_standard_output_closed_by_its_reader(weights, tmp_path):
    """`python sample.py --out - | head -c 2000`: the edit stops with one line on standard
    error and exit code 1, without a traceback."""
    clip = clip_with_audio(tmp_path / "in.mkv", moving_clip(57))
    process = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--video", str(clip), "--out", "-",
                                "--weights", str(weights), *SIZE, "--device", "cpu"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=tmp_path)
    assert len(process.stdout.read(2000)) == 2000
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=600) == 1, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "frame" not in line[:20]]
    assert lines[-1].startswith("standard output was closed by its reader after ") and "Traceback" not in err


def test_a_device_that_is_no_camera_is_one_sentence(weights, tmp_path, monkeypatch, capsys):
    """/dev/null is a character device, as cameras are: it is opened as one and refused."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(["--video", "/dev/null"], weights) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open the camera /dev/null") and err.count("\n") == 1
