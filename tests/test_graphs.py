"""graphs.py's static-shape path, on the CPU: the same padded buffers the CUDA graphs
replay, run eagerly. Padded query rows must never reach the cache or the output, and
the runner must compute what model.forward_chunk computes, clip after clip."""

import pytest
import torch

import graphs
import lipar
import model as M


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    dit = M.CausalWanModel(M.DiTConfig.tiny()).eval().requires_grad_(False)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.2)
    return dit


def test_bucket_size_rounds_up_to_whole_buckets_within_the_chunk():
    assert graphs.bucket_size(1, 4680, 256) == 256
    assert graphs.bucket_size(256, 4680, 256) == 256
    assert graphs.bucket_size(257, 4680, 256) == 512
    assert graphs.bucket_size(4500, 4680, 256) == 4608
    assert graphs.bucket_size(4650, 4680, 256) == 4680  # never past the chunk's own token count
    assert graphs.bucket_size(5, 18, 4) == 8


def run_clip(forward_chunk, make_cache, x, keep, mode, context, seed):
    """3 denoising steps + a memory step per chunk, as the sampler runs them; returns every output."""
    h, w = x.shape[3] // 2, x.shape[4] // 2
    cache = make_cache(context, (h, w))
    g = torch.Generator().manual_seed(seed)
    outputs = []
    for c, plan in enumerate(lipar.chunk_plans(keep, mode)):
        s = 3 * c
        for t in (769.0, 729.0, 625.0):
            noisy = torch.randn(x[:, :, s:s + 3].shape, generator=g)
            outputs.append(forward_chunk(noisy, torch.full((1, 1), t), cache, s, plan=plan))
        outputs.append(forward_chunk(x[:, :, s:s + 3], torch.zeros(1, 1), cache, s, memory_step=True, plan=plan))
    return outputs, cache


def clip_and_mask(seed, frames=9, h=3, w=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, 2 * h, 2 * w, generator=g)
    keep = torch.rand(frames, h, w, generator=g) > 0.5
    keep[0] = True
    keep[-1, -1, -1] = False  # the chunk's last token pruned: a leaked padding row would show there
    keep[3:6] = False         # a fully pruned chunk: no graph, its keys copies of the memory
    return x, keep, torch.randn(1, 5, 48, generator=g)


@pytest.mark.parametrize("mode,window", [("lipar", (1, 3)), ("lipar", None), ("naive", (1, 3)), ("full", None)])
def test_runner_matches_forward_chunk_and_padding_never_leaks(mode, window):
    dit = tiny_dit()
    runner = graphs.GraphRunner(dit, bucket=4)  # 12 tokens per frame, 36 per chunk: kept counts get padded
    with torch.no_grad():
        for seed in (1, 2):  # a second clip reuses the runner's cache and buffers
            x, keep, context = clip_and_mask(seed)
            expected, dense = run_clip(dit.forward_chunk, lambda c, g: M.KVCache(dit, c, g, window),
                                       x, keep, mode, context, seed)
            got, cache = run_clip(runner.forward_chunk, lambda c, g: runner.kv_cache(c, g, window),
                                  x, keep, mode, context, seed)
            for a, b in zip(got, expected):
                assert (a - b).abs().max().item() < 1e-5
            assert (cache.k - dense.k).abs().max().item() < 1e-5
            assert (cache.v - dense.v).abs().max().item() < 1e-5
            if mode != "full":
                pruned = ~keep.repeat_interleave(2, 1).repeat_interleave(2, 2)
                outputs = torch.cat([o for i, o in enumerate(got) if i % 4 == 3], dim=2)  # the memory steps
                assert (outputs[:, :, pruned] == 0).all()
    if mode != "full":  # the padding really was exercised
        padded = [(inputs.n_kept, inputs.step.kept.numel()) for inputs in runner.inputs.values()]
        assert any(n < size for n, size in padded)
        assert all(n > 0 for n, _ in padded)  # the fully pruned chunk ran no graph (KVCache.write_duplicates)
    assert len(runner.caches) == 1 and runner.stats["captures"] == 0  # one cache for both clips; nothing captured on the CPU


def test_sampler_with_a_runner_edits_like_the_plain_sampler():
    import sample

    dit = tiny_dit(3)
    x, keep, context = clip_and_mask(4, frames=12)
    runner = graphs.GraphRunner(dit, bucket=8)
    for mode, window in (("lipar", (1, 3)), ("full", None)):
        plain = sample.edit_latents(dit, x, context, keep, mode, window, seed=5, progress=False)
        plugs = sample.plugs(dit, runner, context, (x.shape[3] // 2, x.shape[4] // 2), mode, window)
        fast = sample.edit_latents(dit, x, context, keep, mode, window, seed=5, progress=False, forward=plugs[0],
                                   cache=plugs[1])
        assert (fast - plain).abs().max().item() < 1e-5


def test_models_use_no_runner_off_cuda():
    import sample

    assert sample.Models(None, "cpu", torch.float32, "cpu").runner() is None


def test_full_keeps_no_lipar_memory_and_edits_as_with_one():
    """`full` never reads LIPAR's memory: its caches, plain and the runner's, hold none
    (0.27 GiB at 832x480), and its edit equals the edit on a cache that holds one (the
    same operations: compared exactly)."""
    import sample

    dit = tiny_dit(7)
    x, keep, context = clip_and_mask(8, frames=12)
    grid = (x.shape[3] // 2, x.shape[4] // 2)
    runner = graphs.GraphRunner(dit, bucket=8)
    assert sample.ChunkEditor(dit, context, grid, "full", (1, 3), 0).cache.memory_k.numel() == 0
    assert sample.plugs(dit, runner, context, grid, "full", (1, 3))[1].memory_v.numel() == 0
    assert sample.plugs(dit, runner, context, grid, "lipar", (1, 3))[1].memory_k.shape == (2, 1, 12, 2, 32)
    without = sample.edit_latents(dit, x, context, keep, "full", None, seed=5, progress=False)
    with_memory = sample.edit_latents(dit, x, context, keep, "full", None, seed=5, progress=False,
                                      cache=M.KVCache(dit, context, grid))
    assert torch.equal(without, with_memory)
