"""A prompt that changes mid-stream (prompts.py): the switch lands at a chunk boundary,
the cache is re-cached under the new prompt from the stored clean latents, a switch
to the same prompt changes nothing, every mode switches, and the command line says
where each prompt took effect. Tiny float64 models: the replays are the same
operations as the history they stand for, so the comparisons are bit for bit."""

import json

import pytest
import torch

import lipar
import model as M
import prompts
import sample
import tape
import video as io
from tests.test_graphs import tiny_dit
from tests.test_sample import moving_clip, run_cli

GRID = (4, 6)  # token grid of a frame: latents of 8x12
MODES = ["full", "lipar", "naive", "noisy_dup"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "ball.mp4"
    io.write_video(path, moving_clip(), 24.0)
    return path


def context(dit, seed):
    return torch.randn(1, 7, dit.cfg.text_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def new_cache(dit, context, window, memory=True):
    """A fresh cache under `context` whose cross-attention keys/values are those a re-cache
    computes (prompts.context_kvs, held to the model's own below): the replay is then
    compared with the history it stands for, operation for operation. memory: LIPAR's,
    which a `full` editor's cache does not hold."""
    cache = M.KVCache(dit, context, GRID, window, memory=memory)
    cache.reset(dit, context, prompts.context_kvs(dit, context))
    return cache


def clip_latents(chunks, seed=3):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 3 * chunks, 8, 12, generator=g, dtype=torch.float64)
    keep = torch.rand(3 * chunks, *GRID, generator=g) < 0.6
    keep[0] = True
    return latents, keep


def editors(dit, mode, schedule):
    """(plain ChunkEditor, ScheduledEditor) from the same seed and first prompt."""
    window = None if mode == "full" else (1, 6)
    plain = sample.ChunkEditor(dit, context(dit, 1), GRID, mode, window, seed=0)
    scheduled = prompts.ScheduledEditor(sample.ChunkEditor(dit, context(dit, 1), GRID, mode, window, seed=0), dit,
                                        schedule)
    return plain, scheduled


@pytest.mark.parametrize("mode", MODES)
def test_a_switch_to_the_same_prompt_changes_nothing(mode):
    """Inside the window the re-cache replays the whole history: bit for bit the cache and
    the edits the unswitched editor gets."""
    dit = tiny_dit().double()
    latents, keep = clip_latents(3)
    plain, scheduled = editors(dit, mode, [(9, "same", context(dit, 1))])
    for s in (0, 3, 6):
        assert torch.equal(scheduled(latents[:, :, s:s + 3], keep[s:s + 3]), plain(latents[:, :, s:s + 3], keep[s:s + 3]))
    assert scheduled.switches == [(9, "same")]
    for name in ("k", "v", "memory_k", "memory_v"):
        assert torch.equal(getattr(scheduled.cache, name), getattr(plain.cache, name)), name


@pytest.mark.parametrize("at_once", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_after_a_switch_the_cache_is_what_the_clean_latents_write_under_the_new_prompt(mode, at_once):
    """Switch before chunk 2 (video frame 21): the cache equals a fresh cache under the new
    prompt into which the two edited chunks' clean x0 were written by their memory steps
    (each with its mask's recovery plan); the edit of chunk 2 then differs from the
    unswitched one. Chunk by chunk these are the same operations: bit for bit. In one
    pass (the default) the same sums in float64 over other row counts and, for the
    pruned modes, one plan for both chunks: 1e-12 is far above float64's rounding at
    these sizes (about 1e-15) and far below any wrong key."""
    dit = tiny_dit().double()
    latents, keep = clip_latents(3)
    new = context(dit, 2)
    plain, scheduled = editors(dit, mode, [(21, "new", new)])
    x0 = [scheduled(latents[:, :, s:s + 3], keep[s:s + 3]) for s in (0, 3)]
    for s in (0, 3):
        plain(latents[:, :, s:s + 3], keep[s:s + 3])
    scheduled.recache(new, at_once=at_once)  # what the next call does first, done here to look at the cache
    reference = new_cache(dit, new, None if mode == "full" else (1, 6), memory=mode != "full")
    for c, s in enumerate((0, 3)):
        plan = None if mode == "full" else lipar.recovery_plan(keep[s:s + 3], mode, has_memory=s > 0)
        dit.forward_chunk(x0[c], torch.zeros(1, 1, dtype=torch.float64), reference, s, memory_step=True, plan=plan)
    # naive's pruned keys are absent, never read: in one pass their rows hold other copies
    rows = {"k": reference.key_valid, "v": reference.key_valid, "memory_k": keep[5].flatten(),
            "memory_v": keep[5].flatten()} if mode == "naive" and at_once else {}
    for name in ("k", "v", "memory_k", "memory_v"):
        ours, theirs = (getattr(c, name)[:, :, rows.get(name, slice(None))] for c in (scheduled.cache, reference))
        assert torch.equal(ours, theirs) if not at_once else torch.allclose(ours, theirs, rtol=0, atol=1e-12), name
    written = 6 * GRID[0] * GRID[1]  # the rows of frames 0-5; the rest are absent after a re-cache
    assert torch.equal(scheduled.cache.key_valid[:written], reference.key_valid[:written])
    assert not scheduled.cache.key_valid[written:].any()
    for (k, v), (ref_k, ref_v) in zip(scheduled.cache.context_kvs, reference.context_kvs):
        assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
    edited = scheduled(latents[:, :, 6:9], keep[6:9])
    assert scheduled.switches == [(21, "new")]
    assert not torch.allclose(edited, plain(latents[:, :, 6:9], keep[6:9]), atol=1e-6)


def test_a_change_inside_a_chunk_waits_for_its_boundary():
    """Frame 10 falls in chunk 1 (video frames 9-20): the prompt changes at frame 21, and
    chunk 1 is edited under the old one, bit for bit."""
    dit = tiny_dit().double()
    latents, keep = clip_latents(3)
    plain, scheduled = editors(dit, "lipar", [(10, "new", context(dit, 2))])
    for s in (0, 3):
        assert torch.equal(scheduled(latents[:, :, s:s + 3], keep[s:s + 3]), plain(latents[:, :, s:s + 3], keep[s:s + 3]))
    assert scheduled.switches == []
    scheduled(latents[:, :, 6:9], keep[6:9])
    assert scheduled.switches == [(21, "new")] and prompts.first_video_frame(6) == 21


@pytest.mark.parametrize("at_once", [False, True])
def test_past_the_window_only_its_frames_are_replayed_and_no_old_key_is_attended(monkeypatch, at_once):
    """Window (1, 6) over 5 chunks: the first chunk (the sink) and the latest two are held,
    whatever the length. A switch replays frame 0 alone (frames 1-2 have left the
    window), then chunks 9 and 12; the cache's old contents never reach the result:
    filled with large garbage or with zeros before the switch, it ends the same."""
    dit = tiny_dit().double()
    latents, keep = clip_latents(5)
    _, scheduled = editors(dit, "lipar", [])
    for s in range(0, 15, 3):
        scheduled(latents[:, :, s:s + 3], keep[s:s + 3])
    assert [c[0] for c in scheduled.first] == [0] and [c[0] for c in scheduled.held] == [9, 12]
    cache, claimed, results = scheduled.cache, [], []
    claim = cache.claim
    monkeypatch.setattr(cache, "claim", lambda start, frames, valid=None: claimed.append((start, frames))
                        or claim(start, frames, valid))
    for stale in (1e4, 0.0):
        cache.k.fill_(stale)
        cache.v.fill_(stale)
        claimed.clear()
        scheduled.recache(context(dit, 2), at_once=at_once)
        results.append([getattr(cache, name).clone() for name in ("k", "v", "memory_k", "memory_v")])
        assert claimed == [(0, 1), (9, 3), (12, 3)]
        scheduled.recache(context(dit, 3), at_once=at_once)  # another prompt between: the next one is a change
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_past_the_window_the_replay_reads_a_prefix_and_matches_the_masked_one(monkeypatch):
    """The re-cache writes the ring afresh from its first slot, so no replayed chunk reads
    a slot it has not written (no mask, no gather). Against a reference written in the
    stream's own slots, where chunk 9 sits between stale slots and its attention needs
    the mask: the same keys per frame and the same next forward, up to float64 rounding
    (the keys are summed in another order; 1e-12 is far above it for these sizes)."""
    dit = tiny_dit().double()
    latents, keep = clip_latents(6)
    _, scheduled = editors(dit, "lipar", [])
    x0 = [scheduled(latents[:, :, s:s + 3], keep[s:s + 3]) for s in range(0, 15, 3)]
    claim, absent = scheduled.cache.claim, []
    monkeypatch.setattr(scheduled.cache, "claim", lambda *a: absent.append(claim(*a)[2]) or claim(*a))
    new = context(dit, 2)
    scheduled.recache(new)
    assert absent == [False, False, False]
    reference = new_cache(dit, new, (1, 6))
    reference.key_valid.fill_(False)
    reference.slot_has_holes = [True] * reference.num_slots
    zero = torch.zeros(1, 1, dtype=torch.float64)
    for s, x, frames in ((0, x0[0], 1), (9, x0[3], 3), (12, x0[4], 3)):
        plan = lipar.recovery_plan(keep[s:s + frames], "lipar", has_memory=s > 0)
        dit.forward_chunk(x[:, :, :frames], zero, reference, s, memory_step=True, plan=plan)
    n = GRID[0] * GRID[1]
    rows = lambda slots: torch.cat([torch.arange(n) + slot * n for slot in slots])  # noqa: E731
    for name in ("k", "v"):
        ours, theirs = getattr(scheduled.cache, name), getattr(reference, name)
        assert torch.allclose(ours[:, :, rows([0, 1, 2, 3, 4, 5, 6])], theirs[:, :, rows([0, 3, 4, 5, 6, 1, 2])],
                              rtol=0, atol=1e-12), name
    assert torch.allclose(scheduled.cache.memory_k, reference.memory_k, rtol=0, atol=1e-12)
    x, t = latents[:, :, 15:18], torch.full((1, 1), 750.0, dtype=torch.float64)
    plan = lipar.recovery_plan(keep[15:18], "lipar")
    ours, theirs = dit.forward_chunk(x, t, scheduled.cache, 15, plan=plan), dit.forward_chunk(x, t, reference, 15,
                                                                                               plan=plan)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12) and not torch.equal(ours, torch.zeros_like(ours))

def test_in_one_pass_past_frame_20_the_window_is_written_where_the_next_chunk_reads_it():
    """`full` over 9 chunks (27 latent frames): the positions have rolled by 6 frames and
    the window holds the latest 7 chunks. Chunk by chunk, the replay rolls the cached
    keys as it goes (a chunk ending past frame 20 rotates them back); in one pass every
    key is placed at once where the last chunk's roll puts it. Without a sink only
    distances between positions enter attention, so both write the same cache and give
    the same next forward, up to the RoPE angles' rounding: they are float32 tables
    (sample.py's), 6e-8 relative, on keys and outputs of size ~1 through two layers:
    1e-5 leaves a factor of ~100."""
    dit = tiny_dit().double()
    latents, keep = clip_latents(10)
    pair = [editors(dit, "full", [])[1] for _ in range(2)]
    for scheduled in pair:
        for s in range(0, 27, 3):
            scheduled(latents[:, :, s:s + 3], keep[s:s + 3])
    assert pair[0].cache.shift == 6 and [c[0] for c in pair[0].held] == list(range(6, 27, 3))
    new = context(dit, 2)
    for scheduled, at_once in zip(pair, (False, True)):
        scheduled.recache(new, at_once=at_once)
    ours, theirs = (scheduled.cache for scheduled in pair)
    assert ours.shift == theirs.shift == 6 and torch.equal(ours.key_valid, theirs.key_valid)
    for name in ("k", "v"):
        assert torch.allclose(getattr(ours, name), getattr(theirs, name), rtol=0, atol=1e-5), name
    x, t = latents[:, :, 27:30], torch.full((1, 1), 750.0, dtype=torch.float64)
    after = [dit.forward_chunk(x, t, cache, 27) for cache in (ours, theirs)]
    assert torch.allclose(*after, rtol=0, atol=1e-5)
    assert not torch.allclose(getattr(ours, "k"), M.KVCache(dit, new, GRID).k, atol=1e-3)


def test_a_window_that_the_replay_overflows_is_replayed_chunk_by_chunk():
    """Window (1, 7): three chunks hold its recent frames, 9 frames for 7 ring slots, so
    the replay cannot be written side by side; it goes chunk by chunk as at_once=False
    does, the same operations: bit for bit."""
    dit = tiny_dit().double()
    latents, keep = clip_latents(6)
    pair = []
    for _ in range(2):
        editor = sample.ChunkEditor(dit, context(dit, 1), GRID, "lipar", (1, 7), seed=0)
        pair.append(prompts.ScheduledEditor(editor, dit, []))
        for s in range(0, 18, 3):
            pair[-1](latents[:, :, s:s + 3], keep[s:s + 3])
    assert len(pair[0].held) == 3
    for scheduled, at_once in zip(pair, (False, True)):
        scheduled.recache(context(dit, 2), at_once=at_once)
    for name in ("k", "v", "memory_k", "memory_v", "key_valid"):
        assert torch.equal(getattr(pair[0].cache, name), getattr(pair[1].cache, name)), name


def test_tape_keeps_its_scores_across_a_re_cache():
    """TAPE's memory step closes a chunk's scores; the re-cache uses its bare memory step,
    so the previous chunk's smoothed scores survive the switch."""
    dit = tiny_dit().double()
    latents, keep = clip_latents(2)
    forward = tape.TapeForward(dit, tape.TapeConfig(0.5, every=2))
    editor = sample.ChunkEditor(dit, context(dit, 1), GRID, "tape", (1, 6), 0, forward=forward)
    scheduled = prompts.ScheduledEditor(editor, dit, [])
    scheduled(latents[:, :, :3])
    before = {i: s.clone() for i, s in forward.state.last_frame.items()}
    scheduled.recache(context(dit, 2))
    assert before and all(torch.equal(forward.state.last_frame[i], s) for i, s in before.items())


@pytest.mark.parametrize("text, named", [
    ("21", "is not FRAME:PROMPT"), ("x:a ball", "is not FRAME:PROMPT"), ("21:  ", "is not FRAME:PROMPT"),
    ("-3:a ball", "is not FRAME:PROMPT"), ("0:a ball", "frame 0 takes --prompt"),
])
def test_bad_prompt_changes_are_one_sentence(text, named):
    with pytest.raises(ValueError, match=named):
        prompts.parse_prompt_at(text)
    assert prompts.parse_prompt_at("48: a snowy street ") == (48, "a snowy street")


def test_the_command_line_says_where_each_prompt_took_effect(clip, weights, tmp_path, monkeypatch, capsys):
    """17 frames (chunks from frames 0 and 9; 24 frames once padded for the tiny VAE's
    pieces): a change at frame 5 lands at 9, one at 30 never does (noted); two changes
    at one frame are refused."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(["--video", str(clip), "--out", "e.mp4", "--json", "s.json", "--prompt-at", "5:a blue ball",
                    "--prompt-at", "30:a green ball", "--vae", "tiny"], weights) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert [p["from_frame"] for p in stats["prompts"]] == [0, 9] and stats["prompts"][1]["prompt"] == "a blue ball"
    assert "--prompt-at 30:'a green ball' never took effect: the video ended before frame 30" in stats["notes"]
    assert "prompt from frame 9: 'a blue ball'" in capsys.readouterr().out
    assert run_cli(["--video", str(clip), "--out", "f.mp4", "--prompt-at", "5:a", "--prompt-at", "5:b"], weights) == 2
    assert "two --prompt-at changes at one frame" in capsys.readouterr().err


@pytest.mark.parametrize("group", [1, 10])
def test_the_new_prompts_cross_attention_in_wide_products_is_the_models(group):
    """prompts.context_kvs (a group of layers per matrix product) against the model's own,
    one layer at a time, in float64: the same sums, possibly blocked otherwise by the
    matrix library (1e-12 is far above float64's rounding for these sizes, far below
    a wrong weight or norm). With three layers, 10 leaves one partial group."""
    torch.manual_seed(0)
    dit = M.CausalWanModel(M.DiTConfig(**{**vars(M.DiTConfig.tiny()), "num_layers": 3})).double()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.5)
        ours, theirs = prompts.context_kvs(dit, context(dit, 4), group), dit.context_kvs(context(dit, 4))
    assert len(ours) == len(theirs) == 3
    for (k, v), (ref_k, ref_v) in zip(ours, theirs):
        assert k.shape == ref_k.shape and v.shape == ref_v.shape
        assert torch.allclose(k, ref_k, rtol=1e-12, atol=1e-12) and torch.allclose(v, ref_v, rtol=1e-12, atol=1e-12)
