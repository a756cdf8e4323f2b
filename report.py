"""The evaluation's report: report.json (every number) and report.md (tables per clip,
overall and for a sweep over θ and m, with plots when matplotlib is there), from the
stats of each job's edit (evaluate.py)."""

import json
import math
from pathlib import Path

import cli
import files
import summary


def clip_row(stats):
    """The report's numbers for one clip: per mode, its prune ratio (overall, per chunk,
    per latent frame), speed, its DiT speedup over `full`, fidelity to `full`."""
    full_dit = stats["modes"].get("full", {}).get("seconds", {}).get("dit")
    modes = {}
    for mode, s in stats["modes"].items():
        modes[mode] = {"prune_ratio": s["prune_ratio"], "prune_ratio_per_chunk": s["prune_ratio_per_chunk"],
                       "prune_ratio_per_frame": s.get("prune_ratio_per_frame"),
                       "dit_seconds": s["seconds"]["dit"], "dit_fps": s["dit_fps"],
                       "end_to_end_fps": s["end_to_end_fps"],
                       "dit_speedup": full_dit / s["seconds"]["dit"] if full_dit else None,
                       "fidelity_to_full": s.get("fidelity_to_full")}
    sweep = [{"theta": p["theta"], "m": p["m"], "prune_ratio": p["prune_ratio"], "dit_seconds": p["seconds"]["dit"],
              "dit_speedup": full_dit / p["seconds"]["dit"] if full_dit else None,
              "fidelity_to_full": p.get("fidelity_to_full")} for p in stats.get("sweep", [])]
    return {"name": stats["name"], "line": stats["line"], "video": stats["video"], "prompt": stats["prompt"],
            "frames": stats["frames"], "latent_frames": stats["latent_frames"],
            "peak_gpu_memory_gib": stats["peak_gpu_memory_gib"], "peak_host_memory_gib": stats["peak_host_memory_gib"],
            "modes": modes, "sweep": sweep}


def mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def overall(rows, modes):
    """Per mode over all clips: prune ratio weighted by frames, frames/s as total frames
    over total time, DiT speedup as total full time over total mode time, fidelity as
    the mean of the clips' (PSNR of identical clips, inf, left out)."""
    out = {}
    frames = sum(r["frames"] for r in rows)
    for mode in modes:
        per = [(r, r["modes"][mode]) for r in rows if mode in r["modes"]]
        if not per:
            continue
        dit = sum(m["dit_seconds"] for _, m in per)
        full = sum(r["modes"]["full"]["dit_seconds"] for r, _ in per if "full" in r["modes"])
        fid = [m["fidelity_to_full"] for _, m in per if m["fidelity_to_full"]]
        out[mode] = {"prune_ratio": sum(r["frames"] * m["prune_ratio"] for r, m in per) / frames,
                     "dit_fps": sum(r["frames"] for r, _ in per) / dit,
                     "end_to_end_fps": sum(r["frames"] for r, _ in per) /
                     sum(r["frames"] / m["end_to_end_fps"] for r, m in per),
                     "dit_speedup": full / dit if full else None,
                     "fidelity_to_full": {key: mean([f[key] for f in fid]) for key in
                                          ("psnr_db", "ssim", "latent_rel_error")} if fid else None}
    return out


def per_video(rows, modes):
    """Per source video that several jobs edit (one clip, several prompts, as the
    authors' list has three per clip): its jobs' names and `overall` over them; {}
    when every video has one job."""
    videos = {}
    for r in rows:
        videos.setdefault(r["video"], []).append(r)
    if all(len(jobs) == 1 for jobs in videos.values()):
        return {}
    return {video: {"jobs": [r["name"] for r in jobs], "modes": overall(jobs, modes)} for video, jobs in videos.items()}


def sweep_table(rows):
    """Per (θ, m) over all clips: mean prune ratio, DiT speedup, mean fidelity."""
    points = {}
    for r in rows:
        full = r["modes"].get("full", {}).get("dit_seconds")
        for p in r["sweep"]:
            acc = points.setdefault((p["theta"], str(p["m"])), {"theta": p["theta"], "m": p["m"], "rows": []})
            acc["rows"].append((r["frames"], full, p))
    table = []
    for acc in points.values():
        rows_ = acc.pop("rows")
        frames = sum(n for n, _, _ in rows_)
        fulls = [f for _, f, _ in rows_ if f]
        table.append({**acc, "prune_ratio": sum(n * p["prune_ratio"] for n, _, p in rows_) / frames,
                      "dit_speedup": sum(fulls) / sum(p["dit_seconds"] for _, _, p in rows_) if fulls else None,
                      **{key: mean([p["fidelity_to_full"][key] for _, _, p in rows_ if p["fidelity_to_full"]])
                         for key in ("psnr_db", "ssim", "latent_rel_error")}})
    return sorted(table, key=lambda t: (str(t["m"]), t["theta"]))


def write_report(folder, stats, failures, args, setup):
    """report.json (every number) and report.md (tables, plots) in `folder`; returns the .md path.
    setup: device, dtype, vae, random_weights, height, width."""
    rows = [clip_row(s) for s in stats]
    modes = list(dict.fromkeys(m for r in rows for m in r["modes"]))
    report = {"manifest": str(args.manifest) if args.manifest else "embedded demo clips", "setup": setup,
              "modes": modes, "overall": overall(rows, modes), "videos": per_video(rows, modes), "clips": rows,
              "sweep": sweep_table(rows), "failed": failures}
    report["plots"] = plots(folder, rows, report["sweep"])
    files.write_text(folder / "report.json", json.dumps(report, indent=2), overwrite=True)  # rebuilt on every run
    path = folder / "report.md"
    files.write_text(path, report_markdown(report), overwrite=True)
    return path


def fmt(value, spec):
    return "–" if value is None else ("inf" if value == float("inf") else format(value, spec))


def report_markdown(report):
    setup = report["setup"]
    lines = [f"# LIPAR evaluation: {report['manifest']}", "",
             f"{len(report['clips'])} clips, {setup['width']}x{setup['height']}, {setup['device']} {setup['dtype']}, "
             f"{'tiny' if setup['vae'] == 'tiny' else 'Wan'} VAE"
             + (", **random weights** (the speed is real, the fidelity numbers only show the format)"
                if setup["random_weights"] else "") + ". Every mode ran from the same noise; fidelity is to `full`. "
             "The first clip's DiT time includes capturing the CUDA graphs, when they are used.", "",
             f"Recipe: {summary.recipe_text(setup['recipe'])}.", ""]
    lines += tables_markdown(report) if report["clips"] else ["No job was edited: see the failures below."]
    if report["failed"]:
        lines += ["", "## Jobs that failed", ""] + [f"- line {f['line']}: {f['error']}" for f in report["failed"]]
    if report["clips"]:
        lines += ["", "## Plots", ""]
        if report["plots"] is None:
            lines.append("No plots: matplotlib is not installed (`pip install matplotlib`, then rerun the same "
                         "command; finished jobs are not redone).")
        else:
            lines += [f"![{title}]({name})" for name, title in report["plots"].items()]
    return "\n".join(lines) + "\n"


def tables_markdown(report):
    """The report's tables: overall, per clip, and the sweep's."""
    lines = ["## Overall", "",
             "| mode | pruned | DiT frames/s | DiT speedup | end-to-end frames/s | PSNR dB | SSIM | latent rel. error |",
             "|" + " --- |" * 8]
    for mode, o in report["overall"].items():
        f = o["fidelity_to_full"] or {}
        lines.append(f"| {mode} | {o['prune_ratio']:.1%} | {o['dit_fps']:.1f} | {fmt(o['dit_speedup'], '.2f')}x "
                     f"| {o['end_to_end_fps']:.1f} | {fmt(f.get('psnr_db'), '.2f')} | {fmt(f.get('ssim'), '.4f')} "
                     f"| {fmt(f.get('latent_rel_error'), '.4f')} |")
    if report["videos"]:
        lines += ["", "## Per video (its prompts together)", "",
                  "| video | jobs | mode | pruned | DiT speedup | PSNR dB | SSIM | latent rel. error |", "|" + " --- |" * 8]
        for video, v in report["videos"].items():
            for mode, o in v["modes"].items():
                f = o["fidelity_to_full"] or {}
                lines.append(f"| {Path(video).stem} | {len(v['jobs'])} | {mode} | {o['prune_ratio']:.1%} "
                             f"| {fmt(o['dit_speedup'], '.2f')}x | {fmt(f.get('psnr_db'), '.2f')} "
                             f"| {fmt(f.get('ssim'), '.4f')} | {fmt(f.get('latent_rel_error'), '.4f')} |")
    lines += ["", "## Per clip and prompt", "",
              "| clip | prompt | frames | mode | pruned | per chunk | DiT frames/s | DiT speedup | end-to-end frames/s "
              "| peak GPU GiB | PSNR dB | SSIM | latent rel. error |", "|" + " --- |" * 13]
    for r in report["clips"]:
        prompt = r["prompt"] if len(r["prompt"]) <= 40 else r["prompt"][:39] + "…"
        for mode, m in r["modes"].items():
            f = m["fidelity_to_full"] or {}
            chunks = " ".join(f"{c:.0%}" for c in m["prune_ratio_per_chunk"])
            lines.append(f"| {r['name']} | {prompt.replace('|', '/')} | {r['frames']} | {mode} | {m['prune_ratio']:.1%} "
                         f"| {chunks} | {m['dit_fps']:.1f} | {fmt(m['dit_speedup'], '.2f')}x | {m['end_to_end_fps']:.1f} "
                         f"| {fmt(r['peak_gpu_memory_gib'], '.2f')} | {fmt(f.get('psnr_db'), '.2f')} "
                         f"| {fmt(f.get('ssim'), '.4f')} | {fmt(f.get('latent_rel_error'), '.4f')} |")
    if report["sweep"]:
        lines += ["", "## Sweep over θ and the window m (LIPAR, mean over clips)", "",
                  "| θ | m | pruned | DiT speedup | PSNR dB | SSIM | latent rel. error |", "|" + " --- |" * 7]
        for p in report["sweep"]:
            lines.append(f"| {p['theta']:g} | {cli.window_text(p['m'])} | {p['prune_ratio']:.1%} | {fmt(p['dit_speedup'], '.2f')}x "
                         f"| {fmt(p['psnr_db'], '.2f')} | {fmt(p['ssim'], '.4f')} | {fmt(p['latent_rel_error'], '.4f')} |")
    return lines


def plots(folder, rows, sweep):
    """{file name: title} of the PNGs written to `folder`, or None without matplotlib
    (an optional dependency, for these plots only)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    written = {}
    if not rows:
        return written

    def save(fig, name, title):
        fig.suptitle(title)
        fig.tight_layout()
        with files.writing(folder / name, overwrite=True) as partial:
            fig.savefig(partial, dpi=80, format="png")
        plt.close(fig)
        written[name] = title

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        per_frame = next((m["prune_ratio_per_frame"] for mode, m in r["modes"].items()
                          if mode != "full" and m["prune_ratio_per_frame"]), None)
        if per_frame:
            ax.plot(range(len(per_frame)), per_frame, marker=".", label=r["name"])
    ax.set(xlabel="latent frame", ylabel="pruned tokens", ylim=(-0.02, 1.02))
    if rows:
        ax.legend(fontsize="small")
    save(fig, "prune_ratio_per_frame.png", "Prune ratio per latent frame")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode in dict.fromkeys(m for r in rows for m in r["modes"] if m != "full"):
        points = [(r["modes"][mode]["prune_ratio"], r["modes"][mode]["dit_speedup"]) for r in rows
                  if mode in r["modes"] and r["modes"][mode]["dit_speedup"]]
        if points:
            ax.scatter(*zip(*points), label=mode)
    points = [(p["prune_ratio"], p["dit_speedup"]) for r in rows for p in r["sweep"] if p["dit_speedup"]]
    if points:
        ax.scatter(*zip(*points), marker="x", label="lipar, sweep")
    ax.set(xlabel="prune ratio", ylabel="DiT speedup over full")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    save(fig, "speedup_vs_prune_ratio.png", "DiT speedup against prune ratio")

    thetas = sorted({p["theta"] for p in sweep})
    if len(thetas) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in dict.fromkeys(str(p["m"]) for p in sweep):
            line = sorted((p["theta"], p["psnr_db"]) for p in sweep if str(p["m"]) == m and p["psnr_db"] is not None)
            if line:
                ax.plot(*zip(*line), marker="o", label=f"m = {m}")
        ax.set(xlabel="θ", ylabel="PSNR to full, dB")
        ax.legend(fontsize="small")
        save(fig, "fidelity_vs_theta.png", "Fidelity against θ")
    return written
