"""Many edits in one command, and the paper's evaluation, as DiT's sample_ddp.py stands
beside its sample.py:

    python evaluate.py --manifest jobs.jsonl                 # a batch: each job as sample.py would edit it
    python evaluate.py --manifest jobs.jsonl --eval          # full and lipar per job, fidelity, report
    python evaluate.py --eval                                # the same on the embedded demo clips
    torchrun --nproc-per-node 4 evaluate.py --manifest jobs.jsonl --eval   # the jobs split over 4 GPUs

The models are loaded once (per GPU), every distinct prompt is encoded with one load of
the text encoder, which is freed before the DiT arrives, and the DiT's CUDA graphs
and compiled code serve clip after clip. Each job is one streamed edit
(sample.edit_video); with --eval its modes run side by side from the same noise and
are measured against `full` (metrics.py), and a sweep over θ and the window m re-runs
LIPAR against the `full` edit kept from the first run. A job's stats are written
beside its video as <name>.json: a rerun skips finished jobs and rebuilds the report.
"""

if __name__ == "__main__":  # Ctrl-C, SIGTERM or SIGHUP while Python loads: one line, nothing written
    import signals
    signals.quiet_until_started()

import argparse  # noqa: E402 (the lines above come first)
import copy
import csv
import datetime
import itertools
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import cli
import demo
import files
import model as M
import sample
import signals
import stream
import video as io
from metrics import Fidelity
from report import write_report

FIELDS = ("video", "video_path", "prompt", "name", "out", "seed", "mode", "modes", "theta", "theta2", "m", "mask_lookahead",
          "tape_ratio")
DEMO_CLIPS = ("ball", "ball_backwards", "still")


@dataclass
class Job:
    line: int                  # in the manifest, for messages (a CSV's header is line 1)
    name: str                  # unique in the manifest: the job's outputs and its row in the report
    video: str
    out: str                   # the job's main output; several modes add _<mode> to its name
    settings: cli.EditSettings


def parser():
    p = cli.Parser(description="Edit many videos with the models loaded once; with --eval, the "
                                "paper's evaluation (fidelity to full, speed, a report).",
                   formatter_class=cli.HelpFormatter)
    p.add_argument("--manifest", help="a .jsonl (or .json: JSON lines or one array) or .csv of jobs (video or "
                   "video_path, prompt, optional name, out, seed, mode, modes, theta, theta2, m, mask_lookahead, "
                   "tape_ratio; README: Reproduce the paper's table); without one, --eval runs on the embedded "
                   "demo clips")
    p.add_argument("--root", help="the folder the manifest's relative video paths start from (default: the "
                   "manifest's folder; the authors' davis_prompt.json: their repository's root)")
    p.add_argument("--out", help="the results folder (default results/<manifest name>, or results/eval_demo)")
    p.add_argument("--mode", choices=cli.MODES, help="the mode of a batch without --eval (default lipar)")
    p.add_argument("--eval", action="store_true",
                   help="evaluate: each job in --eval-modes from the same noise, fidelity to full (PSNR, SSIM, "
                        "latent error), report.md/json with plots")
    p.add_argument("--eval-modes", nargs="+", choices=cli.MODES, metavar="MODE",
                   help=f"modes --eval runs, full among them ({', '.join(cli.MODES)}; default full lipar)")
    p.add_argument("--sweep-theta", nargs="+", type=float, metavar="THETA",
                   help="with --eval, also run lipar at each θ (speed–fidelity trade-off)")
    p.add_argument("--sweep-m", nargs="+", type=cli.parse_window, metavar="SINK,RECENT",
                   help="with --eval, also run lipar with each window (with --sweep-theta: every pair)")
    cli.add_edit_flags(p)
    return p


def parse(argv=None):
    """evaluate.py's flags: (args, the modes of a job), every problem refused in one UsageError."""
    args = parser().parse_args(argv)
    problems = []
    if args.manifest:
        path = Path(args.manifest)
        if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
            problems.append(f"--manifest {path}: give a .jsonl or .json (JSON objects, one a line, or an array of "
                            "them) or a .csv with a header row")
        elif not path.is_file():
            problems.append(f"the manifest {path} does not exist; check the path")
    elif not args.eval:
        problems.append("give a --manifest of jobs, or --eval to evaluate on the embedded demo clips")
    if args.root is not None and not Path(args.root).is_dir():
        problems.append(f"--root {args.root} is not a folder; give the folder the manifest's video paths start from")
    if args.root is not None and not args.manifest:
        problems.append("--root places a manifest's videos; give --manifest or drop --root")
    if args.out == io.STDIO or (args.out and Path(args.out).suffix):
        problems.append(f"--out {args.out}: evaluate.py writes a results folder; give a folder")
    if args.eval:
        if args.mode is not None:
            problems.append("--mode and --eval: --eval runs the modes of --eval-modes; drop --mode")
        if args.eval_modes and "full" not in args.eval_modes:
            problems.append("--eval-modes needs full: the other modes are measured against it")
    else:
        for flag, value in (("--eval-modes", args.eval_modes), ("--sweep-theta", args.sweep_theta),
                            ("--sweep-m", args.sweep_m)):
            if value:
                problems.append(f"{flag} is part of --eval; add --eval or drop it")
    for theta in args.sweep_theta or []:
        if cli.not_a_threshold(theta):
            problems.append(f"--sweep-theta {theta} is not a threshold; give numbers >= 0")
    problems += [problem for m in args.sweep_m or [] if (problem := cli.window_problem("--sweep-m", m))]
    modes = list(dict.fromkeys(args.eval_modes or ["full", "lipar"])) if args.eval else [args.mode or "lipar"]
    problems += cli.edit_settings(args, modes)[1]
    cli.refuse(problems)
    return args, modes


# -----------------------------------------------------------------------------
# The manifest


def read_records(path):
    """[(line, {field: value})] from a .jsonl (one JSON object a line; blank lines and
    lines starting with # are skipped) or a .csv (a header row naming the fields;
    empty cells are absent fields). A line that cannot be read gives {"": error}."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise cli.UsageError(f"the manifest {path} is not UTF-8 text (byte {err.start} cannot be read); save it as "
                             "UTF-8") from None
    except OSError as err:
        raise cli.UsageError(f"cannot read the manifest {path} ({err.strerror}); check the path") from None
    records = []
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # one array of objects
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as err:
            raise cli.UsageError(f"the manifest {path} is not JSON ({err.msg} at line {err.lineno}); write one "
                                 "array of jobs or one job a line") from None
        return [(i, e if isinstance(e, dict) else {"": "it is not a JSON object; write {\"video\": ..., "
                                                       "\"prompt\": ...}"}) for i, e in enumerate(entries, 1)]
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


def whole_number(value):
    """A manifest's integer: a JSON integer or its digits as text (a CSV cell), never 1.7 or true."""
    if isinstance(value, (bool, float)):
        raise ValueError(value)
    return int(value)


def real_number(value):
    """A manifest's number: a JSON number or its digits as text, never true."""
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


def window(value):
    """A manifest's window: "1,6", [1, 6] or "all"."""
    if isinstance(value, list):
        value = ",".join(str(whole_number(v)) for v in value)
    if not isinstance(value, str):
        raise ValueError(value)
    return cli.parse_window(value)


TEXT_FIELDS = ("video", "prompt", "name", "out", "mode")
CONVERTERS = {"seed": (whole_number, "a whole number"), "theta": (real_number, "a number"),
              "theta2": (real_number, "a number"), "mask_lookahead": (whole_number, "a whole number"),
              "tape_ratio": (real_number, "a number"), "m": (window, "a window SINK,RECENT")}


def job_settings(record, base, modes, manifest_folder, root=None):
    """(video, out or None, EditSettings) of one manifest record, or (None, what is
    wrong): the record's fields override the command's flags in `base`, and are checked
    as those flags are. A relative video path starts from `root`, else from the
    manifest's folder; `video_path` (the authors' key) stands for `video`."""
    if "" in record:
        return None, record[""]
    if "video_path" in record:
        if "video" in record:
            return None, "both video and video_path; give one of them"
        record = {("video" if k == "video_path" else k): v for k, v in record.items()}
    unknown = [k for k in record if k not in FIELDS]
    if unknown:
        return None, f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}"
    record = {k: v for k, v in record.items() if v is not None}  # JSON's null: the field is absent
    not_text = [k for k in TEXT_FIELDS if k in record and not isinstance(record[k], str)]
    if not_text:
        return None, f"{not_text[0]} {record[not_text[0]]!r} is not text; write it as a JSON string, in quotes"
    missing = [k for k in ("video", "prompt") if not record.get(k, "").strip()]  # blank is missing
    if missing:
        return None, f"no {' and no '.join(missing)}; every job needs a video and a prompt"
    args = copy.copy(base)
    args.prompt = record["prompt"]
    for key, (convert, kind) in CONVERTERS.items():
        if key in record:
            try:
                setattr(args, key, convert(record[key]))
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                return None, f"{key} {record[key]!r} is not {kind}"
    if args.mask_lookahead not in (None, 0, 1):
        return None, f"mask_lookahead {args.mask_lookahead} is not 0 or 1"
    if "mode" in record:
        if record["mode"] not in cli.MODES:
            return None, f"mode {record['mode']!r} is not one of {', '.join(cli.MODES)}"
        modes = [record["mode"]] if len(modes) == 1 else modes
    if "modes" in record:
        listed = record["modes"].split() if isinstance(record["modes"], str) else record["modes"]
        bad = [m for m in listed if m not in cli.MODES] if isinstance(listed, list) else [listed]
        if bad or "full" not in listed:
            return None, (f"modes {record['modes']!r}: give modes from {', '.join(cli.MODES)}, "
                          "full among them (the reference the others are measured against)")
        modes = list(dict.fromkeys(listed))
    video = str(resolve(record["video"], Path(root) if root else manifest_folder))
    settings, problems = cli.edit_settings(args, modes)
    if (missing_video := cli.input_problems(video)) and not Path(record["video"]).expanduser().is_absolute():
        missing_video = [missing_video[0] + f" (a relative path starts from {'--root' if root else 'the manifest'}'s "
                         "folder; --root sets another)"]
    problems += missing_video
    if problems:
        return None, problems[0]
    settings.height, settings.width = base.height, base.width
    out = str(resolve(record["out"], manifest_folder)) if record.get("out") else None
    return (video, out, settings), None


RESERVED = {"report", "clips", "sweep"}  # the report's own files and folders in the results folder


def safe_name(name):
    """A job's name as a file name that stays in the results folder: letters, digits,
    '.', '-' and '_' (anything else, a path separator among them, becomes '_'), not
    starting with a dot."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in name).lstrip(".")
    return safe[:100] or "job"


def resolve(path, folder):
    """A manifest's paths are relative to the manifest's own folder."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else folder / path


def read_manifest(path, base, modes, folder):
    """(jobs, failures) of a manifest: a failure is {"line", "error"} for a line that
    cannot be run; the other jobs still run. Names are unique (a clip's second prompt,
    or a second clip.mp4, becomes clip_2)."""
    jobs, failures, taken = [], [], set(RESERVED)
    for line, record in read_records(path):
        job, error = job_settings(record, base, modes, Path(path).parent, getattr(base, "root", None))
        if error:
            failures.append({"line": line, "error": error})
            continue
        video, out, settings = job
        name = stem = safe_name(str(record.get("name") or Path(video).stem))
        for n in itertools.count(2):
            if name not in taken:
                break
            name = f"{stem}_{n}"
        taken.add(name)
        jobs.append(Job(line, name, video, out or str(folder / f"{name}.mp4"), settings))
    return jobs, failures


def demo_jobs(base, modes, folder):
    """--eval without a manifest: three clips of the embedded demo scene (the ball
    rolling, the same backwards, and its first frame held still: from some pruning to
    nearly all), written once under <folder>/clips."""
    clips = folder / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    frames = demo.demo_frames()
    scenes = {"ball": frames, "ball_backwards": frames.flip(0), "still": frames[:1].expand_as(frames)}
    settings = cli.edit_settings(base, modes)[0]
    settings.height, settings.width = base.height, base.width
    jobs = []
    for line, name in enumerate(DEMO_CLIPS, 1):
        path = clips / f"{name}.mp4"
        if not path.exists():
            io.write_video(path, scenes[name], demo.DEMO_FPS)
        jobs.append(Job(line, name, str(path), str(folder / f"{name}.mp4"), copy.deepcopy(settings)))
    return jobs


# -----------------------------------------------------------------------------
# Running the jobs


def signature(job, args):
    """What a job's result depends on: a finished job is redone when this changes."""
    s = job.settings
    return {"video": job.video, "prompt": s.prompt, "seed": s.seed, "theta": s.theta, "theta2": s.theta2,
            "m": cli.window_json(s.window), "mask_lookahead": s.mask_lookahead, "modes": s.modes, "vae": s.vae,
            "recipe": s.recipe.name,
            "tape": asdict(s.tape), "height": s.height, "width": s.width,
            "sweep_theta": args.sweep_theta, "sweep_m": [cli.window_json(m) for m in args.sweep_m or []]}


def job_outputs(job):
    """{mode: path}: the job's out, or with several modes <out>_<mode>.mp4 each."""
    out = Path(job.out)
    several = len(job.settings.modes) > 1
    return {mode: out.with_name(f"{out.stem}_{mode}{out.suffix or '.mp4'}") if several else out
            for mode in job.settings.modes}


def check_job_outputs(job, args):
    """The job's videos and stats, checked as sample.py checks its outputs (cli.check_paths)."""
    named = [(f"the {mode} output", path) for mode, path in job_outputs(job).items()]
    cli.check_paths(named + [("the stats", stats_path(job))], [job.video], args.weights, args.overwrite)


def check_inputs_kept(jobs, manifest, folder):
    """Refuse, before any work, a run that would write over what it reads: a job's video,
    stats or the report on the manifest, or one job's output on another job's video."""
    inputs = {}  # file key -> what reads it (files.file_keys: one lookup per output, however many jobs)
    for source, path in ([("the manifest", manifest)] if manifest else []) + [(f"the video of {j.name}", j.video)
                                                                             for j in jobs]:
        inputs.update((key, source) for key in files.file_keys(path) if key not in inputs)
    written = [(f"the report {folder / name}", folder / name) for name in ("report.json", "report.md")]
    written += [(f"{j.name}'s output {path}", path) for j in jobs for path in [*job_outputs(j).values(), stats_path(j)]]
    for what, path in written:
        if source := next((inputs[key] for key in files.file_keys(path) if key in inputs), None):
            raise cli.UsageError(f"{what} would replace {source}; give that job another \"out\" (or the run "
                                 "another --out folder)")


def stats_path(job):
    return Path(job.out).with_suffix(".json")


def finished(job, args):
    """The job's stats from an earlier run when every output it wrote is still there and
    its settings are the same; None otherwise."""
    try:
        stats = json.loads(stats_path(job).read_text())
    except (OSError, ValueError):
        return None
    if stats.get("job") != signature(job, args) or not all(Path(p).exists() for p in stats_outputs(stats)):
        return None
    return stats


def stats_outputs(stats):
    return list(stats.get("outputs", {}).values()) + [p["output"] for p in stats.get("sweep", [])]


def edit(job, settings, outputs, models, context, fidelity, overwrite):
    """One streamed edit of the job's video (sample.edit_video)."""
    clock = stream.Stopwatch(models.device)
    with io.VideoReader(job.video) as reader:
        return sample.edit_video(reader, models, context, settings, outputs, clock, [], fidelity=fidelity,
                                 overwrite=overwrite)


def run_job(job, args, models, context):
    """One job's edit (and its sweep); returns its stats, also written to <out>.json."""
    sweep = args.eval and (args.sweep_theta or args.sweep_m)
    fidelity = Fidelity(reference=[] if sweep else None) if args.eval else None
    check_job_outputs(job, args)
    try:
        return edit_job(job, args, models, context, fidelity, sweep)
    except stream.Interrupted as stop:  # a job's videos without its stats are no result: a rerun redoes it
        for path in stop.kept:
            Path(path).unlink(missing_ok=True)
        raise


def edit_job(job, args, models, context, fidelity, sweep):
    stats = edit(job, job.settings, job_outputs(job), models, context, fidelity, args.overwrite)
    stats["name"], stats["line"], stats["job"], stats["sweep"] = job.name, job.line, signature(job, args), []
    if sweep:
        out = Path(job.out)
        for theta, m in itertools.product(args.sweep_theta or [job.settings.theta],
                                          args.sweep_m or [job.settings.window or "all"]):
            window = None if m == "all" else tuple(m)
            point = replace(job.settings, modes=["lipar"], theta=theta, window=window)
            output = out.parent / "sweep" / f"{out.stem}_theta{theta:g}_m{cli.window_text(m).replace(',', '-')}.mp4"
            cli.check_paths([("the sweep's output", output)], [job.video], args.weights, args.overwrite)
            result = edit(job, point, {"lipar": output}, models, context, Fidelity(reference=fidelity.reference),
                          args.overwrite)
            stats["sweep"].append({"theta": theta, "m": cli.window_json(window), "output": str(output),
                                   **result["modes"]["lipar"]})
    files.write_text(stats_path(job), json.dumps(stats, indent=2), args.overwrite)  # whole or absent: a rerun trusts it
    return stats


def start_distributed(device):
    """(rank, world size): under torchrun, one process per GPU (NCCL) or per CPU process
    (gloo); torch.distributed is used only to know the rank and to gather the stats."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    cuda = torch.device(device).type == "cuda"
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


def main(argv=None):
    """Every job, then (rank 0) the summary and report. Returns the exit code: 1 when any job failed."""
    args, modes = parse(argv)
    rank, world = start_distributed(args.device)
    say = print if rank == 0 and world == 1 else (lambda *a, **k: print(f"[rank {rank}]", *a, **k))
    folder = Path(args.out or Path("results") / (Path(args.manifest).stem if args.manifest else "eval_demo"))
    weights = args.weights if Path(args.weights).exists() else None
    if weights is None and args.manifest:
        raise cli.UsageError(f"no weights at {args.weights}; download them as weights.md says (or run "
                             "`python evaluate.py --eval` for the random-weight demo clips)")
    if problem := files.folder_problem(folder):
        raise cli.UsageError(f"--out {folder}: {problem}")
    if weights and folder.resolve().is_relative_to(Path(weights).resolve()):
        raise cli.UsageError(f"--out {folder} is inside the weights folder {weights}; choose another results folder")
    settings = cli.edit_settings(args, modes)[0]
    models = sample.Models(weights, args.device, cli.model_dtype(args), args.text_device or args.device,
                           use_graphs=not args.no_graphs, vae=settings.vae, fp8=args.fp8)
    if models.random:
        args.height, args.width = args.height or 240, args.width or 416  # as the demo: a CPU minute a clip
        say("No weights: tiny RANDOM-weight models. Every number is real, the pixels are not an edit.")
    notes = []
    cli.settle_size(args, notes)
    for note in notes:
        say(f"note: {note}")
    if args.manifest:
        jobs, failures = read_manifest(args.manifest, args, modes, folder)
    else:
        jobs, failures = demo_jobs(args, modes, folder), []
    if not jobs and not failures:
        raise cli.UsageError(f"the manifest {args.manifest} holds no jobs; write one per line, e.g. "
                             '{"video": "clip.mp4", "prompt": "..."}, or a .csv with a header row')
    check_inputs_kept(jobs, args.manifest, folder)
    try:
        files.prepare_folder(folder / "report.md")
    except files.OutputError as err:
        raise cli.UsageError(str(err)) from None
    mine = jobs[rank::world]
    results, todo = {}, []
    for job in mine:
        done = None if args.overwrite else finished(job, args)
        if done:
            results[job.name] = done
            say(f"{job.name}: finished before, skipped (--overwrite redoes it)")
        else:
            todo.append(job)
    contexts = sample.encode_prompts(models.text_encoder, [j.settings.prompt for j in todo], torch.device(args.device),
                                     models.dtype) if todo else {}
    edited = 0
    try:
        with M.fusion(cli.fusion(args)):
            for i, job in enumerate(todo, 1):
                try:
                    stats = run_job(job, args, models, contexts[job.settings.prompt])
                except (cli.UsageError, io.VideoError) as err:
                    failures.append({"line": job.line, "name": job.name, "error": str(err)})
                    say(f"[{i}/{len(todo)}] {job.name} (line {job.line}) failed: {err}")
                    continue
                results[job.name], edited = stats, edited + 1
                say(f"[{i}/{len(todo)}] {job.name}: " + "; ".join(
                    f"{mode} pruned {s['prune_ratio']:.1%}, DiT {s['dit_fps']:.1f} frames/s"
                    for mode, s in stats["modes"].items()))
    except (stream.Interrupted, KeyboardInterrupt) as stop:  # Ctrl-C, SIGTERM, SIGHUP (signals.py)
        why = stop.why if isinstance(stop, stream.Interrupted) else \
            f"stopped by {stop}" if isinstance(stop, signals.Terminated) else "interrupted"
        raise stream.Interrupted(
            f"{why}: {edited} of the {len(todo)} jobs to do were edited, each kept with its stats in {folder} (a "
            "stopped job's partial videos are removed); the same command again edits the rest",
            getattr(stop, "code", 130), why) from None
    merged, all_failures = {}, []
    # every rank read the whole manifest: its unreadable lines are sent once, by rank 0;
    # the jobs that failed while running (they have a name) by the rank that ran them
    ran_failures = [f for f in failures if "name" in f]
    for part_results, part_failures in gather((results, failures if rank == 0 else ran_failures), world):
        merged.update(part_results)
        all_failures += part_failures
    if rank == 0:
        setup = {"device": args.device, "dtype": str(models.dtype).removeprefix("torch."), "vae": settings.vae,
                 "random_weights": models.random, "height": args.height, "width": args.width,
                 "recipe": {"name": settings.recipe.name} | settings.recipe.choices()}
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


if __name__ == "__main__":  # every output is closed (a stopped job's removed): end without the teardown,
    signals.exit_at_once(cli.guarded(main))  # in which a run stopped by SIGTERM could crash (SIGSEGV) after its line
