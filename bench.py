"""
Speed of the editing pipeline on the GPU: the Self-Forcing baseline (`full`) and
LIPAR at fixed prune ratios, in one process, on the same clip and noise.

    python bench.py                 # the real 1.3B DiT and Wan VAE shapes, bf16, CUDA
    python bench.py --smoke         # tiny models on the CPU: checks the harness runs

Speed does not depend on weight values, so every model has random weights. Each
stage is timed with CUDA events after warm-up; the median of --runs is reported.
The DiT's FLOPs follow SPEC §5 (linear 2·(4d² + 2d² + 2d·ffn) per token and layer,
self-attention 4·L_kv·d, cross-attention 4·512·d) and are set against ceilings
measured here: a bf16 GEMM and SDPA at the DiT's shapes.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lipar
import model as M
import sample
import vae as V
import video as io

PRUNE_RATIOS = (0.0, 0.20, 0.35, 0.50)


def coherent_mask(latent_frames, h, w, ratio, seed=0):
    """A realistic keep-mask [L, h, w] with `ratio` of the tokens after frame 0 pruned.

    Real masks prune large still regions, not scattered tokens: threshold a smooth
    random field (coarse noise, upsampled, drifting slowly from frame to frame) at
    its per-frame quantile. Frame 0 is always kept.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(latent_frames, 1, max(h // 6, 2), max(w // 6, 2), generator=g)
    for f in range(1, latent_frames):  # slow temporal drift
        coarse[f] = 0.9 * coarse[f - 1] + 0.45 * coarse[f]
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[:, 0]
    keep = torch.ones(latent_frames, h, w, dtype=torch.bool)
    if ratio > 0:
        threshold = torch.quantile(field[1:].flatten(1), ratio, dim=1)
        keep[1:] = field[1:] > threshold[:, None, None]
    return keep


def dit_flops(keep, mode, window, cfg, frames_per_chunk=3):
    """(linear, self-attention, cross-attention) FLOPs of one edit: 3 denoising steps
    and a memory step per chunk, each on the chunk's computed tokens."""
    d, n = cfg.dim, keep.shape[1] * keep.shape[2]
    per_token_linear = 2 * (4 * d * d + 2 * d * d + 2 * d * cfg.ffn_dim)
    linear = attention = cross = 0
    for start in range(0, keep.shape[0], frames_per_chunk):
        end = start + frames_per_chunk
        queries = frames_per_chunk * n if mode == "full" else int(keep[start:end].sum())
        sink, recent = (0, keep.shape[0]) if window is None else window
        visible_frames = min(end, sink + recent)
        calls = 4 * cfg.num_layers
        linear += calls * queries * per_token_linear
        attention += calls * queries * 4 * visible_frames * n * d
        cross += calls * queries * 4 * 512 * d
    return linear, attention, cross


def cuda_ms(fn, warmup, runs):
    """Median milliseconds of fn() over `runs`, timed with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_ms(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ceilings(cfg, n_tokens, timer):
    """Measured bf16 GEMM rate at the FFN's shape and SDPA rate at a chunk's shape (TFLOP/s)."""
    a = torch.randn(n_tokens, cfg.dim, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(cfg.dim, cfg.ffn_dim, device="cuda", dtype=torch.bfloat16)
    gemm = 2 * n_tokens * cfg.dim * cfg.ffn_dim / timer(lambda: a @ b) / 1e9
    q = torch.randn(1, n_tokens, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 7 * n_tokens // 3, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    sdpa = 4 * q.shape[1] * k.shape[1] * cfg.dim / timer(lambda: M.attention(q, k, k)) / 1e9
    return gemm, sdpa


def cpu_float32_vs_gpu(dit, context, keep):
    """Relative error between the CPU float32 and the GPU (bf16) kept-token paths on the
    same inputs: two chunks of LIPAR, denoising and memory steps, real model shapes."""
    cpu = M.CausalWanModel(dit.cfg)
    cpu.load_state_dict({k: v.float().cpu() for k, v in dit.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    h, w = keep.shape[1:]
    x = torch.randn(1, 16, 6, 2 * h, 2 * w, generator=g)
    outputs = []
    for model, device in ((cpu, "cpu"), (dit, "cuda")):
        dtype = model.head.head.weight.dtype
        cache = M.KVCache(model, context.to(device, dtype), 6, (h, w), window=(1, 6))
        plans = lipar.chunk_plans(keep.to(device), "lipar")
        out = []
        for c, plan in enumerate(plans):
            chunk = x[:, :, 3 * c:3 * c + 3].to(device, dtype)
            out.append(model.forward_chunk(chunk, torch.full((1, 1), 700.0, device=device), cache, 3 * c, plan=plan))
            model.forward_chunk(chunk, torch.zeros(1, 1, device=device), cache, 3 * c, memory_step=True, plan=plan)
        outputs.append(torch.cat(out, dim=2).float().cpu())
    return ((outputs[1] - outputs[0]).norm() / outputs[0].norm()).item()


def profile_edit(edit):
    """Top CUDA kernels of one edit, by total time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        edit()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)


def vae_variants(vae, video, timer):
    """Encode/decode time and peak of the VAE as bench runs it, with cuDNN's autotuner,
    and with channels-last 3D convolutions: printed lines, one per variant."""
    lines = []
    for name in ("defaults", "cudnn.benchmark", "channels-last 3D"):
        torch.backends.cudnn.benchmark = name == "cudnn.benchmark"
        if name == "channels-last 3D":
            for conv in (m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)):
                conv.weight.data = conv.weight.data.to(memory_format=torch.channels_last_3d)
            video = video.to(memory_format=torch.channels_last_3d)
        latents = vae.encode(video)
        torch.cuda.reset_peak_memory_stats()
        encode_ms = timer(lambda: vae.encode(video))
        torch.cuda.reset_peak_memory_stats()
        decode_ms = timer(lambda: vae.decode(latents))
        lines.append(f"VAE {name}: encode {encode_ms:.0f} ms, decode {decode_ms:.0f} ms, "
                     f"decode peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    torch.backends.cudnn.benchmark = False
    return lines


def random_(module, std=0.02):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, one run: checks the harness")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one LIPAR 35% edit")
    p.add_argument("--vae-variants", action="store_true",
                   help="only time the VAE with its defaults, cudnn.benchmark and channels-last 3D, then exit")
    args = p.parse_args(argv)

    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    frames, height, width = (21, 64, 112) if smoke else (81, 480, 832)
    runs, warmup = (1, 0) if smoke else (args.runs, args.warmup)
    timer = (lambda fn: wall_ms(fn, warmup, runs)) if smoke else (lambda fn: cuda_ms(fn, warmup, runs))
    torch.manual_seed(0)

    dit_cfg = M.DiTConfig.tiny() if smoke else M.DiTConfig()
    vae_cfg = V.VAEConfig.tiny() if smoke else V.VAEConfig()
    with torch.device(device):
        vae = random_(V.WanVAE(vae_cfg), 0.05).to(dtype).eval().requires_grad_(False)
    video = io.to_model(sample.demo_frames(height, width, frames)).to(device)
    device_name = "CPU (smoke)" if smoke else torch.cuda.get_device_name()
    if args.vae_variants and not smoke:
        with torch.no_grad():
            print("\n".join(vae_variants(vae, video, timer)))
        return None
    vae_peaks = None
    if not smoke:  # the VAE alone: does a round trip need memory growing with the clip?
        with torch.no_grad():
            torch.cuda.reset_peak_memory_stats()
            latents = vae.encode(video)
            encode_peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            vae.decode(latents)
            vae_peaks = (encode_peak, torch.cuda.max_memory_allocated() / 2**30)
    with torch.device(device):
        dit = random_(M.CausalWanModel(dit_cfg)).to(dtype).eval().requires_grad_(False)
    context = torch.randn(1, 512, dit_cfg.text_dim, device=device, dtype=dtype)

    results = {}
    with torch.no_grad():
        encode_ms = timer(lambda: vae.encode(video))
        latents = vae.encode(video)

        def edit(keep, mode, window, source=latents):
            return sample.edit_latents(dit, source, context, keep, mode, window, seed=0, progress=False)

        decode_ms = timer(lambda: vae.decode(latents))
        L, (h, w) = latents.shape[2], (latents.shape[3] // 2, latents.shape[4] // 2)
        mask_ms = timer(lambda: lipar.prune_mask(latents[0].transpose(0, 1)))
        masks = [(f"lipar {r:.0%}", coherent_mask(L, h, w, r).to(device)) for r in PRUNE_RATIOS]
        masks.append(("lipar (clip mask)", lipar.prune_mask(latents[0].transpose(0, 1))))
        configs = [("full", "full", torch.ones(L, h, w, dtype=torch.bool, device=device), None)]
        configs += [(name, "lipar", keep, (1, 6)) for name, keep in masks]

        # speed work must not change results beyond bf16 tolerance: the fast path
        # against the plain float32 softmax path on the 35 % mask
        keep35 = masks[2][1]
        fast = edit(keep35, "lipar", (1, 6))
        dit.attn_impl = "math"
        reference = edit(keep35, "lipar", (1, 6))
        dit.attn_impl = "sdpa"
        agreement = ((fast - reference).norm() / reference.norm()).item()
        assert agreement < 3e-2, f"fast path differs from the reference by {agreement:.2e}"

        cross_device = None
        if not smoke:  # CPU float32 vs GPU bf16 at the real width, on a small (240x416) grid
            small_keep = coherent_mask(6, 15, 26, 0.35).to(device)
            cross_device = cpu_float32_vs_gpu(dit, context, small_keep)
        if args.profile and not smoke:
            print(profile_edit(lambda: edit(keep35, "lipar", (1, 6))))
        gemm_rate, sdpa_rate = (None, None) if smoke else ceilings(dit_cfg, 3 * h * w, timer)
        for name, mode, keep, window in configs:
            if not smoke:
                torch.cuda.empty_cache()
            dit_ms = timer(lambda: edit(keep, mode, window))
            if not smoke:  # peak of a whole edit (encode, mask, DiT, decode) with the weights resident
                torch.cuda.reset_peak_memory_stats()
                vae.decode(edit(keep, mode, window, source=vae.encode(video)))
            peak = None if smoke else torch.cuda.max_memory_allocated() / 2**30
            linear, attention, cross = dit_flops(keep, mode, window, dit_cfg)
            ideal_ms = None if smoke else ((linear + cross) / gemm_rate + attention / sdpa_rate) / 1e9
            e2e_ms = encode_ms + mask_ms + dit_ms + decode_ms
            results[name] = dict(pruned=lipar.prune_ratio(keep) if mode != "full" else 0.0, dit_ms=dit_ms,
                                 tflops=(linear + attention + cross) / dit_ms / 1e9, ideal_ms=ideal_ms,
                                 e2e_ms=e2e_ms, peak=peak, flops=linear + attention + cross)
        if not smoke:  # the same edits with the blocks run op by op: the baseline of the fusion
            M.FUSE = False
            for name, mode, keep, window in (configs[0], configs[3]):
                eager_ms = timer(lambda: edit(keep, mode, window))
                results[f"{name} (eager, not fused)"] = dict(results[name], dit_ms=eager_ms,
                                                             e2e_ms=results[name]["e2e_ms"] - results[name]["dit_ms"]
                                                             + eager_ms, tflops=results[name]["flops"] / eager_ms / 1e9)
            M.FUSE = True
    full = results["full"]
    header = ("| config | pruned | DiT ms | DiT frames/s | DiT TFLOP/s | % of roofline | speedup vs full "
              "| ideal speedup | end-to-end frames/s | peak GiB (whole edit) |")
    rows = [header, "|" + " --- |" * 10]
    for name, r in results.items():
        roofline = "n/a" if r["ideal_ms"] is None else f"{r['ideal_ms'] / r['dit_ms']:.0%}"
        peak = "n/a" if r["peak"] is None else f"{r['peak']:.2f}"
        rows.append(f"| {name} | {r['pruned']:.1%} | {r['dit_ms']:.0f} | {frames / r['dit_ms'] * 1e3:.1f} "
                    f"| {r['tflops']:.0f} | {roofline} | {full['dit_ms'] / r['dit_ms']:.2f}x "
                    f"| {full['flops'] / r['flops']:.2f}x | {frames / r['e2e_ms'] * 1e3:.1f} | {peak} |")
    vae_line = (f"VAE: encode {encode_ms:.0f} ms ({frames / encode_ms * 1e3:.1f} frames/s), decode {decode_ms:.0f} ms "
                f"({frames / decode_ms * 1e3:.1f} frames/s); mask {mask_ms:.1f} ms; text encoding excluded")
    if not smoke:
        vae_line += (f"; VAE alone: peak {vae_peaks[0]:.2f} GiB encoding, {vae_peaks[1]:.2f} GiB decoding "
                     f"(input clip {video.numel() * 4 / 2**30:.2f} GiB float32)")
        vae_line += (f"; VAE at {2.1e3 * frames / encode_ms:.0f} / {3.5e3 * frames / decode_ms:.0f} TFLOP/s "
                     f"(SPEC §5 counts); ceilings measured here: bf16 GEMM {gemm_rate:.0f} TFLOP/s, "
                     f"SDPA {sdpa_rate:.0f} TFLOP/s")
    agreements = f"fast vs plain-softmax path: relative error {agreement:.1e}"
    if cross_device is not None:
        agreements += f"; GPU bf16 vs CPU float32 (2 LIPAR chunks): {cross_device:.1e}"
    lines = [f"{device_name}, {str(dtype).removeprefix('torch.')}, {frames} frames {width}x{height} "
             f"({L} latent frames), median of {runs} after {warmup} warm-up; {agreements}", "", *rows, "", vae_line]
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
