"""
Streaming: the threads and the timeline around sample.py's chunk pipeline.

A source is decoded one piece ahead in a reader thread, each piece is handed to the
pipeline (encode, mask, edit, decode: sample.edit_chunks) as soon as it is read, and
every edited chunk is encoded to its outputs in a writer thread while the GPU edits
the next. Memory stays that of a few chunks, however long the video. Ctrl-C or a
closed standard output keeps every finished chunk in a playable file. This file
takes the pipeline and the outputs as arguments; it knows nothing of the sampler.
"""

import queue
import resource
import statistics
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

import video as io
from files import OutputError
from signals import Terminated


class Stopwatch:
    """Seconds per stage, and on CUDA each stage's peak GPU memory (GiB).

    On the CPU a stage's seconds are its wall time. On CUDA they are the time between two
    events queued on the stream at the stage's start and end: from the moment the GPU
    reaches the stage to the moment it has done the stage's work (for a stage of host work,
    such as waiting for the reader thread, the GPU idles and the events count the wait).
    Nothing waits for the GPU, so the host queues the next stage while the GPU still runs
    this one, and each stage is still charged its own work: the stream runs the stages in
    the order they were queued. The peaks need no wait either: the allocator counts memory
    as the work is queued. Finished events are read as each stage ends; `seconds` waits
    for the last one."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._seconds, self.peaks = {}, {}
        self._pending = deque()  # (stage, start event, end event) not yet read

    @contextmanager
    def __call__(self, stage):
        if not self.cuda:
            start = time.perf_counter()
            yield
            self._add(stage, time.perf_counter() - start)
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._record_peak(stage)
        self._pending.append((stage, start, end))
        self._read(wait=False)

    @property
    def seconds(self):
        """{stage: seconds} so far."""
        self._read(wait=True)
        return self._seconds

    def _read(self, wait):
        while self._pending and (wait or self._pending[0][2].query()):
            stage, start, end = self._pending.popleft()
            end.synchronize()
            self._add(stage, start.elapsed_time(end) / 1e3)

    def _add(self, stage, seconds):
        self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    def _record_peak(self, stage):
        """The stage's peak GPU memory since its start (GiB): the largest of its runs."""
        self.peaks[stage] = max(self.peaks.get(stage, 0.0), torch.cuda.max_memory_allocated(self.device) / 2**30)


class Timeline:
    """When the edit's chunks were read and written: the time to the first edited frame,
    each chunk's latency (its last source frame read → its edited frames written), the
    steady state (frames/s after the first chunk), and the resident host memory after
    each chunk (flat, however long the video)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.read_at, self.written, self.resident = [], [], []  # per chunk

    def read(self):
        self.read_at.append(time.perf_counter() - self.start)

    def wrote(self, frames):
        self.written.append((time.perf_counter() - self.start, frames))

    def holding(self):
        """Called between chunks in the editing thread, where nothing of a chunk is in flight."""
        self.resident.append(host_memory_gib("VmRSS"))

    def stats(self):
        if not self.written:
            return {}
        latencies = [done - read for read, (done, _) in zip(self.read_at, self.written)]
        (first, _), (last, _) = self.written[0], self.written[-1]
        later = sum(frames for _, frames in self.written[1:])
        return {"first_frame_s": first, "chunk_latency_s": {"median": statistics.median(latencies),
                                                            "max": max(latencies)},
                "steady_fps": later / (last - first) if later else None, "wall_s": last,
                "host_memory_gib_per_chunk": self.resident}


def host_memory_gib(field="VmHWM"):
    """This process's resident memory, GiB: its peak (VmHWM) or now (VmRSS), as Linux
    counts them (getrusage's ru_maxrss would also count what a parent held when it
    started this process). Elsewhere the peak from ru_maxrss (macOS: bytes), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    if field != "VmHWM":
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def source_pieces(reader, vae, frames_per_chunk, height, width, notes, max_frames=None):
    """Step 1 as a stream: the source's frames in the pieces the VAE takes for one chunk
    of the DiT (F latent frames) each. For the Wan VAE 1 + 4(F − 1) frames first
    (frame 0 is coded alone), then 4F; for the tiny VAE 4F every time. Yields
    (frames uint8 [n, H, W, 3] at the source's size, the source times of the real ones).

    Edited frames come out 1 + 4(F − 1) for the first chunk and 4F for each later one,
    whichever the VAE (the tiny one decodes 3 frames late and drops its first 3). At
    the end the last piece, and where needed one more, repeat the source's last frame
    until the output reaches every source frame; the caller trims the rest. With
    max_frames, reading stops there (with a note).
    """
    size, frames, times, pieces = vae.chunk_frames(frames_per_chunk, True), [], [], 0
    reader.fit = (height, width)  # a huge source is shrunk as it is decoded: a piece stays small
    for pixels, seconds in reader:
        if reader.frames_read == 1 and reader.size != (height, width):
            notes.append(f"resized {reader.size[1]}x{reader.size[0]} to {width}x{height} (centre crop)")
        frames.append(pixels)
        times.append(seconds)
        if len(frames) == size:
            yield torch.stack(frames), times
            frames, times, pieces = [], [], pieces + 1
            size = vae.chunk_frames(frames_per_chunk, False)
        if reader.frames_read == max_frames:
            notes.append(f"stopped reading after {max_frames} frames: absolute time positions (--recipe paper) "
                         "end at the 1,024 of RoPE's table; the default recipe edits any length")
            break
    count = padded = reader.frames_read
    # p pieces give 4Fp - 3 edited frames, whichever the VAE
    while frames or 4 * frames_per_chunk * pieces - 3 < count:
        padded += size - len(frames)
        yield torch.stack(frames + [pixels] * (size - len(frames))), times  # pixels: the source's last frame
        frames, times, pieces = [], [], pieces + 1
        size = vae.chunk_frames(frames_per_chunk, False)
    if padded != count:
        notes.append(f"padded {count} frames to {padded} by repeating the last one (the model takes chunks of "
                     f"{frames_per_chunk} latent frames); the output is trimmed back to {count}")


class ReaderThread:
    """Decodes the source's next chunk in a background thread while the GPU edits the
    current one (PyAV decodes without holding the GIL), one chunk ahead at most.
    next() returns the chunks of `chunks` in order, then None; an error in reading is
    raised there."""

    def __init__(self, chunks):
        self.chunks, self.ready, self.stop = chunks, queue.Queue(maxsize=1), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for chunk in self.chunks:
                if not self._put(("chunk", chunk)):
                    return
            self._put(("end", None))
        except BaseException as err:
            self._put(("error", err))

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self):
        kind, value = self.ready.get()
        if kind == "error":
            raise value
        return value

    def close(self):
        """Stop reading (on the way out of an interrupt or error) and wait for the thread."""
        self.stop.set()
        self.thread.join()


class WriterThread:
    """The outputs' H.264 encoding and audio muxing, done in one background thread, job
    after job, while the GPU edits the next chunk. PyAV encodes without holding the GIL:
    on two CPU cores, encoding 48 frames at 832x480 beside 1.95 s of matrix products
    took 1.79 s in all, against 0.53 + 1.95 s one after the other. At most two chunks
    wait; an error there is raised in the editing thread at its next call."""

    def __init__(self):
        self.jobs, self.error = queue.Queue(maxsize=2), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            if self.error is None:  # after an error the outputs are abandoned: skip the rest
                try:
                    job()
                except BaseException as err:
                    self.error = err

    def submit(self, job):
        self._raise()
        self.jobs.put(job)

    def join(self):
        """Wait for every job; raise what went wrong in one."""
        self.jobs.put(None)
        self.thread.join()
        self._raise()

    def drain(self):
        """join() on the way out of an error or interrupt: the jobs given still finish
        (their chunks are complete), an error among them is not raised again."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()

    def _raise(self):
        if self.error is not None:
            raise self.error


class Interrupted(Exception):
    """Ctrl-C, a stopping signal or a closed pipe part-way: the message says what was
    written; `code` is the exit code, `why` what stopped it, `kept` the files closed
    with the finished chunks."""

    def __init__(self, message, code, why="interrupted", kept=()):
        super().__init__(message)
        self.code, self.why, self.kept = code, why, list(kept)


def close_interrupted(writers, stop):
    """Close every output on Ctrl-C, a stopping signal or a closed pipe, keeping what was
    finished: (one sentence, why it stopped, the files kept)."""
    kept, frames = [], 0
    for writer in writers.values():
        frames = max(frames, writer.frames_written)
        if writer.frames_written == 0 or writer.to_stdout:
            writer.discard()  # a closed standard output takes nothing more
            continue
        try:
            writer.close()
            kept.append(writer.name)
        except (BrokenPipeError, io.VideoError, OutputError):
            writer.discard()
    if isinstance(stop, Terminated):
        why = f"stopped by {stop}"
    elif isinstance(stop, KeyboardInterrupt):
        why = "interrupted"
    else:
        why = f"standard output was closed by its reader after {frames} edited frames"
    if not kept:
        return (f"{why}; nothing was written" if frames == 0 else why), why, kept
    return (f"{why}: {', '.join(kept)} {'holds' if len(kept) == 1 else 'hold'} the {frames} edited frames finished "
            f"so far (every finished chunk, playable)"), why, kept


def run(reader, pieces, size, pipeline, render, writers, clock, keep_sources=False):
    """Edit a stream. `pieces` (from source_pieces) are read in a thread, resized to
    `size` (height, width) on `clock`'s device and fed to `pipeline`: a generator
    function over model-size video pieces [1, 3, n, H, W] in [-1, 1] that yields the
    edited chunks in order, each with a `frames` count. render(chunk, count, sources,
    first) turns a chunk into {kind: uint8 frames [count, H, W, 3]}: the `count` source
    frames it replaces (its last chunk may be longer: the padding), `sources` those
    frames at model size (None unless keep_sources), `first` whether it is the first. Each
    kind goes to writers[kind], in a writer thread; on CUDA the frames may still be on
    their way to the host, and each write first waits for the GPU to pass the point where
    render returned. Returns (the writers' notes, the
    Timeline). Raises Interrupted on Ctrl-C or a closed standard output (the finished
    chunks are kept); on any other error every output is discarded."""
    waiting = deque()  # (source frame at model size or None, its time): not yet matched by edited frames
    chunks = ReaderThread(pieces)
    background = WriterThread()
    progress = tqdm(total=reader.frame_count, desc=f"editing ({', '.join(writers)})", unit="frame", leave=False)
    timeline = Timeline()

    def model_pieces():
        while True:
            with clock("read"):  # decoded by the reader thread, cropped and resized on the device
                piece = chunks.next()
                if piece is None:
                    return
                frames, times = piece
                frames = io.resize_crop(frames.to(clock.device), *size)
            timeline.read()
            waiting.extend(zip(frames[:len(times)] if keep_sources else [None] * len(times), times))
            yield io.to_model(frames)

    try:
        for index, chunk in enumerate(pipeline(model_pieces())):
            timeline.holding()
            matched = [waiting.popleft() for _ in range(min(chunk.frames, len(waiting)))]
            sources = torch.stack([f for f, _ in matched]).cpu() if keep_sources and matched else None
            outputs, times = render(chunk, len(matched), sources, index == 0), [t for _, t in matched]
            copied = None
            if clock.cuda:  # render's frames may still be on their way from the GPU (video.from_model)
                copied = torch.cuda.Event()
                copied.record()

            def write(outputs=outputs, times=times, copied=copied):
                if copied is not None:
                    copied.synchronize()
                for kind, frames in outputs.items():
                    writers[kind].write(frames, times)
                timeline.wrote(len(times))
                progress.update(len(times))
            background.submit(write)
        with clock("write"):  # what the writer thread still has to do once the GPU is done
            background.join()
            notes = [note for writer in writers.values() if (note := writer.close())]
        progress.close()
        return notes, timeline
    except (KeyboardInterrupt, BrokenPipeError) as stop:  # Ctrl-C, SIGTERM, SIGHUP (signals.py); a closed pipe
        chunks.close()
        background.drain()
        progress.close()
        code = getattr(stop, "code", 130) if isinstance(stop, KeyboardInterrupt) else 1
        message, why, kept = close_interrupted(writers, stop)
        raise Interrupted(message, code, why, kept) from None
    except BaseException:
        chunks.close()
        background.drain()
        progress.close()
        for writer in writers.values():
            writer.discard()
        raise
