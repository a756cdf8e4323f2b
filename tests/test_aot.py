"""aot.py on the CPU: the exported regions (weights as inputs, the token count dynamic)
compute what the model's own code computes, one package serves every kept count and
every block, packages are reused from disk, keyed by what their code depends on, and
rebuilt when unreadable; calls no package can serve run as written.

AOTInductor's compile step itself (C++ and Triton) is torch's and runs on the GPU
(bench.py --kernels); here the packages are torch.export's own files of the same
exported programs, so everything up to the compiler is the code that runs there."""

import pytest
import torch

import aot
import fp8
import lipar
import model as M
from test_graphs import run_clip, tiny_dit


def export_build(fn, spec, module, tensors, consts, path):
    program = aot.export(fn, spec, module, tensors, consts)
    aot.written(path, lambda partial: torch.export.save(program, partial))


def export_load(path):
    return torch.export.load(str(path)).module()


def kernels(folder):
    return aot.Kernels(folder, build=export_build, load=export_load, device_type="cpu")


def clip(frames=6, h=3, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, 2 * h, 2 * w, generator=g, dtype=torch.float64)
    keep = torch.rand(frames, h, w, generator=g) > 0.4
    keep[0] = True
    return x, keep, torch.randn(1, 5, 48, generator=g, dtype=torch.float64)


def edit(dit, how, x, keep, mode, context, window):
    dtype = dit.head.head.weight.dtype

    def forward(chunk, *args, **kwargs):  # run_clip's noise is float32
        return dit.forward_chunk(chunk.to(dtype), *args, **kwargs)

    with M.fusion(how):
        return run_clip(forward, lambda c, hw: M.KVCache(dit, c, hw, window), x, keep, mode, context, 0)


@pytest.mark.parametrize("mode,window", [("full", None), ("lipar", (1, 3)), ("naive", (1, 3))])
def test_the_packages_compute_what_the_model_code_computes(tmp_path, mode, window):
    """Float64, the same operations in the same order: equal to float64 rounding (1e-12 relative)."""
    dit = tiny_dit().double()
    x, keep, context = clip()
    with torch.no_grad():
        plain, plain_cache = edit(dit, None, x, keep, mode, context, window)
        k = kernels(tmp_path)
        fused, fused_cache = edit(dit, k, x, keep, mode, context, window)
    assert k.stats["built"] == 3 and k.stats["plain_calls"] == 0  # before/after attention, the key rotation
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_cache.k, plain_cache.k, rtol=1e-12, atol=1e-12)


def test_one_package_serves_every_kept_count_and_later_processes_load_it(tmp_path):
    dit = tiny_dit().double()
    x, keep, context = clip(frames=9)
    keep[3:6] = torch.rand(3, 3, 4, generator=torch.Generator().manual_seed(5)) > 0.8  # other kept counts
    with torch.no_grad():
        first = kernels(tmp_path)
        edit(dit, first, x, keep, "lipar", context, (1, 3))
        assert first.stats["built"] == 3 and len(list(tmp_path.glob("*.pt2"))) == 3
        later = kernels(tmp_path)  # a new process: nothing built, everything loaded
        edit(dit, later, x, keep, "lipar", context, (1, 3))
    assert later.stats["built"] == 0 and later.stats["loaded"] == 3
    assert not list(tmp_path.glob(".*"))  # no partial file left


def test_packages_are_keyed_by_their_weights_dtypes_and_shapes(tmp_path):
    """The fp8 model's blocks hold other weights: their regions get their own packages."""
    x, keep, context = clip()
    with torch.no_grad():
        k = kernels(tmp_path)
        edit(tiny_dit(), k, x.float(), keep, "lipar", context.float(), (1, 3))
        edit(fp8.quantize_ffn(tiny_dit()), k, x.float(), keep, "lipar", context.float(), (1, 3))
    assert k.stats["built"] == 5  # the key rotation has no weights: one package serves both


def test_an_unreadable_package_is_built_again(tmp_path):
    dit = tiny_dit().double()
    x, keep, context = clip()
    with torch.no_grad():
        edit(dit, kernels(tmp_path), x, keep, "lipar", context, (1, 3))
        for package in tmp_path.glob("*.pt2"):
            package.write_bytes(b"not a package")
        again = kernels(tmp_path)
        plain, _ = edit(dit, None, x, keep, "lipar", context, (1, 3))
        fused, _ = edit(dit, again, x, keep, "lipar", context, (1, 3))
    assert again.stats["built"] == 3
    torch.testing.assert_close(fused[-1], plain[-1], rtol=1e-12, atol=1e-12)


def test_a_build_that_fails_leaves_no_file(tmp_path):
    def fails(partial):
        open(partial, "wb").write(b"half")
        raise RuntimeError("the compiler stopped")

    with pytest.raises(RuntimeError):
        aot.written(tmp_path / "region.pt2", fails)
    assert list(tmp_path.iterdir()) == []


def test_calls_no_package_serves_run_as_written(tmp_path):
    """One token (below the exported range), tensors on another device type, and a
    function that is no region: the plain code, nothing built."""
    dit = tiny_dit()
    block = dit.blocks[0]
    x = torch.randn(1, 1, dit.cfg.dim)
    e = torch.randn(1, 1, 6, dit.cfg.dim)
    rope = (torch.randn(1, dit.cfg.head_dim // 2), torch.randn(1, dit.cfg.head_dim // 2))
    k = kernels(tmp_path)
    with torch.no_grad(), M.fusion(k):
        one = block.before_attention(x, e, rope)
    cuda_only = aot.Kernels(tmp_path, build=export_build, load=export_load)  # device_type "cuda"
    with torch.no_grad(), M.fusion(cuda_only):
        block.before_attention(torch.randn(1, 7, dit.cfg.dim), e, tuple(torch.randn(7, r.shape[1]) for r in rope))
    with torch.no_grad():
        expected = M.Block.before_attention.__wrapped__(block, x, e, rope)
    for a, b in zip(one, expected, strict=True):
        assert torch.equal(a, b)
    assert k.stats["plain_calls"] == 1 and cuda_only.stats["plain_calls"] == 1
    assert k.stats["built"] == cuda_only.stats["built"] == 0
    assert k(lipar.prune_ratio, torch.ones(2, 2, 2, dtype=torch.bool)) == 0.0 and k.stats["plain_calls"] == 2


def test_kernel_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIPAR_CACHE", str(tmp_path / "mine"))
    assert aot.kernel_cache() == tmp_path / "mine" / "kernels"
    monkeypatch.delenv("LIPAR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert aot.kernel_cache() == tmp_path / "xdg" / "lipar" / "kernels"
