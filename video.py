"""
Video in and out, on PyAV, a few frames at a time: read a clip, a pipe or a camera
frame by frame, bring frames to the model's resolution, and write the result as an
H.264 mp4 as it is made, carrying the source's audio along.

Frames are uint8 tensors [T, H, W, 3] (RGB); the model takes float video
[1, 3, T, H, W] in [-1, 1]. "-" as a path is standard input or output.
"""

import errno
import math
import os
import stat
import sys
from collections import deque
from fractions import Fraction
from pathlib import Path

import av
import torch
import torch.nn.functional as F

import files

STDIO = "-"
# x264's "veryfast" preset: on the H200's host (2026-12-04) 2.5 against 4.2 ms a frame at
# 832x480 for the default "medium", about the same size at CRF 18 on the demo clip, and
# a streamed tiny-VAE edit at 70.4 against 48.5 frames/s (the encoder's threads compete
# with the one that drives the GPU; BENCHMARKS.md "Writing the outputs").
X264_PRESET = "veryfast"
# Audio codecs an mp4 can hold as they are; anything else is re-encoded to AAC.
MP4_AUDIO_CODECS = {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}


class VideoError(Exception):
    """A video cannot be read or written; the message says why and what to do."""


def is_camera(path):
    """A character device such as /dev/video0 (PyAV opens it with Video4Linux2)."""
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def is_pipe(path):
    """A named pipe, or what /dev/fd/N and a shell's <(...) name: read as a stream."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


class VideoReader:
    """The frames of a video file, of standard input ("-") or of a camera, decoded one
    packet at a time, so that memory does not grow with the clip.

    fps: the stated frame rate; frame_count: the number of frames where the container
    says so, else None (a pipe, a camera). Iterating yields (frame uint8 [H, W, 3],
    seconds since the first frame or None), upright as a player shows it (the
    stream's display rotation applied). Audio packets met on the way are handed to
    every queue from audio_queue() (what VideoWriter carries into its output).
    """

    def __init__(self, source):
        self.name = "standard input" if str(source) == STDIO else str(source)
        self.error = None  # a sentence, when the input ended in a read error after some frames
        self.frames_read = 0
        self.size = None  # (height, width) of the source's frames, upright, once the first is read
        self.fit = None   # (height, width) the frames are needed at, if known: see _rgb
        self._queues = []
        self._start = None
        if str(source) == STDIO:
            target, options = sys.stdin.buffer, {}
        else:
            path = Path(source)
            if not path.exists():
                raise VideoError(f"video not found: {path} does not exist; check the path")
            if path.is_dir():
                raise VideoError(f"{path} is a folder, not a video file; pass the path of a video file")
            camera = is_camera(path)
            if path.is_file() and path.stat().st_size == 0:
                raise VideoError(f"{path} is empty (0 bytes); pass a complete video file")
            target, options = str(path), ({"format": "v4l2"} if camera else {})
        try:
            self.container = av.open(target, **options)
        except (av.FFmpegError, OSError) as err:
            reason = getattr(err, "strerror", None) or err
            if options:
                raise VideoError(f"cannot open the camera {self.name} ({reason}); check that it is a Video4Linux "
                                 f"device that no other program is using") from None
            raise VideoError(f"cannot read {self.name} as a video ({reason}); pass an mp4, mov, webm, mkv or "
                             f"gif") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{self.name} holds no video stream; pass a video file (mp4, mov, webm or gif)")
        self.video = self.container.streams.video[0]
        self.video.thread_type = "AUTO"
        self.audio = self.container.streams.audio[0] if self.container.streams.audio else None
        rate = self.video.average_rate or self.video.guessed_rate
        if not rate:
            self.container.close()
            raise VideoError(f"{self.name} does not state a frame rate; re-encode it with a fixed frame rate")
        self.fps = float(rate)
        self.frame_count = self.video.frames or None

    def audio_queue(self):
        """A queue that will receive the source's audio packets as they are read (None: no audio)."""
        if self.audio is None:
            return None
        queue = deque()
        self._queues.append(queue)
        return queue

    def __iter__(self):
        streams = [self.video] + ([self.audio] if self.audio is not None and self._queues else [])
        try:
            for packet in self.container.demux(*streams):
                if packet.stream is not self.video:
                    if packet.dts is not None:  # None: the demuxer's end-of-stream marker
                        for queue in self._queues:
                            queue.append(packet)
                    continue
                for frame in packet.decode():
                    # Phones store portrait clips as landscape frames plus a display rotation
                    # (counter-clockwise degrees); applying it gives the picture a player shows.
                    turns = round(frame.rotation / 90)
                    if self.size is None:
                        self.size = (frame.width, frame.height) if turns % 2 else (frame.height, frame.width)
                    pixels = torch.rot90(torch.from_numpy(self._rgb(frame, turns)), turns, dims=(0, 1)).contiguous()
                    if self._start is None:
                        self._start = frame.time
                    self.frames_read += 1
                    yield pixels, None if frame.time is None or self._start is None else frame.time - self._start
        except (av.FFmpegError, OSError) as err:
            reason = getattr(err, "strerror", None) or err
            if not self.frames_read:
                raise VideoError(f"cannot read {self.name} as a video ({reason}); pass an mp4, mov, webm, mkv "
                                 f"or gif") from None
            # a pipe cut short or a damaged tail: what was read is still worth editing
            self.error = f"{self.name} ended in a read error after {self.frames_read} frames ({reason})"
        if not self.frames_read:
            raise VideoError(f"{self.name} holds no decodable video frame; pass a video with at least one frame")

    def _rgb(self, frame, turns):
        """The frame as uint8 RGB [H, W, 3]; with `fit` set, a frame more than twice that
        size on both sides is first shrunk while it is decoded (area average, same
        aspect), so that no frame is held far above the size it is needed at."""
        if self.fit is not None:
            height, width = self.fit[::-1] if turns % 2 else self.fit
            scale = max(2 * height / frame.height, 2 * width / frame.width)
            if scale < 1:
                return frame.reformat(width=max(1, round(frame.width * scale)),
                                      height=max(1, round(frame.height * scale)), format="rgb24",
                                      interpolation="AREA").to_ndarray()
        return frame.to_ndarray(format="rgb24")

    def read_audio(self):
        """Queue the rest of the source's audio without decoding its video (write_video)."""
        if self.audio is not None:
            try:
                for packet in self.container.demux(self.audio):
                    if packet.dts is not None:
                        for queue in self._queues:
                            queue.append(packet)
            except (av.FFmpegError, OSError) as err:
                self.error = f"the audio of {self.name} ended in a read error ({getattr(err, 'strerror', None) or err})"

    def close(self):
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_video(path):
    """Decode every frame of a video at once: (frames uint8 [T, H, W, 3], fps).

    A variable-frame-rate source (phones record these) can state a rate far from the
    pace of its frames: the fps returned is then their average pace.
    """
    with VideoReader(path) as reader:
        frames, times = zip(*reader)
        fps = reader.fps
    if len(frames) > 1 and None not in times and times[-1] > times[0]:
        measured = (len(frames) - 1) / (times[-1] - times[0])
        if abs(measured / fps - 1) > 0.01:
            fps = measured
    return torch.stack(frames), fps


def resize_crop(frames, height, width):
    """Fill height x width without distortion: crop the centre to that aspect ratio, then resize (antialiased).

    uint8 [T, H, W, 3] -> uint8 [T, height, width, 3].
    """
    _, H, W, _ = frames.shape
    if (H, W) == (height, width):
        return frames
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


def from_model(video, wait=True):
    """Float video [1, 3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3] on the CPU.
    wait=False: from CUDA the frames are copied into pinned memory without waiting; they
    hold their values once the stream has reached the copy (stream.run waits for that
    before writing them)."""
    if video.shape[0] != 1:
        raise ValueError(f"from_model takes one video (batch 1), got a batch of {video.shape[0]}")
    pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).to("cpu", non_blocking=not wait)


def padded_length(count):
    """The model takes T = 12k - 3 frames: 1 + (T - 1) / 4 latent frames, in chunks of
    3. The next such length from `count` frames: 81 -> 81 (21 latent frames), 1 -> 9, 12 -> 21."""
    return 12 * math.ceil((count + 3) / 12) - 3


def pad_frames(frames):
    """Repeat the last frame up to padded_length; returns (padded, original count)."""
    count = len(frames)
    if count == 0:
        raise VideoError("the video has no frames; pass a video with at least one frame")
    return torch.cat([frames, frames[-1:].expand(padded_length(count) - count, *frames.shape[1:])]), count


class VideoWriter:
    """An H.264 (yuv420p) mp4 written as frames arrive, with the audio of a VideoReader.

    A file is written to a temporary file of its own beside the target (files.py) and
    moved into place by close(), only if the target is still absent (or, with
    overwrite, a regular file): an error part-way (discard()) leaves nothing under the
    output's name, and an interrupted edit closed with close() leaves a valid,
    playable file of every frame written so far. "-" writes a fragmented mp4 (playable while it is
    still being written) to standard output.

    Frames carry the times of the source frames they come from, so a variable frame
    rate, and with it the audio's sync, survives; without times they are 1/fps apart.
    The source's audio is copied where mp4 can hold its codec, re-encoded to AAC
    otherwise, and cut where the video ends. Audio that cannot be read or written is
    left out from there on, and close() returns a sentence saying so (else None).
    """

    def __init__(self, target, fps, audio_from=None, overwrite=False):
        self.target, self.rate = str(target), Fraction(fps).limit_denominator(1001)  # 29.97.. -> 30000/1001
        self.to_stdout = self.target == STDIO
        if self.to_stdout:
            self.partial = None
            self.container = av.open(sys.stdout.buffer, "w", format="mp4",
                                     options={"movflags": "frag_keyframe+empty_moov+default_base_moof"})
        else:
            path = Path(target)
            self.overwrite = overwrite
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.partial = files.partial_path(path)
                self.container = av.open(str(self.partial), "w", format="mp4")
            except (av.FFmpegError, OSError) as err:
                raise VideoError(f"cannot write {path} ({getattr(err, 'strerror', None) or err}); check the folder "
                                 f"is writable") from None
        self.stream = None
        self.audio_source = audio_from
        self.audio_queue = audio_from.audio_queue() if audio_from is not None else None
        self.audio_out = self.audio_note = None
        self.frames_written, self.end_time = 0, 0.0
        # timestamps at >= 90 kHz (the MPEG clock) that also count whole frames at the rate
        self.time_base = Fraction(1, self.rate.numerator * math.ceil(90000 / self.rate.numerator))

    def _open_streams(self, height, width):
        # A pipe is read as it is written: no frame reordering or look-ahead (zerolatency), so
        # each frame leaves at once, and no negative decode times, which a fragmented mp4
        # (no edit list) would turn into a video start later than the audio's.
        options = {"crf": "18", "preset": X264_PRESET, **({"tune": "zerolatency"} if self.to_stdout else {})}
        self.stream = self.container.add_stream("libx264", rate=self.rate, options=options)
        self.stream.height, self.stream.width, self.stream.pix_fmt = height, width, "yuv420p"
        self.stream.codec_context.time_base = self.time_base
        if self.audio_queue is not None:
            audio = self.audio_source.audio
            if audio.codec_context.name in MP4_AUDIO_CODECS:
                self.audio_out = self.container.add_stream_from_template(audio)
                self.audio_copy = True
            else:
                self.audio_out = self.container.add_stream("aac", rate=audio.rate, layout=audio.layout.name)
                self.audio_copy = False

    def write(self, frames, times=None):
        """Append uint8 frames [T, H, W, 3], shown at `times` (seconds from the first frame
        of the video; default: 1/fps apart). Odd sides are made even (yuv420p stores colour
        at half resolution) by repeating the last row or column."""
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"VideoWriter takes uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        if frames.shape[1] % 2:
            frames = torch.cat([frames, frames[:, -1:]], dim=1)
        if frames.shape[2] % 2:
            frames = torch.cat([frames, frames[:, :, -1:]], dim=2)
        try:
            if self.stream is None:
                self._open_streams(frames.shape[1], frames.shape[2])
            _encode_frames(self, frames, times)
            self._carry_audio(final=False)
        except (av.FFmpegError, OSError) as err:
            if isinstance(err, OSError) and err.errno == errno.EPIPE:
                raise BrokenPipeError(errno.EPIPE, "the reader of standard output has gone") from None
            raise VideoError(f"cannot write {self.name} ({getattr(err, 'strerror', None) or err}); check the folder "
                             f"is writable and has free space") from None

    @property
    def name(self):
        return "standard output" if self.to_stdout else self.target

    def _carry_audio(self, final):
        """Mux the queued audio that starts before the video written so far ends (all of it up
        to the video's end when final): the audio stays beside the frames it belongs to."""
        queue = self.audio_queue
        while queue and self.audio_out is not None:
            packet = queue[0]
            starts = packet.pts * packet.time_base if packet.pts is not None else None
            if starts is not None and starts >= self.end_time:
                if final:
                    queue.clear()
                break
            queue.popleft()
            try:
                if self.audio_copy:
                    copy = av.Packet(bytes(packet))  # one packet feeds every output; muxing consumes it
                    copy.pts, copy.dts, copy.duration = packet.pts, packet.dts, packet.duration
                    copy.time_base = packet.time_base
                    copy.stream = self.audio_out
                    self.container.mux(copy)
                else:
                    for frame in packet.decode():
                        frame.pts = None  # let the encoder count samples; the source's are in another time base
                        self.container.mux(self.audio_out.encode(frame))
            except av.FFmpegError as err:
                self.audio_note = (f"the audio of {self.audio_source.name} could not be read past "
                                   f"{float(starts or 0):.2f} s ({err.strerror or err}); {self.name} has no sound "
                                   f"from there on")
                self.audio_queue = None
                break
        if final and self.audio_out is not None and not self.audio_copy:
            self.container.mux(self.audio_out.encode(None))  # the AAC encoder's delayed samples

    def close(self):
        """Flush the encoders, finish the file and move it into place; returns the audio note or None."""
        try:
            if self.stream is not None:
                self.container.mux(self.stream.encode(None))  # the encoder's delayed frames
                self._carry_audio(final=True)
            self.container.close()
            if self.partial is not None:
                files.publish(self.partial, self.target, self.overwrite)
        except (av.FFmpegError, OSError) as err:
            self.discard()
            if isinstance(err, OSError) and err.errno == errno.EPIPE:
                raise BrokenPipeError(errno.EPIPE, "the reader of standard output has gone") from None
            raise VideoError(f"cannot write {self.name} ({getattr(err, 'strerror', None) or err}); check the folder "
                             f"is writable and has free space") from None
        return self.audio_note

    def discard(self):
        """Give up: close what can be closed and leave nothing under the output's name."""
        try:
            self.container.close()
        except (av.FFmpegError, OSError):
            pass
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)


def _encode_frames(writer, frames, times):
    for i, pixels in enumerate(frames.numpy()):
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        seconds = times[i] if times is not None and times[i] is not None else writer.frames_written / writer.rate
        frame.pts = round(Fraction(seconds).limit_denominator(10**6) / writer.time_base)
        writer.container.mux(writer.stream.encode(frame))
        writer.frames_written += 1
        writer.end_time = frame.pts * writer.time_base + 1 / writer.rate


def write_video(path, frames, fps, audio_from=None):
    """Write uint8 frames [T, H, W, 3] as one mp4 at `fps`, with the audio of the video file
    `audio_from` if any; returns VideoWriter.close's note (None: nothing to say)."""
    if len(frames) == 0:
        raise ValueError("write_video takes at least one frame")
    if audio_from is not None and Path(path).resolve() == Path(audio_from).resolve():
        raise VideoError(f"refusing to overwrite the input video {path}; choose another output path")
    source = VideoReader(audio_from) if audio_from is not None else None
    writer = VideoWriter(path, fps, audio_from=source)
    try:
        writer.write(frames)
        if source is not None:
            source.read_audio()
        return writer.close()
    except BaseException:
        writer.discard()
        raise
    finally:
        if source is not None:
            source.close()
