"""
Video files in and out, on PyAV: read a clip into frames, bring it to the
model's resolution and frame count, and write the result as an H.264 mp4 that
carries the source's audio.

Frames are uint8 tensors [T, H, W, 3] (RGB); the model takes float video
[1, 3, T, H, W] in [-1, 1].
"""

import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

# Audio codecs an mp4 can hold as they are; anything else is re-encoded to AAC.
MP4_AUDIO_CODECS = {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}


class VideoError(Exception):
    """A video cannot be read or written; the message says why and what to do."""


def read_video(path):
    """Decode every frame of a video file (mp4, mov, webm, gif...; audio is ignored).

    Returns (frames, fps): uint8 RGB frames [T, H, W, 3], upright as a player
    shows them (the stream's display rotation applied), and the frame rate.
    """
    path = Path(path)
    if not path.exists():
        raise VideoError(f"video not found: {path} does not exist; check the path")
    if not path.is_file():
        raise VideoError(f"{path} is a folder, not a video file; pass the path of a video file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path} is empty (0 bytes); pass a complete video file")
    frames, times, rotation = [], [], 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path} holds no video stream; pass a video file (mp4, mov, webm or gif)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(frame.time)
                rotation = frame.rotation
            fps = stream.average_rate or stream.guessed_rate
            # A variable-frame-rate source (phones record these) can state a rate far from
            # the pace of its frames: the output plays at their average pace instead.
            if len(frames) > 1 and None not in times and times[-1] > times[0]:
                measured = (len(frames) - 1) / (times[-1] - times[0])
                if not fps or abs(measured / float(fps) - 1) > 0.01:
                    fps = measured
    except av.FFmpegError as err:
        raise VideoError(f"cannot read {path} as a video ({err.strerror}); pass an mp4, mov, webm or gif file") from None
    if not frames:
        raise VideoError(f"{path} holds no decodable video frame; pass a video with at least one frame")
    if not fps:
        raise VideoError(f"{path} does not state a frame rate; re-encode it with a fixed frame rate")
    video = torch.from_numpy(np.stack(frames))
    # Phones store portrait clips as landscape frames plus a display rotation
    # (counter-clockwise degrees); applying it gives the picture a player shows.
    return torch.rot90(video, round(rotation / 90), dims=(1, 2)).contiguous(), float(fps)


def resize_crop(frames, height, width):
    """Fill height x width without distortion: crop the centre to that aspect ratio, then resize (antialiased).

    uint8 [T, H, W, 3] -> uint8 [T, height, width, 3].
    """
    _, H, W, _ = frames.shape
    crop_h, crop_w = min(H, round(W * height / width)), min(W, round(H * width / height))
    top, left = (H - crop_h) // 2, (W - crop_w) // 2
    frames = frames[:, top:top + crop_h, left:left + crop_w]
    resized = []
    for group in frames.split(16):  # a group at a time: a long HD clip in float32 would not fit in memory
        x = F.interpolate(group.permute(0, 3, 1, 2).float(), size=(height, width), mode="bilinear",
                          antialias=True, align_corners=False)
        resized.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(resized)


def to_model(frames):
    """uint8 frames [T, H, W, 3] -> float video [1, 3, T, H, W] in [-1, 1]."""
    return frames.permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1


def from_model(video):
    """Float video [1, 3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3] on the CPU."""
    if video.shape[0] != 1:
        raise ValueError(f"from_model takes one video (batch 1), got a batch of {video.shape[0]}")
    pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu()


def pad_frames(frames):
    """Repeat the last frame up to the next length T = 12k - 3; returns (padded, original count).

    The VAE takes T = 4m + 1 frames and gives 1 + (T - 1) / 4 latent frames,
    which the sampler cuts into chunks of 3: T = 12k - 3 gives 3k of them.
    81 -> 81 (21 latent frames), 1 -> 9, 12 -> 21.
    """
    count = len(frames)
    if count == 0:
        raise VideoError("the video has no frames; pass a video with at least one frame")
    target = 12 * math.ceil((count + 3) / 12) - 3
    return torch.cat([frames, frames[-1:].expand(target - count, *frames.shape[1:])]), count


def trim_frames(frames, count):
    """Undo pad_frames: keep the first `count` frames."""
    return frames[:count]


def write_video(path, frames, fps, audio_from=None):
    """Write uint8 frames [T, H, W, 3] as an H.264 (yuv420p) mp4 at `fps`, with the audio of `audio_from` if any.

    yuv420p stores colour at half resolution, so an odd height or width is made
    even by repeating the last row or column. The audio of `audio_from` (the
    source video) is copied as it is when mp4 can hold its codec, re-encoded to
    AAC otherwise, and cut where the video ends. When that audio cannot be read,
    the video is written without it; the returned sentence says so (else None).
    """
    path = Path(path)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"write_video takes uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if audio_from is not None and path.resolve() == Path(audio_from).resolve():
        raise VideoError(f"refusing to overwrite the input video {path}; choose another output path")
    if frames.shape[1] % 2:
        frames = torch.cat([frames, frames[:, -1:]], dim=1)
    if frames.shape[2] % 2:
        frames = torch.cat([frames, frames[:, :, -1:]], dim=2)
    rate = Fraction(fps).limit_denominator(1001)  # 29.97002997... -> 30000/1001
    duration = len(frames) / rate
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a hidden file beside the target and renamed when complete: an error or
    # Ctrl-C part-way leaves no half-written video under the output's name.
    partial = path.with_name(f".{path.name}.partial")
    dropped = None
    try:
        try:
            _write(partial, frames, rate, duration, audio_from)
        except (av.FFmpegError, OSError) as err:
            if audio_from is None:
                raise
            # The source's audio may be what failed (a damaged or unreadable stream):
            # the edit is still worth having, silent.
            _write(partial, frames, rate, duration, None)
            dropped = f"the audio of {audio_from} could not be copied ({err.strerror or err}); {path} is silent"
        os.replace(partial, path)
    except (av.FFmpegError, OSError) as err:  # OSError: a full disk, a folder that went away
        raise VideoError(f"cannot write {path} ({err.strerror or err}); check the folder is writable and has "
                         f"free space") from None
    finally:
        partial.unlink(missing_ok=True)
    return dropped


def _write(path, frames, rate, duration, audio_from):
    """Encode the frames (and the audio of audio_from) into the mp4 file at path."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate, options={"crf": "18"})
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        source = av.open(str(audio_from)) if audio_from is not None else None
        try:
            audio = source.streams.audio[0] if source is not None and source.streams.audio else None
            if audio is None:
                _encode_frames(out, stream, frames)
            elif audio.codec_context.name in MP4_AUDIO_CODECS:
                copy = out.add_stream_from_template(audio)
                _encode_frames(out, stream, frames)
                _copy_audio(out, copy, source, audio, duration)
            else:
                aac = out.add_stream("aac", rate=audio.rate, layout=audio.layout.name)
                _encode_frames(out, stream, frames)
                _reencode_audio(out, aac, source, audio, duration)
        finally:
            if source is not None:
                source.close()


def _encode_frames(out, stream, frames):
    for index, pixels in enumerate(frames.numpy()):
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = index  # in frames: the stream's time base is 1 / fps
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))  # flush the encoder's delayed frames


def _copy_audio(out, copy, source, audio, duration):
    """Remux the audio packets that start before the video ends."""
    for packet in source.demux(audio):
        if packet.dts is None:  # the demuxer's end-of-stream marker
            continue
        if packet.pts is not None and packet.pts * packet.time_base >= duration:
            break
        packet.stream = copy
        out.mux(packet)


def _reencode_audio(out, aac, source, audio, duration):
    """Decode the audio and encode it as AAC, up to the end of the video (PyAV converts the sample format)."""
    for frame in source.decode(audio):
        if frame.time is not None and frame.time >= duration:
            break
        frame.pts = None  # let the encoder count samples; the source's pts are in another time base
        out.mux(aac.encode(frame))
    out.mux(aac.encode(None))
