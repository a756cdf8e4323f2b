"""
Speed of the editing pipeline on the GPU: the Self-Forcing baseline (`full`) and
LIPAR at fixed prune ratios, in one process, on the same clip and noise.

    python bench.py                 # the real 1.3B DiT and Wan VAE shapes, bf16, CUDA
    python bench.py --smoke         # tiny models on the CPU: checks the harness runs

Speed does not depend on weight values, so every model has random weights. Each
stage is timed with CUDA events after warm-up; the median of --runs is reported.
The DiT's FLOPs (flops.py: linear 2·(4d² + 2d² + 2d·ffn) per token and layer,
self-attention 4·L_kv·d, cross-attention 4·512·d) and are set against ceilings
measured here: a bf16 GEMM and SDPA at the DiT's shapes.
"""

import argparse
import asyncio
import copy
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

import demo
import fp8
import graphs
import lipar
import live
import model as M
import sample
import stream
import prompts
import tape
import vae as V
import vae_layout
import video as io
from cli import EditSettings
from demo import coherent_mask, realistic_latents
from flops import dit_flops, linear_flops_per_token, tape_flops
from metrics import Fidelity, psnr
from text_encoder import T5Config, UMT5Encoder
from tiny_vae import TinyVAE

PRUNE_RATIOS = (0.0, 0.20, 0.35, 0.50, 0.85, 1.0)  # 85 %: a near-static clip


def edit_latents(dit, latents, context, keep, mode, window, runner=None, tape_cfg=None):
    """sample.edit_latents (seed 0, no progress bar) on the path sample.py takes: replayed
    CUDA graphs with a graphs.GraphRunner, TAPE's forward in mode tape."""
    grid = (latents.shape[3] // 2, latents.shape[4] // 2)
    forward, cache = sample.plugs(dit, runner, context, grid, mode, window, tape_cfg)
    return sample.edit_latents(dit, latents, context, keep, mode, window, 0, progress=False, forward=forward,
                               cache=cache)


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


def ceilings(cfg, n_tokens, timer, reps=20):
    """Measured bf16 GEMM rate at the FFN's shape and SDPA rate at a chunk's shape (TFLOP/s).
    Each sample times `reps` back-to-back calls: one call alone is short enough
    (~0.2 ms) for launch latency to show in the rate."""
    a = torch.randn(n_tokens, cfg.dim, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(cfg.dim, cfg.ffn_dim, device="cuda", dtype=torch.bfloat16)
    gemm = reps * 2 * n_tokens * cfg.dim * cfg.ffn_dim / timer(lambda: [a @ b for _ in range(reps)]) / 1e9
    q = torch.randn(1, n_tokens, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 7 * n_tokens // 3, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    sdpa = reps * 4 * q.shape[1] * k.shape[1] * cfg.dim / timer(lambda: [M.attention(q, k, k) for _ in range(reps)])
    return gemm, sdpa / 1e9


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
        cache = M.KVCache(model, context.to(device, dtype), (h, w), window=(1, 6))
        plans = lipar.chunk_plans(keep.to(device), "lipar")
        out = []
        for c, plan in enumerate(plans):
            chunk = x[:, :, 3 * c:3 * c + 3].to(device, dtype)
            out.append(model.forward_chunk(chunk, torch.full((1, 1), 700.0, device=device), cache, 3 * c, plan=plan))
            model.forward_chunk(chunk, torch.zeros(1, 1, device=device), cache, 3 * c, memory_step=True, plan=plan)
        outputs.append(torch.cat(out, dim=2).float().cpu())
    return ((outputs[1] - outputs[0]).norm() / outputs[0].norm()).item()


def profile_edit(edit, rows=18):
    """Top CUDA kernels of one call of edit(), by total time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        edit()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def vae_variants(vae, video, timer, profile=False):
    """Encode/decode time and decode peak of the VAE run op by op and with its norm + SiLU
    fused (torch.compile); the fused latents and video against the op-by-op ones
    (asserted within bf16 tolerance). Printed lines, one per variant."""
    lines, reference = [], None
    for name, fuse in (("op by op", False), ("fused", True)):
        with M.fusion("compile" if fuse else None):
            latents = vae.encode(video)
            decoded = vae.decode(latents)
            reference = reference or (latents, decoded)
            errors = relative_error(latents, reference[0]), relative_error(decoded, reference[1])
            assert max(errors) < 2e-2, f"VAE variant {name} differs from the op-by-op VAE: {errors}"
            encode_ms = timer(lambda: vae.encode(video))
            torch.cuda.reset_peak_memory_stats()
            decode_ms = timer(lambda: vae.decode(latents))
            say(lines, f"VAE {name}: encode {encode_ms:.0f} ms, decode {decode_ms:.0f} ms, "
                       f"decode peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; "
                       f"vs op by op: latents {errors[0]:.1e}, video {errors[1]:.1e}")
            if profile:
                print(profile_edit(lambda: vae.decode(latents), 12))
    return lines


def cli_bench(timer, runs_folder=None, figures=None):
    """The user's command at real shapes: `python sample.py --video clip.mp4 ...` (lipar) in
    fresh processes: twice with the defaults (the first compiles the Triton kernels into
    a new Triton cache, the second loads them), once with --fusion off; against the same
    edit in this process once everything is loaded and captured: the steady state. Weights are random
    and real-shape, written in weights.md's layout, except the text encoder: one umT5
    layer at full width with a small vocabulary, whose stage the comparison leaves out.
    Returns printed lines; `figures` (a dict), if given, gets the second run's seconds
    without the text stage and the steady state's (defaults)."""
    folder = Path(runs_folder or tempfile.mkdtemp(prefix="lipar_cli_"))
    weights = real_shape_weights(folder)
    clip = folder / "clip.mp4"
    io.write_video(clip, demo.demo_frames(480, 832, 81), 16)
    env = fresh_env(folder / "bytecode", TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"),
                    TRITON_CACHE_DIR=str(folder / "triton"), PYTHONUNBUFFERED="1")
    lines = []
    for run, flags in (("first (defaults: --fusion triton, empty Triton and bytecode caches)", []), ("second", []),
                       ("--fusion off", ["--fusion", "off"])):
        wall, stats, stdout = run_sample(["--video", clip, "--weights", weights, "--out", folder / "out.mp4", *flags],
                                         env)
        print(stdout)
        seconds = stats["modes"]["lipar"]["seconds"]
        if run == "second" and figures is not None:
            figures["cli_second_s"] = wall - seconds["text"]
        peaks = "  ".join(f"{k} {v:.2f}" for k, v in stats["peak_gpu_memory_gib_per_stage"].items())
        lines.append(f"CLI {run}: {wall:.1f} s wall, {wall - seconds['text']:.1f} s without the text stage; "
                     f"stages (s): " + "  ".join(f"{k} {v:.2f}" for k, v in seconds.items())
                     + f"; peak {stats['peak_gpu_memory_gib']:.2f} GiB (per stage: {peaks}); "
                     f"pruned {stats['modes']['lipar']['prune_ratio']:.1%}")
    models = sample.Models(weights, "cuda", torch.bfloat16, "cuda")
    with torch.no_grad():
        video = io.to_model(io.pad_frames(io.resize_crop(io.read_video(clip)[0], 480, 832))[0]).cuda()
        context = sample.encode_prompts(models.text_encoder, [demo.DEFAULT_PROMPT], "cuda", torch.bfloat16)[demo.DEFAULT_PROMPT]
        vae, dit = models.vae(), models.dit()
        import triton_ops
        for label, how in (("--fusion off", None), ("the defaults (--fusion triton)", triton_ops.Kernels())):
            with M.fusion(how):
                runner = graphs.GraphRunner(dit)

                def whole_edit():
                    latents = vae.encode(video)
                    keep = lipar.prune_mask(latents[0].transpose(0, 1))
                    edited = edit_latents(dit, latents, context, keep, "lipar", (1, 6), runner)
                    return vae.decode(edited)

                steady_ms = timer(whole_edit)
                runner.release()
                if how is not None and figures is not None:
                    figures["cli_steady_s"] = steady_ms / 1e3
                lines.append(f"CLI steady state with {label} (the same edit in one process, everything loaded "
                             f"and captured): {steady_ms / 1e3:.2f} s (encode, mask, DiT, decode)")
    return lines


def real_shape_dit():
    """A random real-shape bf16 DiT on CUDA, a random prompt's context, and random latents
    of 81 frames at 832x480 [1, 16, 21, 60, 104]."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        dit = random_(M.CausalWanModel(M.DiTConfig())).to(torch.bfloat16).eval().requires_grad_(False)
    context = torch.randn(1, 512, dit.cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    return dit, context, torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)


def kernels_profile():
    """Top CUDA kernels of one replayed `lipar` 35 % DiT edit with the Triton kernels, in
    bf16 and with --fp8, and of one 100 %-pruned edit: where the fp8 and floor time goes."""
    import triton_ops
    dit, context, latents = real_shape_dit()
    L, h, w = 21, 30, 52
    lines = []
    with torch.no_grad(), M.fusion(triton_ops.Kernels()):
        for name, model, ratio in (("bf16, lipar 35%", dit, 0.35),
                                   ("fp8, lipar 35%", fp8.quantize_ffn(copy.deepcopy(dit)), 0.35),
                                   ("bf16, lipar 100%", dit, 1.0)):
            keep = coherent_mask(L, h, w, ratio).cuda()
            runner = graphs.GraphRunner(model)
            for _ in range(2):  # eager, then captured
                edit_latents(model, latents, context, keep, "lipar", (1, 6), runner)
            say(lines, f"{name} (Triton kernels, replayed graphs)\n"
                       + profile_edit(lambda: edit_latents(model, latents, context, keep, "lipar", (1, 6), runner), 14))
            runner.release()
    return lines


KERNEL_LOAD_PROCESSES = 3  # the kernels' load: the median of this many fresh processes
KERNEL_LOAD = (  # a fresh process loading the Triton kernels from a warm cache: python -c "$KERNEL_LOAD"
    "import time; t0 = time.perf_counter(); import torch, model as M, graphs, triton_ops; torch.zeros(1).cuda(); "
    "t1 = time.perf_counter(); torch.manual_seed(0)\n"
    "with torch.device('cuda'): dit = M.CausalWanModel(M.DiTConfig()).to(torch.bfloat16).eval().requires_grad_(False)\n"
    "ctx = torch.randn(1, 512, 4096, device='cuda', dtype=torch.bfloat16)\n"
    "with torch.no_grad(): graphs.warm_up(dit, ctx, (30, 52)); torch.cuda.synchronize()\n"
    "t2 = time.perf_counter()\n"
    "with torch.no_grad(), M.fusion(triton_ops.Kernels()): graphs.warm_up(dit, ctx, (30, 52)); torch.cuda.synchronize()\n"
    "t3 = time.perf_counter()\n"
    "with torch.no_grad(), M.fusion(triton_ops.Kernels()): graphs.warm_up(dit, ctx, (30, 52)); torch.cuda.synchronize()\n"
    "print(f'fresh process, Triton cache warm: imports and CUDA start {t1 - t0:.2f} s; the warm-up with the "
    "kernels {t3 - t2:.2f} s the first time, {time.perf_counter() - t3:.2f} s the second: the kernels cost "
    "{(t3 - t2) - (time.perf_counter() - t3):.2f} s to load')")


def kernels_bench(timer, figures=None):
    """The fusion choices side by side at real shapes, CUDA graphs on: op by op (`--fusion
    off`), torch.compile in this process (`compile`) and the Triton kernels (`triton`,
    sample.py's default, compiled into a fresh Triton cache first: the one-time cost),
    each checked against the plain eager edit; the Wan VAE the same three ways; a fresh
    process loading the kernels from that cache (what a later command pays); and `--fp8`
    with the Triton kernels: its DiT time and its error against the bf16 edit (latents,
    and PSNR of the frames decoded by a random Wan VAE: random weights, so a bound on the
    drift, not a quality figure). Returns printed lines; `figures` (a dict), if given,
    gets the DiT times per fusion, the kernels' load time and fp8's speed-up."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lipar_triton_")  # cold: the first process's cost
    import triton_ops  # here: CPU-only installs (bench.py --smoke) have no Triton
    torch.manual_seed(0)
    with torch.device("cuda"):
        dit = random_(M.CausalWanModel(M.DiTConfig())).to(torch.bfloat16).eval().requires_grad_(False)
        vae = random_(V.WanVAE(V.VAEConfig()), 0.05).to(torch.bfloat16).eval().requires_grad_(False)
    context = torch.randn(1, 512, dit.cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    video = io.to_model(demo.demo_frames(480, 832, 81)).cuda().to(torch.bfloat16)
    L, h, w = 21, 30, 52
    latents = torch.randn(1, 16, L, 2 * h, 2 * w, device="cuda", dtype=torch.bfloat16)
    configs = [("full", "full", torch.ones(L, h, w, dtype=torch.bool, device="cuda")),
               ("lipar 35%", "lipar", coherent_mask(L, h, w, 0.35).cuda()),
               ("lipar 100%", "lipar", coherent_mask(L, h, w, 1.0).cuda())]
    window = lambda mode: None if mode == "full" else (1, 6)  # noqa: E731
    lines, times = [], {}
    with torch.no_grad():
        reference = {name: edit_latents(dit, latents, context, keep, mode, window(mode)) for name, mode, keep in configs}
        vae_reference = vae.encode(video)
        kernels = triton_ops.Kernels()
        for label, how, model in (("off", None, dit), ("triton", kernels, dit), ("compile", "compile", dit),
                                  ("triton + fp8", kernels, fp8.quantize_ffn(copy.deepcopy(dit)))):
            with M.fusion(how):
                runner = graphs.GraphRunner(model)
                start = time.perf_counter()
                if how is not None:
                    graphs.warm_up(model, context, (h, w))
                warm_s = time.perf_counter() - start
                row = []
                for name, mode, keep in configs:
                    edit = lambda: edit_latents(model, latents, context, keep, mode, window(mode), runner)  # noqa: E731
                    first_ms = wall_ms(edit, 0, 1)
                    ms = times[label, name] = timer(edit)
                    out = edit()
                    if label == "triton + fp8" and name == "lipar 35%":
                        fp8_out = out
                    row.append(f"{name} {ms:.0f} ms (first clip {first_ms:.0f} ms; against plain eager "
                               f"{relative_error(out, reference[name]):.1e})")
                runner.release()
                say(lines, f"DiT, graphs, fusion {label}: warm-up {warm_s:.1f} s; " + "; ".join(row))
                if label in ("off", "triton"):  # compile's VAE: BENCHMARKS.md's earlier runs
                    start = time.perf_counter()
                    encoded = vae.encode(video)  # the first call compiles (compile, triton)
                    first_s = time.perf_counter() - start
                    encode_ms, decode_ms = timer(lambda: vae.encode(video)), timer(lambda: vae.decode(encoded))
                    times[label, "vae"] = encode_ms + decode_ms
                    say(lines, f"Wan VAE, fusion {label}: encode {encode_ms:.0f} ms + decode {decode_ms:.0f} ms = "
                               f"{encode_ms + decode_ms:.0f} ms (first encode {first_s:.1f} s; latents against "
                               f"op by op {relative_error(encoded, vae_reference):.1e})")
        say(lines, "triton's speed: " + ", ".join(
            f"{name} {times['off', name] / times['triton', name]:.2f}x over off, "
            f"{times['compile', name] / times['triton', name]:.0%} of compile's" for name, _, _ in configs)
            + f"; Wan VAE {times['off', 'vae'] / times['triton', 'vae']:.2f}x over off")
        say(lines, "fp8 over bf16 (both triton): " + ", ".join(
            f"{name} {times['triton', name] / times['triton + fp8', name]:.2f}x" for name, _, _ in configs))
        bf16_out = edit_latents(dit, latents, context, configs[1][2], "lipar", (1, 6))
        frames_bf16, frames_fp8 = (io.from_model(vae.decode(x)).float() for x in (bf16_out, fp8_out))
        say(lines, f"fp8 lipar 35 %: latents relative error {relative_error(fp8_out, bf16_out):.2e} against bf16 "
                   f"(eager, no fusion); decoded frames PSNR {psnr(((frames_fp8 - frames_bf16) ** 2).mean().item()):.1f} dB")
    loads = []  # KERNEL_LOAD_PROCESSES fresh processes: one process on a just-started machine varied by a second
    for _ in range(KERNEL_LOAD_PROCESSES):
        done = subprocess.run([sys.executable, "-c", KERNEL_LOAD], capture_output=True, text=True,
                              cwd=Path(__file__).parent, env=fresh_env())
        say(lines, done.stdout.strip() or done.stderr[-2000:])
        loaded = re.search(r"the kernels cost (-?[0-9.]+) s to load", done.stdout)
        loads.append(float(loaded.group(1)) if loaded else None)
    if figures is not None:
        figures.update({f"dit_ms {label} {name}": ms for (label, name), ms in times.items() if name != "vae"})
        figures["kernel_load_s"] = statistics.median(loads) if None not in loads else None
        figures["kernel_load_each_s"] = loads
    return lines


def floor_bench(timer, figures=None):
    """Edits that prune nearly everything, at real shapes (random bf16 DiT, 81 frames at
    832x480, the window (1, 6), CUDA graphs and the Triton kernels: sample.py's defaults),
    each checked against the plain eager edit. Masks: 35 %, 90 %, 98 %, one kept token in
    each chunk after the first (the smallest bucket), and 100 % (no block runs after the
    first chunk: model.KVCache.write_duplicates). Returns printed lines; `figures` (a
    dict), if given, gets the 100 % edit's DiT ms."""
    import triton_ops
    dit, context, latents = real_shape_dit()
    L, h, w = 21, 30, 52
    one_token = coherent_mask(L, h, w, 1.0)
    one_token[3::3, h // 2, w // 2] = True
    masks = [(f"{r:.0%}", coherent_mask(L, h, w, r)) for r in (0.35, 0.9, 0.98)]
    masks += [("1 token a chunk", one_token), ("100%", coherent_mask(L, h, w, 1.0))]
    lines = ["| mask | pruned | DiT ms | against plain eager |", "| --- | --- | --- | --- |"]
    with torch.no_grad():
        reference = {name: edit_latents(dit, latents, context, keep.cuda(), "lipar", (1, 6)) for name, keep in masks}
        with M.fusion(triton_ops.Kernels()):
            graphs.warm_up(dit, context, (h, w))
            runner = graphs.GraphRunner(dit)
            for name, keep in masks:
                edit = lambda: edit_latents(dit, latents, context, keep.cuda(), "lipar", (1, 6), runner)  # noqa: E731
                ms = timer(edit)
                if figures is not None and name == "100%":
                    figures["floor_ms"] = ms
                lines.append(f"| {name} | {lipar.prune_ratio(keep.cuda()):.1%} | {ms:.0f} "
                             f"| {relative_error(edit(), reference[name]):.1e} |")
            runner.release()
    print("\n".join(lines), flush=True)
    return lines


SWITCH_PROMPTS = ("a snowy street at night", "a sunny beach at noon", "an autumn forest in fog")


async def drive_page(url, frames, pace, switch_at=()):
    """A scripted page over a real WebSocket: frames (RGBA bytes at the model's size) sent
    at `pace` frames/s with their capture times, SWITCH_PROMPTS[k] typed before frame
    switch_at[k]; then the edited frames read until none has come for 4 s. Returns what a
    page sees: {"arrivals": [(arrival ms, capture ms)], "chunks": [chunk messages],
    "prompts_sent": [(ms, prompt)], "errors"} (ms on time.perf_counter's clock, this process)."""
    import aiohttp
    clock = lambda: time.perf_counter() * 1e3  # noqa: E731
    seen = {"arrivals": [], "chunks": [], "prompts_sent": [], "errors": []}
    for _ in range(120):  # the previous page's session may still be ending
        async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
            hello = await ws.receive_json()
            if hello["type"] == "hello":
                return await _drive(ws, frames, pace, dict(zip(switch_at, SWITCH_PROMPTS)), seen, clock)
        await asyncio.sleep(0.5)
    raise RuntimeError(f"live.py kept refusing the page: {hello}")


async def _drive(ws, frames, pace, prompt_at, seen, clock):
    import aiohttp

    async def read():
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                seen["arrivals"].append((clock(), live.HEADER.unpack_from(message.data)[0]))
            elif message.type == aiohttp.WSMsgType.TEXT:
                parsed = json.loads(message.data)
                seen["chunks" if parsed["type"] == "chunk" else "errors"].append(parsed)

    reading = asyncio.create_task(read())
    start = clock()
    for i, frame in enumerate(frames):
        await asyncio.sleep(max(0.0, start + i * 1e3 / pace - clock()) / 1e3)
        if i in prompt_at:
            seen["prompts_sent"].append((clock(), prompt_at[i]))
            await ws.send_json({"type": "prompt", "text": prompt_at[i]})
        await ws.send_bytes(live.HEADER.pack(clock()) + frame)
    count = -1
    while count != len(seen["arrivals"]):  # until nothing more comes for 4 s
        count = len(seen["arrivals"])
        await asyncio.sleep(4)
    reading.cancel()
    return seen


def page_figures(seen):
    """The page's figures from drive_page: steady edited frames/s (after the first chunk),
    glass-to-glass ms (median, 90th percentile; from the second chunk on), frames dropped,
    and for each prompt change the ms from typing it to the first frame edited under it."""
    arrivals, chunks = seen["arrivals"], seen["chunks"]
    first = chunks[0]["frames"]
    later = arrivals[first:]
    fps = (len(later) - 1) / (later[-1][0] - later[0][0]) * 1e3 if len(later) > 1 else None
    glass = sorted(arrived - captured for arrived, captured in later)
    figures = {"edited_fps": fps, "frames": len(arrivals), "dropped": chunks[-1]["dropped"],
               "glass_ms": (statistics.median(glass), glass[int(0.9 * (len(glass) - 1))]),
               "chunk_latency_ms": statistics.median(c["chunk_latency_s"] for c in chunks[1:]) * 1e3,
               "chunk_frames": statistics.median(c["frames"] for c in chunks[1:]),
               "prune_ratio": statistics.mean(c["prune_ratio"] for c in chunks[1:]), "gpu_gib": chunks[-1]["gpu_gib"]}
    figures["switch_ms"] = []
    for sent_ms, prompt in seen["prompts_sent"]:  # the prompts differ: the first chunk under each
        index = 0
        for c in chunks:
            if c["prompt"] == prompt:
                figures["switch_ms"].append(arrivals[index][0] - sent_ms)
                break
            index += c["frames"]
    return figures


def live_bench(frames=240, folder=None, smoke=False, figures=None):
    """live.py at real shapes (random real-shape weights on local disk, 832x480, LIPAR with
    the window (1, 6), graphs and the Triton kernels: its defaults), with each VAE, against
    the CLI's stream of the same clip. For each VAE: sample.py on the clip in a fresh
    process (its steady frames/s), then `python live.py` in a process of its own, driven
    by a scripted page (drive_page) three times: a warm-up, a camera pace the GPU keeps
    up with (0.8x the CLI's steady rate; glass-to-glass latency and three prompts typed
    a quarter of the clip apart, their latencies' median and each), and a pace it does not (1.5x: the page's edited frames/s against the
    CLI's, the oldest waiting frames dropped). smoke: the demo's tiny models on the CPU
    at 112x64, checking the harness. Returns printed lines; `figures` (a dict), if given,
    gets per VAE the page's and the CLI's f/s, the prompt changes' latencies and what
    bounds them: a chunk's period at the camera's pace plus the page's chunk latency."""
    folder = Path(folder or tempfile.mkdtemp(prefix="lipar_live_"))
    weights = demo.write_random_weights(folder / "weights") if smoke else real_shape_weights(folder)
    size = ["--height", "64", "--width", "112", "--device", "cpu"] if smoke else []
    clip = write_long_demo_clip(folder / "clip.mp4", frames, *((64, 112) if smoke else ()))
    video = io.read_video(clip)[0]
    rgba = [torch.cat([f, torch.full_like(f[..., :1], 255)], -1).numpy().tobytes() for f in video]
    lines = ["| VAE | CLI stream steady f/s | page f/s (paced 1.5x) | page / CLI | glass-to-glass ms median / p90 "
             "(paced 0.8x) | chunk latency ms | prompt typed → first frame under it, ms: median (each) | dropped (1.5x) | pruned "
             "| GPU GiB |", "|" + " --- |" * 10]
    _print(lines)
    for kind in ("tiny", "wan"):
        _, stats, _ = run_sample(["--video", clip, "--weights", weights, "--vae", kind, "--out", folder / f"{kind}.mp4",
                                  *size])
        cli_fps = stats["stream"]["steady_fps"]
        port, log = 8765 + len(lines), folder / f"live_{kind}.log"
        with open(log, "w") as out:
            server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("live.py")), "--weights", weights,
                                       "--vae", kind, "--port", str(port), *size], stdout=out,
                                      stderr=subprocess.STDOUT, env=fresh_env())
        try:
            started = time.perf_counter()
            while True:  # the port opens once the models are loaded
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.perf_counter() - started > 300:
                        raise RuntimeError(f"live.py did not start: {log.read_text()[-2000:]}") from None
                    time.sleep(0.5)
            url = f"http://127.0.0.1:{port}/ws"
            camera_fps = 0.8 * cli_fps  # a pace the GPU keeps up with
            asyncio.run(drive_page(url, rgba[:60], camera_fps))  # graphs captured, kernels loaded
            switches = [frames * k // 4 for k in (1, 2, 3)]
            camera = page_figures(asyncio.run(drive_page(url, rgba, camera_fps, switch_at=switches)))
            flooded = page_figures(asyncio.run(drive_page(url, rgba, 1.5 * cli_fps)))
        finally:
            server.terminate()
            server.wait(30)
        if figures is not None:
            figures[f"live {kind}"] = {"cli_fps": cli_fps, "page_fps": flooded["edited_fps"],
                                       "switch_ms": camera["switch_ms"], "chunk_latency_ms": camera["chunk_latency_ms"],
                                       "chunk_period_ms": camera["chunk_frames"] * 1e3 / camera_fps}
        say(lines, f"| {kind} | {cli_fps:.1f} | {flooded['edited_fps']:.1f} | {flooded['edited_fps'] / cli_fps:.0%} "
                   f"| {camera['glass_ms'][0]:.0f} / {camera['glass_ms'][1]:.0f} | {camera['chunk_latency_ms']:.0f} "
                   f"| {statistics.median(camera['switch_ms'] or [float('nan')]):.0f} "
                   f"({', '.join(f'{ms:.0f}' for ms in camera['switch_ms'])}) | {flooded['dropped']} of {frames} "
                   f"| {camera['prune_ratio']:.1%} | {camera['gpu_gib'] or float('nan'):.2f} |")
    return lines


def edit_state_lines(window=(1, 6), height=480, width=832):
    """What an edit at real shapes (bf16) holds on the GPU from its first chunk to its last,
    counted on the meta device (shapes only, no GPU): the weights, each mode's KV cache and
    LIPAR memory (model.KVCache), and each stream's VAE causal caches (vae.CausalCache after
    two chunks). Returns printed lines, GiB."""
    gib = lambda tensors: sum(t.numel() * t.element_size() for t in tensors) / 2**30  # noqa: E731
    with torch.device("meta"):
        dit = M.CausalWanModel(M.DiTConfig()).to(torch.bfloat16)
        vae = V.WanVAE(V.VAEConfig()).to(torch.bfloat16)
        context = torch.empty(1, T5Config().text_len, dit.cfg.text_dim, dtype=torch.bfloat16)
    fpc, space = dit.cfg.frames_per_chunk, vae.cfg.space_stride
    shared = {"DiT weights": gib(dit.parameters()), "Wan VAE weights": gib(vae.parameters())}
    per_mode = {}
    for mode, w in (("full", None), ("lipar", window)):
        cache = M.KVCache(dit, context, (height // 16, width // 16), w, memory=mode != "full")
        per_mode[mode] = {"KV cache": gib([cache.k, cache.v]), "LIPAR memory and cross-attention keys": gib(
            [cache.memory_k, cache.memory_v, *(t for kv in cache.context_kvs for t in kv)])}
    for name, network, shape in (("encoder", vae.encoder, (1, 3, fpc * vae.cfg.time_stride, height, width)),
                                 ("decoder", vae.decoder, (1, vae.cfg.z_dim, fpc, height // space, width // space))):
        cache, x = V.CausalCache(), torch.empty(shape, device="meta", dtype=torch.bfloat16)
        network(x, cache)
        cache.at_start = False
        network(x, cache)
        size = gib(cache.past.values())
        if name == "encoder":  # one encoder feeds every mode
            shared["the stream's VAE encoder causal cache"] = size
        else:
            for sizes in per_mode.values():
                sizes["VAE decoder causal cache"] = size
    lines = [f"{name}: {size:.2f} GiB" for name, size in shared.items()]
    lines += [f"{mode}'s {name}: {size:.2f} GiB" for mode, sizes in per_mode.items() for name, size in sizes.items()]
    held = lambda *modes: sum(shared.values()) + sum(sum(per_mode[m].values()) for m in modes)  # noqa: E731
    lines += [f"held by a lipar edit: {held('lipar'):.2f} GiB; by a full edit: {held('full'):.2f} GiB; "
              f"by --compare (both, one encoder): {held('full', 'lipar'):.2f} GiB"]
    return lines


def compare_bench(count=321, folder=None, figures=None):
    """`sample.py --compare --save-mask` at real shapes (random real-shape weights, a clip of
    `count` frames at 832x480, sample.py's defaults) in a fresh process, beside a `lipar`
    edit alone and a `full` edit alone: wall time, the write stage against the edit's, GPU
    peaks per stage, and the resident host memory between chunks. Returns printed lines;
    `figures` (a dict), if given, gets per run the GPU peak, the write stage's share of
    the edit and the resident host memory per chunk."""
    folder = Path(folder or tempfile.mkdtemp(prefix="lipar_compare_"))
    weights = real_shape_weights(folder)
    clip = write_long_demo_clip(folder / "clip.mp4", count)
    lines = edit_state_lines()
    print(*lines, sep="\n", flush=True)
    for label, flags in (("lipar alone", []), ("full alone", ["--mode", "full"]),
                         ("--compare --save-mask", ["--compare", "--save-mask"])):
        wall, stats, _ = run_sample(["--video", clip, "--weights", weights, "--out", folder / "out.mp4", *flags])
        modes = list(stats["modes"].values())
        seconds = dict(modes[0]["seconds"])  # the shared stages (read, encode, mask, write), and each mode's own
        seconds["dit"] = sum(m["seconds"]["dit"] for m in modes)
        seconds["decode"] = sum(m["seconds"]["decode"] for m in modes)
        resident = stats["stream"]["host_memory_gib_per_chunk"]
        peaks = "  ".join(f"{k} {v:.2f}" for k, v in stats["peak_gpu_memory_gib_per_stage"].items())
        edit_s = sum(v for k, v in seconds.items() if k.startswith(("dit", "decode", "encode", "mask")))
        say(lines, f"{label}, {count} frames: {wall:.1f} s wall; write {seconds.get('write', 0):.2f} s against "
                   f"{edit_s:.2f} s of encode, mask, DiT and decode ({seconds.get('write', 0) / edit_s:.0%}); "
                   f"steady {stats['stream']['steady_fps']:.1f} frames/s; GPU peak "
                   f"{stats['peak_gpu_memory_gib']:.2f} GiB (per stage: {peaks}); host peak "
                   f"{stats['peak_host_memory_gib']:.2f} GiB; resident between chunks (GiB): "
                   + " ".join(f"{r:.2f}" for r in resident))
        if figures is not None:
            figures[f"compare {label}"] = {"gpu_peak_gib": stats["peak_gpu_memory_gib"], "resident_gib": resident,
                                           "write_share": seconds.get("write", 0) / edit_s}
    return lines


def vae_layout_bench(timer, peer_vae=None, figures=None):
    """The Wan VAE's memory layout at real shapes (random bf16 weights, 81 frames at 832x480):
    NCDHW op by op, NCDHW with the Triton norm + SiLU, channels-last (vae_layout.channels_last)
    without the tap split, with it, with it and the residual blocks' biases folded into the
    passes after their convs (sample.py's default), each with the Triton kernels, and the
    default op by op. Per row: encode and decode time, the first encode + decode of the
    process, the peak memory of each, and the latents' and video's error against NCDHW op by
    op (the default asserted within bf16 tolerance). With peer_vae (the path of Self-Forcing's
    wan/modules/vae.py) its WanVAE_ too, with the same weights, and the default's ratio to it.
    Then the conv inputs that were not channels-last on the GPU, the top kernels of the
    default decode, and the streamed path (9 frames, then 12 at a time, as sample.edit_chunks
    feeds the VAE). Prints each line as it is measured; returns them. `figures` (a dict),
    if given, gets the default's encode + decode seconds and its ratio to the peer's."""
    import triton_ops  # here: CPU-only installs (bench.py --smoke) have no Triton
    torch.manual_seed(0)
    with torch.device("cuda"):
        ncdhw = random_(V.WanVAE(V.VAEConfig()), 0.05).to(torch.bfloat16).eval().requires_grad_(False)
    without_taps = vae_layout.channels_last(copy.deepcopy(ncdhw), taps=False, fold=False)
    unfolded = vae_layout.channels_last(copy.deepcopy(ncdhw), fold=False)
    channels_last = vae_layout.channels_last(copy.deepcopy(ncdhw))
    video = io.to_model(demo.demo_frames(480, 832, 81)).cuda().to(torch.bfloat16)
    kernels = triton_ops.Kernels()
    default = "channels-last + taps, Triton (the default)"
    unfolded_name = "channels-last + taps, Triton, biases added by their convs"
    rows = [("NCDHW, op by op", ncdhw, None), ("NCDHW, Triton norm", ncdhw, kernels),
            ("channels-last, Triton norm, no taps", without_taps, kernels),
            (unfolded_name, unfolded, kernels), (default, channels_last, kernels),
            ("channels-last + taps, op by op", channels_last, None)]
    if peer_vae:
        rows.append(("Self-Forcing's WanVAE_", self_forcing_vae(peer_vae, ncdhw), None))
    lines, reference, totals, outputs = [], None, {}, {}

    def peak_gib(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30

    with torch.no_grad():
        for name, vae, how in rows:
            with M.fusion(how):
                torch.cuda.synchronize()
                start = time.perf_counter()
                latents = vae.encode(video)
                decoded = vae.decode(latents)
                torch.cuda.synchronize()
                first_s = time.perf_counter() - start
                reference = reference or (latents, decoded)
                errors = relative_error(latents, reference[0]), relative_error(decoded, reference[1])
                encode_ms, decode_ms = timer(lambda: vae.encode(video)), timer(lambda: vae.decode(latents))
                encode_gib, decode_gib = peak_gib(lambda: vae.encode(video)), peak_gib(lambda: vae.decode(latents))
            totals[name] = encode_ms + decode_ms
            if name in (default, unfolded_name):  # the folded biases against the unfolded: in host memory, off the peaks
                outputs[name] = latents.cpu(), decoded.cpu()
            say(lines, f"Wan VAE {name}: encode {encode_ms:.0f} ms + decode {decode_ms:.0f} ms = {encode_ms + decode_ms:.0f} "
                       f"ms (first encode + decode {first_s:.1f} s); peak encode {encode_gib:.2f} GiB, decode "
                       f"{decode_gib:.2f} GiB; against NCDHW op by op: latents {errors[0]:.1e}, video {errors[1]:.1e}")
            if name == default:
                assert errors[1] < 2e-2, f"the default VAE differs from the NCDHW one: video {errors[1]:.1e}"
        folded, not_folded = outputs[default], outputs[unfolded_name]
        say(lines, f"{default} against {unfolded_name}: largest difference of the latents "
                   f"{(folded[0] - not_folded[0]).abs().max().item():.1e}, of the video "
                   f"{(folded[1] - not_folded[1]).abs().max().item():.1e}")
        for baseline in [name for name, _, _ in rows if name != default]:
            say(lines, f"{default}: {totals[baseline] / totals[default]:.2f}x over {baseline}")
        if figures is not None:
            figures["wan_vae_s"] = totals[default] / 1e3
            figures["wan_vae_vs_peer"] = totals[rows[-1][0]] / totals[default] if peer_vae else None
        say(lines, f"{default}: {totals[default]:.0f} ms (target <= 1350 ms"
                   + (f", >= 2.0x Self-Forcing's: {totals[rows[-1][0]] / totals[default]:.2f}x)" if peer_vae else ")"))
    # The streamed path: pieces of 9 frames (3 latent frames), then 12, one cache per clip.
    first, later = V.WanVAE.chunk_frames(3, True), V.WanVAE.chunk_frames(3, False)
    cuts = [0, *range(first, video.shape[2] + 1, later)]  # 0, 9, 21, ..., 81
    video_pieces = [video[:, :, start:end] for start, end in zip(cuts, cuts[1:])]

    def encode_streamed(vae):
        cache = V.CausalCache()
        return torch.cat([vae.encode(piece, cache=cache) for piece in video_pieces], dim=2)

    def decode_streamed(vae, latents):
        cache = V.CausalCache()
        return torch.cat([vae.decode(latents[:, :, s:s + 3], cache=cache) for s in range(0, latents.shape[2], 3)],
                         dim=2)

    with torch.no_grad(), M.fusion(kernels):
        off = vae_layout.conv_inputs_off_channels_last(
            lambda: channels_last.decode(channels_last.encode(video[:, :, :first])))
        say(lines, f"{default}: {len(off)} conv inputs not channels-last on the GPU (encode + decode "
                   f"of {first} frames)" + (f", first {off[:4]}" if off else ""))
        latents = channels_last.encode(video)
        say(lines, f"{default}: decode, top CUDA kernels\n" + profile_edit(lambda: channels_last.decode(latents), 25))
        say(lines, f"{default}: encode, top CUDA kernels\n" + profile_edit(lambda: channels_last.encode(video), 15))
        for name, vae in ((rows[1][0], ncdhw), (rows[2][0], without_taps), (default, channels_last)):
            latents = encode_streamed(vae)
            decoded = decode_streamed(vae, latents)
            errors = relative_error(latents, reference[0]), relative_error(decoded, reference[1])
            encode_ms = timer(lambda: encode_streamed(vae))
            decode_ms = timer(lambda: decode_streamed(vae, latents))
            say(lines, f"Wan VAE {name}, streamed ({first} frames, then {later} at a time): encode {encode_ms:.0f} ms + "
                       f"decode {decode_ms:.0f} ms = {encode_ms + decode_ms:.0f} ms; against NCDHW op by op, whole "
                       f"clip: latents {errors[0]:.1e}, video {errors[1]:.1e}")
    return lines


def self_forcing_vae(path, like):
    """Self-Forcing's WanVAE_ (wan/modules/vae.py of guandeh17/Self-Forcing, at `path`; it needs
    einops) with the release's configuration and the weights of our WanVAE `like` (the
    same key names), on like's device and dtype. Wrapped to our encode(video) /
    decode(latents) with the latent normalisation as its `scale`, decode clamped as its
    wrapper clamps."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("self_forcing_vae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = like.cfg
    peer = module.WanVAE_(dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                          num_res_blocks=cfg.num_res_blocks, attn_scales=[],
                          temperal_downsample=list(cfg.temporal_downsample))
    peer.load_state_dict(like.state_dict())
    weight = like.conv1.weight
    peer = peer.to(weight.device, weight.dtype).eval().requires_grad_(False)
    mean, std = (v.view(-1) for v in V.WanVAE._latent_stats(weight))
    scale = [mean, 1 / std]

    class Peer:
        encode = staticmethod(lambda video: peer.encode(video.to(weight.dtype), scale).float())
        decode = staticmethod(lambda latents: peer.decode(latents.to(weight.dtype), scale).float().clamp(-1, 1))
    return Peer()


def real_shape_weights(folder, full_text_encoder=False):
    """Random real-shape weights in weights.md's layout, except the text encoder: one umT5
    layer at full width with a small vocabulary (its stage is left out of the timings),
    or with full_text_encoder the whole umT5-XXL (11 GB to write and to load)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        dit = random_(M.CausalWanModel(M.DiTConfig())).to(torch.bfloat16)
        vae = random_(V.WanVAE(V.VAEConfig()), 0.05)
        t5 = T5Config() if full_text_encoder else T5Config(vocab=300, layers=1)
        text_encoder = random_(UMT5Encoder(t5).to(torch.bfloat16))
        tiny_vae = random_(TinyVAE(), 0.05)
    weights = demo.write_random_weights(Path(folder) / "weights", dit, vae, text_encoder, tiny_vae)
    del dit, vae, text_encoder, tiny_vae
    torch.cuda.empty_cache()
    return weights


_SHARED_BYTECODE = Path(tempfile.gettempdir()) / "lipar_bench_bytecode"


def fresh_env(bytecode=None, **extra):
    """os.environ for a fresh process the bench times, as a pip install leaves Python:
    with bytecode. The GPU machines' image ships torch without it and sets
    PYTHONDONTWRITEBYTECODE, so each process there would compile torch's sources again
    (4.5 s, BENCHMARKS "The user's command, where its time goes"), which a user never
    pays. bytecode: a folder of the caller's own, empty at first (its first process fills
    it, and pays for it); by default one shared by the bench's processes, filled by an
    untimed process that imports what they import (Dynamo too: building the models on
    the meta device imports it) before the first is timed. `extra` variables are set
    on top."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPYCACHEPREFIX=str(bytecode or _SHARED_BYTECODE), **extra)
    if bytecode is None and not _SHARED_BYTECODE.exists():
        subprocess.run([sys.executable, "-c", "import sample, evaluate, live, torch._dynamo\ntry: import triton_ops\n"
                        "except ImportError: pass"], env=env, check=True, cwd=Path(__file__).parent, capture_output=True)
    return env


def run_sample(args, env=None):
    """sample.py in a fresh process (fresh_env() by default) with --json; returns (wall
    seconds, its stats, its stdout)."""
    stats_file = Path(tempfile.mkdtemp(prefix="lipar_stats_")) / "stats.json"
    env = env or fresh_env()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("sample.py")), *map(str, args),
                           "--overwrite", "--json", str(stats_file)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"sample.py failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return wall, json.loads(stats_file.read_text()), done.stdout


def write_long_demo_clip(path, count, height=480, width=832):
    """An 832x480 clip of `count` frames at 16 fps: the demo scene forwards, backwards,
    forwards... (no cut), written 80 frames at a time so that it is never held whole."""
    scene = demo.demo_frames(height, width, 81)
    writer = io.VideoWriter(path, 16)
    for start in range(0, count, 80):
        writer.write((scene if start // 80 % 2 == 0 else scene.flip(0))[:min(80, count - start)])
    writer.close()
    return path


class FixedMask:
    """Stands in for lipar.MaskStream in a timing: hands out a given mask [L, h, w] frame by
    frame, each frame three latent frames after it arrives, as the real one does."""

    def __init__(self, keep):
        self.keep, self.given, self.seen = keep, 0, 0

    def push(self, latents):
        self.seen += latents.shape[0]
        return self._upto(max(1, self.seen - 3))

    def finish(self):
        return self._upto(self.keep.shape[0])

    def _upto(self, end):
        frames, self.given = self.keep[self.given:end], max(self.given, end)
        return frames


class SynchronizingStopwatch(stream.Stopwatch):
    """A stream.Stopwatch that waits for the GPU at both ends of every stage and times each
    on the host: the baseline that shows what the events' stopwatch saves the stream."""

    @contextmanager
    def __call__(self, stage):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        torch.cuda.synchronize(self.device)
        self._record_peak(stage)
        self._add(stage, time.perf_counter() - start)


def stream_fixed_mask(models, clip, keep, out, clock=stream.Stopwatch):
    """sample.edit_video of `clip` with LIPAR at a given mask [L, h, w] (a FixedMask in
    place of lipar.MaskStream: random weights make no realistic mask), twice in this
    process, each run with a new clock("cuda"); the first run captures the graphs.
    Returns the second run's stats."""
    settings = EditSettings(demo.DEFAULT_PROMPT, ["lipar"], vae=models.vae_kind)
    context = sample.encode_prompts(models.text_encoder, [settings.prompt], "cuda", torch.bfloat16)[settings.prompt]
    for _ in range(2):
        with io.VideoReader(clip) as reader:
            stats = sample.edit_video(reader, models, context, settings, {"lipar": out}, clock("cuda"), [],
                                      masks=FixedMask(keep), overwrite=True)
    return stats


def stream_bench(timer, lengths=(81, 321, 1281), folder=None):
    """Streaming at real shapes. First sample.py in fresh processes on clips of several
    lengths (so that each peak, GPU and host, is that run's own): time to the first
    edited frame, steady frames/s, chunk latency, peaks. Then, in this process, the
    steady state of a long stream against the whole-clip edit of 81 frames, both with
    LIPAR at a fixed 35 % mask, graphs on, nothing compiled (sample.py's defaults).
    Returns printed lines."""
    folder = Path(folder or tempfile.mkdtemp(prefix="lipar_stream_"))
    weights = real_shape_weights(folder)
    lines = ["| clip | mode | pruned | first edited frame s | steady frames/s | chunk latency s (median / max) "
             "| end to end frames/s | peak GPU GiB | peak host GiB |", "|" + " --- |" * 9]
    runs = [(n, "lipar") for n in lengths] + [(n, "full") for n in lengths[:2]]
    for count, mode in runs:
        clip = folder / f"clip{count}.mp4"
        if not clip.exists():
            write_long_demo_clip(clip, count)
        wall, stats, _ = run_sample(["--video", clip, "--weights", weights, "--mode", mode,
                                     "--out", folder / f"out{count}_{mode}.mp4"])
        s, m = stats["stream"], stats["modes"][mode]
        lines.append(f"| {count} frames | {mode} | {m['prune_ratio']:.1%} | {s['first_frame_s']:.2f} "
                     f"| {s['steady_fps']:.1f} | {s['chunk_latency_s']['median']:.2f} / "
                     f"{s['chunk_latency_s']['max']:.2f} | {m['end_to_end_fps']:.1f} "
                     f"| {stats['peak_gpu_memory_gib']:.2f} | {stats['peak_host_memory_gib']:.2f} |")
    models = sample.Models(weights, "cuda", torch.bfloat16, "cuda")
    with torch.no_grad():
        context = sample.encode_prompts(models.text_encoder, [demo.DEFAULT_PROMPT], "cuda", torch.bfloat16)[demo.DEFAULT_PROMPT]
        vae, dit, runner = models.vae(), models.dit(), models.runner()
        video = io.to_model(io.read_video(folder / f"clip{lengths[0]}.mp4")[0]).cuda()
        L = 1 + (video.shape[2] - 1) // 4
        keep = coherent_mask(L, 30, 52, 0.35).cuda()

        def whole_edit():
            latents = vae.encode(video)
            lipar.prune_mask(latents[0].transpose(0, 1))  # timed as the stream times its own mask
            edited = edit_latents(dit, latents, context, keep, "lipar", (1, 6), runner)
            return vae.decode(edited)

        whole_fps = lengths[0] / timer(whole_edit) * 1e3
        latents = vae.encode(video)
        stages = {"encode": timer(lambda: vae.encode(video)),
                  "mask": timer(lambda: lipar.prune_mask(latents[0].transpose(0, 1))),
                  "DiT": timer(lambda: edit_latents(dit, latents, context, keep, "lipar", (1, 6), runner)),
                  "decode": timer(lambda: vae.decode(latents))}
        long_keep = coherent_mask(1 + (lengths[1] - 1) // 4 + 2, 30, 52, 0.35).cuda()
        streamed = stream_fixed_mask(models, folder / f"clip{lengths[1]}.mp4", long_keep, folder / "inprocess.mp4")
    steady = streamed["stream"]["steady_fps"]
    seconds = streamed["modes"]["lipar"]["seconds"]
    lines += ["", f"LIPAR 35 % (fixed mask), graphs, not compiled, one process: whole-clip edit of {lengths[0]} frames "
              f"{whole_fps:.1f} frames/s end to end (encode, mask, DiT, decode); streamed {lengths[1]} frames, "
              f"steady state {steady:.1f} frames/s ({steady / whole_fps - 1:+.1%})",
              "whole clip, ms per frame: " + "  ".join(f"{k} {v / lengths[0]:.1f}" for k, v in stages.items()),
              "streamed, ms per frame: " + "  ".join(f"{k} {v * 1e3 / lengths[1]:.1f}" for k, v in seconds.items()
                                                       if k not in ("text", "load", "compile"))]
    return lines


def tiny_vae_bench(timer, frames=81, baseline=True, figures=None):
    """The tiny VAE (TAEHV) against the Wan VAE (channels-last, as sample.py runs it on CUDA) at real
    shapes, in one process: encode and
    decode of 81 frames at 832x480 in bf16 with each stage's peak memory, and the whole
    edit (encode, mask, DiT, decode) with LIPAR at a fixed 35 % mask, graphs on, the fused
    kernels off or on (Triton: sample.py's default, the VAEs' stages always with it). Then
    streamed edits of 321 frames with each VAE in this process (the mask fixed at 35 %,
    graphs and the Triton kernels on: sample.py's defaults), timed by stream.Stopwatch and,
    as the baseline, by one that waits for the GPU at every stage boundary: three rounds
    of the two, alternating, each reported by its median run, and how far apart the two
    clocks' last output files are (the frames handed to the writers are the same run to
    run; the files have differed where they were: BENCHMARKS.md, "Where two runs' files differ").
    baseline=False leaves that second clock out. Prints each line as soon as it is
    measured; `figures` (a dict), if given, gets per VAE the defaults' whole-clip and
    streamed steady frames/s."""
    import triton_ops
    kernels = triton_ops.Kernels()
    torch.manual_seed(0)
    with torch.device("cuda"):
        vaes = {"Wan VAE": vae_layout.channels_last(random_(V.WanVAE(V.VAEConfig()), 0.05).to(torch.bfloat16).eval()),
                "tiny VAE": random_(TinyVAE(), 0.05).to(torch.bfloat16).eval()}
        dit = random_(M.CausalWanModel(M.DiTConfig())).to(torch.bfloat16).eval().requires_grad_(False)
    context = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    video = io.to_model(demo.demo_frames(480, 832, frames)).cuda()
    keep = coherent_mask(1 + (frames - 1) // 4, 30, 52, 0.35).cuda()
    def emit(*lines):
        print("\n".join(lines), flush=True)

    emit("| VAE | encode ms | decode ms | peak encode GiB | peak decode GiB | frames/s encode + decode |",
         "|" + " --- |" * 6)
    stages = {}
    with torch.no_grad(), M.fusion(kernels):
        for name, vae in vaes.items():
            latents = vae.encode(video)
            encode_ms, decode_ms = timer(lambda: vae.encode(video)), timer(lambda: vae.decode(latents))
            peaks = []
            for fn in (lambda: vae.encode(video), lambda: vae.decode(latents)):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn()
                peaks.append(torch.cuda.max_memory_allocated() / 2**30)
            stages[name] = (encode_ms, decode_ms, latents)
            emit(f"| {name} | {encode_ms:.0f} | {decode_ms:.0f} | {peaks[0]:.2f} | {peaks[1]:.2f} "
                 f"| {frames / (encode_ms + decode_ms) * 1e3:.1f} |")
        emit("", "| whole edit, LIPAR 35 % | DiT | DiT ms | end-to-end ms | end-to-end frames/s |",
             "|" + " --- |" * 5)
        for label, how in (("graphs, fusion off", None), ("graphs, Triton kernels (default)", kernels)):
            with M.fusion(how):
                runner = graphs.GraphRunner(dit)
                latents = stages["Wan VAE"][2]
                graphs.warm_up(dit, context, (30, 52))
                dit_ms = timer(lambda: edit_latents(dit, latents, context, keep, "lipar", (1, 6), runner))
                mask_ms = timer(lambda: lipar.prune_mask(latents[0].transpose(0, 1)))
                runner.release()
                for name, (encode_ms, decode_ms, _) in stages.items():
                    total = encode_ms + mask_ms + dit_ms + decode_ms
                    emit(f"| {name} | {label} | {dit_ms:.0f} | {total:.0f} "
                         f"| {frames / total * 1e3:.1f} |")
                    if how is not None and figures is not None:
                        figures[f"whole_fps {name}"] = frames / total * 1e3
    vaes = dit = runner = None  # free the GPU for the streamed edits below
    torch.cuda.empty_cache()
    folder = Path(tempfile.mkdtemp(prefix="lipar_tiny_"))
    weights = real_shape_weights(folder)
    count = 321
    clip = write_long_demo_clip(folder / "clip.mp4", count)
    keep = coherent_mask(1 + (count - 1) // 4 + 2, 30, 52, 0.35).cuda()
    emit("", f"| streamed {count} frames, LIPAR 35 %, defaults (median of 3, alternating) | first edited frame s "
         "| steady frames/s (each run) | end to end frames/s | peak GPU GiB | ms per frame |", "|" + " --- |" * 6)
    apart = []
    for kind, vae_name in (("wan", "Wan VAE"), ("tiny", "tiny VAE")):
        models = sample.Models(weights, "cuda", torch.bfloat16, "cuda", vae=kind)
        clocks = {vae_name: stream.Stopwatch}
        if baseline:
            clocks[f"{vae_name}, waiting at every stage"] = SynchronizingStopwatch
        runs = {name: [] for name in clocks}
        with torch.no_grad(), M.fusion(kernels):
            for _ in range(3):
                for i, (name, clock) in enumerate(clocks.items()):
                    runs[name].append(stream_fixed_mask(models, clip, keep, folder / f"out_{kind}_{i}.mp4", clock))
        models = None
        torch.cuda.empty_cache()
        if baseline:  # the last run of each clock wrote its file: the same frames, or how far apart
            first, second = (io.read_video(folder / f"out_{kind}_{i}.mp4")[0].int() for i in range(len(clocks)))
            apart.append(f"{vae_name}: the two clocks' last runs wrote frames {(first - second).abs().max().item()} of "
                         f"255 apart at most, {(first != second).float().mean().item():.2%} of their values differing")
        for name, all_stats in runs.items():
            steady = [stats["stream"]["steady_fps"] for stats in all_stats]
            stats = all_stats[steady.index(statistics.median(steady))]
            if name == vae_name and figures is not None:
                figures[f"streamed_fps {vae_name}"] = statistics.median(steady)
            s, seconds = stats["stream"], stats["modes"]["lipar"]["seconds"]
            emit(f"| {name} | {s['first_frame_s']:.2f} | {s['steady_fps']:.1f} ({', '.join(f'{f:.1f}' for f in steady)}) "
                 f"| {stats['modes']['lipar']['end_to_end_fps']:.1f} | {stats['peak_gpu_memory_gib']:.2f} | "
                 + "  ".join(f"{k} {v * 1e3 / count:.1f}" for k, v in seconds.items()
                             if k not in ("text", "load", "compile")) + " |")
    emit("", *apart)


def batch_bench(clips=8):
    """evaluate.py --manifest against one sample.py call per clip, at real shapes with the
    whole umT5-XXL: 8 clips of 81 frames at 832x480 (the demo scene, each shifted
    sideways), two prompts, LIPAR with sample.py's defaults. Wall time of the processes,
    loading included. Prints each line as it is measured."""
    folder = Path(tempfile.mkdtemp(prefix="lipar_batch_"))
    weights = real_shape_weights(folder, full_text_encoder=True)
    scene = demo.demo_frames(480, 832, 81)
    prompts = [demo.DEFAULT_PROMPT, "a pencil sketch of a ball rolling across a table"]
    jobs = []
    for i in range(clips):
        io.write_video(folder / f"clip{i}.mp4", scene.roll(97 * i, dims=2), 16)
        jobs.append({"video": f"clip{i}.mp4", "prompt": prompts[i % 2]})
    manifest = folder / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    separate = []
    for i, job in enumerate(jobs):
        wall, _, _ = run_sample(["--video", folder / job["video"], "--prompt", job["prompt"], "--weights", weights,
                                 "--out", folder / "separate" / f"clip{i}.mp4"])
        separate.append(wall)
        print(f"separate call {i}: {wall:.1f} s", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("evaluate.py")), "--manifest", str(manifest),
                           "--weights", str(weights), "--out", str(folder / "batch")], capture_output=True, text=True,
                          env=fresh_env())
    batch = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"evaluate.py --manifest failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    per_job = [json.loads((folder / "batch" / f"clip{i}.json").read_text()) for i in range(clips)]
    dit = [s["modes"]["lipar"]["seconds"]["dit"] for s in per_job]
    print(f"\n| {clips} clips of 81 frames, 832x480, LIPAR | wall s | per clip s |\n| --- | --- | --- |\n"
          f"| {clips} separate sample.py calls | {sum(separate):.1f} | {sum(separate) / clips:.1f} |\n"
          f"| one evaluate.py --manifest call | {batch:.1f} | {batch / clips:.1f} ({sum(separate) / batch:.2f}x) |\n"
          f"\nin the manifest call, DiT seconds per clip: " + " ".join(f"{d:.2f}" for d in dit)
          + f"; pruned {statistics.mean(s['modes']['lipar']['prune_ratio'] for s in per_job):.1%} on average",
          flush=True)


def tape_bench(timer, ratios=(0.2, 0.35, 0.5), smoke=False):
    """TAPE beside LIPAR at matched prune ratios, in one process at real shapes: 81
    frames (21 latent frames) of the bench's generated clip latents, bf16, the DiT not
    compiled, every mode both op by op and in replayed CUDA graphs (TAPE's through
    tape.TapeForward's runner path, asserted equal to its op-by-op edit), the M-degree
    window (1, 6) for the pruned modes. LIPAR and naive prune `ratio` of the tokens
    after frame 0 (a fixed coherent mask), TAPE skips `ratio` on average over the steps.
    Fidelity to `full` (metrics.Fidelity): latents, and frames decoded by the Wan VAE.
    Random weights: the times are real, the fidelity only says how far each method
    moves a random model. Prints as it goes. smoke: tiny float32 models on the CPU (the
    harness and the agreement check, no meaningful times)."""
    torch.manual_seed(0)
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    dit_cfg, vae_cfg = (M.DiTConfig.tiny(), V.VAEConfig.tiny()) if smoke else (M.DiTConfig(), V.VAEConfig())
    with torch.device(device):
        dit = random_(M.CausalWanModel(dit_cfg)).to(dtype).eval().requires_grad_(False)
        vae = random_(V.WanVAE(vae_cfg), 0.05).to(dtype).eval()
    cfg, (L, h, w) = dit.cfg, ((3, 4, 7) if smoke else (21, 30, 52))
    context = torch.randn(1, 512, cfg.text_dim, device=device, dtype=dtype)
    latents = realistic_latents(L, 2 * h, 2 * w).transpose(0, 1)[None].to(device)
    runner = graphs.GraphRunner(dit)
    edits, frames, rows = {}, {}, []

    def run(name, mode, ratio, keep, tape_cfg=None):
        def edit(use_graphs=False):
            return edit_latents(dit, latents, context, keep, mode, (1, 6), runner if use_graphs else None, tape_cfg)
        eager, in_graphs = timer(edit), timer(lambda: edit(True))
        with torch.no_grad():
            edits[name], replayed = edit(), edit(True)
            frames[name] = io.from_model(vae.decode(edits[name].to(dtype)))
        agreement = ((replayed - edits[name]).norm() / edits[name].norm()).item()
        assert agreement < 1e-2, f"{name}: the graph path is {agreement:.1e} from the op-by-op one"
        if mode == "tape":
            flops = sum(tape_flops(L, h * w, cfg, tape_cfg, (1, 6)))
        else:
            flops = sum(dit_flops(keep, mode, None if mode == "full" else (1, 6), cfg))
        rows.append((name, mode, ratio, eager, in_graphs, flops))
        print(f"{name}: {eager:.0f} ms op by op, {in_graphs:.0f} ms in graphs (relative difference "
              f"{agreement:.1e}), {flops / 1e12:.1f} TFLOP", flush=True)

    run("full", "full", 0.0, coherent_mask(L, h, w, 0.0).to(device))
    for ratio in ratios:
        keep = coherent_mask(L, h, w, ratio).to(device)
        for mode in ("lipar", "naive"):
            run(f"{mode} {ratio:.0%}", mode, ratio, keep)
        run(f"tape {ratio:.0%}", "tape", ratio, keep, tape.TapeConfig(ratio))
    fidelity = Fidelity()
    fidelity.add(edits, frames)
    scores = fidelity.stats()
    _, _, _, full_ms, full_graphs_ms, full_flops = rows[0]
    print("\n| method | prune ratio | DiT ms op by op | speedup | DiT ms in graphs | speedup | TFLOP | FLOPs vs full "
          "| frames PSNR dB | SSIM | latent rel. error |\n|" + " --- |" * 11)
    for name, mode, ratio, eager, in_graphs, flops in rows:
        s = scores.get(name, {})
        print(f"| {mode} | {ratio:.0%} | {eager:.0f} | {full_ms / eager:.2f}x | {in_graphs:.0f} | "
              f"{full_graphs_ms / in_graphs:.2f}x | {flops / 1e12:.1f} | {flops / full_flops:.2f} | "
              + (f"{s['psnr_db']:.2f} | {s['ssim']:.4f} | {s['latent_rel_error']:.4f} |" if s else "– | – | – |"))


def recache_bench(timer, smoke=False, figures=None):
    """A prompt change's cost (prompts.py) beside the chunk work it interrupts, at real
    shapes: random bf16 DiT, 832x480, the M-degree window (1, 6) for LIPAR (35 %, a
    fixed coherent mask) and the whole causal cache for full, both in CUDA graphs with
    sample.py's default fusion. Five chunks are edited, then timed: the re-cache under
    another prompt in one pass (the default) and chunk by chunk (at_once=False), one DiT
    forward of the next chunk (a denoising step), and that chunk's whole edit (3 steps
    and its memory step); then one more re-cache chunk by chunk, each of its memory
    steps timed on its own (the editor's forward, wrapped). The two re-caches' keys are
    compared (bf16: they differ by rounding only). smoke: tiny models on the CPU.
    `figures` (a dict), if given, gets per mode the one pass's ms and its ratio to a
    forward."""
    torch.manual_seed(0)
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    with torch.device(device):
        dit = random_(M.CausalWanModel(M.DiTConfig.tiny() if smoke else M.DiTConfig())).to(dtype).eval()
    dit.requires_grad_(False)
    L, h, w = (18, 4, 7) if smoke else (18, 30, 52)
    contexts = [torch.randn(1, 512, dit.cfg.text_dim, device=device, dtype=dtype) for _ in range(2)]
    latents = realistic_latents(L, 2 * h, 2 * w).transpose(0, 1)[None].to(device)
    keep = coherent_mask(L, h, w, 0.35).to(device)
    runner = None if smoke else graphs.GraphRunner(dit)
    if not smoke:
        import triton_ops  # Triton: CUDA builds only
    kernels = None if smoke else triton_ops.Kernels()
    lines = ["| mode | held chunks | re-cache ms, one pass | chunk by chunk | one DiT forward ms "
             "| re-cache / forward: one pass | chunk by chunk | FLOPs re-cache / forward | chunk edit ms "
             "| keys, one pass vs chunk by chunk |", "| --- |" + " --- |" * 9]
    steps = []
    for mode in ("lipar", "full"):
        window = None if mode == "full" else (1, 6)
        forward, cache = sample.plugs(dit, runner, contexts[0], (h, w), mode, window)
        forward = forward or dit.forward_chunk
        replays = []  # (first frame, frames, start, end) of each call while `replays` is being read

        def timed(x, t, cache, start, **kwargs):
            begin = stamp(smoke)
            out = forward(x, t, cache, start, **kwargs)
            replays.append((start, x.shape[2], begin, stamp(smoke)))
            return out
        editor = prompts.ScheduledEditor(sample.ChunkEditor(dit, contexts[0], (h, w), mode, window, 0, timed, cache),
                                         dit, [])
        prompt = iter(contexts[::-1] * 1000)  # never the one in force: every call re-caches

        def recache(at_once=True):
            editor.recache(next(prompt), at_once)
        with torch.no_grad(), M.fusion(kernels):
            for s in range(0, 15, 3):
                editor(latents[:, :, s:s + 3], keep[s:s + 3])
            x, part = latents[:, :, 15:18].to(dtype), keep[15:18]
            plan = lipar.recovery_plan(part, mode) if mode != "full" else None
            t = torch.full((1, 1), sample.editing_schedule()[0][0], device=device)
            step = lambda: editor.forward(x, t, editor.cache, 15, plan=plan)  # noqa: E731
            at_once_ms = timer(recache)
            one_by_one_ms = timer(lambda: recache(at_once=False))
            forward_ms = timer(step)
            chunk_ms = timer(lambda: [step() for _ in range(3)]
                             + [editor.forward(x, t * 0, editor.cache, 15, memory_step=True, plan=plan)])
            keys = []
            for at_once in (True, False):
                editor.recache(contexts[0])  # then contexts[1] is a change
                replays.clear()
                editor.recache(contexts[1], at_once)
                keys.append(editor.cache.k[:, :, editor.cache.key_valid])  # the rows the re-cache wrote
            if not smoke:
                torch.cuda.synchronize()
        error = (sum((a.float() - b.float()).norm() ** 2 for a, b in zip(*keys)).sqrt()
                 / sum(b.float().norm() ** 2 for b in keys[1]).sqrt()).item()
        held = [*editor.first, *editor.held]
        # FLOPs (flops.py's count) of the replay, chunk by chunk with the keys each sees, against the forward's
        replayed = [(start, x0.shape[2]) for start, x0, _ in editor.replayed()]
        seen = [sum(f for _, f in replayed[:i + 1]) for i in range(len(replayed))]
        queries = lambda start, f: f * h * w if mode == "full" else int(keep[start:start + f].sum())  # noqa: E731
        recache_flops = sum(step_flops(dit.cfg, queries(s, f), keys * h * w) for (s, f), keys in zip(replayed, seen))
        forward_flops = step_flops(dit.cfg, queries(15, 3), (seen[-1] + 3 if mode == "full" else 7) * h * w)
        if figures is not None:
            figures[f"recache {mode}"] = {"ms": at_once_ms, "forwards": at_once_ms / forward_ms}
        lines.append(f"| {mode} | {len(held)} | {at_once_ms:.1f} | {one_by_one_ms:.1f} | {forward_ms:.1f} "
                     f"| {at_once_ms / forward_ms:.2f} | {one_by_one_ms / forward_ms:.2f} "
                     f"| {recache_flops / forward_flops:.2f} | {chunk_ms:.1f} | relative error {error:.1e} |")
        steps.append(f"{mode}'s re-cache chunk by chunk, memory step by memory step: " + ", ".join(
            f"latent frames {s}-{s + f - 1} {elapsed_ms(a, b):.1f} ms" for s, f, a, b in replays))
        if error > 2e-2:
            raise SystemExit(f"{mode}: the re-cache in one pass wrote other keys than chunk by chunk "
                             f"(relative error {error:.1e} > 2e-2)")
    print("\n".join(lines + steps), flush=True)


def step_flops(cfg, queries, keys):
    """FLOPs of one DiT call on `queries` tokens that attend to `keys` (flops.py's count)."""
    return cfg.num_layers * queries * (linear_flops_per_token(cfg) + 4 * keys * cfg.dim + 4 * 512 * cfg.dim)


def stamp(smoke):
    """A point in time for elapsed_ms: a recorded CUDA event (no wait), or the CPU's clock."""
    if smoke:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def elapsed_ms(a, b):
    return (b - a) * 1e3 if isinstance(a, float) else a.elapsed_time(b)


def random_(module, std=0.02):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def _print(lines):
    print("\n".join(lines), flush=True)


def say(lines, line):
    """`line` added to a run's `lines` and printed at once: each line as it is measured."""
    lines.append(line)
    print(line, flush=True)


# -----------------------------------------------------------------------------
# Every target of issues 23 and 24 in one run

# The groups of figures a targets run measures, in order: name -> run(args, timer, figures).
# Each is also one of the single-purpose runs below, printing its lines as that run does;
# here it records its figures as well.
TARGET_GROUPS = {
    "kernels": lambda a, timer, figures: kernels_bench(timer, figures),
    "floor": lambda a, timer, figures: floor_bench(timer, figures),
    "recache": lambda a, timer, figures: recache_bench(timer, a.smoke, figures),
    "vae": lambda a, timer, figures: vae_layout_bench(timer, a.peer_vae, figures),
    "edit": lambda a, timer, figures: tiny_vae_bench(timer, baseline=False, figures=figures),
    "cli": lambda a, timer, figures: _print(cli_bench(timer, figures=figures)),
    "compare": lambda a, timer, figures: compare_bench(figures=figures),
    "live": lambda a, timer, figures: live_bench(figures=figures),
}
SMOKE_TARGET_GROUPS = ("recache",)  # what runs on the CPU: the harness, not the figures
WINDOW_FILLED_CHUNK = 7  # `full`'s 21 latent frames are cached from its 7th chunk on


def targets_bench(args, timer, groups):
    """The measurements behind every target of issues 23 and 24, group by group
    (TARGET_GROUPS; only those args.targets names, if it names any), then one table:
    each target, what was measured, met or not. With --figures FILE the figures are kept
    there, written after each group, and groups already in it are not measured again: a
    run cut short (a per-command time limit) goes on where it stopped, and runs of some
    groups each fill one table. groups: what the file held already (read_figures), or {}.
    Returns the table's lines."""
    path = Path(args.figures) if args.figures else None
    device = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    wanted = args.targets or list(TARGET_GROUPS)
    for name, run in TARGET_GROUPS.items():
        if name in groups or name not in wanted or (args.smoke and name not in SMOKE_TARGET_GROUPS):
            continue
        figures = {}
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        try:
            with torch.no_grad():
                run(args, timer, figures)
        except Exception:  # the other groups still run; this one stays unmeasured, for the next run
            traceback.print_exc()
            print(f"the group {name} failed (above): the table leaves it unmeasured", flush=True)
            continue
        groups[name] = {"device": device, "date": started, "figures": figures}
        if path:  # whole or not at all: a run killed mid-write leaves the previous file
            path.with_suffix(".tmp").write_text(json.dumps(groups, indent=1))
            path.with_suffix(".tmp").replace(path)
        if not args.smoke:
            torch.cuda.empty_cache()
    lines = target_table(groups)
    print("\n".join(lines), flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return lines


def read_figures(path):
    """What targets_bench wrote to `path`, {group: {"device", "date", "figures"}}; None if
    the file holds anything else."""
    try:
        groups = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(groups, dict) and all(isinstance(g, dict) and {"device", "date", "figures"} <= set(g)
                                        for g in groups.values()):
        return groups
    return None


def target_table(groups):
    """Issue 23's and 24's targets against the figures of targets_bench's groups
    ({group: {"device", "date", "figures"}}): lines of a markdown table, each group's
    device and date first; a target whose group was not measured says so."""
    def get(group, key):
        return groups[group]["figures"].get(key) if group in groups else None

    rows = []

    def row(target, needs, measure):  # measure() -> (text, met) from figures that are there
        if any(group not in groups for group in needs):
            rows.append(f"| {target} | not measured ({', '.join(g for g in needs if g not in groups)}) | - |")
        else:
            try:
                text, met = measure()
            except (KeyError, TypeError, ValueError, ZeroDivisionError, statistics.StatisticsError) as e:
                rows.append(f"| {target} | incomplete figures ({type(e).__name__}: {e}) | - |")
                return
            rows.append(f"| {target} | {text} | {'yes' if met else 'no'} |")

    def dit(fusion, config):
        return get("kernels", f"dit_ms {fusion} {config}")

    row("sample.py's defaults: DiT `lipar` 35 % ≤ 940 ms, `full` ≤ 1,700 ms (old default: `--fusion off`)",
        ["kernels"], lambda: (f"{dit('triton', 'lipar 35%'):.0f} / {dit('triton', 'full'):.0f} ms (old default "
                              f"{dit('off', 'lipar 35%'):.0f} / {dit('off', 'full'):.0f})",
                              dit("triton", "lipar 35%") <= 940 and dit("triton", "full") <= 1700))
    speeds = lambda: [dit("compile", c) / dit("triton", c) for c in ("full", "lipar 35%")]  # noqa: E731
    row("Triton ≥ 95 % of torch.compile's DiT speed (`full`, `lipar` 35 %)", ["kernels"],
        lambda: (" / ".join(f"{r:.0%}" for r in speeds()), min(speeds()) >= 0.95))
    each = lambda: get("kernels", "kernel_load_each_s")  # noqa: E731  (None in files that timed one process)
    row("a later process loads the kernels in ≤ 1 s (median of fresh processes)", ["kernels"],
        lambda: (f"{get('kernels', 'kernel_load_s'):.2f} s"
                 + (f" ({', '.join(f'{x:.2f}' for x in each())})" if each() else ""), get("kernels", "kernel_load_s") <= 1))
    row("end to end `lipar` 35 %, whole clip: ≥ 35 f/s Wan VAE, ≥ 75 f/s tiny VAE", ["edit"],
        lambda: (f"{get('edit', 'whole_fps Wan VAE'):.1f} / {get('edit', 'whole_fps tiny VAE'):.1f}",
                 get("edit", "whole_fps Wan VAE") >= 35 and get("edit", "whole_fps tiny VAE") >= 75))
    row("streamed steady state (321 frames, median of 3): ≥ 30 f/s Wan VAE, ≥ 70 f/s tiny VAE", ["edit"],
        lambda: (f"{get('edit', 'streamed_fps Wan VAE'):.1f} / {get('edit', 'streamed_fps tiny VAE'):.1f}",
                 get("edit", "streamed_fps Wan VAE") >= 30 and get("edit", "streamed_fps tiny VAE") >= 70))
    vae_ratio = lambda: get("vae", "wan_vae_vs_peer")  # noqa: E731
    row("Wan VAE encode + decode ≤ 1.35 s and ≥ 2.0× Self-Forcing's in the same call", ["vae"],
        lambda: (f"{get('vae', 'wan_vae_s'):.3f} s, " + (f"{vae_ratio():.2f}×" if vae_ratio() else "no peer (--peer-vae)"),
                 get("vae", "wan_vae_s") <= 1.35 and (vae_ratio() or 0) >= 2.0))
    cli = lambda: get("cli", "cli_second_s") / get("cli", "cli_steady_s")  # noqa: E731
    row("the user's command, second fresh run (without the text stage), ≤ 2× the steady state", ["cli"],
        lambda: (f"{get('cli', 'cli_second_s'):.2f} s against {get('cli', 'cli_steady_s'):.2f} s: {cli():.1f}×",
                 cli() <= 2))
    runs = lambda: {label: get("compare", f"compare {label}") for label in  # noqa: E731
                    ("--compare --save-mask", "lipar alone", "full alone")}
    row("`--compare` ≤ 12 GiB GPU (321 frames)", ["compare"],
        lambda: ("; ".join(f"{label} {r['gpu_peak_gib']:.2f} GiB" for label, r in runs().items()),
                 runs()["--compare --save-mask"]["gpu_peak_gib"] <= 12))

    def host():  # flat: after `full`'s window fills, the later half of the chunks within 0.05 GiB of the earlier
        resident = runs()["--compare --save-mask"]["resident_gib"][WINDOW_FILLED_CHUNK - 1:]
        half = len(resident) // 2
        trend = statistics.mean(resident[half:]) - statistics.mean(resident[:half])
        return (f"{min(resident):.2f}–{max(resident):.2f} GiB from chunk {WINDOW_FILLED_CHUNK} to "
                f"{WINDOW_FILLED_CHUNK + len(resident) - 1}; later half {trend:+.3f} GiB against the earlier"), trend <= 0.05
    row("host memory flat over 321 frames once the window has filled (`--compare --save-mask`)", ["compare"], host)
    row("writing adds ≤ 10 % to the edit (alone, with `--compare --save-mask`)", ["compare"],
        lambda: (f"{runs()['lipar alone']['write_share']:.0%} / {runs()['--compare --save-mask']['write_share']:.0%}",
                 max(runs()[k]["write_share"] for k in ("lipar alone", "--compare --save-mask")) <= 0.10))
    row("100 %-pruned DiT ≤ 150 ms", ["floor"],
        lambda: (f"{get('floor', 'floor_ms'):.0f} ms", get("floor", "floor_ms") <= 150))
    fp8_gain = lambda: dit("triton", "lipar 35%") / dit("triton + fp8", "lipar 35%")  # noqa: E731
    row("`--fp8` DiT ≥ 1.2× bf16 at `lipar` 35 %", ["kernels"], lambda: (f"{fp8_gain():.2f}×", fp8_gain() >= 1.2))
    recache = lambda mode: get("recache", f"recache {mode}")  # noqa: E731
    row("a prompt switch re-caches in ≤ 2 chunk forwards (`lipar`; `full` beside it)", ["recache"],
        lambda: (f"{recache('lipar')['forwards']:.2f} ({recache('lipar')['ms']:.1f} ms); full "
                 f"{recache('full')['forwards']:.2f}", recache("lipar")["forwards"] <= 2))

    def switch():  # the bound: a chunk's period at the camera's pace + the re-cache + the page's chunk latency
        parts, met = [], True
        for kind in ("tiny", "wan"):
            live_kind = get("live", f"live {kind}")
            bound = live_kind["chunk_period_ms"] + recache("lipar")["ms"] + live_kind["chunk_latency_ms"]
            parts.append(f"{kind}: {', '.join(f'{ms:.0f}' for ms in live_kind['switch_ms'])} ms against {bound:.0f}")
            met = met and bool(live_kind["switch_ms"]) and max(live_kind["switch_ms"]) <= bound
        return "; ".join(parts), met
    row("first frame under a new prompt within one chunk plus the re-cache (three changes, each VAE)",
        ["live", "recache"], switch)
    page = lambda kind: get("live", f"live {kind}")["page_fps"] / get("live", f"live {kind}")["cli_fps"]  # noqa: E731
    row("the live page ≥ 90 % of the CLI stream's steady f/s, either VAE", ["live"],
        lambda: (f"{page('tiny'):.0%} / {page('wan'):.0%}", min(page("tiny"), page("wan")) >= 0.9))
    measured = [f"- {name}: {g['device']}, {g['date']}" for name, g in groups.items()]
    return (["Groups measured (device, start):", *measured, "", "| target | measured | met |", "| --- | --- | --- |"]
            + rows)


# The single-purpose runs: --flag -> (what it times, run(args, timer, smoke, vae, video), whether
# --smoke runs it). Each run prints its lines: as it measures them, or all at the end (_print).
ONLY = {
    "cli": ("time sample.py itself at real shapes (cold and warm processes, per-stage peaks)",
            lambda a, timer, *_: _print(cli_bench(timer)), False),
    "stream": ("time streaming edits at real shapes (81, 321, 1281 frames; first frame, steady frames/s, peaks)",
               lambda a, timer, *_: _print(stream_bench(timer)), False),
    "tiny-vae": ("time the tiny VAE against the Wan VAE (and whole and streamed edits with each)",
                 lambda a, timer, *_: tiny_vae_bench(timer), False),
    "batch": ("time evaluate.py --manifest of 8 clips against 8 separate sample.py calls",
              lambda *_: batch_bench(), False),
    "tape": ("time TAPE beside LIPAR and naive pruning at 20/35/50 %% (speed, FLOPs, fidelity)",
             lambda a, timer, *_: tape_bench(timer), False),
    "recache": ("time a prompt change's re-cache beside a chunk's forward and edit",
                lambda a, timer, smoke, *_: recache_bench(timer, smoke), True),
    "kernels": ("time the fusion choices (off, triton, compile) and --fp8; with --profile, only the top CUDA "
                "kernels of a Triton-fused edit in bf16 and fp8 and a 100 %% pruned one",
                lambda a, timer, *_: kernels_profile() if a.profile else kernels_bench(timer), False),
    "live": ("time live.py driven by a scripted page against the CLI's stream, each VAE",
             lambda a, timer, smoke, *_: live_bench(48 if smoke else 240, smoke=smoke), True),
    "compare-memory": ("time sample.py --compare --save-mask on 321 frames beside lipar and full alone",
                       lambda *_: compare_bench(), False),
    "floor": ("time nearly and wholly pruned edits (the 100 %% pruned floor)",
              lambda a, timer, *_: floor_bench(timer), False),
    "vae-variants": ("time the VAE op by op and fused",
                     lambda a, timer, smoke, vae, video: vae_variants(vae, video, timer, a.profile_vae), False),
    "vae-layout": ("time the Wan VAE in NCDHW and channels-last memory, op by op and with the Triton norm, whole "
                   "and streamed (--peer-vae: beside Self-Forcing's)",
                   lambda a, timer, *_: vae_layout_bench(timer, a.peer_vae), False),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, one run: checks the harness")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--profile", action="store_true",
                   help="print the top CUDA kernels of one LIPAR 35%% and one 100%% edit (CUDA graphs)")
    p.add_argument("--profile-vae", action="store_true", help="print the top CUDA kernels of VAE encode and decode")
    p.add_argument("--targets", nargs="*", metavar="GROUP", choices=list(TARGET_GROUPS),
                   help="measure every target of issues 23 and 24, or only the groups named (of "
                   f"{', '.join(TARGET_GROUPS)}; --smoke: {', '.join(SMOKE_TARGET_GROUPS)} only), and print them met "
                   "or not; needs --peer-vae for the VAE's ratio")
    p.add_argument("--figures", metavar="FILE", help="with --targets: keep the figures in this JSON file and skip "
                   "the groups it already holds (to go on after a run was cut short)")
    p.add_argument("--peer-vae", metavar="FILE", help="with --vae-layout: also time Self-Forcing's VAE, its "
                   "wan/modules/vae.py at FILE (from a checkout of guandeh17/Self-Forcing; needs einops)")
    for name, (text, _, _) in ONLY.items():
        p.add_argument(f"--{name}", action="store_true", help=f"only {text}, then exit")
    args = p.parse_args(argv)
    if args.figures and args.targets is None:
        p.error("--figures keeps the figures of a --targets run: add --targets")
    if args.peer_vae and not Path(args.peer_vae).is_file():
        p.error(f"--peer-vae {args.peer_vae} is not a file: give the path of wan/modules/vae.py in a checkout of "
                "guandeh17/Self-Forcing")
    measured = read_figures(Path(args.figures)) if args.figures and Path(args.figures).exists() else {}
    if measured is None:
        p.error(f"{args.figures} is not the JSON file a --targets run writes: give a new path, or remove it")

    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    frames, height, width = (21, 64, 112) if smoke else (81, 480, 832)
    runs, warmup = (1, 0) if smoke else (args.runs, args.warmup)
    timer = (lambda fn: wall_ms(fn, warmup, runs)) if smoke else (lambda fn: cuda_ms(fn, warmup, runs))
    if args.targets is not None:
        return targets_bench(args, timer, measured)
    torch.manual_seed(0)

    dit_cfg = M.DiTConfig.tiny() if smoke else M.DiTConfig()
    vae_cfg = V.VAEConfig.tiny() if smoke else V.VAEConfig()
    with torch.device(device):
        vae = random_(V.WanVAE(vae_cfg), 0.05).to(dtype).eval().requires_grad_(False)
    video = io.to_model(demo.demo_frames(height, width, frames)).to(device)
    device_name = "CPU (smoke)" if smoke else torch.cuda.get_device_name()
    for name, (_, run, on_cpu) in ONLY.items():
        if getattr(args, name.replace("-", "_")) and (on_cpu or not smoke):
            with torch.no_grad():
                run(args, timer, smoke, vae, video)
            return None
    with M.fusion("compile"):  # the table's rows are compiled unless they say "not compiled"
        if args.profile_vae and not smoke:
            with torch.no_grad():
                latents = vae.encode(video)
                print("VAE encode\n" + profile_edit(lambda: vae.encode(video), 25))
                print("VAE decode\n" + profile_edit(lambda: vae.decode(latents), 25))
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

            def edit(keep, mode, window, source=latents, runner=None):
                return edit_latents(dit, source, context, keep, mode, window, runner)

            decode_ms = timer(lambda: vae.decode(latents))
            L, (h, w) = latents.shape[2], (latents.shape[3] // 2, latents.shape[4] // 2)
            mask_ms = timer(lambda: lipar.prune_mask(latents[0].transpose(0, 1)))
            masks = [(f"lipar {r:.0%}", coherent_mask(L, h, w, r).to(device)) for r in PRUNE_RATIOS]
            clip_latents = realistic_latents(L, 2 * h, 2 * w).to(device)
            masks.append(("lipar (clip mask)", lipar.prune_mask(clip_latents)))
            configs = [("full", "full", torch.ones(L, h, w, dtype=torch.bool, device=device), None)]
            configs += [(name, "lipar", keep, (1, 6)) for name, keep in masks]
            keep35 = dict(masks)["lipar 35%"]

            # speed work must not change results beyond bf16 tolerance: the fused kernels
            # against the plain float32 softmax path on the 35 % mask
            fast = edit(keep35, "lipar", (1, 6))
            dit.attn_impl = "math"
            reference = edit(keep35, "lipar", (1, 6))
            dit.attn_impl = "sdpa"
            agreement = relative_error(fast, reference)
            assert agreement < 3e-2, f"fast path differs from the reference by {agreement:.2e}"

            cross_device = None
            if not smoke:  # CPU float32 vs GPU bf16 at the real width, on a small (240x416) grid
                small_keep = coherent_mask(6, 15, 26, 0.35).to(device)
                cross_device = cpu_float32_vs_gpu(dit, context, small_keep)
            if args.profile and not smoke:  # the graph path, warmed up (captured) before the profiled edit
                for name in ("lipar 35%", "lipar 100%"):
                    runner = graphs.GraphRunner(dit)
                    for _ in range(2):
                        edit(dict(masks)[name], "lipar", (1, 6), runner=runner)
                    print(name + "\n" + profile_edit(lambda: edit(dict(masks)[name], "lipar", (1, 6), runner=runner)))
                    runner.release()
            gemm_rate, sdpa_rate = (None, None) if smoke else ceilings(dit_cfg, 3 * h * w, timer)

            # CUDA graphs: the first clip of a fresh runner (eager first calls and captures
            # included) against the eager path, then graph and eager agreement
            graph_agreement, first_clip = {}, {}
            graphs.warm_up(dit, context, (h, w))  # compile both paths first: captures alone are timed
            for name, mode, keep, window in configs:
                runner = graphs.GraphRunner(dit)
                if name in ("full", "lipar 35%"):
                    first_clip[name] = (wall_ms(lambda: edit(keep, mode, window, runner=runner), 0, 1),
                                        runner.stats["capture_s"] * 1e3, runner.stats["captures"])
                if name in ("full", "lipar 20%", "lipar 50%", "lipar 85%", "lipar (clip mask)"):
                    graph_agreement[name] = relative_error(edit(keep, mode, window, runner=runner),
                                                           edit(keep, mode, window))
                runner.release()
            worst = max(graph_agreement.values())
            assert worst < 2e-2, f"CUDA-graph path differs from the eager path by {worst:.2e}: {graph_agreement}"

            def measure(name, mode, keep, window, runner):
                dit_ms = timer(lambda: edit(keep, mode, window, runner=runner))
                peak = None
                if not smoke:  # peak of a whole edit (encode, mask, DiT, decode) with the weights resident
                    torch.cuda.reset_peak_memory_stats()
                    vae.decode(edit(keep, mode, window, source=vae.encode(video), runner=runner))
                    peak = torch.cuda.max_memory_allocated() / 2**30
                linear, attention, cross = dit_flops(keep, mode, window, dit_cfg)
                ideal_ms = None if smoke else ((linear + cross) / gemm_rate + attention / sdpa_rate) / 1e9
                e2e_ms = encode_ms + mask_ms + dit_ms + decode_ms
                results[name] = dict(pruned=lipar.prune_ratio(keep) if mode != "full" else 0.0, dit_ms=dit_ms,
                                     tflops=(linear + attention + cross) / dit_ms / 1e9, ideal_ms=ideal_ms,
                                     e2e_ms=e2e_ms, peak=peak, flops=linear + attention + cross)

            for name, mode, keep, window in configs:
                if not smoke:
                    torch.cuda.empty_cache()
                runner = graphs.GraphRunner(dit)
                measure(name, mode, keep, window, runner)
                runner.release()
            for name, mode, keep, window in (configs[0], configs[3]):  # no graphs, blocks compiled
                measure(f"{name} (eager, compiled)", mode, keep, window, None)
            if not smoke:  # nothing compiled (sample.py's default), with and without graphs
                with M.fusion(None):
                    for name, mode, keep, window in (configs[0], configs[3]):
                        runner = graphs.GraphRunner(dit)
                        measure(f"{name} (graphs, not compiled)", mode, keep, window, runner)
                        runner.release()
                        measure(f"{name} (eager, not compiled)", mode, keep, window, None)
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
                         f"(2.1 / 3.5 TFLOP a frame, PyTorch's FLOP counter on the diffusers VAE); ceilings measured here: bf16 GEMM {gemm_rate:.0f} TFLOP/s, "
                         f"SDPA {sdpa_rate:.0f} TFLOP/s")
        agreements = f"fast vs plain-softmax path: relative error {agreement:.1e}"
        agreements += "; CUDA graphs vs eager: " + ", ".join(f"{k} {v:.1e}" for k, v in graph_agreement.items())
        if cross_device is not None:
            agreements += f"; GPU bf16 vs CPU float32 (2 LIPAR chunks): {cross_device:.1e}"
        first = [f"first clip of a fresh runner, {name}: {ms:.0f} ms with {n} graph captures taking {cap:.0f} ms "
                 f"(eager path, compiled: {results[name + ' (eager, compiled)']['dit_ms']:.0f} ms)"
                 for name, (ms, cap, n) in first_clip.items()]
        lines = [f"{device_name}, {str(dtype).removeprefix('torch.')}, {frames} frames {width}x{height} "
                 f"({L} latent frames), median of {runs} after {warmup} warm-up; {agreements}", "", *rows, "", vae_line,
                 *first]
        print("\n".join(lines))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("\n".join(lines) + "\n")
    if smoke:
        tape_bench(timer, ratios=(0.35,), smoke=True)
    return results


if __name__ == "__main__":
    main()
