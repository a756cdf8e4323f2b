"""
An edit's numbers and the summary printed at its end: per mode the prune ratio
(overall, per chunk, per latent frame), seconds per stage, frames/s, fidelity to
`full`, the stream's timeline, peak memory, the recipe and the outputs written
(sample.py's --json holds them all; evaluate.py's report reads them).
"""

import builtins
import functools
import sys
from dataclasses import asdict

import cli
import lipar
import model as M
import stream
import video as io

def edit_stats(reader, settings, frames_per_chunk, models, clock, timeline, keep, fidelities, graph_stats,
               tape_ratios, writers, notes, switches=()):
    """Every number of one edit: per mode the prune ratio (overall, per chunk and per
    latent frame), seconds per stage, frames/s, fidelity to `full`; the stream's
    timeline; peak memory; the outputs written; the prompts and the video frame each
    took effect at (`switches` [(frame, prompt)]: the changes made, prompts.py)."""
    count = reader.frames_read
    stats = {"video": reader.name, "prompt": settings.prompt, "random_weights": models.random, "vae": settings.vae,
             "frames": count, "fps": reader.fps, "height": settings.height, "width": settings.width,
             "latent_frames": 1 + (io.padded_length(count) - 1) // 4, "theta": settings.theta,
             "theta2": settings.theta2, "mask_lookahead": settings.mask_lookahead, "m": cli.window_json(settings.window),
             "seed": settings.seed, "recipe": {"name": settings.recipe.name} | settings.recipe.choices(),
             "device": str(clock.device), "dtype": str(models.dtype).removeprefix("torch."),
             "prompts": [{"from_frame": 0, "prompt": settings.prompt}]
             + [{"from_frame": frame, "prompt": prompt} for frame, prompt in switches],
             "notes": notes, "modes": {}, "stream": timeline.stats()}
    shared = sum(clock.seconds.get(stage, 0.0) for stage in ("read", "encode", "mask", "write"))
    for mode in settings.modes:
        pruned = mode in cli.MASK_MODES and keep is not None
        dit_s, decode_s = clock.seconds[f"dit_{mode}"], clock.seconds[f"decode_{mode}"]
        skipped = settings.tape.ratio if mode == "tape" else 0.0  # TAPE's tokens skipped, the mean over steps
        s = stats["modes"][mode] = {
            "prune_ratio": lipar.prune_ratio(keep) if pruned else skipped,
            "prune_ratio_per_chunk": lipar.chunk_prune_ratios(keep, frames_per_chunk) if pruned else
            [skipped] * len(timeline.written),
            "seconds": {stage: clock.seconds.get(stage, 0.0) for stage in ("read", "encode", "mask", "text", "load",
                                                                            "compile", "write")}
            | {"dit": dit_s, "decode": decode_s},
            "cuda_graphs": None if mode == "tape" else graph_stats,
            "dit_fps": count / dit_s, "end_to_end_fps": count / (shared + dit_s + decode_s)}
        if mode == "tape":
            s["tape"] = asdict(settings.tape) | {"ratio_per_step": tape_ratios}
        if pruned:  # per latent frame, for the evaluation's plots (frame 0 is never pruned)
            s["prune_ratio_per_frame"] = (1 - keep.flatten(1).float().mean(1)).tolist()
        if mode in fidelities:
            s["fidelity_to_full"] = fidelities[mode]
    if "lipar" in fidelities:
        stats["psnr_full_vs_lipar_db"] = fidelities["lipar"]["psnr_db"]
    how = M.fusing()
    stats["fusion"] = "triton" if callable(how) else how or "off"
    stats["fp8"] = models.fp8
    stats["peak_gpu_memory_gib"] = max(clock.peaks.values()) if clock.cuda else None
    stats["peak_gpu_memory_gib_per_stage"] = clock.peaks if clock.cuda else None
    stats["peak_host_memory_gib"] = stream.host_memory_gib()
    stats["outputs"] = {kind: writer.name for kind, writer in writers.items()}
    return stats


def print_summary(stats, file=sys.stdout):
    print = functools.partial(builtins.print, file=file)
    for note in stats["notes"]:
        print(f"note: {note}")
    print(f"{stats['frames']} frames at {stats['width']}x{stats['height']}, {stats['latent_frames']} latent frames, "
          f"{stats['device']} {stats['dtype']}{' (the FFN in fp8)' if stats['fp8'] else ''}, "
          f"{'tiny' if stats['vae'] == 'tiny' else 'Wan'} VAE"
          f"{' (random weights)' if stats['random_weights'] else ''}")
    print(f"recipe: {recipe_text(stats['recipe'])}")
    for change in stats["prompts"][1:]:
        print(f"prompt from frame {change['from_frame']}: {change['prompt']!r} (the cache re-cached under it)")
    for mode, s in stats["modes"].items():
        sec = s["seconds"]
        chunks = " ".join(f"{r:.0%}" for r in s["prune_ratio_per_chunk"])
        if mode == "tape":
            ratios = " ".join(f"{r:.0%}" for r in s["tape"]["ratio_per_step"])
            print(f"[{mode}] skipped {s['prune_ratio']:.1%} of tokens between selections (per step: {ratios})")
        else:
            print(f"[{mode}] pruned {s['prune_ratio']:.1%} of tokens after frame 0 (per chunk: {chunks})")
        print(f"[{mode}] read {sec['read']:.2f}s  encode {sec['encode']:.2f}s  mask {sec['mask']:.3f}s  "
              f"text {sec['text']:.2f}s  DiT {sec['dit']:.2f}s  decode {sec['decode']:.2f}s  write {sec['write']:.2f}s")
        if s["cuda_graphs"]:
            g = s["cuda_graphs"]
            print(f"[{mode}] DiT forwards: {g['replays']} replayed CUDA graphs, {g['eager']} eager (first of their "
                  f"shape), {g['captures']} captures taking {g['capture_s']:.2f}s of the DiT time")
        print(f"[{mode}] DiT {s['dit_fps']:.1f} frames/s, end to end {s['end_to_end_fps']:.1f} frames/s "
              f"(text encoding excluded)")
    sec = next(iter(stats["modes"].values()))["seconds"]
    what = {"triton": "loading the fused kernels (compiling them, the first time on a machine)",
            "compile": "compiling the DiT"}.get(stats["fusion"])
    compiling = f", {what} and warming up {sec['compile']:.2f}s" if sec["compile"] else ""
    print(f"loading the weights took {sec['load']:.2f}s{compiling} (not in the times above)")
    timeline = stats["stream"]
    if timeline:
        steady = f"{timeline['steady_fps']:.1f} frames/s" if timeline["steady_fps"] else "- (one chunk)"
        print(f"streaming: first edited frame after {timeline['first_frame_s']:.2f}s, steady state {steady}, "
              f"chunk latency {timeline['chunk_latency_s']['median']:.2f}s median, "
              f"{timeline['chunk_latency_s']['max']:.2f}s max")
    if "psnr_full_vs_lipar_db" in stats:
        print(f"PSNR lipar vs full: {stats['psnr_full_vs_lipar_db']:.2f} dB")
    if stats["peak_gpu_memory_gib"] is not None:
        stages = "  ".join(f"{stage} {gib:.2f}" for stage, gib in stats["peak_gpu_memory_gib_per_stage"].items())
        print(f"peak GPU memory: {stats['peak_gpu_memory_gib']:.2f} GiB (per stage, GiB: {stages})")
    print(f"peak host memory: {stats['peak_host_memory_gib']:.2f} GiB")
    for kind, path in stats["outputs"].items():
        print(f"wrote {kind}: {path}")


def recipe_text(recipe):
    """A recipe as the summary and the report name it: 'paper (steps 400,300,250, ...)'."""
    return (f"{recipe['name']} (steps {','.join(map(str, recipe['steps']))}, restoration {recipe['restoration']}, "
            f"dilation {recipe['dilation']}, {'' if recipe['bound_after_cleanup'] else 'no '}Eq. 5-6 after the "
            f"cleanup, positions {recipe['positions']})")


