"""
Edit a video with LIPAR on the Self-Forcing causal video model, in one command:

    python sample.py --video in.mp4 --prompt "a watercolor painting of ..."

This file is the editing procedure as the paper states it (Self-Forcing's SDEdit-style
editing with the DMD checkpoint, LIPAR's Eq. 1-6 at the marked places), read top to
bottom:

    1  read the source a piece at a time, crop and resize     stream.source_pieces
    2  z = VAE.encode(video), normalised latents              edit_chunks
    3  keep = LIPAR mask of z                  (Eq. 1, 5-6)  edit_chunks -> lipar.MaskStream
    4  context = umT5(prompt), once                           encode_prompts
    5  x = (1 - σ0)·z + σ0·ε                   (SDEdit)      ChunkEditor.__call__
    6  per step: v = DiT(x, t), x0 = x - σ·v, re-noised       ChunkEditor.__call__
         on the kept tokens, keys recovered    (Eq. 3-4)     lipar.recovery_plan, model
         pruned latents restored from memory                 lipar.restore
    7  memory step: DiT(x0, t = 0) caches clean keys          ChunkEditor.__call__
    8  decode the chunk, write it                             edit_chunks, stream.run

Every edit is a stream: `edit_chunks` takes the video a piece at a time and yields
each chunk of 3 latent frames edited and decoded, so memory does not grow with the
clip. `main` at the bottom wires the flags (cli.py), the weights (weights.py), the
CUDA graphs (graphs.py), TAPE (tape.py) and the threads (stream.py) around it.
With no arguments it runs a demo on a generated clip.
"""

if __name__ == "__main__":  # Ctrl-C, SIGTERM or SIGHUP while Python loads: one line, nothing written
    import signals
    signals.quiet_until_started()

import sys  # noqa: E402 (the lines above come first)
import tempfile
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import cli
import demo
import graphs
import lipar
import model as M
import prompts
import stream
import summary
import tape
import vae_layout
import video as io
import weights as W
from metrics import Fidelity
from vae import CausalCache

EDIT_STEPS = lipar.Recipe().steps  # (400, 350, 250): the editing steps on Self-Forcing's 1000-step table
SHIFT = 5.0


# -----------------------------------------------------------------------------
# The schedule


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
# Steps 5-7, one chunk at a time


class ChunkEditor:
    """Steps 5–7 for one chunk after another, with what a clip carries from chunk to
    chunk: the DiT's KV cache, the noise generator and LIPAR's memory x0.

    mode: "full" (the Self-Forcing baseline), "lipar", or an ablation (lipar.MODES);
    "tape" and other comparison methods come in as `forward`. window: the M-degree
    window (m_sink, m_recent), or None for Self-Forcing's causal cache (the whole clip
    up to 21 latent frames, a rolling window of 21 past that). Every chunk draws its
    noise from one generator in the same order in every mode, so `full` and `lipar`
    with one seed see identical noise. forward: what runs the DiT on a chunk, with
    model.CausalWanModel.forward_chunk's arguments (default: that method; graphs.py's
    replayed CUDA graphs and tape.py's pruning plug in here); cache: its KV cache
    (default: a new model.KVCache); recipe: a lipar.Recipe (the steps, the
    restoration, the positions).
    """

    def __init__(self, dit, context, grid_hw, mode, window, seed, forward=None, cache=None, recipe=lipar.Recipe()):
        self.mode, self.schedule, self.chained = mode, editing_schedule(recipe.steps), recipe.chained
        self.device, self.dtype = context.device, dit.head.head.weight.dtype
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.prunes = mode in lipar.MODES and mode != "full"
        self.cache = cache or M.KVCache(dit, context, grid_hw, None if mode == "full" else window,
                                        recipe.rolled_positions, memory=mode != "full")
        self.forward = forward or dit.forward_chunk
        self.start = 0          # the chunk's first latent frame
        self.memory_x0 = None   # the previous chunk's last frame of x0: the substitute of pruned latents

    def noise(self, like):
        return torch.randn(like.shape, generator=self.generator, device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, latents, keep=None):
        """latents [1, 16, F, h, w]: the next chunk's normalised source latents; keep
        [F, h/2, w/2]: its LIPAR mask (ignored by `full`). Returns its edited latents x0."""
        s, device = self.start, self.device
        # Eq. 3-4: where each pruned key comes from, a pure function of the chunk's mask
        plan = lipar.recovery_plan(keep, self.mode, has_memory=s > 0) if self.prunes else None
        _, sigma0 = self.schedule[0]
        x = (1 - sigma0) * latents + sigma0 * self.noise(latents)  # step 5: the SDEdit start
        for i, (t, sigma) in enumerate(self.schedule):  # step 6
            v = self.forward(x.to(self.dtype), torch.full((1, 1), t, device=device), self.cache, s, plan=plan)
            x0 = x - sigma * v.float()
            if plan is not None:  # restoration: pruned latents take the memory's value (or the frame before's)
                x0 = lipar.restore(x0, keep, x0[:, :, 0] if self.memory_x0 is None else self.memory_x0, self.chained)
            if i + 1 < len(self.schedule):
                next_sigma = self.schedule[i + 1][1]
                x = (1 - next_sigma) * x0 + next_sigma * self.noise(x0)
        self.memory_x0 = x0[:, :, -1]
        # step 7, the memory step: t = 0 writes the chunk's clean keys/values for later chunks
        self.forward(x0.to(self.dtype), torch.zeros(1, 1, device=device), self.cache, s, memory_step=True, plan=plan)
        self.start += latents.shape[2]
        return x0


@torch.no_grad()
def edit_latents(dit, latents, context, keep, mode, window, seed, progress=True, forward=None, cache=None,
                 recipe=lipar.Recipe()):
    """Steps 5–7 over a whole clip's latents [1, 16, L, h, w] with its mask keep [L, h/2, w/2]:
    the edited latents (float32). edit_chunks edits the same chunks as a stream goes."""
    fpc = dit.cfg.frames_per_chunk
    editor = ChunkEditor(dit, context, (latents.shape[3] // 2, latents.shape[4] // 2), mode, window, seed,
                         forward, cache, recipe)
    chunks = tqdm(range(0, latents.shape[2], fpc), desc=f"DiT {mode}", unit="chunk", disable=not progress,
                  leave=False)
    return torch.cat([editor(latents[:, :, s:s + fpc], keep[s:s + fpc]) for s in chunks], dim=2)


# -----------------------------------------------------------------------------
# The chunk pipeline: steps 2-8 as the video arrives


@dataclass
class EditedChunk:
    """One chunk through the pipeline: its mask [F, h, w] (None without a pruned mode),
    and per mode its edited latents x0 [1, 16, F, h, w] and decoded video [1, 3, n, H, W]."""
    keep: torch.Tensor | None
    latents: dict = field(default_factory=dict)
    videos: dict = field(default_factory=dict)

    @property
    def frames(self):
        return next(iter(self.videos.values())).shape[2]


def edit_chunks(pieces, vae, editors, masks=None, clock=None):
    """Steps 2-8 of a video that arrives in pieces: yields each chunk as an EditedChunk,
    in order, as soon as its mask is final.

    pieces: video pieces [1, 3, n, H, W] in [-1, 1] at model size, n = vae.chunk_frames
    (the first holds frame 0 of the clip); editors: {mode: ChunkEditor}, run side by
    side on every chunk; masks: a lipar.MaskStream (None: no mode prunes); clock:
    clock(stage) is a context manager timing each stage (stream.Stopwatch)."""
    clock = clock or (lambda stage: nullcontext())
    encoder_cache, decoder_caches = CausalCache(), {mode: CausalCache() for mode in editors}
    waiting, mask_frames = deque(), []  # latents waiting for their mask; final mask frames not yet used

    def finish(latents):
        keep, frames = None, latents.shape[2]
        if masks is not None:
            keep, mask_frames[:frames] = torch.stack(mask_frames[:frames]), []
        chunk = EditedChunk(keep)
        for mode, editor in editors.items():
            with clock(f"dit_{mode}"):  # steps 5-7
                chunk.latents[mode] = editor(latents, keep)
            with clock(f"decode_{mode}"):  # step 8, with the decoder's causal cache
                chunk.videos[mode] = vae.decode(chunk.latents[mode], cache=decoder_caches[mode])
        return chunk

    for piece in pieces:
        with clock("encode"):  # step 2, continuing the encoder's causal cache
            latents = vae.encode(piece, cache=encoder_cache)
        if masks is not None:
            with clock("mask"):  # step 3: a frame's mask is final once the frames it looks ahead to are read
                mask_frames.extend(masks.push(latents[0].transpose(0, 1)))
        waiting.append(latents)
        while waiting and (masks is None or len(mask_frames) >= waiting[0].shape[2]):
            yield finish(waiting.popleft())
    if masks is not None:
        with clock("mask"):
            mask_frames.extend(masks.finish())
    while waiting:
        yield finish(waiting.popleft())


def encode_prompts(text_encoder_loader, prompts, device, dtype, notes=None):
    """Step 4: {prompt: context [1, 512, 4096]} for every distinct prompt, with one load of
    the text encoder (11 GB for umT5-XXL), freed before the DiT arrives. A prompt longer
    than the encoder reads is noted in `notes` (a list), if given."""
    text_encoder = text_encoder_loader()
    contexts = {prompt: text_encoder.encode([prompt]).to(device, dtype) for prompt in dict.fromkeys(prompts)}
    for prompt in contexts:
        count, length = text_encoder.tokenizer.token_count(prompt), text_encoder.tokenizer.text_len
        if notes is not None and count > length:
            notes.append(f"the prompt is {count} tokens long; the text encoder reads its first {length - 1} "
                         f"(and the end mark): shorten it to keep the rest")
    del text_encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return contexts


# -----------------------------------------------------------------------------
# The models, and one edit with its outputs


class Models:
    """The networks, loaded lazily so that the text encoder is gone before the DiT arrives; as a
    context manager, the demo's random weights are removed on leaving it. weights=None: tiny
    random-weight models (demo.py). vae: "wan" (Wan 2.1) or "tiny" (TAEHV). use_graphs: the
    DiT through CUDA graphs (graphs.py) when on CUDA. fp8: the DiT's FFN in fp8 (fp8.py)."""

    def __init__(self, weights, device, dtype, text_device, use_graphs=True, vae="wan", fp8=False):
        self.device, self.dtype, self.text_device, self.vae_kind, self.fp8 = device, dtype, text_device, vae, fp8
        self.use_graphs = use_graphs and torch.device(device).type == "cuda"
        self.random = weights is None
        self._vae = self._dit = self._runner = None
        if self.random:
            self._tmp = tempfile.TemporaryDirectory()
            self.weights = demo.write_random_weights(self._tmp.name)
        else:
            self.weights = Path(weights)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.random:
            self._tmp.cleanup()

    def vae(self):
        if self._vae is None:
            load = W.load_tiny_vae if self.vae_kind == "tiny" else W.load_vae
            self._vae = load(self.weights / ("tiny_vae" if self.vae_kind == "tiny" else "vae"), self.device, self.dtype)
            if self.vae_kind == "wan" and torch.device(self.device).type == "cuda":
                vae_layout.channels_last(self._vae)  # cuDNN's layout: no transposes around each conv
        return self._vae

    def dit(self):
        if self._dit is None:
            self._dit = W.load_dit(self.weights / "dit", self.device, self.dtype, self.fp8)
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
        return W.load_text_encoder(self.weights / "text_encoder", self.weights / "tokenizer", self.text_device, dtype)


def plugs(dit, runner, context, grid_hw, mode, window, tape_cfg=None, rolled_positions=True):
    """(forward, cache) of a ChunkEditor in `mode` on the fastest path it has: the
    replayed CUDA graphs of a graphs.GraphRunner when there is one (TAPE's forward,
    tape.py, replays its own through it), else the model's own (or TAPE's) op by op."""
    if mode == "tape":
        cache = None if runner is None else runner.kv_cache(context, grid_hw, window, mode, rolled_positions)
        return tape.TapeForward(dit, tape_cfg, runner=runner), cache
    if runner is not None:
        return runner.forward_chunk, runner.kv_cache(context, grid_hw, None if mode == "full" else window, mode,
                                                     rolled_positions, memory=mode != "full")
    return None, None


def make_editors(models, context, grid_hw, settings, schedule=()):
    """A ChunkEditor for each mode of `settings` (cli.EditSettings), side by side; with a
    schedule [(frame, prompt, context)] each changes its prompt as it says (prompts.py)."""
    dit, runner = models.dit(), models.runner()
    recipe = settings.recipe
    editors = {mode: ChunkEditor(dit, context, grid_hw, mode, settings.window, settings.seed,
                                 *plugs(dit, runner, context, grid_hw, mode, settings.window, settings.tape,
                                        recipe.rolled_positions), recipe) for mode in settings.modes}
    return {mode: prompts.ScheduledEditor(e, dit, schedule) for mode, e in editors.items()} if schedule else editors


def edit_video(reader, models, context, settings, outputs, clock, notes, masks=None, fidelity=None, overwrite=False,
               schedule=()):
    """Steps 1-8 on an open video.VideoReader, chunk by chunk as it is read, writing
    `outputs` {kind: path or "-"}: each mode's edit (with the source's audio), and where
    named the side-by-side "compare" and the "mask" preview (over existing files only
    with overwrite). Returns the stats (summary.edit_stats).

    masks: what computes the mask (default: a lipar.MaskStream of the settings, when a
    mode prunes or a preview is asked for); fidelity: a metrics.Fidelity (default: one
    when `full` runs beside another mode); schedule: prompt changes, as make_editors takes them."""
    vae, dit = models.vae(), models.dit()
    grid = (settings.height // 16, settings.width // 16)
    if clock.cuda and M.fusing():
        with clock("compile"):
            graphs.warm_up(dit, context, grid)
    if fidelity is None and "full" in settings.modes and len(settings.modes) > 1:
        fidelity = Fidelity()
    if masks is None and ("mask" in outputs or set(settings.modes) & set(lipar.MODES[1:])):
        masks = lipar.MaskStream(settings.theta, settings.theta2, dit.cfg.frames_per_chunk, settings.mask_lookahead,
                                 settings.recipe.dilation_frames, settings.recipe.bound_after_cleanup)
    runner = models.runner()
    graphs_before = dict(runner.stats) if runner else None
    editors = make_editors(models, context, grid, settings, schedule)
    writers = cli.open_writers(outputs, settings.modes, reader, overwrite)
    kept = []

    # Frames that only go to their writers need not be on the host before the next chunk starts
    passed_through = fidelity is None and not set(outputs) & {"compare", "mask"}

    def render(chunk, count, sources, first):  # the frames each output gets from one chunk
        edited = {mode: io.from_model(video, wait=not passed_through)[:count] for mode, video in chunk.videos.items()}
        if chunk.keep is not None:
            kept.append(chunk.keep)
        if fidelity is not None:
            with clock("fidelity"):
                fidelity.add(chunk.latents, edited)
        return cli.render_outputs(edited, outputs, sources, chunk.keep, first)

    most = None if settings.recipe.rolled_positions else 4 * (M.MAX_POSITIONS // 3 * 3) - 3  # 4089 frames
    pieces = stream.source_pieces(reader, vae, dit.cfg.frames_per_chunk, settings.height, settings.width, notes, most)
    notes_out, timeline = stream.run(reader, pieces, (settings.height, settings.width),
                                     lambda video: edit_chunks(video, vae, editors, masks, clock), render, writers,
                                     clock, keep_sources=bool(set(outputs) & {"compare", "mask"}))
    notes += notes_out
    if reader.error:
        notes.append(f"{reader.error}; edited the frames read before it")
    elif reader.frame_count and reader.frames_read < reader.frame_count and reader.frames_read != most:
        notes.append(f"{reader.name} ended after {reader.frames_read} of the {reader.frame_count} frames its "
                     f"container states (cut short?); edited the {reader.frames_read} frames read")
    graph_stats = None if runner is None else {k: runner.stats[k] - graphs_before[k] for k in graphs_before}
    tape_ratios = editors["tape"].forward.ratios if "tape" in editors else None
    switches = next(iter(editors.values())).switches if schedule else []
    notes += next(iter(editors.values())).never_took_effect() if schedule else []
    return summary.edit_stats(reader, settings, dit.cfg.frames_per_chunk, models, clock, timeline,
                              torch.cat(kept) if kept else None, fidelity.stats() if fidelity is not None else {},
                              graph_stats, tape_ratios, writers, notes, switches)


# -----------------------------------------------------------------------------
# The command


def main(argv=None):
    args, settings, notes = cli.parse(argv)  # every flag checked first: one sentence per problem
    if args.check_weights:
        print(W.check_weights(args.weights))
        return 0
    if args.convert_checkpoint:
        print(checkpoint.convert_checkpoint(*args.convert_checkpoint, overwrite=args.overwrite))
        return 0
    demo_run = args.video is None
    report = sys.stderr if io.STDIO in (args.out, args.json) else sys.stdout  # stdout may be the video or stats
    if demo_run:
        args.video = cli.write_demo_clip()
        print(f"demo: editing {args.video} with the prompt {args.prompt!r}", file=report)
    outputs = cli.check_outputs(args, settings)
    clock = stream.Stopwatch(args.device)
    with Models(cli.weights_folder(args, demo_run), args.device, cli.model_dtype(args), args.text_device or args.device,
                use_graphs=not args.no_graphs, vae=settings.vae, fp8=args.fp8) as models, \
            io.VideoReader(args.video) as reader, M.fusion(cli.fusion(args)):  # the input is checked before loading
        if models.random:
            print(f"No weights at {args.weights}: running tiny RANDOM-weight models. The pipeline runs end to end, "
                  "but the pixels are not an edit. See weights.md to get the real ones.", file=report)
        with clock("text"):  # step 4, first: the text encoder is freed before the DiT arrives
            contexts = encode_prompts(models.text_encoder, [args.prompt, *(p for _, p in settings.prompt_at)],
                                      torch.device(args.device), models.dtype, notes)
        with clock("load"):  # weights from disk
            models.vae(), models.dit()
        stats = edit_video(reader, models, contexts[args.prompt], settings, outputs, clock, notes,
                           overwrite=args.overwrite, schedule=[(f, p, contexts[p]) for f, p in settings.prompt_at])
    summary.print_summary(stats, report)
    if args.json is not None:
        cli.write_json(args.json, stats, args.overwrite)
    return 0


if __name__ == "__main__":
    signals.exit_at_once(cli.guarded(main))  # every output is closed: skip the ~1 s of teardown
