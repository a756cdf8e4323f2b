"""
One launch per DiT forward: CUDA graphs for the chunk steps of the causal DiT.

At LIPAR's token counts a chunk forward is a few milliseconds of GPU work spread
over ~30 layers × ~20 kernels, and launching them one by one from Python costs
the CPU more than the GPU needs (BENCHMARKS.md). A CUDA graph records the whole
forward once and replays it with a single launch, as gpt-fast does for a decoding
step. This file is that machinery and nothing else: model.py knows nothing about
it, and `--no-graphs` (sample.py) or simply not using a GraphRunner switches it off.

A graph replays fixed kernels on fixed addresses, so everything a forward reads
must have a fixed shape and live in a fixed place:
- the kept-token count of a chunk is padded up to a bucket (a multiple of
  `bucket` tokens) by repeating its last kept token: model.run_chunk computes the
  copies and writes each back to that token's own place, with the value the
  token itself gets; the recovery gather reads rows of real kept tokens only, so
  the copies never reach the cache. A chunk with no kept token runs no graph: its
  keys are copies of the memory (model.KVCache.write_duplicates), a few kernels;
- the keys a chunk reads are a prefix of the cache whose length is part of the
  graph's key (with the M-degree window it stops growing once the window is
  full; `full` gets one graph per chunk position, 7 for 21 latent frames);
  absent keys (LIPAR's first chunk, naive pruning) are masked (`key_mask`), not
  gathered as model.forward_chunk does: finding them would wait for the GPU, and
  their count changes;
- latents, timestep, positions, slots and the recovery plan's gather indices are
  copied into static buffers before each replay; the KV cache itself is static
  (the runner hands out caches and reuses them from clip to clip).

Graphs are keyed by those shapes and captured lazily: the first call with a key
runs eagerly (it compiles, builds cuDNN plans and computes the real result); the
second captures, and every later one replays. They are reused across denoising
steps, chunks and clips, and share one memory pool (replays never overlap, and
each replay's output is copied out at once). On the CPU nothing is captured, but
the same padded static buffers are used, so the tests check the bucketing.

`GraphRunner.launch` is the capture-and-replay step on its own: TAPE's denoising steps
(tape.py), whose kept count is fixed by the step's ratio, replay through it too, with
their static buffers kept by the runner (`buffers`) as the model's are.
"""

import time
from dataclasses import replace

import torch

from lipar import recovery_plan
from model import KVCache


def bucket_size(count, total, bucket):
    """`count` rounded up to a multiple of `bucket` (at least one bucket), at most `total`."""
    return min(total, max(1, -(-count // bucket)) * bucket)


class StaticInputs:
    """Fixed buffers for one graph: the chunk's latents, timestep and ChunkStep tensors."""

    def __init__(self, x, t, step, kept_size):
        self.x, self.t = torch.empty_like(x), torch.empty_like(t)
        clone = lambda a: None if a is None else torch.empty_like(a)  # noqa: E731
        kept = None if step.kept is None else step.kept.new_empty(kept_size)
        # key_mask is a view of the (static) cache's validity flags: it needs no copy
        self.step = replace(step, positions=clone(step.positions), kept=kept, slots=clone(step.slots),
                            source=clone(step.source))
        self.n_kept = None

    def fill(self, x, t, step):
        self.x.copy_(x)
        self.t.copy_(t)
        self.step.positions.copy_(step.positions)
        self.step.slots.copy_(step.slots)
        if step.source is not None:
            self.step.source.copy_(step.source)
        if step.kept is not None:
            n = self.n_kept = step.kept.numel()
            self.step.kept[:n].copy_(step.kept)
            self.step.kept[n:] = step.kept[n - 1]  # padding: see the module docstring

    def run(self, model, cache):
        """model.run_chunk on these buffers."""
        return model.run_chunk(self.x, self.t, cache, self.step)


class GraphRunner:
    """Runs `model.forward_chunk` through captured CUDA graphs (same arguments, same result).

    Use `runner.kv_cache(...)` instead of model.KVCache(...), then
    `runner.forward_chunk(...)` instead of model.forward_chunk(...).
    """

    def __init__(self, model, bucket=128):
        self.model = model
        self.bucket = bucket
        self.capture = model.head.head.weight.is_cuda
        self.caches = {}
        self.inputs = {}   # graph key -> its static buffers (StaticInputs, or TAPE's: tape.py)
        self.launched = set()  # graph keys run once eagerly
        self.graphs = {}   # graph key -> (CUDAGraph, static output)
        self.pool = None   # one memory pool for every graph
        self.stats = {"eager": 0, "captures": 0, "replays": 0, "capture_s": 0.0}

    def kv_cache(self, context, grid_hw, window=None, owner=None, rolled_positions=True, memory=True):
        """A KVCache for a clip, in storage that persists (and that the graphs point at);
        `owner` tells apart caches that live side by side (sample.py: one per mode)."""
        key = (tuple(context.shape), tuple(grid_hw), window, owner, rolled_positions, memory)
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = KVCache(self.model, context, grid_hw, window, rolled_positions, memory)
        else:
            cache.reset(self.model, context)
        return cache

    def forward_chunk(self, x, t, cache, start_frame, memory_step=False, plan=None):
        step = self.model.chunk_step(x, cache, start_frame, memory_step, plan)
        if step.kept is not None and step.kept.numel() == 0:
            return self.model.run_chunk(x, t, cache, step)  # no graph: see the module docstring
        if step.absent_keys:
            step.key_mask = cache.key_valid[: step.visible]
        kept_size = None if step.kept is None else bucket_size(step.kept.numel(), step.positions.shape[0], self.bucket)
        key = (id(cache), tuple(x.shape), tuple(t.shape), kept_size, step.visible, step.key_mask is not None,
               step.source is not None and step.memory_step, step.source is not None, self.model.attn_impl)
        inputs = self.buffers(key, lambda: StaticInputs(x, t, step, kept_size))
        inputs.fill(x, t, step)
        return self.launch(key, lambda: inputs.run(self.model, cache))

    def buffers(self, key, make):
        """The static buffers of graph `key`, made by make() the first time. They live as
        long as the runner, as its graphs do: a graph replays on the addresses it was
        captured with, whichever caller launches it."""
        if key not in self.inputs:
            self.inputs[key] = make()
        return self.inputs[key]

    def launch(self, key, run):
        """run() (a function of static buffers only, the same each time for one key) for
        the graph `key`: eager the first time, captured the second, replayed after.
        Returns its output, a tensor or a tuple of them, copied out of the pool."""
        if key not in self.launched or not self.capture:
            self.launched.add(key)
            self.stats["eager"] += 1
            return run()
        if key not in self.graphs:
            self.graphs[key] = self._capture(run)
        graph, out = self.graphs[key]
        graph.replay()
        self.stats["replays"] += 1
        # the pool is shared: another graph's replay may reuse this memory
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    def _capture(self, run):
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=self.pool)
            try:
                out = run()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        self.pool = graph.pool()
        self.stats["captures"] += 1
        self.stats["capture_s"] += time.perf_counter() - start
        return graph, out

    def release(self):
        """Drop every graph, buffer and cache (their memory returns to the allocator)."""
        self.caches.clear()
        self.inputs.clear()
        self.launched.clear()
        self.graphs.clear()
        self.pool = None


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
    cache = KVCache(dit, context, grid_hw, window=(0, fpc))
    for plan in (None, recovery_plan(keep, has_memory=False)):
        dit.forward_chunk(chunk, torch.zeros(1, 1, device=param.device), cache, 0, plan=plan)
