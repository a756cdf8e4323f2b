"""The causal DiT against diffusers' WanTransformer3DModel, the weight manifests,
and the KV-cached chunk-wise inference against the full block-causal forward."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
import weights as W

MANIFESTS = Path(__file__).resolve().parent / "manifests"  # copies of shared/reference/weights
TINY = dict(num_attention_heads=2, attention_head_dim=32, text_dim=48, freq_dim=32, ffn_dim=96, num_layers=2)


def read_manifest(name):
    rows = (MANIFESTS / name).read_text().splitlines()[1:]
    return {n: tuple(int(d) for d in re.findall(r"\d+", s)) for n, s in (r.split("\t") for r in rows)}


class Float64Timesteps(torch.nn.Module):
    """Wan's timestep features: [cos | sin](t · 10000^(-i/half)) formed in float64.
    diffusers forms t · freq in float32 (an error of ~1e-5 at t ≈ 700); Wan and
    Self-Forcing, whose weights we load, use float64."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.tensor([10000.0 ** (-i / half) for i in range(half)], dtype=torch.float64)
        angles = t.double()[:, None] * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=1).float()


@pytest.fixture(scope="module")
def diffusers_dit(tmp_path_factory):
    """A tiny random diffusers model, saved in its own layout (+ config.json)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():  # default init leaves zeros and ones that would hide mistakes
            p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("dit_diffusers")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "model.safetensors"))
    ref.save_config(folder)
    return ref, folder


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_dit_matches_diffusers(diffusers_dit, impl):
    ref, folder = diffusers_dit
    ours = W.load_dit(folder)
    ours.attn_impl = impl
    torch.manual_seed(1)
    x, context = torch.randn(2, 16, 3, 8, 12), torch.randn(2, 20, 48)
    with torch.no_grad():
        # t = 0 (the memory step): timestep features are exact in any precision
        zero = torch.zeros(2)
        assert rel_err(ours(x, zero[:, None].expand(2, 3), context), ref(x, zero, context, return_dict=False)[0]) < 1e-5
        # a sampler timestep, with the oracle's features formed in float64 as Wan does
        t = torch.full((2,), 769.2308)
        timesteps_proj = ref.condition_embedder.timesteps_proj
        ref.condition_embedder.timesteps_proj = Float64Timesteps(TINY["freq_dim"])
        try:
            expected = ref(x, t, context, return_dict=False)[0]
        finally:
            ref.condition_embedder.timesteps_proj = timesteps_proj
        got = ours(x, t[:, None].expand(2, 3), context)
    err = rel_err(got, expected)
    print(f"DiT vs diffusers ({impl}): relative error {err:.2e}")
    assert err < 1e-5


def test_native_and_self_forcing_layouts_load_identically(diffusers_dit, tmp_path):
    _, folder = diffusers_dit
    from_diffusers = W.load_dit(folder)
    # our module names are the native names (test_full_size_names_match_manifests);
    # nest them as the converted Self-Forcing checkpoint does, with a decoy generator
    native = {k: v.clone() for k, v in from_diffusers.state_dict().items()}
    nested = {f"generator_ema.model.{k}": v for k, v in native.items()}
    nested.update({f"generator.model.{k}": torch.randn_like(v) for k, v in native.items()})
    save_file(native, str(tmp_path / "native.safetensors"))
    cfg = from_diffusers.cfg  # a native-format config.json beside them (the tiny width hides the head count)
    (tmp_path / "config.json").write_text(json.dumps({
        "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "in_dim": 16, "out_dim": 16, "text_dim": cfg.text_dim}))
    save_file(nested, str(tmp_path / "self_forcing.safetensors"))
    torch.manual_seed(2)
    x, t, context = torch.randn(1, 16, 3, 4, 6), torch.rand(1, 3) * 1000, torch.randn(1, 7, 48)
    with torch.no_grad():
        expected = from_diffusers(x, t, context)
        for file in ("native.safetensors", "self_forcing.safetensors"):
            assert torch.equal(W.load_dit(tmp_path / file)(x, t, context), expected)


def test_full_size_names_match_manifests():
    with torch.device("meta"):
        dit = M.CausalWanModel(M.DiTConfig())
    ours = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    native = read_manifest("wan21_t2v_1.3b_dit_native.tsv")
    assert ours == native
    diffusers = read_manifest("wan21_t2v_1.3b_dit_diffusers.tsv")
    mapped, layout = W.native_dit_tensors({k: torch.empty(s, device="meta") for k, s in diffusers.items()})
    assert layout == "diffusers"
    assert len(mapped) == len(diffusers)  # one-to-one: no two names collapse
    assert {k: tuple(v.shape) for k, v in mapped.items()} == native


def test_config_from_either_config_json():
    native = {"dim": 1536, "ffn_dim": 8960, "freq_dim": 256, "num_heads": 12, "num_layers": 30, "in_dim": 16,
              "out_dim": 16, "text_len": 512, "eps": 1e-6, "patch_size": [1, 2, 2], "model_type": "t2v"}
    diffusers = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30,
                 "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "patch_size": [1, 2, 2]}
    blocks = {f"blocks.{i}.ffn.0.weight": torch.empty(0) for i in range(30)}  # the block count is checked too
    assert W.dit_config(native, blocks, "native") == M.DiTConfig() == W.dit_config(diffusers, blocks, "diffusers")


def test_loader_names_missing_and_misshaped_tensors(diffusers_dit, tmp_path):
    _, folder = diffusers_dit
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["blocks.1.attn2.to_k.bias"]
    tensors["proj_out.weight"] = torch.zeros(64, 63)
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(W.WeightsError) as err:
        W.load_dit(tmp_path / "broken.safetensors")
    message = str(err.value)
    for part in ("diffusers layout", "missing 1: blocks.1.cross_attn.k.bias", "extra.weight",
                 "head.head.weight (64, 63) != (64, 64)"):
        assert part in message
    with pytest.raises(W.WeightsError, match="does not exist"):
        W.load_dit(tmp_path / "nowhere")


def test_sharded_folder_loads(diffusers_dit, tmp_path):
    _, folder = diffusers_dit
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    loaded = W.load_dit(tmp_path).state_dict()
    reference = W.load_dit(folder).state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def run_chunkwise(model, x, t, context, window=None):
    """The sampler's way: per chunk a noisy denoising call, then the memory call with
    the chunk's real inputs, which overwrites the chunk's cache slots."""
    fpc = model.cfg.frames_per_chunk
    cache = M.KVCache(model, context, (x.shape[3] // 2, x.shape[4] // 2), window)
    outputs = []
    for start in range(0, x.shape[2], fpc):
        chunk = x[:, :, start:start + fpc]
        model.forward_chunk(torch.randn_like(chunk), torch.full_like(t[:, start:start + fpc], 500.0), cache, start)
        outputs.append(model.forward_chunk(chunk, t[:, start:start + fpc], cache, start, memory_step=True))
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_kv_cache_matches_block_causal_forward(diffusers_dit, impl):
    model = W.load_dit(diffusers_dit[1])
    model.attn_impl = impl
    torch.manual_seed(3)
    x, context = torch.randn(1, 16, 12, 4, 6), torch.randn(1, 9, 48)
    t = torch.rand(1, 12) * 1000  # a different timestep for every frame
    with torch.no_grad():
        full = model(x, t, context)
        chunked = run_chunkwise(model, x, t, context)
    err = rel_err(chunked, full)
    print(f"KV cache vs block-causal forward ({impl}): relative error {err:.2e}")
    assert err < 1e-5
    # the causal structure is real: changing the last chunk leaves the others alone
    x2 = x.clone()
    x2[:, :, 9:] += 1
    with torch.no_grad():
        full2 = model(x2, t, context)
    assert torch.allclose(full2[:, :, :9], full[:, :, :9], atol=1e-6)
    assert not torch.allclose(full2[:, :, 9:], full[:, :, 9:], atol=1e-3)


def test_window_cache_matches_windowed_attention(diffusers_dit):
    """With a window (m_sink, m_recent) the ring of slots must hold exactly the sink
    frames and the latest m_recent frames; checked against the block-causal forward
    with the window written as an explicit attention mask."""
    model = W.load_dit(diffusers_dit[1])
    m_sink, m_recent, frames, fpc = 1, 6, 15, model.cfg.frames_per_chunk
    torch.manual_seed(4)
    x, t, context = torch.randn(1, 16, frames, 4, 4), torch.rand(1, frames) * 1000, torch.randn(1, 5, 48)
    n = 4  # tokens per frame
    frame = torch.arange(frames).repeat_interleave(n)
    chunk_end = (frame // fpc + 1) * fpc  # exclusive end frame of each query's chunk
    visible = (frame[None, :] < chunk_end[:, None]) & ((frame[None, :] < m_sink) |
                                                      (frame[None, :] >= chunk_end[:, None] - m_recent))
    original = M.attention

    def windowed(q, k, v, key_mask=None, impl="sdpa"):
        if k.shape[1] == frames * n:  # the full forward's self-attention
            key_mask = visible
        return original(q, k, v, key_mask, impl)

    M.attention = windowed
    try:
        with torch.no_grad():
            expected = model(x, t, context)
    finally:
        M.attention = original
    with torch.no_grad():
        got = run_chunkwise(model, x, t, context, window=(m_sink, m_recent))
        unwindowed = run_chunkwise(model, x, t, context)
    assert rel_err(got, expected) < 1e-5
    assert rel_err(unwindowed, expected) > 1e-3  # the window does change the result


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_plain_and_sdpa_attention_agree(dtype, tol):
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 37, 3, 16, dtype=dtype) for _ in range(3))
    mask = torch.rand(37) > 0.3
    # reference: float64 loops over heads, written independently of attention()
    ref = torch.empty(2, 37, 3, 16, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            s = q[b, :, h].double() @ k[b, :, h].double().T / math.sqrt(16)
            s[:, ~mask] = -math.inf
            ref[b, :, h] = torch.softmax(s, dim=1) @ v[b, :, h].double()
    for impl in ("math", "sdpa"):
        out = M.attention(q, k, v, mask, impl)
        assert out.dtype == dtype
        assert rel_err(out, ref) < tol, impl


def test_rope_rotates_pairs_by_position_times_frequency():
    """RoPE at (frame, row, col) against a hand-built complex rotation per axis."""
    head_dim = 32
    x = torch.randn(1, 2, 1, head_dim)
    positions = torch.tensor([[3, 1, 4], [0, 5, 2]])
    got = M.apply_rope(x, M.rope_angles(positions, head_dim, 10000.0))
    dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    assert sum(dims) == head_dim and dims == (12, 10, 10)
    for token in range(2):
        z = torch.view_as_complex(x[0, token, 0].double().reshape(-1, 2).contiguous())
        angles = torch.cat([positions[token, a] * 10000.0 ** (-torch.arange(0, d, 2).double() / d)
                            for a, d in enumerate(dims)])
        expected = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten()
        assert torch.allclose(got[0, token, 0].double(), expected, atol=1e-6)


def test_meta_device_checks_headers_only(diffusers_dit, tmp_path):
    _, folder = diffusers_dit
    checked = W.load_dit(folder, device="meta")
    assert all(p.is_meta for p in checked.parameters())
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["proj_out.weight"] = torch.zeros(64, 63)
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(W.WeightsError, match="mis-shaped 1: head.head.weight"):
        W.load_dit(tmp_path / "broken.safetensors", device="meta")


def test_bfloat16_model_runs_and_agrees_with_float32(diffusers_dit):
    """The sampler's dtype on the GPU, checked on the CPU: bf16 weights, float32 islands."""
    model32 = W.load_dit(diffusers_dit[1])
    model16 = W.load_dit(diffusers_dit[1], dtype=torch.bfloat16)
    torch.manual_seed(6)
    x, context = torch.randn(1, 16, 6, 4, 6), torch.randn(1, 9, 48)
    out = []
    with torch.no_grad():
        for model in (model32, model16):
            dtype = model.head.head.weight.dtype
            cache = M.KVCache(model, context.to(dtype), (2, 3), window=(1, 6))
            for start in (0, 3):
                chunk = x[:, :, start:start + 3].to(dtype)
                model.forward_chunk(chunk, torch.zeros(1, 1), cache, start, memory_step=True)
            out.append(model.forward_chunk(chunk, torch.full((1, 1), 700.0), cache, 3).float())
    assert out[1].dtype == torch.float32 and rel_err(out[1], out[0]) < 3e-2


def rotated(k, cos, sin):
    """RoPE as complex multiplication: each pair (x, y) of k [..., T, H, Dh] times e^{iθ}."""
    pairs = torch.view_as_complex(k.reshape(*k.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.complex(cos, sin)[:, None, :]).flatten(-2)


def test_a_chunk_without_kept_tokens_runs_no_block_and_writes_copies_of_the_memory_once(monkeypatch):
    import lipar

    torch.manual_seed(5)
    dit = M.CausalWanModel(M.DiTConfig.tiny()).double().eval().requires_grad_(False)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(4)
    h, w = 3, 4
    x = torch.randn(1, 16, 6, 2 * h, 2 * w, generator=g, dtype=torch.float64)
    keep = torch.rand(6, h, w, generator=g) > 0.5
    keep[0], keep[3:] = True, False  # the second chunk prunes everything
    context = torch.randn(1, 5, 48, generator=g, dtype=torch.float64)
    cache = M.KVCache(dit, context, (h, w), (1, 3))
    first, second = lipar.chunk_plans(keep, "lipar")
    t = torch.full((1, 1), 700.0, dtype=torch.float64)
    dit.forward_chunk(x[:, :, :3], t, cache, 0, plan=first)
    dit.forward_chunk(x[:, :, :3], t * 0, cache, 0, memory_step=True, plan=first)
    memory_k, memory_v = cache.memory_k.clone(), cache.memory_v.clone()
    blocks_run, rotations = [], []
    dit.blocks[0].register_forward_hook(lambda *_: blocks_run.append(1))
    rotate = M.rotate_keys
    monkeypatch.setattr(M, "rotate_keys", lambda *a: rotations.append(1) or rotate(*a))
    for memory_step in (False, False, False, True):  # three denoising steps, then the memory step
        out = dit.forward_chunk(x[:, :, 3:], t * (not memory_step), cache, 3, memory_step=memory_step, plan=second)
        assert (out == 0).all()
    assert not blocks_run and len(rotations) == 1  # the four steps' copies are the same: written once
    n = h * w
    # the cache's angles are float32 tables (model.rope_angles' default): the same angles here
    cos, sin = (a.double() for a in M.rope_angles(M.grid_positions(3, h, w, start_frame=3), dit.cfg.head_dim,
                                                  dit.cfg.rope_theta))
    slots = torch.cat([torch.arange(n) + n * cache.slot_of(f) for f in range(3, 6)])
    for layer in range(dit.cfg.num_layers):
        copies_k, copies_v = memory_k[layer].repeat(1, 3, 1, 1), memory_v[layer].repeat(1, 3, 1, 1)  # every frame
        assert (cache.k[layer][:, slots] - rotated(copies_k, cos, sin)).abs().max().item() < 1e-12
        assert torch.equal(cache.v[layer][:, slots], copies_v)
    assert torch.equal(cache.memory_k, memory_k) and torch.equal(cache.memory_v, memory_v)
