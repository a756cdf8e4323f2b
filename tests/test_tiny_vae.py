"""tiny_vae.py (TAEHV for Wan 2.1): its memory wiring against a frame-by-frame float64
reference written differently, pieces against whole clips, frame counts, and loading
the published layout (tests/../shared manifest, the temporal-growth rows, bad files)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import cli
import demo
import sample
import tiny_vae as T
import vae as V
import video as io
import weights as W

MANIFEST = Path(__file__).resolve().parent / "manifests" / "taew2_1.tsv"  # a copy of shared/reference/weights/


def random_tiny(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    vae = T.TinyVAE(T.TinyVAEConfig.tiny()).to(dtype)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.3)
    return vae


# ---- an independent reference: one frame at a time, plain convolutions ----


def conv2d(layer, x):
    return F.conv2d(x, layer.weight, layer.bias, stride=layer.stride, padding=layer.padding)


def frame_by_frame(layers, frames):
    """The network as the reference's sequential mode runs it: frames enter one at a
    time; every MemBlock keeps the input it saw last (zeros at first); a TPool waits for
    `stride` frames and stacks them; a TGrow sends its frames on, earliest first. Plain
    F.conv2d, a Python loop per frame: nothing shared with tiny_vae.run."""
    memory, pooled = {}, {}

    def push(index, x):  # x [B, C, H, W]: one frame entering layers[index]
        if index == len(layers):
            return [x]
        layer = layers[index]
        if isinstance(layer, T.MemBlock):
            past = memory.get(index, torch.zeros_like(x))
            memory[index] = x
            c0, c2, c4 = layer.conv[0], layer.conv[2], layer.conv[4]
            y = conv2d(c4, F.relu(conv2d(c2, F.relu(conv2d(c0, torch.cat([x, past], dim=1))))))
            return push(index + 1, F.relu(y + x))
        if isinstance(layer, T.TPool):
            pooled.setdefault(index, []).append(x)
            if len(pooled[index]) < layer.stride:
                return []
            stacked = torch.cat(pooled.pop(index), dim=1)
            return push(index + 1, F.conv2d(stacked, layer.conv.weight))
        if isinstance(layer, T.TGrow):
            grown = F.conv2d(x, layer.conv.weight).chunk(layer.stride, dim=1)
            return [out for frame in grown for out in push(index + 1, frame)]
        if isinstance(layer, torch.nn.Conv2d):
            return push(index + 1, conv2d(layer, x))
        if isinstance(layer, torch.nn.Upsample):
            return push(index + 1, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
        if isinstance(layer, T.Clamp):
            return push(index + 1, 3 * torch.tanh(x / 3))
        assert isinstance(layer, torch.nn.ReLU), layer
        return push(index + 1, F.relu(x))

    return torch.stack([out for t in range(frames.shape[2]) for out in push(0, frames[:, :, t])], dim=2)


def test_encode_and_decode_match_a_frame_by_frame_reference():
    vae = random_tiny()
    video = torch.rand(1, 3, 13, 32, 48, dtype=torch.float64) * 2 - 1
    padded = torch.cat([video, video[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)  # 13 -> 16 frames
    expected = frame_by_frame(list(vae.encoder), (padded + 1) / 2)
    latents = vae.encode(video)
    assert latents.shape == (1, 16, 4, 4, 6)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-12)
    frames = frame_by_frame(list(vae.decoder), latents)[:, :, 3:]  # the first 3 come before frame 0
    torch.testing.assert_close(vae.decode(latents), frames.clamp(0, 1) * 2 - 1, rtol=0, atol=1e-12)


def test_pieces_with_one_cache_equal_the_whole_clip_and_counts_match_the_wan_vae():
    vae = random_tiny(1)
    video = torch.rand(1, 3, 21, 16, 32, dtype=torch.float64) * 2 - 1  # 21 = 4·5 + 1
    whole = vae.encode(video)
    cache = V.CausalCache()
    padded = torch.cat([video, video[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)
    pieces = [vae.encode(padded[:, :, s:s + 12], cache=cache) for s in (0, 12)]
    assert torch.equal(torch.cat(pieces, dim=2), whole)
    cache = V.CausalCache()
    decoded = [vae.decode(whole[:, :, s:s + 3], cache=cache) for s in (0, 3)]
    assert [d.shape[2] for d in decoded] == [9, 12]
    assert torch.equal(torch.cat(decoded, dim=2), vae.decode(whole))
    wan = V.WanVAE(V.VAEConfig(base_dim=8)).double()
    for frames in (1, 5, 9, 21):
        clip = video[:, :, :frames]
        assert vae.encode(clip).shape[2] == 1 + (frames - 1) // 4
        assert vae.decode(vae.encode(clip)).shape[2] == frames
        if frames > 1:  # (the Wan VAE's temporal convolutions want a few frames)
            assert wan.encode(clip).shape[2] == 1 + (frames - 1) // 4
    assert [V.WanVAE.chunk_frames(3, first) for first in (True, False)] == [9, 12]
    assert [T.TinyVAE.chunk_frames(3, first) for first in (True, False)] == [12, 12]
    with pytest.raises(ValueError, match="pieces of 4k frames"):
        vae.encode(video[:, :, :5], cache=V.CausalCache())


# ---- loading ----


def test_full_size_names_and_shapes_match_the_published_manifest():
    rows = [line.split("\t") for line in MANIFEST.read_text().splitlines()[1:]]
    published = {name: tuple(int(n) for n in shape.strip("()").split(",") if n.strip()) for name, shape in rows}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in T.TinyVAE().state_dict().items()}
    assert ours == published and len(ours) == 128
    assert sum(torch.Size(s).numel() for s in ours.values()) == 11_315_539


def test_loader_keeps_the_last_rows_of_wider_growth_layers_and_names_bad_tensors(tmp_path):
    vae = random_tiny(2, torch.float32)
    tensors = {k: v.contiguous() for k, v in vae.state_dict().items()}
    key = "decoder.13.conv.weight"  # TGrow(8, 2): 16 rows
    earlier = torch.randn(8, *tensors[key].shape[1:])
    tensors[key] = torch.cat([earlier, tensors[key]])  # stored as a 3-step growth: the model keeps the last 16
    folder = tmp_path / "tiny_vae"
    folder.mkdir()
    save_file(tensors, str(folder / "taew2_1.safetensors"))
    (folder / "config.json").write_text('{"channels": 8, "decoder_channels": [16, 8, 8, 8]}')
    loaded = W.load_tiny_vae(folder)
    for name, tensor in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tensors["encoder.0.weight"] = torch.zeros(8, 3, 5, 5)
    save_file(tensors, str(folder / "taew2_1.safetensors"))
    with pytest.raises(W.WeightsError, match=r"mis-shaped 1: encoder.0.weight \(8, 3, 5, 5\) != \(8, 3, 3, 3\)"):
        W.load_tiny_vae(folder)


def test_the_cli_edits_with_the_tiny_vae(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    weights = demo.write_random_weights(tmp_path / "weights")
    clip = tmp_path / "clip.mp4"
    io.write_video(clip, demo.demo_frames(64, 112, 26), 24.0)
    assert cli.guarded(sample.main, ["--video", str(clip), "--vae", "tiny", "--weights", str(weights), "--height", "64",
                       "--width", "112", "--device", "cpu", "--out", "out.mp4", "--save-mask"]) == 0
    assert "tiny VAE" in capsys.readouterr().out
    for kind in ("lipar", "mask"):
        assert io.read_video(tmp_path / f"out_{kind}.mp4")[0].shape == (26, 64, 112, 3)
    assert cli.guarded(sample.main, ["--check-weights", "--weights", str(weights)]) == 0
    assert "tiny VAE" in capsys.readouterr().out


def test_the_pickled_release_converts_once_and_loads(tmp_path):
    """taew2_1.pth is a plain state dict: --convert-checkpoint writes it as safetensors
    (read with weights_only=True), and the loader takes the result."""
    vae = T.TinyVAE()
    torch.save(vae.state_dict(), tmp_path / "taew2_1.pth")
    target = tmp_path / "tiny_vae" / "taew2_1.safetensors"
    assert cli.guarded(sample.main, ["--convert-checkpoint", str(tmp_path / "taew2_1.pth"), str(target)]) == 0
    loaded = W.load_tiny_vae(tmp_path / "tiny_vae")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())
