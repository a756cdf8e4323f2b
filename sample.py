"""
Edit a video with LIPAR on the Self-Forcing causal video model, in one command:

    python sample.py --video in.mp4 --prompt "a watercolor painting of ..."
    ffmpeg -i in.mov -f matroska - | python sample.py --video - --out - > edited.mp4

The sampler below follows SPEC §3 step by step (SDEdit-style editing with the
Self-Forcing DMD checkpoint) with LIPAR's three stages from lipar.py at the marked
places. Every edit is a stream: frames are read a chunk at a time, encoded,
masked, denoised, decoded and written before the next are read, so memory does not
grow with the clip. With no arguments it runs a demo: a generated clip, edited by
the real models if ./weights holds them, by tiny random-weight models otherwise.
"""

import argparse
import builtins
import functools
import json
import math
import os
import queue
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import graphs
import lipar
import model as M
import tape
import vae as V
import video as io
from metrics import Fidelity
from tiny_vae import MemBlock, TinyVAE, TinyVAEConfig, load_tiny_vae

EDIT_STEPS = (400, 350, 250)  # the authors' editing steps on Self-Forcing's 1000-step table
SHIFT = 5.0
DEFAULT_PROMPT = "a watercolor painting of a red ball rolling across a wooden table, soft brush strokes"
DEMO_FRAMES, DEMO_FPS = 57, 16  # 57 = 12·5 − 3 frames: 15 latent frames, 5 chunks, 3.6 s


MODES = lipar.MODES + ("tape",)  # LIPAR, the baseline and the ablations; TAPE for comparison (tape.py)


class UsageError(Exception):
    """Bad input the user can fix; the message says how."""


# -----------------------------------------------------------------------------
# The schedule (SPEC §3)


def editing_schedule(steps=EDIT_STEPS, shift=SHIFT):
    """[(t, σ)] of the editing steps: each step index into the shifted 1000-step table.

    s_i = 1 − i/1000, σ(s) = shift·s / (1 + (shift − 1)·s), t = 1000·σ; step k is
    entry 1000 − k of the table: [400, 350, 250] → t = 769.23, 729.17, 625.0.
    """
    schedule = []
    for step in steps:
        s = 1 - (1000 - step) / 1000
        sigma = shift * s / (1 + (shift - 1) * s)
        schedule.append((1000 * sigma, sigma))
    return schedule


# -----------------------------------------------------------------------------
# The sampler, one step of SPEC §3 at a time, one chunk at a time


def encode_prompt(text_encoder_loader, prompt, device, dtype):
    """Step 4: the prompt's umT5 context [1, 512, 4096], computed once; the encoder is then freed."""
    return encode_prompts(text_encoder_loader, [prompt], device, dtype)[prompt]


def encode_prompts(text_encoder_loader, prompts, device, dtype):
    """{prompt: context [1, 512, 4096]} for every distinct prompt, with one load of the
    text encoder (11 GB for umT5-XXL), freed before the DiT arrives."""
    text_encoder = text_encoder_loader()
    contexts = {prompt: text_encoder.encode([prompt]).to(device, dtype) for prompt in dict.fromkeys(prompts)}
    del text_encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return contexts


@torch.no_grad()
def warm_up(dit, context, grid_hw):
    """Forwards of a first chunk on a scratch cache, unpruned and half pruned: the first
    CUDA calls compile the fused regions (torch.compile; Inductor caches its code on
    disk, so a second run of the command is quicker), outside the time charged to the DiT."""
    fpc = dit.cfg.frames_per_chunk
    param = dit.head.head.weight
    chunk = torch.zeros(1, dit.cfg.in_channels, fpc, 2 * grid_hw[0], 2 * grid_hw[1], device=param.device,
                        dtype=param.dtype)
    keep = torch.rand(fpc, *grid_hw, generator=torch.Generator().manual_seed(0)).to(param.device) < 0.5
    keep[0] = True
    cache = M.KVCache(dit, context, grid_hw, window=(0, fpc))
    for plan in (None, lipar.recovery_plan(keep, has_memory=False)):
        dit.forward_chunk(chunk, torch.zeros(1, 1, device=param.device), cache, 0, plan=plan)


class ChunkEditor:
    """Steps 5–7 for one chunk after another, with what a clip carries from chunk to
    chunk: the DiT's KV cache, the noise generator and LIPAR's memory x0.

    mode: one of MODES ("tape" takes tape_cfg, a tape.TapeConfig); window: the M-degree window (m_sink, m_recent),
    or None for Self-Forcing's causal cache (the whole clip up to 21 latent frames, a
    rolling window of 21 past that). Every chunk draws its noise from one generator
    in the same order in every mode, so `full` and `lipar` with one seed see
    identical noise. With a graphs.GraphRunner for `dit` every DiT forward is one
    replayed CUDA graph (same results, less CPU time).
    """

    def __init__(self, dit, context, grid_hw, mode, window, seed, runner=None, tape_cfg=None):
        self.dit, self.mode, self.schedule = dit, mode, editing_schedule()
        self.device, self.dtype = context.device, dit.head.head.weight.dtype
        self.generator = torch.Generator(self.device).manual_seed(seed)
        window = None if mode == "full" else window
        if mode == "tape":  # TAPE runs op by op (tape.py): its selections are decided as it goes
            runner = None
            self.tape_cfg, self.tape_state = tape_cfg or tape.TapeConfig(), tape.TapeState()
            self.tape_ratios = tape.highlow_ratios(self.tape_cfg.ratio, len(self.schedule), self.tape_cfg.delta)
        self.cache = M.KVCache(dit, context, grid_hw, window) if runner is None else \
            runner.kv_cache(context, grid_hw, window, owner=mode)
        self.forward_chunk = dit.forward_chunk if runner is None else runner.forward_chunk
        self.start = 0          # the chunk's first latent frame
        self.memory_x0 = None   # the previous chunk's last frame of x0: the substitute of pruned latents

    def noise(self, like):
        return torch.randn(like.shape, generator=self.generator, device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, latents, keep=None):
        """latents [1, 16, F, h, w]: the next chunk's normalised source latents; keep
        [F, h/2, w/2]: its LIPAR mask (ignored by `full`). Returns its edited latents x0."""
        s, device = self.start, self.device
        # LIPAR stage 2: how the chunk recovers its pruned keys (a pure function of its mask)
        pruned = self.mode in lipar.MODES and self.mode != "full"
        plan = lipar.recovery_plan(keep, self.mode, has_memory=s > 0) if pruned else None
        _, sigma0 = self.schedule[0]
        x = (1 - sigma0) * latents + sigma0 * self.noise(latents)  # step 5
        for i, (t, sigma) in enumerate(self.schedule):  # step 6
            t_chunk = torch.full((1, 1), t, device=device)
            if self.mode == "tape":  # the step's HighLow ratio; the state carries the smoothed scores
                v = tape.forward_chunk(self.dit, x.to(self.dtype), t_chunk, self.cache, s, self.tape_ratios[i],
                                       self.tape_state, self.tape_cfg)
            else:
                v = self.forward_chunk(x.to(self.dtype), t_chunk, self.cache, s, plan=plan)
            x0 = x - sigma * v.float()
            if plan is not None:  # LIPAR stage 3: pruned latents take the memory's value
                x0 = lipar.restore(x0, keep, x0[:, :, 0] if self.memory_x0 is None else self.memory_x0)
            if i + 1 < len(self.schedule):
                next_sigma = self.schedule[i + 1][1]
                x = (1 - next_sigma) * x0 + next_sigma * self.noise(x0)
        self.memory_x0 = x0[:, :, -1]
        if self.mode == "tape":
            self.tape_state.commit()
        # step 7, the memory step: t = 0 writes the chunk's clean keys/values for later chunks
        self.forward_chunk(x0.to(self.dtype), torch.zeros(1, 1, device=device), self.cache, s, memory_step=True,
                           plan=plan)
        self.start += latents.shape[2]
        return x0


@torch.no_grad()
def edit_latents(dit, latents, context, keep, mode, window, seed, progress=True, runner=None, tape_cfg=None):
    """Steps 5–7 over a whole clip's latents [1, 16, L, h, w] with its mask keep [L, h/2, w/2]:
    the edited latents (float32). The stream below edits the same chunks one by one."""
    fpc = dit.cfg.frames_per_chunk
    editor = ChunkEditor(dit, context, (latents.shape[3] // 2, latents.shape[4] // 2), mode, window, seed, runner,
                         tape_cfg)
    chunks = tqdm(range(0, latents.shape[2], fpc), desc=f"DiT {mode}", unit="chunk", disable=not progress,
                  leave=False)
    return torch.cat([editor(latents[:, :, s:s + fpc], keep[s:s + fpc]) for s in chunks], dim=2)


# -----------------------------------------------------------------------------
# Measuring


class Stopwatch:
    """Wall time per stage, and on CUDA each stage's peak GPU memory (GiB); waits for
    the GPU so each stage is charged its own work."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.seconds, self.peaks = {}, {}

    @contextmanager
    def __call__(self, stage):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.peaks[stage] = max(self.peaks.get(stage, 0.0), peak)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def mask_preview(frames, keep, first_chunk=True):
    """The input with pruned patches greyed out: what LIPAR skips, frame by frame.

    frames uint8 [T, H, W, 3] at model size, of a chunk; keep [L, H/16, W/16] its mask.
    In the first chunk video frame 0 belongs to latent frame 0 and frames 4k−3..4k to
    latent frame k (the VAE's causal stride 4); in a later one frames 4j..4j+3 to its
    latent frame j.
    """
    latent_of_frame = (torch.arange(len(frames)) + (3 if first_chunk else 0)) // 4
    cell = frames.shape[1] // keep.shape[1]
    kept = keep.cpu()[latent_of_frame.clamp(max=keep.shape[0] - 1)]
    kept = kept.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[..., None]
    grey = (frames.float() * 0.25 + 96).to(torch.uint8)
    return torch.where(kept, frames, grey)


# -----------------------------------------------------------------------------
# Models


class Models:
    """The three networks, loaded lazily so that the text encoder is gone before the DiT arrives.

    weights=None stands in tiny random-weight models (the demo without downloads).
    vae: "wan" (the Wan 2.1 VAE) or "tiny" (TAEHV, tiny_vae.py).
    use_graphs: run the DiT through CUDA graphs (graphs.py) when on CUDA.
    """

    def __init__(self, weights, device, dtype, text_device, use_graphs=True, vae="wan"):
        self.device, self.dtype, self.text_device, self.vae_kind = device, dtype, text_device, vae
        self.use_graphs = use_graphs and torch.device(device).type == "cuda"
        self.random = weights is None
        self._vae = self._dit = self._runner = None
        if self.random:
            self._tmp = tempfile.TemporaryDirectory()
            self.weights = write_random_weights(self._tmp.name)
        else:
            self.weights = Path(weights)

    def vae(self):
        if self._vae is None:
            if self.vae_kind == "tiny":
                self._vae = load_tiny_vae(self.weights / "tiny_vae", self.device, self.dtype)
            else:
                self._vae = V.load_vae(self.weights / "vae", self.device, self.dtype)
        return self._vae

    def dit(self):
        if self._dit is None:
            self._dit = M.load_dit(self.weights / "dit", self.device, self.dtype)
        return self._dit

    def runner(self):
        """The DiT's CUDA-graph runner, or None (graphs off, or not on CUDA)."""
        if self.use_graphs and self._runner is None:
            self._runner = graphs.GraphRunner(self.dit())
        return self._runner

    def text_encoder(self):
        # umT5-XXL is 5.7 B parameters: bf16 on the CPU too (22 GB in float32), except the tiny demo one
        on_cpu = torch.device(self.text_device).type == "cpu"
        dtype = torch.float32 if self.random else (torch.bfloat16 if on_cpu else self.dtype)
        return M.load_text_encoder(self.weights / "text_encoder", self.weights / "tokenizer", self.text_device, dtype)


def write_random_weights(folder, dit=None, vae=None, text_encoder=None, tiny_vae=None):
    """Random-weight models saved in the layout of weights.md: the demo's and the tests'
    stand-ins (tiny ones unless given; bench.py passes real-shape ones)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(folder)
    torch.manual_seed(0)
    text_dim = (text_encoder.cfg if text_encoder else M.T5Config.tiny()).dim
    dit = dit or M.CausalWanModel(M.DiTConfig(**{**vars(M.DiTConfig.tiny()), "text_dim": text_dim}))
    vae = vae or random_demo_vae()
    text_encoder = text_encoder or M.UMT5Encoder(M.T5Config.tiny())
    tiny_vae = tiny_vae or random_tiny_vae()
    for name, module in (("dit", dit), ("vae", vae), ("text_encoder", text_encoder), ("tiny_vae", tiny_vae)):
        (folder / name).mkdir(parents=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(tensors, str(folder / name / "model.safetensors"))
    cfg = dit.cfg
    (folder / "dit" / "config.json").write_text(json.dumps(
        {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "num_heads": cfg.num_heads,
         "num_layers": cfg.num_layers, "in_dim": cfg.in_channels, "out_dim": cfg.out_channels,
         "text_dim": cfg.text_dim}))
    (folder / "vae" / "config.json").write_text(json.dumps(vae.cfg.to_diffusers_json()))
    (folder / "tiny_vae" / "config.json").write_text(json.dumps(asdict(tiny_vae.cfg)))
    words = sorted(set(DEFAULT_PROMPT.replace(",", "").split()))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    (folder / "tokenizer").mkdir()
    tokenizer.save(str(folder / "tokenizer" / "tokenizer.json"))
    return folder


def check_weights(weights):
    """--check-weights: every file present, every tensor named and shaped right; headers only."""
    weights = Path(weights)
    if not weights.exists():
        raise UsageError(f"no weights folder at {weights}; download the files listed in weights.md")
    M.load_dit(weights / "dit", device="meta")
    V.load_vae(weights / "vae", device="meta")
    M.load_text_encoder(weights / "text_encoder", weights / "tokenizer", device="meta")
    if (weights / "tiny_vae").exists():
        load_tiny_vae(weights / "tiny_vae", device="meta")
        return f"{weights}: DiT, VAE, tiny VAE, text encoder and tokenizer present, all names and shapes as expected"
    return (f"{weights}: DiT, VAE, text encoder and tokenizer present, all names and shapes as expected (no tiny VAE, "
            f"which --vae tiny needs: see weights.md)")


def convert_checkpoint(source, target):
    """One-time conversion of Self-Forcing's pickled self_forcing_dmd.pt to safetensors.

    The .pt is read with weights_only=True (tensors and plain containers only, no
    code); we keep the EMA generator, which is what the authors sample with.
    """
    from safetensors.torch import save_file

    target = Path(target)
    if target.exists():
        raise UsageError(f"{target} already exists; remove it or choose another path")
    checkpoint = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint.get("generator_ema", checkpoint.get("generator", checkpoint))
    tensors = {k.removeprefix("model."): v.contiguous() for k, v in state.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target))
    return f"wrote {len(tensors)} tensors to {target}"


# -----------------------------------------------------------------------------
# One edit, start to finish, chunk by chunk


class Interrupted(Exception):
    """Ctrl-C or a closed pipe part-way: the message says what was written; `code` is the exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def source_chunks(reader, vae, frames_per_chunk, height, width, notes):
    """Step 1 as a stream: the source's frames in the pieces the VAE takes for one chunk
    of the DiT (F latent frames) each. For the Wan VAE 1 + 4(F − 1) frames first
    (frame 0 is coded alone), then 4F; for the tiny VAE 4F every time. Yields
    (frames uint8 [n, H, W, 3] at the source's size, the source times of the real ones).

    Edited frames come out 1 + 4(F − 1) for the first chunk and 4F for each later one,
    whichever the VAE (the tiny one decodes 3 frames late and drops its first 3). At
    the end the last piece, and where needed one more, repeat the source's last frame
    until the output reaches every source frame; the caller trims the rest.
    """
    size, frames, times, pieces = vae.chunk_frames(frames_per_chunk, True), [], [], 0
    for pixels, seconds in reader:
        if reader.frames_read == 1 and pixels.shape[:2] != (height, width):
            notes.append(f"resized {pixels.shape[1]}x{pixels.shape[0]} to {width}x{height} (centre crop)")
        frames.append(pixels)
        times.append(seconds)
        if len(frames) == size:
            yield torch.stack(frames), times
            frames, times, pieces = [], [], pieces + 1
            size = vae.chunk_frames(frames_per_chunk, False)
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


def open_writers(args, modes, reader):
    """A VideoWriter per output: each mode's edit (with the source's audio), and with
    --compare the side-by-side video, with --save-mask the mask preview."""
    kinds = modes + (["compare"] if args.compare else []) + (["mask"] if args.save_mask else [])
    writers = {}
    try:
        for kind in kinds:
            writers[kind] = io.VideoWriter(output_path(args, kind), reader.fps,
                                           audio_from=reader if kind in modes else None)
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    return writers


def run_edit(args, models, notes):
    """Steps 1–8 for every requested mode, chunk by chunk as the video is read; returns
    the stats. Memory stays that of a few chunks, however long the video."""
    with io.VideoReader(args.video) as reader:  # the input is checked before anything heavy
        return stream_edit(args, models, reader, notes)


def stream_edit(args, models, reader, notes, context=None, fidelity=None):
    """run_edit on an open reader. context: the prompt's, when already encoded (a
    manifest encodes all its prompts with one load of the text encoder). fidelity: a
    metrics.Fidelity to use (a sweep's, holding the `full` edit it compares with);
    by default one is made when `full` runs beside another mode."""
    device = torch.device(args.device)
    clock, timeline = Stopwatch(device), None
    if context is None:
        with clock("text"):  # step 4, first: the text encoder is freed before the DiT arrives
            context = encode_prompt(models.text_encoder, args.prompt, device, models.dtype)
    with clock("load"):  # weights from disk
        vae, dit = models.vae(), models.dit()
    fpc = dit.cfg.frames_per_chunk
    grid = (args.height // 16, args.width // 16)
    if M.FUSE and clock.cuda:
        with clock("compile"):
            warm_up(dit, context, grid)
    modes = edit_modes(args)
    if fidelity is None and "full" in modes and len(modes) > 1:
        fidelity = Fidelity()
    window = None if args.m == "all" else args.m
    runner = models.runner()
    graphs_before = dict(runner.stats) if runner else None
    tape_cfg = tape.TapeConfig(args.prune_ratio, args.tape_alpha, args.tape_delta, args.tape_every)
    editors = {mode: ChunkEditor(dit, context, grid, mode, window, args.seed, runner, tape_cfg) for mode in modes}
    masks = (lipar.MaskStream(args.theta, args.theta2, fpc, args.mask_lookahead)
             if args.save_mask or set(modes) - {"full", "tape"} else None)
    encoder_cache = V.CausalCache()
    decoder_caches = {mode: V.CausalCache() for mode in modes}
    pending, ready_masks = deque(), []  # chunks encoded but waiting for their mask; final mask frames
    waiting_times, waiting_frames = deque(), deque()  # source frames read, not yet matched by edited ones
    chunks_done = 0
    kept_per_chunk = []
    writers = open_writers(args, modes, reader)
    background = WriterThread()
    progress = tqdm(total=reader.frame_count, desc=f"editing ({', '.join(modes)})", unit="frame", leave=False)

    def finish_chunk(latents):
        """Steps 5–8 for one chunk whose mask is known: edit it in every mode, decode, and
        hand the frames to the writer thread with the source frames and times they match."""
        nonlocal chunks_done
        timeline.holding()
        keep = None
        if masks is not None:
            keep = torch.stack(ready_masks[:fpc])
            del ready_masks[:fpc]
            kept_per_chunk.append(keep)
        first, chunks_done = chunks_done == 0, chunks_done + 1
        count = min(4 * fpc - 3 * first, len(waiting_times))  # the frames out, less any padding
        times = [waiting_times.popleft() for _ in range(count)]
        source = torch.stack([waiting_frames.popleft() for _ in range(count)]).cpu() if waiting_frames else None
        edited, x0s = {}, {}
        for mode, editor in editors.items():
            with clock(f"dit_{mode}"):
                x0s[mode] = editor(latents, keep)
            with clock(f"decode_{mode}"):  # step 8, with the decoder's causal cache
                edited[mode] = io.from_model(vae.decode(x0s[mode], cache=decoder_caches[mode]))[:count]
        if fidelity is not None:
            with clock("fidelity"):
                fidelity.add(x0s, edited)
        outputs = {mode: edited[mode] for mode in modes}
        if args.compare:
            outputs["compare"] = torch.cat([source, edited["full"], edited["lipar"]], dim=2)
        if args.save_mask:
            outputs["mask"] = mask_preview(source, keep.cpu(), first_chunk=first)

        def write():
            for kind, frames in outputs.items():
                writers[kind].write(frames, times)
            timeline.wrote(count)
            progress.update(count)
        background.submit(write)

    chunks = ReaderThread(source_chunks(reader, vae, fpc, args.height, args.width, notes))
    try:
        timeline = Timeline()
        while True:
            with clock("read"):  # step 1: decoded by the reader thread, cropped and resized on the device
                chunk = chunks.next()
                if chunk is not None:
                    source = io.resize_crop(chunk[0].to(device), args.height, args.width)
            if chunk is None:
                break
            timeline.read()
            waiting_times.extend(chunk[1])  # the source frames' times, until their edits are written
            if args.compare or args.save_mask:
                waiting_frames.extend(source[:len(chunk[1])])
            with clock("encode"):  # step 2, continuing the encoder's causal cache
                latents = vae.encode(io.to_model(source), cache=encoder_cache)
            if masks is not None:
                with clock("mask"):  # step 3, LIPAR stage 1: final once the frames it looks ahead to are read
                    ready_masks.extend(masks.push(latents[0].transpose(0, 1)))
            pending.append(latents)
            while pending and (masks is None or len(ready_masks) >= fpc):
                finish_chunk(pending.popleft())
        if masks is not None:
            with clock("mask"):
                ready_masks.extend(masks.finish())
        while pending:
            finish_chunk(pending.popleft())
        with clock("write"):  # what the writer thread still has to do once the GPU is done
            background.join()
            for writer in writers.values():
                if note := writer.close():
                    notes.append(note)
        progress.close()
    except (KeyboardInterrupt, BrokenPipeError) as stop:
        chunks.close()
        background.drain()
        progress.close()
        raise Interrupted(close_interrupted(writers, stop), 130 if isinstance(stop, KeyboardInterrupt) else 1) \
            from None
    except BaseException:
        chunks.close()
        background.drain()
        progress.close()
        for writer in writers.values():
            writer.discard()
        raise
    if reader.error:
        notes.append(f"{reader.error}; edited the frames read before it")
    count = reader.frames_read
    stats = {"video": str(args.video), "prompt": args.prompt, "random_weights": models.random, "vae": args.vae,
             "frames": count, "fps": reader.fps, "height": args.height, "width": args.width,
             "latent_frames": 1 + (io.padded_length(count) - 1) // 4, "theta": args.theta, "theta2": args.theta2,
             "mask_lookahead": args.mask_lookahead,
             "m": "all" if window is None else list(window), "seed": args.seed, "device": str(device),
             "dtype": str(models.dtype).removeprefix("torch."), "notes": notes, "modes": {},
             "stream": timeline.stats()}
    keep = torch.cat(kept_per_chunk) if kept_per_chunk else None
    fidelities = fidelity.stats() if fidelity is not None else {}
    shared = sum(clock.seconds.get(stage, 0.0) for stage in ("read", "encode", "mask", "write"))
    for mode in modes:
        pruned = mode not in ("full", "tape") and keep is not None
        dit_s, decode_s = clock.seconds[f"dit_{mode}"], clock.seconds[f"decode_{mode}"]
        skipped = tape_cfg.ratio if mode == "tape" else 0.0  # TAPE's tokens skipped, the mean over steps
        stats["modes"][mode] = {
            "prune_ratio": lipar.prune_ratio(keep) if pruned else skipped,
            "prune_ratio_per_chunk": lipar.chunk_prune_ratios(keep, fpc) if pruned else
            [skipped] * len(timeline.written),
            "seconds": {stage: clock.seconds.get(stage, 0.0) for stage in ("read", "encode", "mask", "text", "load",
                                                                            "compile", "write")}
            | {"dit": dit_s, "decode": decode_s},
            "cuda_graphs": None if runner is None else {k: runner.stats[k] - graphs_before[k] for k in graphs_before},
            "dit_fps": count / dit_s, "end_to_end_fps": count / (shared + dit_s + decode_s)}
        if mode == "tape":
            stats["modes"][mode]["tape"] = asdict(tape_cfg) | {"ratio_per_step": editors[mode].tape_ratios}
        if pruned:  # per latent frame, for the evaluation's plots (frame 0 is never pruned)
            stats["modes"][mode]["prune_ratio_per_frame"] = (1 - keep.flatten(1).float().mean(1)).tolist()
        if mode in fidelities:
            stats["modes"][mode]["fidelity_to_full"] = fidelities[mode]
    if args.compare:
        stats["psnr_full_vs_lipar_db"] = fidelities["lipar"]["psnr_db"]
    stats["peak_gpu_memory_gib"] = max(clock.peaks.values()) if clock.cuda else None
    stats["peak_gpu_memory_gib_per_stage"] = clock.peaks if clock.cuda else None
    stats["peak_host_memory_gib"] = host_memory_gib()
    stats["outputs"] = {kind: writer.name for kind, writer in writers.items()}
    return stats


def close_interrupted(writers, stop):
    """Close every output on Ctrl-C or a closed pipe, keeping what was finished: one sentence."""
    kept, frames = [], 0
    for writer in writers.values():
        frames = max(frames, writer.frames_written)
        if writer.frames_written == 0 or writer.to_stdout:
            writer.discard()  # a closed standard output takes nothing more
            continue
        try:
            writer.close()
            kept.append(writer.name)
        except (BrokenPipeError, io.VideoError):
            writer.discard()
    if isinstance(stop, KeyboardInterrupt):
        why = "interrupted"
    else:
        why = f"standard output was closed by its reader after {frames} edited frames"
    if not kept:
        return f"{why}; nothing was written" if frames == 0 else why
    return (f"{why}: {', '.join(kept)} {'holds' if len(kept) == 1 else 'hold'} the {frames} edited frames finished "
            f"so far (every finished chunk, playable)")


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


def edit_modes(args):
    """The modes one run edits in, side by side from the same noise: `full` and `lipar`
    for --compare, the evaluation's for --eval, else --mode."""
    if args.compare:
        return ["full", "lipar"]
    return list(args.eval_modes) if args.eval else [args.mode]


def output_path(args, kind):
    """results/<input>_<kind>.mp4, or --out (with the kind appended when several files are
    written); "-" is standard output."""
    if args.out is None:
        stem = "stdin" if str(args.video) == io.STDIO else Path(args.video).stem
        return Path("results") / f"{stem}_{kind}.mp4"
    if args.out == io.STDIO:
        return io.STDIO
    out = Path(args.out)
    several = len(edit_modes(args)) > 1 or args.compare or args.save_mask
    return out.with_name(f"{out.stem}_{kind}{out.suffix or '.mp4'}") if several else out


def check_outputs(args):
    """Refuse to overwrite anything unless --overwrite, and never the input."""
    kinds = edit_modes(args) + (["compare"] if args.compare else []) + (["mask"] if args.save_mask else [])
    if args.out == io.STDIO:
        if len(kinds) > 1:
            raise UsageError("--out - writes one video to standard output; drop --compare and --save-mask, or give "
                             "--out a file name")
        return
    source = Path(args.video).resolve()
    for kind in kinds:
        path = output_path(args, kind)
        if path.resolve() == source:
            raise UsageError(f"the output {path} is the input video; choose another --out")
        if path.exists() and not args.overwrite:
            raise UsageError(f"{path} already exists; pass --overwrite or choose another --out")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create the output folder {path.parent} ({err.strerror}); "
                             "choose another --out") from None


# -----------------------------------------------------------------------------
# The demo clip


def demo_frames(height=480, width=832, frames=DEMO_FRAMES):
    """A still textured background, a still block, and a ball rolling across: the case
    LIPAR is made for (most patches repeat the previous frame, a few move). uint8 [T, H, W, 3]."""
    y, x = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    wood = 0.5 + 0.25 * torch.sin(x / 9 + 3 * torch.sin(y / 40)) + 0.1 * torch.sin(y / 3)
    background = torch.stack([150 * wood + 60, 100 * wood + 40, 60 * wood + 20], dim=-1)
    background[height // 8:height // 3, width * 2 // 3:width * 5 // 6] = torch.tensor([40.0, 70.0, 160.0])
    clip = []
    for i in range(frames):
        cx, cy = width * (0.1 + 0.5 * i / frames), height * (0.6 + 0.15 * math.sin(i / 6))
        ball = ((x - cx) ** 2 + (y - cy) ** 2 < (height / 10) ** 2)[..., None]
        shade = 0.8 + 0.2 * torch.cos((x - cx + y - cy) / 15)[..., None]
        clip.append(torch.where(ball, torch.tensor([210.0, 30.0, 30.0]) * shade, background))
    return torch.stack(clip).round().clamp(0, 255).to(torch.uint8)


def random_tiny_vae():
    """A narrow random-weight TAEHV (tiny_vae.py) for the demo and the tests, made, like
    random_demo_vae, to behave as a trained one where LIPAR looks: each MemBlock's last
    convolution at zero (every block passes its input on: latents follow the picture),
    and the last encoder convolution scaled to latents of zero mean and unit spread on
    the demo scene."""
    torch.manual_seed(0)
    vae = TinyVAE(TinyVAEConfig.tiny())
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, MemBlock):
                module.conv[4].weight.zero_()
                module.conv[4].bias.zero_()
        z = vae.encode(io.to_model(demo_frames(64, 112, 9)))
        m, s = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
        last = vae.encoder[-1]
        last.weight /= s.view(-1, 1, 1, 1)
        last.bias.sub_(m).div_(s)
    return vae


def random_demo_vae():
    """A tiny random-weight VAE that behaves like a trained one where LIPAR looks.

    Two things a trained VAE has and random weights lack: locality (a random deep
    encoder lets a moving object change every latent of a small frame) and the
    latent spread LIPAR's thresholds were set on (unit std per channel after
    normalisation). So every residual branch and attention output starts at
    zero ("identity" init), and the posterior-mean projection (conv1's first 16
    outputs) is rescaled so that the demo scene's normalised latents are
    zero-mean and unit-std. The pixels it decodes stay meaningless.
    """
    torch.manual_seed(0)
    vae = V.WanVAE(V.VAEConfig.tiny())
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, V.ResidualBlock):
                last_conv = [m for m in module.residual.modules() if isinstance(m, torch.nn.Conv3d)][-1]
                last_conv.weight.zero_()
                last_conv.bias.zero_()
            elif isinstance(module, V.AttentionBlock):
                module.proj.weight.zero_()
                module.proj.bias.zero_()
        z = vae.encode(io.to_model(demo_frames(64, 112, 9)))
        m, s = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
        mean, std = torch.tensor(V.LATENT_MEAN), torch.tensor(V.LATENT_STD)
        z_dim = len(mean)  # mu' = mean + std·(z − m)/s, with z = (mu − mean)/std and mu = W·h + b
        vae.conv1.weight[:z_dim] /= s.view(-1, 1, 1, 1, 1)
        vae.conv1.bias[:z_dim] = (vae.conv1.bias[:z_dim] - mean - std * m) / s + mean
    return vae


# -----------------------------------------------------------------------------
# Command line


def parse_window(text):
    if text == "all":
        return text
    try:
        sink, recent = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--m takes 'SINK,RECENT' (e.g. 1,6) or 'all', not {text!r}") from None
    return sink, recent


def parse_args(argv):
    p = argparse.ArgumentParser(description="Edit a video with LIPAR on Self-Forcing (Wan 2.1 T2V 1.3B).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--video", help="input video (mp4, mov, webm, gif); default: a generated demo clip")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="what the edited video should show")
    p.add_argument("--out", help="output mp4 (default: results/<input>_<mode>.mp4)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--weights", default="weights", help="folder laid out as weights.md says")
    p.add_argument("--mode", default="lipar", choices=MODES,
                   help="lipar: the method; full: the Self-Forcing baseline; naive / noisy_dup: ablations; "
                        "tape: TAPE's attention-importance pruning, for comparison (README: TAPE beside LIPAR)")
    p.add_argument("--theta", type=float, default=0.149, help="prune threshold θ on the robust patch L1 (Eq. 1)")
    p.add_argument("--theta2", type=float, default=0.3, help="substitute bound θ2 (Eq. 5-6)")
    p.add_argument("--vae", choices=["wan", "tiny"], default=None,
                   help="wan: the Wan 2.1 VAE; tiny: TAEHV (taew2_1), about 20x cheaper, a little less faithful "
                        "(default: wan when weights/vae exists, else tiny when weights/tiny_vae does)")
    p.add_argument("--mask-lookahead", type=int, default=1, choices=[0, 1],
                   help="latent frames the mask's medians and dilation see ahead: 1 as the authors' code (the "
                        "paper's numbers), 0 strictly causal (kept regions linger 3 frames longer after motion)")
    p.add_argument("--prune-ratio", type=float, default=0.3,
                   help="tape: the share of tokens skipped between selections (the mean over the denoising steps)")
    p.add_argument("--tape-alpha", type=float, default=0.5, help="tape: temporal smoothing weight α of the scores")
    p.add_argument("--tape-delta", type=float, default=0.1,
                   help="tape: HighLow budget, the ratio runs from R + δ at the first step to R − δ at the last")
    p.add_argument("--tape-every", type=int, default=10, help="tape: blocks from one selection to the next")
    p.add_argument("--m", type=parse_window, default=(1, 6),
                   help="M-degree window 'SINK,RECENT' in latent frames, or 'all' for the whole cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="model height, a multiple of 16 (default 480)")
    p.add_argument("--width", type=int, default=None, help="model width, a multiple of 16 (default 832)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="model precision (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--text-device", default=None, help="where the text encoder runs (default: --device)")
    p.add_argument("--no-graphs", action="store_true",
                   help="run the DiT op by op instead of replaying captured CUDA graphs (graphs.py; CUDA only)")
    p.add_argument("--compile", action="store_true",
                   help="fuse the DiT's and VAE's elementwise chains with torch.compile (CUDA only): faster per "
                        "clip, but it costs 15-50 s per process, more than one short edit saves (BENCHMARKS.md)")
    p.add_argument("--compare", action="store_true",
                   help="run full and lipar from the same noise; write a side-by-side video and their PSNR")
    p.add_argument("--save-mask", action="store_true", help="write the input with pruned patches greyed out")
    p.add_argument("--json", help="write all stats to this JSON file")
    p.add_argument("--manifest", help="a .jsonl or .csv of jobs (video, prompt, optional name, out, seed and mode "
                   "flags; README: Reproduce the paper's table), edited with the models loaded once; --out is then "
                   "the results folder (default results/<manifest name>)")
    p.add_argument("--eval", action="store_true",
                   help="evaluate: each job in --eval-modes from the same noise, fidelity to full (PSNR, SSIM, "
                        "latent error), report.md/json with plots; without --manifest, on the embedded demo clips")
    p.add_argument("--eval-modes", nargs="+", choices=MODES, default=["full", "lipar"], metavar="MODE",
                   help=f"modes --eval runs, full among them ({', '.join(MODES)})")
    p.add_argument("--sweep-theta", nargs="+", type=float, metavar="THETA",
                   help="with --eval, also run lipar at each θ (speed–fidelity trade-off)")
    p.add_argument("--sweep-m", nargs="+", type=parse_window, metavar="SINK,RECENT",
                   help="with --eval, also run lipar with each window (with --sweep-theta: every pair)")
    p.add_argument("--check-weights", action="store_true", help="verify the weights folder (names, shapes) and exit")
    p.add_argument("--convert-checkpoint", nargs=2, metavar=("PT", "SAFETENSORS"),
                   help="convert Self-Forcing's self_forcing_dmd.pt to safetensors once, and exit")
    return p.parse_args(argv)


def flag_problems(args):
    """Every problem with the flags and the input that can be seen before any work: one
    sentence each, naming the flag and what to give instead."""
    batch = bool(args.manifest or args.eval)
    return edit_problems(args, out_is_folder=batch) + batch_problems(args)


def edit_problems(args, out_is_folder=False):
    """flag_problems of one edit's flags (a manifest's jobs are checked with these)."""
    problems = []
    for name in ("theta", "theta2"):
        value = getattr(args, name)
        if not_a_threshold(value, inf_allowed=name == "theta2"):
            problems.append(f"--{name} {value} is not a threshold; give a number >= 0"
                            + (" (inf turns the bound off)" if name == "theta2" else ""))
    if not 0 <= args.prune_ratio <= 0.95:
        problems.append(f"--prune-ratio {args.prune_ratio} is out of range; give a share from 0 to 0.95")
    if not 0 <= args.tape_alpha <= 1:
        problems.append(f"--tape-alpha {args.tape_alpha} is not a weight; give a number from 0 to 1")
    if not 0 <= args.tape_delta <= 0.5:
        problems.append(f"--tape-delta {args.tape_delta} is out of range; give a number from 0 to 0.5")
    if args.tape_every < 1:
        problems.append(f"--tape-every {args.tape_every} is not a block count; give 1 or more")
    if cannot_hold_a_chunk(args.m):
        problems.append(f"--m {args.m[0]},{args.m[1]} cannot hold a chunk; give SINK >= 0 and RECENT >= 3 "
                        "latent frames (e.g. 1,6) or 'all'")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            problems.append(f"--{name} {value} is not a size; give a positive multiple of 16")
    for flag, device in (("--device", args.device), ("--text-device", args.text_device)):
        try:
            kind = torch.device(device).type if device is not None else None
        except RuntimeError:
            problems.append(f"{flag} {device!r} is not a device; give cpu or cuda")
            continue
        if kind == "cuda" and not torch.cuda.is_available():
            problems.append(f"{flag} {device}: this machine has no usable CUDA GPU; give cpu")
    if not out_is_folder and args.out not in (None, io.STDIO) and Path(args.out).suffix.lower() not in ("", ".mp4"):
        problems.append(f"--out {args.out}: sample.py writes H.264 mp4 files; give the output a .mp4 name")
    if args.video not in (None, io.STDIO) and not Path(args.video).is_file() and not io.is_camera(args.video):
        state = "is a folder" if Path(args.video).is_dir() else "does not exist"
        problems.append(f"the video {args.video} {state}; give the path of a video file, a camera device or - "
                        f"(standard input)")
    return problems


def not_a_threshold(value, inf_allowed=False):
    """θ and θ2 are numbers >= 0; θ2 = inf turns the substitute bound off."""
    return math.isnan(value) or value < 0 or (math.isinf(value) and not inf_allowed)


def cannot_hold_a_chunk(window):
    """An M-degree window (SINK, RECENT) must keep the current chunk's 3 frames."""
    return window != "all" and (window[0] < 0 or window[1] < 3)


def batch_problems(args):
    """The flags of --manifest and --eval (evaluate.py), one sentence each."""
    problems = []
    if args.manifest:
        path = Path(args.manifest)
        if args.video is not None:
            problems.append("--manifest and --video: the manifest names the videos; give one or the other")
        if path.suffix.lower() not in (".jsonl", ".csv"):
            problems.append(f"--manifest {path}: give a .jsonl (one JSON object a line) or a .csv with a header row")
        elif not path.is_file():
            problems.append(f"the manifest {path} does not exist; check the path")
    if args.manifest or args.eval:
        if args.out == io.STDIO or (args.out and Path(args.out).suffix):
            problems.append(f"--out {args.out}: with --manifest or --eval, --out is the results folder; give a folder")
        if args.json:
            problems.append("--json: with --manifest or --eval each job's stats go to <results>/<name>.json (and "
                            "the report to report.json); drop --json")
    if args.eval:
        if "full" not in args.eval_modes:
            problems.append("--eval-modes needs full: the other modes are measured against it")
        if args.compare:
            problems.append("--compare and --eval: --eval already runs full and lipar side by side; drop --compare")
        if args.video is not None and not args.manifest:
            problems.append("--eval takes a --manifest of jobs (or nothing: the demo clips), not --video")
    elif args.sweep_theta or args.sweep_m:
        problems.append("--sweep-theta and --sweep-m are part of --eval; add --eval")
    for theta in args.sweep_theta or []:
        if not_a_threshold(theta):
            problems.append(f"--sweep-theta {theta} is not a threshold; give numbers >= 0")
    for m in args.sweep_m or []:
        if cannot_hold_a_chunk(m):
            problems.append(f"--sweep-m {m[0]},{m[1]} cannot hold a chunk; give SINK >= 0 and RECENT >= 3")
    return problems


def main(argv=None):
    args = parse_args(argv)
    problems = flag_problems(args)
    if problems:
        raise UsageError(problems[0] if len(problems) == 1 else
                         f"{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))
    M.FUSE = args.compile
    if args.check_weights:
        print(check_weights(args.weights))
        return 0
    if args.convert_checkpoint:
        print(convert_checkpoint(*args.convert_checkpoint))
        return 0
    demo = args.video is None and not args.manifest
    have_weights = Path(args.weights).exists()
    if not demo and not have_weights:
        raise UsageError(f"no weights at {args.weights}; download them as weights.md says (or run "
                         "`python sample.py` with no arguments for the random-weight demo)")
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32)
    if args.vae is None:
        only_tiny = have_weights and not (Path(args.weights) / "vae").exists() and \
            (Path(args.weights) / "tiny_vae").exists()
        args.vae = "tiny" if only_tiny else "wan"
    if args.manifest or args.eval:
        import evaluate  # many jobs, models loaded once; the evaluation's report
        return evaluate.run(args, dtype, have_weights)
    models = Models(args.weights if have_weights else None, args.device, dtype, args.text_device or args.device,
                    use_graphs=not args.no_graphs, vae=args.vae)
    notes = []
    report = sys.stderr if args.out == io.STDIO else sys.stdout  # standard output may be the video
    if demo:
        args.video = Path("results") / "demo_input.mp4"
        if not args.video.exists():
            args.video.parent.mkdir(parents=True, exist_ok=True)
            io.write_video(args.video, demo_frames(), DEMO_FPS)
        args.compare = args.save_mask = args.overwrite = True
        if models.random:  # tiny models: a small resolution keeps the CPU demo to about a minute
            args.height, args.width = args.height or 240, args.width or 416
        print(f"demo: editing {args.video} with the prompt {args.prompt!r}", file=report)
    settle_size(args, notes)
    check_outputs(args)
    if models.random:
        print(f"No weights at {args.weights}: running tiny RANDOM-weight models. The pipeline runs end to end, "
              "but the pixels are not an edit. See weights.md to get the real ones.", file=report)
    stats = run_edit(args, models, notes)
    print_summary(stats, report)
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2))
    return 0


def settle_size(args, notes):
    """--height and --width: 480x832 unless given, rounded to multiples of 16 with a note."""
    args.height, args.width = args.height or 480, args.width or 832
    for name in ("height", "width"):
        value = getattr(args, name)
        if value % 16:  # sizes <= 0 were refused by flag_problems
            rounded = max(16, round(value / 16) * 16)
            notes.append(f"--{name} {value} is not a multiple of 16; using {rounded}")
            setattr(args, name, rounded)


def cli(argv=None):
    """main() with bad input reported as one sentence and exit code 2, never a traceback."""
    try:
        return main(argv)
    except (UsageError, io.VideoError, M.WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:  # Ctrl-C or a closed pipe while editing: the finished chunks are kept
        print(stop, file=sys.stderr)
        if stop.code == 1:  # nobody reads standard output any more: keep Python from complaining at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return stop.code
    except KeyboardInterrupt:  # before the edit began: outputs are only ever renamed into place when closed
        print("interrupted before the edit began; nothing was written", file=sys.stderr)
        return 130


def print_summary(stats, file=sys.stdout):
    print = functools.partial(builtins.print, file=file)
    for note in stats["notes"]:
        print(f"note: {note}")
    print(f"{stats['frames']} frames at {stats['width']}x{stats['height']}, {stats['latent_frames']} latent frames, "
          f"{stats['device']} {stats['dtype']}, {'tiny' if stats['vae'] == 'tiny' else 'Wan'} VAE"
          f"{' (random weights)' if stats['random_weights'] else ''}")
    for mode, s in stats["modes"].items():
        sec = s["seconds"]
        chunks = " ".join(f"{r:.0%}" for r in s["prune_ratio_per_chunk"])
        if mode == "tape":
            ratios = " ".join(f"{r:.0%}" for r in s["tape"]["ratio_per_step"])
            print(f"[{mode}] skipped {s['prune_ratio']:.1%} of tokens between selections (per step: {ratios})")
        else:
            print(f"[{mode}] pruned {s['prune_ratio']:.1%} of tokens after frame 0 (per chunk: {chunks})")
        print(f"[{mode}] read {sec['read']:.2f}s  encode {sec['encode']:.2f}s  mask {sec['mask']:.3f}s  "
              f"text {sec['text']:.2f}s  DiT {sec['dit']:.2f}s  decode {sec['decode']:.2f}s  write {sec['write']:.2f}s")
        if s["cuda_graphs"]:
            g = s["cuda_graphs"]
            print(f"[{mode}] DiT forwards: {g['replays']} replayed CUDA graphs, {g['eager']} eager (first of their "
                  f"shape), {g['captures']} captures taking {g['capture_s']:.2f}s of the DiT time")
        print(f"[{mode}] DiT {s['dit_fps']:.1f} frames/s, end to end {s['end_to_end_fps']:.1f} frames/s "
              f"(text encoding excluded)")
    sec = next(iter(stats["modes"].values()))["seconds"]
    compiling = f", compiling the DiT {sec['compile']:.2f}s" if sec["compile"] else ""
    print(f"loading the weights took {sec['load']:.2f}s{compiling} (not in the times above)")
    stream = stats["stream"]
    if stream:
        steady = f"{stream['steady_fps']:.1f} frames/s" if stream["steady_fps"] else "- (one chunk)"
        print(f"streaming: first edited frame after {stream['first_frame_s']:.2f}s, steady state {steady}, "
              f"chunk latency {stream['chunk_latency_s']['median']:.2f}s median, "
              f"{stream['chunk_latency_s']['max']:.2f}s max")
    if "psnr_full_vs_lipar_db" in stats:
        print(f"PSNR lipar vs full: {stats['psnr_full_vs_lipar_db']:.2f} dB")
    if stats["peak_gpu_memory_gib"] is not None:
        stages = "  ".join(f"{stage} {gib:.2f}" for stage, gib in stats["peak_gpu_memory_gib_per_stage"].items())
        print(f"peak GPU memory: {stats['peak_gpu_memory_gib']:.2f} GiB (per stage, GiB: {stages})")
    print(f"peak host memory: {stats['peak_host_memory_gib']:.2f} GiB")
    for kind, path in stats["outputs"].items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    sys.modules.setdefault("sample", sys.modules["__main__"])  # evaluate.py's `import sample` is this module
    sys.exit(cli())
