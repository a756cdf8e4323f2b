"""Video I/O on clips generated here with PyAV: round trips (odd sizes, 1 and 2
frames, 23.976 and 30 fps, gif), display rotation, audio carried over, frame
padding, resize/crop, and one clear VideoError for bad input."""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from video import (VideoError, from_model, pad_frames, read_video, resize_crop, to_model,
                   write_video)

NTSC_FILM = Fraction(24000, 1001)  # 23.976 fps


def gradient_frames(count, height, width):
    """Smooth, moving colour ramps (uint8 [T, H, W, 3]): lossy codecs keep them within a few levels."""
    t = torch.arange(count).view(-1, 1, 1)
    y = torch.arange(height).view(1, -1, 1)
    x = torch.arange(width).view(1, 1, -1)
    channels = [60 + 100 * x / width + 10 * t, 60 + 100 * y / height, 128 + 40 * torch.sin((x + y + 5 * t) / 24)]
    return torch.stack(torch.broadcast_tensors(*channels), dim=-1).clamp(0, 255).to(torch.uint8)


def make_clip(path, frames, rate, codec="libx264", pix_fmt="yuv420p", audio=None, rotation=None):
    """Write uint8 frames [T, H, W, 3] with PyAV, plus a 440 Hz stereo tone in codec `audio` if given."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        tone = out.add_stream(audio, rate=48000, layout="stereo") if audio else None
        for index, pixels in enumerate(frames.numpy()):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if tone is not None:
            samples = np.arange(int(48000 * len(frames) / rate)) / 48000
            wave = (0.3 * np.sin(2 * np.pi * 440 * samples)).astype(np.float32)
            sound = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
            sound.sample_rate, sound.pts = 48000, 0
            out.mux(tone.encode(sound))
            out.mux(tone.encode(None))


def audio_streams(path):
    with av.open(str(path)) as container:
        return [(s.codec_context.name, float(s.duration * s.time_base)) for s in container.streams.audio]


def test_reads_every_frame_exactly(tmp_path):
    """A lossless (png in mov) 37x29 clip at 30 fps comes back pixel for pixel."""
    frames = torch.randint(0, 256, (3, 29, 37, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    make_clip(tmp_path / "clip.mov", frames, 30, codec="png", pix_fmt="rgb24")
    read, fps = read_video(tmp_path / "clip.mov")
    assert torch.equal(read, frames) and fps == 30


@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("rate", [NTSC_FILM, Fraction(30)])
@pytest.mark.parametrize("height, width", [(29, 37), (32, 48)])
def test_write_read_round_trip(tmp_path, count, rate, height, width):
    frames = gradient_frames(count, height, width)
    write_video(tmp_path / "out.mp4", frames, float(rate))
    read, fps = read_video(tmp_path / "out.mp4")
    even_h, even_w = height + height % 2, width + width % 2  # yuv420p: odd sides grow by a repeated row/column
    assert read.shape == (count, even_h, even_w, 3)
    assert fps == pytest.approx(float(rate), abs=1e-6)
    assert (read[:, :height, :width].float() - frames.float()).abs().mean() < 3
    assert (read[:, -1].float() - read[:, -2].float()).abs().mean() < 3  # the added row repeats its neighbour
    assert audio_streams(tmp_path / "out.mp4") == []


def test_gif(tmp_path):
    frames = gradient_frames(4, 29, 37)
    make_clip(tmp_path / "clip.gif", frames, 10, codec="gif", pix_fmt="rgb8")
    read, fps = read_video(tmp_path / "clip.gif")
    assert read.shape == (4, 29, 37, 3) and fps == 10
    assert (read.float() - frames.float()).abs().mean() < 20  # rgb8 is a 256-colour palette


def test_display_rotation_is_applied(tmp_path):
    """A 16x32 landscape frame, white top-left quadrant, tagged 'rotate 90 degrees
    counter-clockwise to display' reads as 32x16 portrait with the white quadrant
    bottom-left."""
    frames = torch.zeros(2, 16, 32, 3, dtype=torch.uint8)
    frames[:, :8, :16] = 255
    make_clip(tmp_path / "phone.mp4", frames, 30, rotation=90)
    read, _ = read_video(tmp_path / "phone.mp4")
    assert read.shape == (2, 32, 16, 3)
    quadrant = read[:, 16:, :8].float().mean()
    assert quadrant > 200 and read.float().mean() < quadrant / 3


@pytest.mark.parametrize("container, codec, expected", [
    ("mp4", "aac", "aac"),         # mp4 holds AAC: copied
    ("webm", "libopus", "opus"),   # and Opus: copied
    ("mov", "pcm_s16le", "aac"),   # not PCM: re-encoded to AAC
])
def test_audio_is_carried_over(tmp_path, container, codec, expected):
    source = tmp_path / f"source.{container}"
    video_codec, pix_fmt = ("libvpx-vp9", "yuv420p") if container == "webm" else ("libx264", "yuv420p")
    make_clip(source, gradient_frames(12, 32, 48), NTSC_FILM, codec=video_codec, pix_fmt=pix_fmt, audio=codec)
    frames, fps = read_video(source)
    write_video(tmp_path / "edited.mp4", frames, fps, audio_from=source)
    [(name, seconds)] = audio_streams(tmp_path / "edited.mp4")
    assert name == expected
    assert seconds == pytest.approx(12 / float(NTSC_FILM), abs=0.05)  # about the video's 0.5 s
    assert len(read_video(tmp_path / "edited.mp4")[0]) == 12


def test_source_without_audio_gives_silent_output(tmp_path):
    make_clip(tmp_path / "silent.mp4", gradient_frames(3, 32, 48), 30)
    frames, fps = read_video(tmp_path / "silent.mp4")
    write_video(tmp_path / "edited.mp4", frames, fps, audio_from=tmp_path / "silent.mp4")
    assert audio_streams(tmp_path / "edited.mp4") == []


def test_write_refuses_to_overwrite_its_source(tmp_path):
    make_clip(tmp_path / "clip.mp4", gradient_frames(3, 32, 48), 30)
    before = (tmp_path / "clip.mp4").read_bytes()
    with pytest.raises(VideoError, match="refusing to overwrite"):
        write_video(tmp_path / "clip.mp4", gradient_frames(3, 32, 48), 30, audio_from=tmp_path / "clip.mp4")
    assert (tmp_path / "clip.mp4").read_bytes() == before


@pytest.mark.parametrize("name, content, message", [
    ("missing.mp4", None, "does not exist"),
    ("empty.mp4", b"", "is empty"),
    ("notes.mp4", b"this is a text file, not a video\n" * 20, "cannot read"),
])
def test_bad_input_raises_one_clear_sentence(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoError) as error:
        read_video(path)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text


def test_resize_crop_keeps_the_centre():
    """200 wide x 100 high, white only in the central 100 columns: a square crop is all white."""
    frames = torch.zeros(2, 100, 200, 3, dtype=torch.uint8)
    frames[:, :, 50:150] = 255
    square = resize_crop(frames, 32, 32)
    assert square.shape == (2, 32, 32, 3) and square.dtype == torch.uint8
    assert square.min() == 255
    wide = resize_crop(frames, 16, 48)  # wider than the source: the whole width, a central band of rows
    assert wide.shape == (2, 16, 48, 3)
    assert wide[:, :, :10].max() == 0 and wide[:, :, 20:28].min() == 255


def test_model_range_round_trip():
    frames = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(3, 16, 16, 3)
    video = to_model(frames)
    assert video.shape == (1, 3, 3, 16, 16) and video.min() == -1 and video.max() == 1
    assert torch.equal(from_model(video), frames)


@pytest.mark.parametrize("count, padded", [(81, 81), (1, 9), (9, 9), (10, 21), (12, 21), (82, 93)])
def test_pad_frames_to_whole_chunks(count, padded):
    frames = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 2, 2, 3)
    out, original = pad_frames(frames)
    assert len(out) == padded and original == count
    assert (1 + (padded - 1) // 4) % 3 == 0 and (padded - 1) % 4 == 0  # whole chunks of 3 latent frames
    assert (out[count:] == count - 1).all()  # the last frame, repeated
    assert torch.equal(out[:original], frames)


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    """Frames go to a hidden partial file renamed into place at the end: Ctrl-C (or an
    error) part-way leaves neither a half-written video nor the partial file."""
    def interrupt(writer, frames, times):
        writer.container.mux(writer.stream.encode(av.VideoFrame.from_ndarray(frames[0].numpy(), format="rgb24")))
        raise KeyboardInterrupt

    import video

    monkeypatch.setattr(video, "_encode_frames", interrupt)
    with pytest.raises(KeyboardInterrupt):
        video.write_video(tmp_path / "out.mp4", torch.zeros(5, 16, 16, 3, dtype=torch.uint8), 24)
    assert list(tmp_path.iterdir()) == []


def test_variable_frame_rate_source_is_written_at_its_average_pace(tmp_path):
    """Frames 50 and 33 ms apart in a stream that states 1000 fps: read at ~24 fps."""
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=1000)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += 33 if i % 2 else 50
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    frames, fps = read_video(path)
    assert len(frames) == 12
    assert fps == pytest.approx(11 / 0.465, rel=1e-3)  # 11 intervals (6 of 50 ms, 5 of 33 ms): 465 ms


@pytest.mark.parametrize("container,codec,pix_fmt", [("mp4", "libx264", "yuv444p"), ("mkv", "ffv1", "yuv420p10le")])
def test_yuv444_and_10_bit_sources_read_as_8_bit_rgb(tmp_path, container, codec, pix_fmt):
    path = tmp_path / f"clip.{container}"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for i in range(5):
            rgb = np.full((48, 64, 3), (40 * i, 100, 200), np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    frames, fps = read_video(path)
    assert frames.dtype == torch.uint8 and frames.shape == (5, 48, 64, 3) and fps == 24.0
    assert (frames[:, 24, 32].int() - torch.tensor([[40 * i, 100, 200] for i in range(5)])).abs().max() <= 3


def test_audio_only_file_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "voice.m4a"
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.rate, frame.pts = 16000, 1024 * i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(VideoError, match="holds no video stream"):
        read_video(path)


def test_a_full_disk_while_writing_is_one_sentence_and_leaves_no_file(tmp_path, monkeypatch):
    import errno

    import video

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video, "_encode_frames", full_disk)
    with pytest.raises(VideoError, match="No space left on device"):
        video.write_video(tmp_path / "out.mp4", torch.zeros(5, 16, 16, 3, dtype=torch.uint8), 24)
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_audio_stream_is_left_out_from_there_on_and_said(tmp_path):
    """A good video stream beside an audio stream of damaged MP2 packets (mp4 cannot hold
    MP2, so the audio is decoded and re-encoded): the edit is written, its sound stops
    where the damage starts, and a sentence says so."""
    source = tmp_path / "damaged_audio.mkv"
    with av.open(str(source), "w") as out:
        video_stream = out.add_stream("libx264", rate=24)
        video_stream.width, video_stream.height, video_stream.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("mp2", rate=32000, layout="mono")
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
        silence.rate, silence.pts = 32000, 0
        out.mux(audio.encode(silence))
        for i in range(9):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts = i
            out.mux(video_stream.encode(frame))
            packet = av.Packet(bytes(np.random.default_rng(i).integers(0, 256, 300, dtype=np.uint8)))
            packet.stream, packet.pts, packet.dts = audio, 36 * (i + 1), 36 * (i + 1)  # ms (mkv's time base)
            out.mux(packet)
        out.mux(video_stream.encode(None))
    frames, fps = read_video(source)
    target = tmp_path / "edited.mp4"
    note = write_video(target, frames, fps, audio_from=source)
    assert note is not None and "could not be read past 0.04 s" in note and "no sound from there on" in note
    [(_, seconds)] = audio_streams(target)
    assert seconds < 0.1  # the one good packet, 36 ms
    assert len(read_video(target)[0]) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged_audio.mkv", "edited.mp4"]


def test_outputs_use_x264s_veryfast_preset(tmp_path):
    """x264 writes its settings into the stream: veryfast searches one reference frame with
    subpixel refinement 2 (medium, the library's default: 3 and 7)."""
    write_video(tmp_path / "out.mp4", gradient_frames(5, 32, 48), 24)
    settings = (tmp_path / "out.mp4").read_bytes()
    assert b" ref=1 " in settings and b" subme=2 " in settings
