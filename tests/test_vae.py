"""The VAE against diffusers' AutoencoderKLWan (random weights, both key layouts),
the weight manifests, chunked against one-pass evaluation, and loader errors."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from vae import CausalCache, CausalConv3d, VAEConfig, WanVAE
from weights import (WeightsError, diffusers_to_native, load_vae, vae_config_from_diffusers,
                     vae_config_to_diffusers)

MANIFESTS = Path(__file__).resolve().parent / "manifests"  # copies of shared/reference/weights


def read_manifest(name):
    rows = (MANIFESTS / name).read_text().splitlines()[1:]
    return {n: tuple(int(d) for d in re.findall(r"\d+", s)) for n, s in (r.split("\t") for r in rows)}


def relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def randomise_gains(module, seed):
    """Default init sets every norm gain to 1 (and diffusers' biases are small): randomise
    them too, so that a swapped or ignored gain or bias changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def reference():
    """A tiny AutoencoderKLWan (base_dim 8, z_dim 16) with random weights."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=VAEConfig.tiny().base_dim, z_dim=16).eval()
    randomise_gains(ref, seed=1)
    return ref


@pytest.fixture(scope="module")
def diffusers_folder(reference, tmp_path_factory):
    """The reference saved as the diffusers repo's vae/ folder: config.json + safetensors."""
    folder = tmp_path_factory.mktemp("vae_diffusers")
    reference.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def latent_stats(reference):
    """diffusers' own copy of the latent mean/std, shaped [1, 16, 1, 1, 1]."""
    def column(values):
        return torch.tensor(values).view(1, -1, 1, 1, 1)
    return column(reference.config.latents_mean), column(reference.config.latents_std)


# Both in float32 with the same weights, summed in other orders: our CPU causal convs go to
# oneDNN's blocked kernels, diffusers' through PyTorch's im2col loop. A conv of up to
# 64 · 27 = 1728 products moves by about sqrt(1728) · 6e-8 = 2.5e-6 of its terms' size, and
# the norms between the layers keep that from compounding: 1e-5 of the largest value
# (measured 5.1e-7 encoding, 4.2e-6 decoding, AMD EPYC). A wrong weight or layer moves it by O(1).
TOLERANCE = 1e-5


def clip(frames=9, height=32, width=48, seed=2):
    return torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_matches_diffusers(reference, diffusers_folder, latent_stats):
    vae = load_vae(diffusers_folder)
    video = clip()
    with torch.no_grad():
        mu = reference.encode(video).latent_dist.mode()
    mean, std = latent_stats
    latents = vae.encode(video)
    assert latents.shape == (1, 16, 3, 4, 6) and latents.dtype == torch.float32
    error = relative_error(latents, (mu - mean) / std)
    print(f"encode vs diffusers: relative error {error:.2e}")
    assert error < TOLERANCE


def test_decode_matches_diffusers(reference, diffusers_folder, latent_stats):
    vae = load_vae(diffusers_folder)
    latents = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    mean, std = latent_stats
    with torch.no_grad():
        expected = reference.decode(latents * std + mean).sample
    assert (expected.abs() < 1).float().mean() > 0.9  # mostly inside the clamp: the comparison means something
    video = vae.decode(latents)
    assert video.shape == (1, 3, 9, 32, 48)
    error = relative_error(video, expected)
    print(f"decode vs diffusers: relative error {error:.2e}")
    assert error < TOLERANCE


def test_native_layout_loads_the_same(reference, diffusers_folder, tmp_path):
    """Native names come from diffusers' own converter (native -> diffusers), not from vae.py."""
    diffusers_tensors = reference.state_dict()
    with torch.device("meta"):
        native_names = list(WanVAE(VAEConfig.tiny()).state_dict())
    to_diffusers = convert_wan_vae_to_diffusers({name: name for name in native_names})
    native = {native_name: diffusers_tensors[diffusers_name].clone()
              for diffusers_name, native_name in to_diffusers.items()}
    save_file(native, tmp_path / "wan_vae.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(vae_config_to_diffusers(VAEConfig.tiny())))
    from_native = load_vae(tmp_path / "wan_vae.safetensors")
    from_diffusers = load_vae(diffusers_folder)
    video, latents = clip(), torch.randn(1, 16, 2, 4, 6)
    assert torch.equal(from_native.encode(video), from_diffusers.encode(video))
    assert torch.equal(from_native.decode(latents), from_diffusers.decode(latents))


def test_full_size_names_match_manifests():
    native = read_manifest("wan21_vae_native.tsv")
    diffusers = read_manifest("wan21_vae_diffusers.tsv")
    with torch.device("meta"):
        ours = {name: tuple(p.shape) for name, p in WanVAE(VAEConfig()).state_dict().items()}
    assert ours == native
    mapped = diffusers_to_native({name: torch.empty(shape, device="meta") for name, shape in diffusers.items()},
                                 VAEConfig())
    assert len(mapped) == len(diffusers)  # every diffusers name lands on a distinct name
    assert {name: tuple(t.shape) for name, t in mapped.items()} == native
    # and on the one diffusers' own converter pairs it with
    to_diffusers = convert_wan_vae_to_diffusers({name: name for name in native})
    assert set(to_diffusers) == set(diffusers)
    assert diffusers_to_native(to_diffusers, VAEConfig()) == {name: name for name in native}


def test_config_json_describes_the_same_network():
    """What vae_config_to_diffusers writes builds, in diffusers, the network WanVAE builds, and reads back."""
    config = VAEConfig.tiny()
    theirs = AutoencoderKLWan.from_config(vae_config_to_diffusers(config)).state_dict()
    with torch.device("meta"):
        ours = {name: p.shape for name, p in WanVAE(config).state_dict().items()}
    assert {name: t.shape for name, t in diffusers_to_native(theirs, config).items()} == ours
    assert vae_config_from_diffusers(vae_config_to_diffusers(config)) == config


def test_chunked_equals_one_pass_and_is_causal():
    """Chunked encode/decode (caches carried between chunks) against one pass over the
    whole clip (zero causal padding), in float64; and the first frames' result does
    not depend on later frames."""
    torch.manual_seed(4)
    vae = WanVAE(VAEConfig.tiny()).double()
    randomise_gains(vae, seed=5)
    video = clip(frames=9, height=16, width=24).double()  # chunks of 1, 4, 4 frames
    latents = vae.encode(video)
    assert latents.shape == (1, 16, 3, 2, 3) and latents.dtype == torch.float64
    assert (latents - vae.encode(video, chunked=False)).abs().max() < 1e-12
    assert (latents[:, :, :2] - vae.encode(video[:, :, :5])).abs().max() < 1e-12

    decoded = vae.decode(latents)
    assert decoded.shape == (1, 3, 9, 16, 24)
    assert (decoded - vae.decode(latents, chunked=False)).abs().max() < 1e-12
    assert (decoded[:, :, :5] - vae.decode(latents[:, :, :2])).abs().max() < 1e-12


def test_the_causal_conv_on_the_cpu_computes_the_convolution():
    """In float32 on the CPU the causal conv calls oneDNN itself (vae.CausalConv3d): against
    the same convolution in float64 through F.conv3d, zero past frames padded by hand. Each
    output sums 16 x 27 = 432 products; float32 summation in any order is within
    432 · 2^-24 · Σ|products| of the exact sum (the bound is computed, not guessed)."""
    generator = torch.Generator().manual_seed(0)
    conv = CausalConv3d(16, 16)
    x = torch.randn(1, 16, 4, 8, 12, generator=generator)
    with torch.no_grad():
        out = conv(x, CausalCache())
        past = F.pad(x.double(), (0, 0, 0, 0, 2, 0))
        expected = F.conv3d(past, conv.weight.double(), conv.bias.double(), padding=(0, 1, 1))
        bound = 432 * 2**-24 * (F.conv3d(past.abs(), conv.weight.double().abs(), padding=(0, 1, 1))
                                + conv.bias.double().abs().view(-1, 1, 1, 1))
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert ((out.double() - expected).abs() <= bound).all()


def test_bfloat16_weights_give_float32_latents_close_to_float32(diffusers_folder):
    video = clip()
    exact = load_vae(diffusers_folder).encode(video)
    approx = load_vae(diffusers_folder, dtype=torch.bfloat16).encode(video)
    assert approx.dtype == torch.float32
    assert relative_error(approx, exact) < 5e-2


def test_encode_rejects_a_frame_count_it_cannot_take(diffusers_folder):
    with pytest.raises(ValueError, match="4k \\+ 1 frames"):
        load_vae(diffusers_folder).encode(clip(frames=8))


MIDDLE = VAEConfig.tiny().base_dim * VAEConfig.tiny().dim_mult[-1]  # channels of the middle attention


@pytest.mark.parametrize("damage, expected", [
    ("drop", r"missing 1: encoder\.middle\.1\.proj\.weight"),
    ("reshape", rf"mis-shaped 1: encoder\.middle\.1\.proj\.weight \({MIDDLE}, {MIDDLE}\) != \({MIDDLE}, {MIDDLE}, 1, 1\)"),
])
def test_damaged_file_names_the_tensor(reference, tmp_path, damage, expected):
    tensors = {name: t.clone() for name, t in reference.state_dict().items()}
    name = "encoder.mid_block.attentions.0.proj.weight"
    if damage == "drop":
        del tensors[name]
    else:
        tensors[name] = tensors[name].flatten(1)
    save_file(tensors, tmp_path / "vae.safetensors")
    reference.save_config(tmp_path)
    with pytest.raises(WeightsError, match=expected):
        load_vae(tmp_path / "vae.safetensors")


def test_config_of_another_vae_is_refused(tmp_path):
    AutoencoderKLWan(base_dim=8, z_dim=16, is_residual=True).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(WeightsError, match="is_residual=True"):
        load_vae(tmp_path)

