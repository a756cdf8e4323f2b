"""Many edits in one command, and the paper's evaluation (reached through sample.py).

    python sample.py --manifest jobs.jsonl                 # a batch: each job as sample.py would edit it
    python sample.py --manifest jobs.jsonl --eval          # full and lipar per job, fidelity, report
    python sample.py --eval                                # the same on the embedded demo clips
    torchrun --nproc-per-node 4 sample.py --manifest jobs.jsonl --eval   # the jobs split over 4 GPUs

The models are loaded once (per GPU), every distinct prompt is encoded with one load of
the text encoder, which is freed before the DiT arrives, and the DiT's CUDA graphs
and compiled code serve clip after clip. Each job is one streamed edit (sample.py's
stream_edit); with --eval its modes run side by side from the same noise and are
measured against `full` (metrics.py), and a sweep over θ and the window m re-runs
LIPAR against the `full` edit kept from the first run. A job's stats are written
beside its video as <name>.json: a rerun skips finished jobs and rebuilds the report.
"""

import argparse
import copy
import csv
import datetime
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import sample
import video as io
from metrics import Fidelity

FIELDS = ("video", "prompt", "name", "out", "seed", "mode", "modes", "theta", "theta2", "m", "mask_lookahead",
          "prune_ratio")
DEMO_CLIPS = ("ball", "ball_backwards", "still")


@dataclass
class Job:
    line: int  # in the manifest, for messages (a CSV's header is line 1)
    name: str  # unique in the manifest: the job's outputs and its row in the report
    args: argparse.Namespace  # sample.py's flags for this edit, the job's fields applied


# -----------------------------------------------------------------------------
# The manifest


def read_records(path):
    """[(line, {field: value})] from a .jsonl (one JSON object a line; blank lines and
    lines starting with # are skipped) or a .csv (a header row naming the fields;
    empty cells are absent fields). A line that cannot be read gives {"": error}."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    records = []
    if path.suffix.lower() == ".csv":
        rows = csv.DictReader(text.splitlines())
        for row in rows:
            if None in row:
                records.append((rows.line_num, {"": f"it has {len(row) + len(row[None]) - 1} cells, more than the "
                                                    f"header's {len(rows.fieldnames)}"}))
                continue
            records.append((rows.line_num, {k.strip(): v for k, v in row.items() if k and v not in (None, "")}))
        return records
    for line, entry in enumerate(text.splitlines(), 1):
        if not entry.strip() or entry.lstrip().startswith("#"):
            continue
        try:
            record = json.loads(entry)
        except json.JSONDecodeError as err:
            records.append((line, {"": f"it is not JSON ({err.msg} at column {err.colno})"}))
            continue
        records.append((line, record if isinstance(record, dict) else
                        {"": "it is not a JSON object; write {\"video\": ..., \"prompt\": ...}"}))
    return records


def job_args(record, base, manifest_folder):
    """sample.py's flags for one manifest record: (args, None) or (None, what is wrong)."""
    if "" in record:
        return None, record[""]
    unknown = [k for k in record if k not in FIELDS]
    if unknown:
        return None, f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}"
    missing = [k for k in ("video", "prompt") if not record.get(k)]
    if missing:
        return None, f"no {' and no '.join(missing)}; every job needs a video and a prompt"
    args = copy.copy(base)
    args.manifest, args.eval_modes = None, list(base.eval_modes)
    args.prompt = str(record["prompt"])
    args.video = str(resolve(record["video"], manifest_folder))
    if record.get("out"):
        args.out = str(resolve(record["out"], manifest_folder))
    converters = {"seed": int, "theta": float, "theta2": float, "mask_lookahead": int, "mode": str, "prune_ratio": float,
                  "m": lambda v: sample.parse_window(",".join(map(str, v)) if isinstance(v, list) else str(v))}
    for key, convert in converters.items():
        if key in record:
            try:
                setattr(args, key, convert(record[key]))
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                return None, f"{key} {record[key]!r} is not {'a window SINK,RECENT' if key == 'm' else convert.__name__}"
    if args.mode not in sample.MODES:
        return None, f"mode {args.mode!r} is not one of {', '.join(sample.MODES)}"
    if args.mask_lookahead not in (0, 1):
        return None, f"mask_lookahead {args.mask_lookahead} is not 0 or 1"
    if "modes" in record:
        modes = record["modes"].split() if isinstance(record["modes"], str) else record["modes"]
        bad = [m for m in modes if m not in sample.MODES] if isinstance(modes, list) else [modes]
        if bad or "full" not in modes:
            return None, (f"modes {record['modes']!r}: give modes from {', '.join(sample.MODES)}, "
                          "full among them (the reference the others are measured against)")
        args.eval_modes = list(dict.fromkeys(modes))
    problems = sample.edit_problems(args)
    return (None, problems[0]) if problems else (args, None)


def resolve(path, folder):
    """A manifest's paths are relative to the manifest's own folder."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else folder / path


def read_manifest(path, base, folder):
    """(jobs, failures) of a manifest: a failure is {"line", "error"} for a line that
    cannot be run; the other jobs still run. Names are unique (a second clip.mp4
    becomes clip_2)."""
    jobs, failures, taken = [], [], set()
    for line, record in read_records(path):
        args, error = job_args(record, base, Path(path).parent)
        if error:
            failures.append({"line": line, "error": error})
            continue
        name = stem = str(record.get("name") or Path(args.video).stem)
        for n in itertools.count(2):
            if name not in taken:
                break
            name = f"{stem}_{n}"
        taken.add(name)
        if not record.get("out"):
            args.out = str(folder / f"{name}.mp4")
        jobs.append(Job(line, name, args))
    return jobs, failures


def demo_jobs(base, folder):
    """--eval without a manifest: three clips of the embedded demo scene (the ball
    rolling, the same backwards, and its first frame held still: from some pruning to
    nearly all), written once under <folder>/clips."""
    clips = folder / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    frames = sample.demo_frames()
    scenes = {"ball": frames, "ball_backwards": frames.flip(0), "still": frames[:1].expand_as(frames)}
    jobs = []
    for line, name in enumerate(DEMO_CLIPS, 1):
        path = clips / f"{name}.mp4"
        if not path.exists():
            io.write_video(path, scenes[name], sample.DEMO_FPS)
        args = copy.copy(base)
        args.manifest, args.video, args.out = None, str(path), str(folder / f"{name}.mp4")
        jobs.append(Job(line, name, args))
    return jobs


# -----------------------------------------------------------------------------
# Running the jobs


def signature(args):
    """What a job's result depends on: a finished job is redone when this changes."""
    return {"video": args.video, "prompt": args.prompt, "seed": args.seed, "theta": args.theta,
            "theta2": args.theta2, "m": window_json(args.m),
            "mask_lookahead": args.mask_lookahead, "modes": sample.edit_modes(args), "vae": args.vae,
            "tape": [args.prune_ratio, args.tape_alpha, args.tape_delta, args.tape_every],
            "height": args.height, "width": args.width,
            "sweep_theta": args.sweep_theta, "sweep_m": [window_json(m) for m in args.sweep_m or []]}


def window_json(m):
    """A window as JSON holds it (and a job's stats are compared): "all" or [SINK, RECENT]."""
    return m if m == "all" else list(m)


def stats_path(job):
    return Path(job.args.out).with_suffix(".json")


def finished(job):
    """The job's stats from an earlier run when every output it wrote is still there and
    its settings are the same; None otherwise."""
    try:
        stats = json.loads(stats_path(job).read_text())
    except (OSError, ValueError):
        return None
    if stats.get("job") != signature(job.args) or not all(Path(p).exists() for p in stats_outputs(stats)):
        return None
    return stats


def stats_outputs(stats):
    return list(stats.get("outputs", {}).values()) + [p["output"] for p in stats.get("sweep", [])]


def run_job(job, models, context):
    """One job's edit (and its sweep); returns its stats, also written to <out>.json."""
    args = job.args
    sweep = args.eval and (args.sweep_theta or args.sweep_m)
    fidelity = Fidelity(reference=[] if sweep else None) if args.eval else None
    notes = []
    with io.VideoReader(args.video) as reader:
        stats = sample.stream_edit(args, models, reader, notes, context=context, fidelity=fidelity)
    stats["name"], stats["line"], stats["job"], stats["sweep"] = job.name, job.line, signature(args), []
    if sweep:
        out = Path(args.out)
        for theta, m in itertools.product(args.sweep_theta or [args.theta], args.sweep_m or [args.m]):
            point = copy.copy(args)
            window = "all" if m == "all" else f"{m[0]}-{m[1]}"
            point.eval, point.compare, point.save_mask, point.mode, point.theta, point.m = False, False, False, \
                "lipar", theta, m
            point.out = str(out.parent / "sweep" / f"{out.stem}_theta{theta:g}_m{window}.mp4")
            sample.check_outputs(point)
            with io.VideoReader(args.video) as reader:
                result = sample.stream_edit(point, models, reader, [], context=context,
                                            fidelity=Fidelity(reference=fidelity.reference))
            stats["sweep"].append({"theta": theta, "m": window_json(m), "output": point.out,
                                   **result["modes"]["lipar"]})
    partial = stats_path(job).with_name(f".{stats_path(job).name}.partial")
    partial.write_text(json.dumps(stats, indent=2))
    partial.replace(stats_path(job))  # whole or absent: a rerun trusts it
    return stats


def start_distributed(args):
    """(rank, world size): under torchrun, one process per GPU (NCCL) or per CPU process
    (gloo); torch.distributed is used only to know the rank and to gather the stats."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # a rank that has finished its share waits in the gather for the others, which may
    # take hours on a long manifest: far past the default timeout (10 min for NCCL)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(days=1))
    return dist.get_rank(), world


def gather(value, world):
    """Every rank's value, in rank order (on every rank)."""
    if world == 1:
        return [value]
    import torch.distributed as dist
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def run(args, dtype, have_weights):
    """sample.py --manifest / --eval: every job, then (rank 0) the summary and report.
    Returns the exit code: 1 when any job failed."""
    rank, world = start_distributed(args)
    say = print if rank == 0 and world == 1 else (lambda *a, **k: print(f"[rank {rank}]", *a, **k))
    if args.manifest:
        folder = Path(args.out or Path("results") / Path(args.manifest).stem)
    else:
        folder = Path(args.out or Path("results") / "eval_demo")
    folder.mkdir(parents=True, exist_ok=True)
    models = sample.Models(args.weights if have_weights else None, args.device, dtype,
                           args.text_device or args.device, use_graphs=not args.no_graphs, vae=args.vae)
    if models.random:
        args.height, args.width = args.height or 240, args.width or 416  # as the demo: a CPU minute a clip
        say("No weights: tiny RANDOM-weight models. Every number is real, the pixels are not an edit.")
    notes = []
    sample.settle_size(args, notes)
    for note in notes:
        say(f"note: {note}")
    base = copy.copy(args)
    base.out = None
    if args.manifest:
        jobs, failures = read_manifest(args.manifest, base, folder)
    else:
        jobs, failures = demo_jobs(base, folder), []
    if not jobs and not failures:
        raise sample.UsageError(f"the manifest {args.manifest} holds no jobs; write one per line, e.g. "
                                '{"video": "clip.mp4", "prompt": "..."}, or a .csv with a header row')
    mine = jobs[rank::world]
    results, todo = {}, []
    for job in mine:
        done = None if args.overwrite else finished(job)
        if done:
            results[job.name] = done
            say(f"{job.name}: finished before, skipped (--overwrite redoes it)")
        else:
            todo.append(job)
    device = torch.device(args.device)
    contexts = sample.encode_prompts(models.text_encoder, [j.args.prompt for j in todo], device,
                                     models.dtype) if todo else {}
    for i, job in enumerate(todo, 1):
        try:
            sample.check_outputs(job.args)
            stats = run_job(job, models, contexts[job.args.prompt])
        except (sample.UsageError, io.VideoError) as err:
            failures.append({"line": job.line, "name": job.name, "error": str(err)})
            say(f"[{i}/{len(todo)}] {job.name} (line {job.line}) failed: {err}")
            continue
        results[job.name] = stats
        say(f"[{i}/{len(todo)}] {job.name}: " + "; ".join(
            f"{mode} pruned {s['prune_ratio']:.1%}, DiT {s['dit_fps']:.1f} frames/s" for mode, s in stats["modes"].items()))
    merged, all_failures = {}, []
    # every rank read the whole manifest: its unreadable lines are sent once, by rank 0;
    # the jobs that failed while running (they have a name) by the rank that ran them
    ran_failures = [f for f in failures if "name" in f]
    for part_results, part_failures in gather((results, failures if rank == 0 else ran_failures), world):
        merged.update(part_results)
        all_failures += part_failures
    if rank == 0:
        setup = {"device": args.device, "dtype": str(models.dtype).removeprefix("torch."), "vae": args.vae,
                 "random_weights": models.random, "height": args.height, "width": args.width}
        summarize(folder, jobs, merged, all_failures, args, world, setup)
    finish_distributed(world)
    # the exit code is rank 0's: torchrun stops every process when one ends in failure,
    # which would cut rank 0 off while it writes the report
    return 1 if all_failures and rank == 0 else 0


def summarize(folder, jobs, merged, failures, args, world, setup):
    """Rank 0: the summary lines and, with --eval, the report."""
    failures.sort(key=lambda f: f["line"])
    done = [job for job in jobs if job.name in merged]
    print(f"{len(done)} of {len(jobs) + sum('name' not in f for f in failures)} jobs edited"
          + (f" ({world} processes)" if world > 1 else ""))
    for f in failures:
        print(f"line {f['line']}: {f['error']}")
    if args.eval:
        report = write_report(folder, [merged[j.name] for j in done], failures, args, setup)
        print(f"wrote {report} and {report.with_suffix('.json').name}")


def finish_distributed(world):
    """Every process waits for rank 0's report, then leaves the group together."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# The report


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
              "modes": modes, "overall": overall(rows, modes), "clips": rows, "sweep": sweep_table(rows),
              "failed": failures}
    report["plots"] = plots(folder, rows, report["sweep"])
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    path = folder / "report.md"
    path.write_text(report_markdown(report))
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
             "The first clip's DiT time includes capturing the CUDA graphs, when they are used.", ""]
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
    lines += ["", "## Per clip", "",
              "| clip | frames | mode | pruned | per chunk | DiT frames/s | DiT speedup | end-to-end frames/s "
              "| peak GPU GiB | PSNR dB | SSIM | latent rel. error |", "|" + " --- |" * 12]
    for r in report["clips"]:
        for mode, m in r["modes"].items():
            f = m["fidelity_to_full"] or {}
            chunks = " ".join(f"{c:.0%}" for c in m["prune_ratio_per_chunk"])
            lines.append(f"| {r['name']} | {r['frames']} | {mode} | {m['prune_ratio']:.1%} | {chunks} "
                         f"| {m['dit_fps']:.1f} | {fmt(m['dit_speedup'], '.2f')}x | {m['end_to_end_fps']:.1f} "
                         f"| {fmt(r['peak_gpu_memory_gib'], '.2f')} | {fmt(f.get('psnr_db'), '.2f')} "
                         f"| {fmt(f.get('ssim'), '.4f')} | {fmt(f.get('latent_rel_error'), '.4f')} |")
    if report["sweep"]:
        lines += ["", "## Sweep over θ and the window m (LIPAR, mean over clips)", "",
                  "| θ | m | pruned | DiT speedup | PSNR dB | SSIM | latent rel. error |", "|" + " --- |" * 7]
        for p in report["sweep"]:
            m = p["m"] if p["m"] == "all" else ",".join(map(str, p["m"]))
            lines.append(f"| {p['theta']:g} | {m} | {p['prune_ratio']:.1%} | {fmt(p['dit_speedup'], '.2f')}x "
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
        fig.savefig(folder / name, dpi=80)
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
