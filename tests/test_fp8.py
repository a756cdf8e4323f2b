"""fp8.py on the CPU (torch._scaled_mm runs there too): the quantised product against
float64 math with e4m3 rounding written independently, its error against the bf16/float32
layer, the swap of the FFN's layers, and --fp8 on the command line."""

import json
import math
import sys

import pytest
import torch

import cli
import demo
import fp8
import sample
import video as io
from test_graphs import tiny_dit


def round_e4m3(v):
    """Round float64 values to the nearest e4m3fn number (ties to even): 3 mantissa bits,
    exponents from -6 (normal) with subnormal steps of 2**-9, largest finite 448."""
    out = torch.empty_like(v)
    for i, value in enumerate(v.flatten().tolist()):
        magnitude = min(abs(value), 448.0)
        exponent = max(math.floor(math.log2(magnitude)), -6) if magnitude > 0 else -6
        step = 2.0 ** (exponent - 3)
        q = magnitude / step
        rounded = math.floor(q + 0.5) if q - math.floor(q) != 0.5 else (math.floor(q) + (math.floor(q) % 2))
        out.view(-1)[i] = math.copysign(min(rounded * step, 448.0), value)
    return out


def test_the_fp8_product_is_the_product_of_the_rounded_values():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48)
    layer = fp8.Fp8Linear(linear)
    x = torch.randn(2, 5, 32)
    w, xs = linear.weight.detach().double(), x.reshape(-1, 32).double()
    w_scale = w.abs().amax(1, keepdim=True) / 448
    x_scale = xs.abs().amax(1, keepdim=True) / 448
    expected = (round_e4m3(xs / x_scale) * x_scale) @ (round_e4m3(w / w_scale) * w_scale).T + linear.bias.double()
    # the scales are float32 in the layer: their rounding (2**-24 relative) and the float32
    # accumulation over 32 products bound the difference
    torch.testing.assert_close(layer(x).double().reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fp8_layer_is_close_to_the_layer_it_replaces(dtype):
    """e4m3 keeps 3 mantissa bits: each rounding is within 1/16 of the value, so a product's
    error is a few percent of its size, never more."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 96).to(dtype)
    x = torch.randn(37, 64).to(dtype)  # a row count no multiple of 16
    out, reference = fp8.Fp8Linear(linear)(x).float(), linear(x).float()
    assert out.dtype == torch.float32 and fp8.Fp8Linear(linear)(x).dtype == dtype
    error = ((out - reference).norm() / reference.norm()).item()
    assert 0.005 < error < 0.06, error  # above zero: the product did run in fp8


def test_quantize_ffn_swaps_the_ffns_products_only_and_the_model_still_edits():
    dit, reference = tiny_dit(), tiny_dit()
    fp8.quantize_ffn(dit)
    for block in dit.blocks:
        assert isinstance(block.ffn[0], fp8.Fp8Linear) and isinstance(block.ffn[2], fp8.Fp8Linear)
        assert isinstance(block.self_attn.q, torch.nn.Linear) and isinstance(block.cross_attn.o, torch.nn.Linear)
        assert block.ffn[0].weight_e4m3.dtype == torch.float8_e4m3fn
    x, context = torch.randn(1, 16, 3, 4, 6), torch.randn(1, 5, 48)
    with torch.no_grad():
        out = dit(x, torch.full((1, 3), 500.0), context)
        expected = reference(x, torch.full((1, 3), 500.0), context)
    error = ((out - expected).norm() / expected.norm()).item()
    assert 0 < error < 0.06, error


def test_the_cli_edits_with_fp8_and_says_so(weights, tmp_path):
    clip = tmp_path / "ball.mp4"
    io.write_video(clip, demo.demo_frames(64, 112, 12), 24.0)
    out, stats = tmp_path / "fp8.mp4", tmp_path / "stats.json"
    args = ["--video", str(clip), "--weights", str(weights), "--height", "64", "--width", "112", "--device", "cpu",
            "--vae", "tiny", "--out", str(out), "--json", str(stats)]
    assert cli.guarded(sample.main, [*args, "--fp8"]) == 0
    assert out.exists() and json.loads(stats.read_text())["fp8"] is True


def test_fp8_on_a_gpu_without_fp8_products_is_one_sentence(monkeypatch):
    """An Ampere GPU (8.0) has no fp8 products: --fp8 is refused, naming the GPU and the fix."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(cli, "device_problem", lambda device: None)  # as if this machine had that GPU
    assert cli.fp8_problem("cuda", fp8=False) is None  # not asked for: nothing to refuse
    problem = cli.fp8_problem("cuda")
    assert problem == ("--fp8 needs a GPU with fp8 products (compute capability 8.9 or later: Ada, Hopper); "
                       "NVIDIA A100 has 8.0: drop --fp8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert cli.fp8_problem("cuda") is None
    assert cli.fp8_problem("cpu") is None  # torch._scaled_mm runs on the CPU too


def test_the_fusion_flag_on_the_cpu_and_without_triton(monkeypatch, capsys):
    """Off CUDA every fused function runs as written: --fusion there is refused (it would
    change nothing); on CUDA without Triton the default says so in one line and runs op by op."""
    for choice in ("triton", "compile", "off"):
        with pytest.raises(cli.UsageError, match="--fusion only changes how the models run on CUDA"):
            cli.parse(["--device", "cpu", "--fusion", choice])
    args, _, _ = cli.parse(["--device", "cpu"])
    assert args.fusion is None and cli.fusion(args) is None
    args.device = "cuda"  # as if on a GPU machine
    monkeypatch.setitem(sys.modules, "triton_ops", None)  # `import triton_ops` raises ImportError
    assert cli.fusion(args) is None
    assert capsys.readouterr().err == ("note: Triton is not installed, so the fused kernels are off and the "
                                       "elementwise chains run op by op (pip install triton, or --fusion compile)\n")
    args.fusion = "compile"
    assert cli.fusion(args) == "compile"
