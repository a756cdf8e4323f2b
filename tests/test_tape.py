"""TAPE (tape.py): exact where it should be, hand-checked where it is arithmetic.

With no skipping it is `full` exactly; its smoothing and HighLow budget match small
cases worked by hand; its cheap importance ranks tokens like the exact softmax one;
a skipped token's hidden state passes the skipping blocks unchanged."""

import dataclasses

import pytest
import torch

import model as M
import sample
import tape

GRID = (4, 6)  # token grid of a frame: latents of 8x12


def tiny_dit(layers=5, seed=0):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(M.DiTConfig.tiny(), num_layers=layers)
    dit = M.CausalWanModel(cfg).double()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.2)
    return dit.eval()


def context_for(dit):
    return torch.randn(1, 7, dit.cfg.text_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_highlow_budget_hand_cases():
    assert tape.highlow_ratios(0.3, 3, 0.1) == pytest.approx([0.4, 0.3, 0.2])
    assert tape.highlow_ratios(0.3, 5, 0.1) == pytest.approx([0.4, 0.35, 0.3, 0.25, 0.2])
    assert tape.highlow_ratios(0.9, 3, 0.1) == pytest.approx([0.95, 0.9, 0.8])  # clipped at 0.95
    assert tape.highlow_ratios(0.05, 3, 0.1) == pytest.approx([0.15, 0.05, 0.0])  # and at 0
    assert tape.highlow_ratios(0.3, 1, 0.1) == [0.3]


def test_temporal_smoothing_hand_case():
    """TAPE's s̃_f = α s_f + (1 − α) s̃_{f−1}: α weights the current frame."""
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # α = 0.5: frame 0 is its own score; each later frame is half the previous smoothed frame
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.25, 0.25]])
    assert torch.equal(tape.smooth_scores(scores, None, 0.5), expected)
    # α = 0.25 leans on the past: frame 1 = 0.25·[0, 1] + 0.75·[1, 0]
    assert torch.equal(tape.smooth_scores(scores, None, 0.25)[1], torch.tensor([0.75, 0.25]))
    # across a chunk boundary frame 0 blends with the previous chunk's last smoothed frame
    previous = torch.tensor([0.0, 4.0])
    assert torch.equal(tape.smooth_scores(scores, previous, 0.25)[0], torch.tensor([0.25, 3.0]))
    assert torch.equal(tape.smooth_scores(scores, previous, 1.0), scores)  # α = 1: no smoothing
    assert torch.equal(tape.smooth_scores(scores, previous, 0.0)[2], previous)  # α = 0: the past only


def test_reselection_as_a_spacing_or_a_count():
    assert tape.TapeConfig(every=10).selection_blocks(30) == {0, 10, 20}  # the paper's "every 10 layers"
    assert tape.TapeConfig(selections=5).selection_blocks(30) == {0, 6, 12, 18, 24}  # its chosen count
    assert tape.TapeConfig(selections=4).selection_blocks(30) == {0, 7, 15, 22}
    for count in range(1, 31):
        assert len(tape.TapeConfig(selections=count).selection_blocks(30)) == count


def test_same_count_kept_in_every_frame():
    scores = torch.tensor([[5.0, 1, 3, 2], [0, 9, 8, 7]])
    assert tape.keep_top(scores, 0.5).tolist() == [0, 2, 5, 6]
    assert tape.keep_top(scores, 0.0).tolist() == list(range(8))


def spearman(a, b):
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()))


def test_cheap_importance_ranks_like_the_exact_score(capsys):
    """The fast path averages the attention received over 256 evenly spaced queries of
    a chunk; the exact score over all 4,680 queries (a real chunk: 3 frames of 30x52).
    Keys of varied norm make some tokens draw more attention, as trained ones do."""
    g = torch.Generator().manual_seed(0)
    tokens, cached, heads, dim = 3 * 30 * 52, 2 * 30 * 52, 4, 32
    q = torch.randn(1, tokens, heads, dim, generator=g)
    k = torch.randn(1, cached + tokens, heads, dim, generator=g) * torch.rand(1, cached + tokens, 1, 1, generator=g) * 2
    chunk_keys = torch.arange(cached, cached + tokens)
    exact = tape.received_attention(q, k, chunk_keys)
    cheap = tape.received_attention(q, k, chunk_keys, score_queries=256)
    # the exact score, written differently: per head, per query, softmax rows summed
    reference = torch.zeros(tokens, dtype=torch.float64)
    for h in range(heads):
        weights = (q[0, :, h].double() @ k[0, :, h].double().T / dim ** 0.5).softmax(dim=1)
        reference += weights[:, cached:].sum(0)
    assert torch.allclose(exact.double(), reference / (heads * tokens), rtol=1e-4)
    rho = spearman(cheap, exact)
    with capsys.disabled():
        print(f"\nTAPE importance, 256 queries against all {tokens}: Spearman rank correlation {rho:.3f}")
    assert rho > 0.95


def test_no_skipping_is_full_exactly():
    """Ratio 0 (the loop of tape.forward_chunk, no token skipped) equals model.forward_chunk
    chunk after chunk, memory steps included, with the same attention window."""
    dit = tiny_dit()
    context = context_for(dit)
    cfg = tape.TapeConfig(ratio=0.0, every=2)
    ref_cache, tape_cache = M.KVCache(dit, context, GRID, (1, 3)), M.KVCache(dit, context, GRID, (1, 3))
    state = tape.TapeState()
    g = torch.Generator().manual_seed(2)
    for start in (0, 3, 6):
        x = torch.randn(1, 16, 3, 8, 12, generator=g, dtype=torch.float64)
        t = torch.full((1, 1), 700.0, dtype=torch.float64)
        expected = dit.forward_chunk(x, t, ref_cache, start)
        got = tape.forward_chunk(dit, x, t, tape_cache, start, 0.0, state, cfg)
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)
        for cache in (ref_cache, tape_cache):
            dit.forward_chunk(x, torch.zeros(1, 1, dtype=torch.float64), cache, start, memory_step=True)


def test_editor_with_no_skipping_equals_full():
    dit = tiny_dit()
    context = context_for(dit)
    latents = torch.randn(1, 16, 6, 8, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = torch.ones(6, *GRID, dtype=torch.bool)
    full = sample.edit_latents(dit, latents, context, keep, "full", None, 0, progress=False)
    editor = sample.ChunkEditor(dit, context, GRID, "tape", None, 0,
                                forward=tape.TapeForward(dit, tape.TapeConfig(0.0, delta=0.0)))
    tape_edit = torch.cat([editor(latents[:, :, s:s + 3]) for s in (0, 3)], dim=2)
    assert torch.allclose(tape_edit, full, rtol=0, atol=1e-12)
    skipping = sample.ChunkEditor(dit, context, GRID, "tape", None, 0,
                                  forward=tape.TapeForward(dit, tape.TapeConfig(0.5, every=2)))
    assert not torch.allclose(torch.cat([skipping(latents[:, :, s:s + 3]) for s in (0, 3)], dim=2), full, atol=1e-3)


def test_skipped_tokens_pass_unchanged_to_the_head(monkeypatch):
    """Blocks 0..4, selections at 0 and 3 (every = 3): a token not kept at block 3 leaves
    block 3 (a selection block, every token) with the hidden state the head receives."""
    dit = tiny_dit(layers=5)
    context = context_for(dit)
    seen = {}
    after = dit.blocks[3].after_attention
    monkeypatch.setattr(dit.blocks[3], "after_attention",
                        lambda *a: seen.setdefault("block3", after(*a)))
    head = dit.head.forward
    monkeypatch.setattr(dit.head, "forward", lambda x, e: (seen.setdefault("head", x), head(x, e))[1])
    cache = M.KVCache(dit, context, GRID, None)
    x = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    log = []
    tape.forward_chunk(dit, x, torch.full((1, 1), 700.0, dtype=torch.float64), cache, 0, 0.5, tape.TapeState(),
                       tape.TapeConfig(0.5, every=3), kept_log=log)
    assert [block for block, _ in log] == [0, 3]
    kept = log[1][1]
    skipped = torch.ones(3 * GRID[0] * GRID[1], dtype=torch.bool)
    skipped[kept] = False
    assert skipped.sum() == 3 * 12  # half of each frame's 24 tokens
    assert torch.equal(seen["head"][:, skipped], seen["block3"][:, skipped])
    assert not torch.allclose(seen["head"][:, kept], seen["block3"][:, kept])


def test_a_skipping_block_is_the_block_on_the_kept_tokens_alone():
    """First chunk, blocks 0 (selection) and 1 (skipping): recomputed without the cache
    by Block.forward on the kept tokens alone (float64 attention among them only), then
    scattered into block 0's output and sent through the head."""
    dit = tiny_dit(layers=2)
    context = context_for(dit)
    x = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.full((1, 1), 700.0, dtype=torch.float64)
    log = []
    got = tape.forward_chunk(dit, x, t, M.KVCache(dit, context, GRID, None), 0, 0.5, tape.TapeState(),
                             tape.TapeConfig(0.5, every=2), kept_log=log)
    kept = log[0][1]
    tokens, grid = dit.patchify(x)
    rope = M.rope_angles(M.grid_positions(*grid), dit.cfg.head_dim, dit.cfg.rope_theta)
    e, e0 = dit.embed_time(t)
    context_kvs = dit.context_kvs(context)
    whole = dit.blocks[0](tokens, e0, rope, lambda k, v: (M.apply_rope(k, rope), v, None), context_kvs[0], "sdpa")
    rope_kept = tuple(r[kept] for r in rope)
    some = dit.blocks[1](whole[:, kept], e0, rope_kept, lambda k, v: (M.apply_rope(k, rope_kept), v, None),
                         context_kvs[1], "sdpa")
    expected = dit.unpatchify(dit.head(whole.index_copy(1, kept, some), e), grid)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_rows_a_skipping_block_reads_hand_case():
    """attended_rows (found by a sort, not nonzero()) against a set written out by hand:
    8 visible rows, the chunk in rows 2, 3, 6, 7 (a ring's slots), kept tokens 1 and 2."""
    step = M.ChunkStep(positions=None, kept=None, slots=torch.tensor([2, 3, 6, 7]), source=None, visible=8,
                       absent_keys=False, memory_step=False)
    rows = tape.attended_rows(step, torch.tensor([1, 2]))
    assert rows.tolist() == [0, 1, 3, 4, 5, 6]


def test_the_graph_runners_tape_path_equals_tape_op_by_op():
    """TapeForward through a graphs.GraphRunner (on the CPU it replays nothing, but runs on
    the same static buffers a graph would: its inputs copied in, its scores copied out)
    gives TAPE's op-by-op edit bit for bit, over three chunks at HighLow ratios."""
    import graphs

    dit = tiny_dit()
    context = context_for(dit)
    latents = torch.randn(1, 16, 9, 8, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cfg = tape.TapeConfig(0.4, every=2)
    op_by_op = sample.ChunkEditor(dit, context, GRID, "tape", (1, 3), 0, forward=tape.TapeForward(dit, cfg))
    runner = graphs.GraphRunner(dit)
    forward, cache = sample.plugs(dit, runner, context, GRID, "tape", (1, 3), cfg)
    assert forward.runner is runner and cache is not None
    replayed = sample.ChunkEditor(dit, context, GRID, "tape", (1, 3), 0, forward=forward, cache=cache)
    for s in (0, 3, 6):
        assert torch.equal(replayed(latents[:, :, s:s + 3]), op_by_op(latents[:, :, s:s + 3]))
    tape_buffers = [key for key in runner.inputs if key[0] == "tape"]
    assert runner.stats["eager"] > 0 and len(tape_buffers) >= 3  # one set of buffers per step's shape
    again = sample.ChunkEditor(dit, context, GRID, "tape", (1, 3), 0, *sample.plugs(dit, runner, context, GRID, "tape",
                                                                                    (1, 3), cfg))
    first = again(latents[:, :, :3])  # a second clip: a new TapeForward finds the runner's buffers
    assert [key for key in runner.inputs if key[0] == "tape"] == tape_buffers
    assert torch.equal(first, sample.ChunkEditor(dit, context, GRID, "tape", (1, 3), 0,
                                                 forward=tape.TapeForward(dit, cfg))(latents[:, :, :3]))
