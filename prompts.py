"""
A prompt that changes mid-stream, without a cut: KV re-caching (as LongLive does it).

The authors' live demo restarts from an empty cache when the prompt changes, and the
picture jumps. Here a change lands at a chunk boundary: the cross-attention
keys/values are rebuilt from the new prompt's context, and the chunks whose frames
the KV cache window holds (the first chunk, for the sink, and the latest ones, for
the recent frames) are run through the memory step (t = 0) again on their stored
clean x0 under the new prompt. Their self-attention keys/values then follow the new
text while the picture they came from stays the same. LIPAR's memory (the clean
keys/values of the last frame, which pruned tokens duplicate) is a cache entry too
and is rebuilt with it, from the chunks' own masks.

The replayed chunks go through the blocks in one pass, each chunk's queries seeing
the chunks before it and itself (a block-causal mask in runs, model.BlockCausal):
the same keys, up to rounding, as one memory step per chunk in order, at the fixed
cost of one forward instead of one per chunk. For a clip still inside the window
this replays the whole history: the cache equals what the same clean latents would
have written under the new prompt from the start (tests/test_prompts.py); a switch
to the prompt already in force changes nothing, bit for bit. Past the window, the
window's frames are written again as a clip of their own: the sink frames, then
the recent chunks, each attending to those written before it (where it had attended
to frames that have since left the window), the oldest in the ring's first slot, so
that each reads a prefix of the cache with no mask (SDPA's fast kernels take none);
every slot starts absent all the same, so no key of the old prompt is ever
attended. Only the chunks the window holds are kept: the memory this takes is
bounded by the window, however long the stream.
"""

from collections import deque

import torch
import torch.nn.functional as F

import lipar
import model as M


def parse_prompt_at(text):
    """--prompt-at FRAME:TEXT -> (frame, prompt); ValueError with a sentence otherwise."""
    frame, sep, prompt = text.partition(":")
    if not sep or not frame.strip().isdigit() or not prompt.strip():
        raise ValueError(f"{text!r} is not FRAME:PROMPT; give e.g. 48:'a snowy street' (the video frame the new "
                         "prompt starts at)")
    if int(frame) == 0:
        raise ValueError("frame 0 takes --prompt; give a later frame")
    return int(frame), prompt.strip()


def context_kvs(dit, context, group=10):
    """dit.context_kvs(context) in a few wide products: the keys (and the values) of
    `group` layers from one matrix product, their weights side by side, and one norm
    over them all. The same sums as one layer at a time, up to rounding (tests); a
    prompt change then launches a dozen kernels instead of ~10 per layer, which on
    the GPU took longer than the re-cache's first block (BENCHMARKS.md)."""
    text = dit.text_embedding(context)
    layers = [block.cross_attn for block in dit.blocks]
    heads = (layers[0].num_heads, -1)
    kvs = []
    for first in range(0, len(layers), group):
        part = layers[first:first + group]
        k, v = (F.linear(text, torch.cat([getattr(a, name).weight for a in part]),
                         torch.cat([getattr(a, name).bias for a in part])).unflatten(-1, (len(part), -1))
                for name in "kv")  # [B, L, layers, D]
        k = M.rms_norm(k, torch.stack([a.norm_k.weight for a in part]), part[0].norm_k.eps)
        kvs += [(k[:, :, i].unflatten(-1, heads), v[:, :, i].unflatten(-1, heads)) for i in range(len(part))]
    return kvs


def first_video_frame(latent_frame):
    """The first video frame a chunk starting at `latent_frame` edits: 0, then 4k - 3
    (the VAE's causal stride 4; frame 0 is coded alone)."""
    return 0 if latent_frame == 0 else 4 * latent_frame - 3


class ScheduledEditor:
    """A sample.ChunkEditor whose prompt changes at chunk boundaries. schedule:
    [(video frame, prompt, context)] in order; each takes effect at the first chunk
    that starts at or after its frame. `switches` records [(frame, prompt)] as they
    happen, `overridden` the changes a later one replaced before the same boundary.
    Every other attribute is the editor's."""

    def __init__(self, editor, dit, schedule):
        self.editor, self.dit, self.schedule = editor, dit, deque(schedule)
        self.sink, self.fpc = editor.cache.sink, dit.cfg.frames_per_chunk
        self.first = []                                              # the sink's chunks: (start, x0, keep)
        self.held = deque(maxlen=-(-editor.cache.recent // self.fpc))  # the latest: those holding the recent frames
        self.switches, self.overridden = [], []

    def __getattr__(self, name):
        return getattr(self.editor, name)

    def __call__(self, latents, keep=None):
        start = self.editor.start
        frame = first_video_frame(start)
        due = []
        while self.schedule and self.schedule[0][0] <= frame:
            due.append(self.schedule.popleft())
        if due:  # two changes before one boundary: the later one wins
            self.overridden += [(f, p) for f, p, _ in due[:-1]]
            _, prompt, context = due[-1]
            self.recache(context)
            self.switches.append((frame, prompt))
        x0 = self.editor(latents, keep)
        (self.first if start < self.sink else self.held).append((start, x0, keep))
        return x0

    def never_took_effect(self):
        """Sentences for the notes: the changes that were overridden or came after the end."""
        late = [(f, p) for f, p, _ in self.schedule]
        return ([f"--prompt-at {f}:{p!r} was replaced by a later change before the same chunk boundary"
                 for f, p in self.overridden]
                + [f"--prompt-at {f}:{p!r} never took effect: the video ended before frame {f}" for f, p in late])

    def replayed(self):
        """The chunks a re-cache replays, [(start, x0, keep)] in order: the held ones, the
        first cut to its sink frames when the others do not follow it (past the window)."""
        chunks = [*self.first, *self.held]
        gap = any(later[0] != earlier[0] + self.fpc for earlier, later in zip(chunks, chunks[1:]))
        return [(start, x0[:, :, :self.sink - start], None if keep is None else keep[:self.sink - start])
                if gap and start < self.sink else (start, x0, keep) for start, x0, keep in chunks]

    @torch.no_grad()
    def recache(self, context, at_once=True):
        """The cache under `context`: cross-attention rebuilt, then the window's frames
        written again by memory steps, each chunk attending to those written before it, a
        prefix of the cache. Every slot starts absent, so no key of the old prompt is ever
        attended. When the held chunks follow the first one without a gap, that is the
        whole history, in the slots it had; past the window the first chunk is replayed
        for its sink frames only, since its other frames have left the window, and the
        ring is written afresh from its first slot. at_once: all chunks in one memory
        step (replay_at_once) where they fit the cache side by side; otherwise, and for
        TAPE, one memory step per chunk, in order. The prompt already in force (the same
        context) changes nothing."""
        editor, cache = self.editor, self.editor.cache
        if torch.equal(cache.context, context):
            return
        cache.reset(self.dit, context, context_kvs(self.dit, context))
        cache.key_valid.fill_(False)  # nothing written under the new prompt yet
        cache.slot_has_holes = [True] * cache.num_slots
        zero = torch.zeros(1, 1, device=editor.device)
        # TAPE's forward closes its scores on a memory step; its bare memory step does not
        memory_step = getattr(editor.forward, "memory_step", None)
        replay = self.replayed()
        # the ring written afresh from the first replayed frame past the sink (the frame of
        # its first slot already, inside the window)
        cache.ring_start = next((max(start, self.sink) for start, x0, _ in replay if start + x0.shape[2] > self.sink),
                                self.sink)
        if at_once and replay and memory_step is None and sum(x0.shape[2] for _, x0, _ in replay) <= cache.num_slots:
            return self.replay_at_once(replay, zero)
        for start, x0, keep in replay:
            plan = lipar.recovery_plan(keep, editor.mode, has_memory=start > 0) if editor.prunes else None
            if memory_step is not None:
                memory_step(x0.to(editor.dtype), zero, cache, start)
            else:
                editor.forward(x0.to(editor.dtype), zero, cache, start, memory_step=True, plan=plan)

    def replay_at_once(self, replay, zero):
        """The replayed chunks [(start, x0, keep)] as one memory step over all their frames:
        one pass through the blocks instead of one per chunk (the fixed cost of a forward
        is paid once). Each chunk's queries see the keys of the chunks before it and its
        own (model.BlockCausal), just as its memory step alone would. The recovery plan of
        the joined mask is the chunks' plans chained: a pruned token copies the latest
        kept one at its location, in its chunk or an earlier one (lipar.recovery_plan).
        Every frame is placed at once where the next chunk will read it (sink frames at
        their own index, later ones rolled back by the last chunk's shift): past latent
        frame 20 the earlier chunks then sit a chunk or two before the positions they had
        when each was the newest, against the sink. The slots are those the chunk-by-chunk
        replay claims: the sink's, then the ring from its first slot."""
        editor, cache, dit = self.editor, self.editor.cache, self.dit
        last_start, last_x0, _ = replay[-1]
        if cache.rolled_positions:  # no roll on the way: every slot is written below
            cache.shift = max(0, last_start + last_x0.shape[2] - cache.trained_frames)
        plan = None
        if editor.prunes:
            plan = lipar.recovery_plan(torch.cat([keep for _, _, keep in replay]), editor.mode,
                                       has_memory=replay[0][0] > 0)
        chunk_valid = None if plan is None else plan.key_valid(True)
        (_, h, w), n = (last_x0.shape[2 + i] // p for i, p in enumerate(dit.cfg.patch_size)), cache.tokens_per_frame
        queries = [x0.shape[2] * n for _, x0, _ in replay] if plan is None else torch.stack(
            [keep.sum() for _, _, keep in replay]).tolist()  # kept tokens per chunk
        slots, positions, runs, row, first_query = [], [], [], 0, 0
        for (start, x0, _), count in zip(replay, queries):
            frames = x0.shape[2]
            valid = None if chunk_valid is None else chunk_valid[row:row + frames * n]
            chunk_slots, visible, _ = cache.claim(start, frames, valid)
            slots.append(chunk_slots)
            positions.append(M.grid_positions(frames, h, w, start if start < cache.sink else cache.position_of(start),
                                              device=x0.device))
            if count:
                runs.append((first_query, first_query + count, visible))
            row, first_query = row + frames * n, first_query + count
        step = M.ChunkStep(positions=torch.cat(positions), kept=None if plan is None else plan.kept,
                           slots=torch.cat(slots), source=None if plan is None else plan.source(True),
                           visible=visible, absent_keys=False, memory_step=True, keys_only=True,
                           key_mask=M.BlockCausal(runs, None if chunk_valid is None else cache.key_valid))
        dit.run_chunk(torch.cat([x0 for _, x0, _ in replay], 2).to(editor.dtype), zero, cache, step)
