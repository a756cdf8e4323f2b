"""
The command line of sample.py, and the edit flags evaluate.py shares with it: the
flags, their checks (every problem one sentence, exit code 2), the outputs' names
and frames, and the guard that turns bad input into one sentence (an edit's stats and
its printed summary: summary.py). What it needs comes in as arguments; it imports
none of the sampler.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import demo
import files
import lipar
import prompts
import signals
import stream
import tape as T
import video as io
from weights import WeightsError

MODES = lipar.MODES + ("tape",)  # LIPAR, the baseline and the ablations; TAPE for comparison (tape.py)
MASK_MODES = set(lipar.MODES) - {"full"}  # the modes that compute LIPAR's mask


class UsageError(Exception):
    """Bad input the user can fix; the message says how."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help with "(default: X)" added where a flag has a default to show; a
    flag whose default depends on others (None) says so in its own help."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not hidden and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse, with its errors (an unknown flag, a value not among the choices) raised
    as a UsageError: one sentence and exit code 2, like every other problem."""

    def error(self, message):
        raise UsageError(f"{message} (python {self.prog} --help lists them)")


@dataclass
class EditSettings:
    """What one edit does, whatever drives it (sample.py, evaluate.py, bench.py)."""
    prompt: str
    modes: list                      # run side by side from the same noise
    vae: str = "wan"                 # "wan" or "tiny"
    height: int = 480
    width: int = 832
    seed: int = 0
    window: tuple | None = (1, 6)    # M-degree window (m_sink, m_recent); None: the whole causal cache
    theta: float = 0.149             # Eq. 1 threshold
    theta2: float = 0.3              # Eq. 5-6 substitute bound
    mask_lookahead: int = 1          # latent frames the mask's medians and dilation see ahead
    tape: T.TapeConfig = field(default_factory=T.TapeConfig)
    recipe: lipar.Recipe = field(default_factory=lipar.Recipe)  # the authors' releases' choices, or ours
    prompt_at: list = field(default_factory=list)  # [(video frame, prompt)]: prompt changes (prompts.py)


MAX_SIDE, MAX_PIXELS = 2048, 1920 * 1088  # the largest model size taken: 1080p (the model's own is 832x480)
MAX_WINDOW = 21  # latent frames: Self-Forcing's positions run 0..20, and a window rolls inside them
MAX_SEED = 2**63 - 1

# Flags that only mean something in some modes default to None, so that one given
# where it has no effect is refused rather than silently ignored.
MODE_FLAGS = {"theta": 0.149, "theta2": 0.3, "mask_lookahead": 1, "m": (1, 6),
              "tape_ratio": 0.3, "tape_alpha": 0.5, "tape_delta": 0.1, "tape_every": 10,
              "tape_selections": None}


def parse_window(text):
    if text == "all":
        return text
    try:
        sink, recent = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--m takes 'SINK,RECENT' (e.g. 1,6) or 'all', not {text!r}") from None
    return sink, recent


def prompt_change(text):
    try:
        return prompts.parse_prompt_at(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def window_text(window):
    """A window as flags and reports write it: "1,6", or "all" for the whole cache."""
    return "all" if window in ("all", None) else f"{window[0]},{window[1]}"


def window_json(window):
    """A window as JSON holds it (and a job's stats are compared): "all" or [SINK, RECENT]."""
    return "all" if window in ("all", None) else list(window)


def add_edit_flags(p):
    """The flags of one edit, shared by sample.py and evaluate.py."""
    p.add_argument("--prompt", default=demo.DEFAULT_PROMPT, help="what the edited video should show")
    p.add_argument("--weights", default="weights", help="folder laid out as weights.md says")
    p.add_argument("--recipe", choices=list(lipar.RECIPES), default="ours",
                   help="paper: every choice of the authors' first release, which the paper's numbers come from; "
                        "authors: their later code's; ours: theirs plus Eq. 5-6 once more after the cleanup (README, "
                        "'Recipes')")
    p.add_argument("--vae", choices=["wan", "tiny"], default=None,
                   help="wan: the Wan 2.1 VAE; tiny: TAEHV (taew2_1), about 20x cheaper, a little less faithful "
                        "(default: wan when weights/vae exists, else tiny when weights/tiny_vae does)")
    p.add_argument("--theta", type=float, help="prune threshold θ on the robust patch L1 (Eq. 1; default 0.149)")
    p.add_argument("--theta2", type=float, help="substitute bound θ2 (Eq. 5-6; default 0.3, inf turns it off)")
    p.add_argument("--mask-lookahead", type=int, choices=[0, 1],
                   help="latent frames the mask's medians and dilation see ahead: 1 as the authors' code (the "
                        "paper's numbers; the default), 0 strictly causal (kept regions linger 3 frames longer)")
    p.add_argument("--m", type=parse_window,
                   help="M-degree window 'SINK,RECENT' in latent frames, or 'all' for the whole cache (default 1,6)")
    p.add_argument("--tape-ratio", type=float,
                   help="tape: the share of tokens skipped between selections, the mean over the steps (default 0.3)")
    p.add_argument("--tape-alpha", type=float,
                   help="tape: smoothing weight α of the current frame's scores, s̃ = α·s + (1 − α)·s̃_prev: "
                        "smaller leans on the previous frame (default 0.5)")
    p.add_argument("--tape-delta", type=float,
                   help="tape: HighLow budget, the ratio runs from R + δ at the first step to R − δ (default 0.1)")
    p.add_argument("--tape-every", type=int,
                   help="tape: blocks from one selection to the next (default 10: TAPE's 'every 10 layers', 3 "
                        "selections of Wan's 30 blocks)")
    p.add_argument("--tape-selections", type=int,
                   help="tape: the selections instead, spread evenly over the blocks (5: TAPE's chosen count; "
                        "instead of --tape-every)")
    p.add_argument("--seed", type=int, default=0, help="the noise's seed, 0 to 2**63 - 1: one seed, one edit")
    p.add_argument("--height", type=int, default=None, help="model height, a multiple of 16 (default 480)")
    p.add_argument("--width", type=int, default=None, help="model width, a multiple of 16 (default 832)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="model precision (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--text-device", default=None, help="where the text encoder runs (default: --device)")
    p.add_argument("--no-graphs", action="store_true",
                   help="run the DiT op by op instead of replaying captured CUDA graphs (graphs.py; CUDA only)")
    p.add_argument("--fp8", action="store_true",
                   help="the DiT's feed-forward products in fp8 (e4m3, fp8.py): faster on GPUs with fp8 products "
                        "(compute capability 8.9+: Ada, Hopper), at a small error (BENCHMARKS.md)")
    p.add_argument("--fusion", choices=["triton", "compile", "off"],
                   help="how the elementwise chains of the DiT and the VAE run on CUDA: triton, hand-fused "
                        "kernels (triton_ops.py; compiled once per machine into Triton's cache, then loaded in "
                        "milliseconds; the default); compile, torch.compile in this process (15-50 s per process); "
                        "off, op by op")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def parser():
    p = Parser(description="Edit a video with LIPAR on Self-Forcing (Wan 2.1 T2V 1.3B). Many "
                           "videos, or the paper's evaluation: evaluate.py.",
                formatter_class=HelpFormatter)
    p.add_argument("--video", help="input video (mp4, mov, mkv, webm, gif; a file or a named pipe), a camera device, or - for standard input; "
                   "default: a generated demo clip")
    p.add_argument("--out", help="output mp4, or - for standard output (default: results/<input>_<mode>.mp4)")
    p.add_argument("--mode", choices=MODES,
                   help="lipar: the method (the default); full: the Self-Forcing baseline; naive / noisy_dup: "
                        "ablations; tape: TAPE's attention-importance pruning, for comparison (README)")
    add_edit_flags(p)
    p.add_argument("--prompt-at", action="append", type=prompt_change, metavar="FRAME:PROMPT",
                   help="change the prompt from this video frame on (at the chunk boundary at or after it; the KV "
                        "cache is re-cached under the new prompt, no cut); repeat for several changes")
    p.add_argument("--compare", action="store_true",
                   help="run full and lipar from the same noise; write a side-by-side video and their PSNR")
    p.add_argument("--save-mask", action="store_true", help="write the input with pruned patches greyed out")
    p.add_argument("--json", help="write all stats to this JSON file, or - for standard output (the summary "
                   "then goes to standard error)")
    p.add_argument("--check-weights", action="store_true", help="verify the weights folder (names, shapes) and exit")
    p.add_argument("--convert-checkpoint", nargs=2, metavar=("PT", "SAFETENSORS"),
                   help="convert Self-Forcing's self_forcing_dmd.pt to safetensors once, and exit")
    return p


def parse(argv=None):
    """sample.py's flags: (args, EditSettings, notes), every problem refused in one UsageError."""
    p = parser()
    args = p.parse_args(argv)
    tool = "check_weights" if args.check_weights else "convert_checkpoint" if args.convert_checkpoint else None
    if tool:  # it reads --weights (--check-weights) or writes its target (--overwrite); any other flag is an edit's
        takes = {"check_weights": {"check_weights", "weights"}, "convert_checkpoint": {"convert_checkpoint", "overwrite"}}
        given = ["--" + name.replace("_", "-") for name, value in vars(args).items()
                 if name not in takes[tool] and value != p.get_default(name)]
        if given:
            raise UsageError(f"--{tool.replace('_', '-')} runs on its own and edits nothing; drop {', '.join(given)}")
    if args.compare and args.mode is not None:
        raise UsageError(f"--compare runs full and lipar side by side; drop --mode {args.mode}")
    if args.video is None and not (args.check_weights or args.convert_checkpoint):
        # the demo: both modes side by side (or the one --mode), the mask, at CPU size
        args.compare, args.save_mask, args.overwrite = args.mode is None, True, True
        if not Path(args.weights).exists():
            args.height, args.width = args.height or 240, args.width or 416
    modes = ["full", "lipar"] if args.compare else [args.mode or "lipar"]
    settings, problems = edit_settings(args, modes, mask_preview=args.save_mask)
    if problem := prompt_problem(args.prompt):
        problems.append(problem)
    problems += output_problems(args) + input_problems(args.video)
    refuse(problems)
    notes = []
    if args.dtype in ("bfloat16", "float16") and torch.device(args.device).type == "cpu":
        print(f"note: --dtype {args.dtype} on the CPU runs through PyTorch's slow fallbacks, many times float32's "
              "time (the CPU's default); for speed drop --dtype or give --device cuda", file=sys.stderr)
    settle_size(settings, notes)
    return args, settings, notes


def refuse(problems):
    if problems:
        raise UsageError(problems[0] if len(problems) == 1 else
                         f"{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))


def edit_settings(args, modes, mask_preview=False):
    """(EditSettings, problems) of one edit's flags in `args` for `modes`: a flag that
    has no effect in these modes is a problem, as is a value out of range."""
    problems = unused_flag_problems(args, modes, mask_preview)
    values = {name: default if getattr(args, name, None) is None else getattr(args, name)
              for name, default in MODE_FLAGS.items()}
    problems += value_problems(args, values)
    settings = EditSettings(prompt=args.prompt, modes=list(modes), vae=vae_kind(args), height=args.height,
                            width=args.width, seed=args.seed, window=None if values["m"] == "all" else values["m"],
                            theta=values["theta"], theta2=values["theta2"], mask_lookahead=values["mask_lookahead"],
                            tape=T.TapeConfig(values["tape_ratio"], values["tape_alpha"], values["tape_delta"],
                                                 values["tape_every"], values["tape_selections"]),
                            recipe=lipar.RECIPES[args.recipe], prompt_at=sorted(getattr(args, "prompt_at", None) or []))
    frames = [frame for frame, _ in settings.prompt_at]
    if len(set(frames)) < len(frames):
        problems.append("two --prompt-at changes at one frame; give each frame one prompt")
    return settings, problems


def unused_flag_problems(args, modes, mask_preview):
    given = {name for name in MODE_FLAGS if getattr(args, name, None) is not None}
    problems, which = [], f"--mode {modes[0]}" if len(modes) == 1 else f"modes {', '.join(modes)}"
    mask_flags = sorted(given & {"theta", "theta2", "mask_lookahead"})
    if mask_flags and not (set(modes) & MASK_MODES or mask_preview):
        names, verb, them = flag_list(mask_flags, "sets", "set")
        problems.append(f"{names} {verb} LIPAR's mask, which {which} does not compute; drop {them}, or pick a "
                        "pruned mode (lipar, naive, noisy_dup) or --save-mask")
    if "m" in given and set(modes) <= {"full"}:
        problems.append(f"--m sets the M-degree window of the pruned modes; {which} attends to the whole causal "
                        "cache: drop --m or pick another mode")
    tape_flags = sorted(n for n in given if n.startswith("tape_"))
    if tape_flags and "tape" not in modes:
        names, verb, them = flag_list(tape_flags, "applies", "apply")
        problems.append(f"{names} only {verb} to --mode tape; drop {them} or run --mode tape")
    return problems


def flag_list(names, one, many):
    """("--a, --b", verb, pronoun) for a sentence about the flags `names`, singular or plural."""
    text = ", ".join("--" + name.replace("_", "-") for name in names)
    return (text, one, "it") if len(names) == 1 else (text, many, "them")


def value_problems(args, values):
    problems = []
    for name in ("theta", "theta2"):
        if not_a_threshold(values[name], inf_allowed=name == "theta2"):
            problems.append(f"--{name} {values[name]} is not a threshold; give a number >= 0"
                            + (" (inf turns the bound off)" if name == "theta2" else ""))
    if not 0 <= values["tape_ratio"] <= 0.95:
        problems.append(f"--tape-ratio {values['tape_ratio']} is out of range; give a share from 0 to 0.95")
    if not 0 <= values["tape_alpha"] <= 1:
        problems.append(f"--tape-alpha {values['tape_alpha']} is not a weight; give a number from 0 to 1")
    if not 0 <= values["tape_delta"] <= 0.5:
        problems.append(f"--tape-delta {values['tape_delta']} is out of range; give a number from 0 to 0.5")
    if values["tape_every"] < 1:
        problems.append(f"--tape-every {values['tape_every']} is not a block count; give 1 or more")
    if values["tape_selections"] is not None and values["tape_selections"] < 1:
        problems.append(f"--tape-selections {values['tape_selections']} is not a count; give 1 or more")
    if getattr(args, "tape_every", None) is not None and values["tape_selections"] is not None:
        problems.append("--tape-every and --tape-selections both set the reselections; give one of them")
    if problem := window_problem("--m", values["m"]):
        problems.append(problem)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= MAX_SIDE:
            problems.append(f"--{name} {value} is not a size this tool takes; give a multiple of 16 from 16 to "
                            f"{MAX_SIDE}")
    if args.height and args.width and 0 < args.height <= MAX_SIDE and 0 < args.width <= MAX_SIDE \
            and args.height * args.width > MAX_PIXELS:
        problems.append(f"--height {args.height} --width {args.width} is more than 1080p ({MAX_PIXELS:,} pixels a "
                        "frame), the largest size this tool edits; give a smaller size")
    if not 0 <= args.seed <= MAX_SEED:
        problems.append(f"--seed {args.seed} is out of range; give a number from 0 to 2**63 - 1")
    for flag, device in (("--device", args.device), ("--text-device", args.text_device)):
        if device is not None and (problem := device_problem(device)):
            problems.append(f"{flag} {device!r}: {problem}")
    return problems + [p for p in (fp8_problem(args.device, args.fp8),
                                   cuda_only_problem(args.device, {"no-graphs": args.no_graphs, "fusion": args.fusion}))
                       if p]


def cuda_only_problem(device, flags):
    """flags {name: value given or None/False}: the sentence refusing those given while
    `device` is the CPU, where they would change nothing (sample.py, evaluate.py, live.py); or None."""
    given = sorted(name for name, value in flags.items() if value)
    if not given or device_problem(device) or torch.device(device).type != "cpu":
        return None
    names, verb, them = flag_list(given, "changes", "change")
    return f"{names} only {verb} how the models run on CUDA, and --device is cpu: drop {them} or give --device cuda"


def prompt_problem(prompt):
    """A blank prompt is refused (sample.py, live.py); None otherwise."""
    return None if prompt.strip() else "--prompt is empty; say what the edited video should show"


def fp8_problem(device, fp8=True):
    """Why --fp8 (if given) cannot run on `device` (a sentence), or None; a bad device is device_problem's."""
    if not fp8 or device_problem(device) or torch.device(device).type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    return None if capability >= (8, 9) else ("--fp8 needs a GPU with fp8 products (compute capability 8.9 or later: "
                                              f"Ada, Hopper); {torch.cuda.get_device_name(device)} has "
                                              f"{'.'.join(map(str, capability))}: drop --fp8")


def device_problem(device):
    """Why `device` cannot run the models (a phrase), or None: cpu, cuda or cuda:N of a GPU this machine has."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        return "not a device; give cpu or cuda"
    if device.type not in ("cpu", "cuda"):
        return "not a device the models run on here; give cpu or cuda"
    if device.type == "cpu" and device.index is not None:
        return "the CPU takes no number; give cpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "this machine has no usable CUDA GPU; give cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} GPU(s), numbered from 0; give cuda or cuda:0"
    return None


def not_a_threshold(value, inf_allowed=False):
    """θ and θ2 are numbers >= 0; θ2 = inf turns the substitute bound off."""
    return math.isnan(value) or value < 0 or (math.isinf(value) and not inf_allowed)


def window_problem(flag, window):
    """Why an M-degree window (SINK, RECENT) cannot be used (a sentence naming `flag`), or
    None: it must keep the current chunk's 3 frames and stay inside the trained positions."""
    if window == "all":
        return None
    if window[0] < 0 or window[1] < 3:
        return (f"{flag} {window_text(window)} cannot hold a chunk; give SINK >= 0 and RECENT >= 3 latent frames "
                "(e.g. 1,6) or 'all'")
    if sum(window) > MAX_WINDOW:
        return (f"{flag} {window_text(window)} spans more than the {MAX_WINDOW} latent frames the model was trained "
                f"on; give SINK + RECENT <= {MAX_WINDOW} (or 'all': the whole causal cache)")
    return None


def output_problems(args):
    """--out is an .mp4 or - ; --json a file name or - ; standard output, when named, is open and named once."""
    problems = [f"--out {args.out}: sample.py writes H.264 mp4 files; give the output a .mp4 name"] \
        if args.out not in (None, io.STDIO) and Path(args.out).suffix.lower() != ".mp4" else []
    if args.json is not None and not args.json.strip():
        problems.append("--json is empty; give a file name for the stats, or - for standard output")
    if args.out == io.STDIO and args.json == io.STDIO:
        problems.append("--out - and --json - both name standard output; give --json a file name")
    elif io.STDIO in (args.out, args.json) and sys.stdout is None:
        problems.append(f"{'--out' if args.out == io.STDIO else '--json'} - writes to standard output, which is "
                        "closed; give a file name or run the command with its output open")
    return problems


def input_problems(video):
    """A video must be a file, a named pipe (also /dev/fd/N, <(...)), a camera or -."""
    if video == io.STDIO and sys.stdin is None:
        return ["--video - reads standard input, which is closed; pipe a video in or give a file"]
    if not (video is None or video.strip()):
        return ["--video is empty; give the path of a video file, a camera device or - (standard input)"]
    if video in (None, io.STDIO) or io.is_camera(video) or io.is_pipe(video) or Path(video).is_file():
        return []
    state = "is a folder" if Path(video).is_dir() else "does not exist"
    return [f"the video {video} {state}; give the path of a video file, a camera device or - (standard input)"]


def vae_kind(args):
    """--vae, or by default the Wan VAE unless the weights folder holds only the tiny one."""
    weights = Path(args.weights)
    if args.vae is not None:
        return args.vae
    only_tiny = weights.exists() and not (weights / "vae").exists() and (weights / "tiny_vae").exists()
    return "tiny" if only_tiny else "wan"


def fusion(args):
    """--fusion as model.fusion takes it: triton_ops.Kernels (for "triton" and the default,
    None), "compile" or None (and None off CUDA, where every fused function runs as
    written: Triton is a GPU-side package)."""
    if args.fusion == "off" or torch.device(args.device).type != "cuda":
        return None
    if args.fusion == "compile":
        return "compile"
    try:
        import triton_ops  # here, not at the top: CPU-only installs have no Triton
    except ImportError:
        print("note: Triton is not installed, so the fused kernels are off and the elementwise chains run op by "
              "op (pip install triton, or --fusion compile)", file=sys.stderr)
        return None
    return triton_ops.Kernels()


def model_dtype(args):
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32


def weights_folder(args, demo_run):
    """The weights folder, or None for the demo's random weights when there is none."""
    if Path(args.weights).exists():
        return args.weights
    if demo_run:
        return None
    raise UsageError(f"no weights at {args.weights}; download them as weights.md says (or run "
                     "`python sample.py` with no arguments for the random-weight demo)")


def settle_size(settings, notes):
    """480x832 unless given, rounded to multiples of 16 with a note."""
    settings.height, settings.width = settings.height or 480, settings.width or 832
    for name in ("height", "width"):
        value = getattr(settings, name)
        if value % 16:  # sizes <= 0 were refused with the flags
            rounded = max(16, round(value / 16) * 16)
            notes.append(f"--{name} {value} is not a multiple of 16; using {rounded}")
            setattr(settings, name, rounded)


def write_demo_clip():
    """The demo's source, written once to results/demo_input.mp4."""
    path = Path("results") / "demo_input.mp4"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_video(path, demo.demo_frames(), demo.DEMO_FPS)
    return path


# -----------------------------------------------------------------------------
# Outputs


def output_kinds(args, modes):
    return list(modes) + (["compare"] if args.compare else []) + (["mask"] if args.save_mask else [])


def output_path(args, kind, several):
    """results/<input>_<kind>.mp4, or --out (with the kind appended when several files are
    written); "-" is standard output."""
    if args.out is None:
        stem = "stdin" if str(args.video) == io.STDIO else Path(args.video).stem
        return Path("results") / f"{stem}_{kind}.mp4"
    if args.out == io.STDIO:
        return io.STDIO
    out = Path(args.out)
    return out.with_name(f"{out.stem}_{kind}{out.suffix}") if several else out


def check_outputs(args, settings):
    """{kind: path} of the edit's outputs, each checked before any work: not the input
    (by any name), not one another nor --json, not inside the weights folder, absent or
    (with --overwrite) a regular file, in a folder that can be written."""
    kinds = output_kinds(args, settings.modes)
    if args.out == io.STDIO and len(kinds) > 1:
        raise UsageError("--out - writes one video to standard output; drop --compare and --save-mask, or give "
                         "--out a file name")
    outputs = {kind: io.STDIO if args.out == io.STDIO else output_path(args, kind, several=len(kinds) > 1)
               for kind in kinds}
    named = [(f"the {kind} output", path) for kind, path in outputs.items() if path != io.STDIO]
    if args.json not in (None, io.STDIO):
        named.append(("--json", Path(args.json)))
    check_paths(named, [args.video], args.weights, args.overwrite)
    return outputs


def check_paths(named, inputs, weights, overwrite):
    """Refuse any of the outputs `named` [(what, path)] that would touch an input, the
    weights or another output, or that cannot be written (files.py); make their folders."""
    inputs = [Path(p) for p in inputs if p not in (None, io.STDIO)]
    for i, (what, path) in enumerate(named):
        if any(files.same_file(path, source) for source in inputs):
            raise UsageError(f"{what} {path} is the input video; choose another name")
        if weights is not None and Path(path).resolve().is_relative_to(Path(weights).resolve()):
            raise UsageError(f"{what} {path} is inside the weights folder {weights}; choose another name")
        for other, other_path in named[:i]:
            if files.same_file(path, other_path):
                raise UsageError(f"{what} {path} is also {other}; give each output a name of its own")
        if problem := files.target_problem(path, overwrite):
            raise UsageError(problem.replace("choose another output", "choose another --out" if what != "--json"
                                             else "choose another --json"))
        try:
            files.prepare_folder(path)
        except files.OutputError as err:
            raise UsageError(str(err)) from None


def open_writers(outputs, modes, reader, overwrite=False):
    """A VideoWriter per output {kind: path}; each mode's edit carries the source's audio."""
    writers = {}
    try:
        for kind, path in outputs.items():
            writers[kind] = io.VideoWriter(path, reader.fps, audio_from=reader if kind in modes else None,
                                           overwrite=overwrite)
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    return writers


def mask_preview(frames, keep, first_chunk=True):
    """The input with pruned patches greyed out: what LIPAR skips, frame by frame.

    frames uint8 [T, H, W, 3] at model size, of a chunk; keep [L, H/16, W/16] its mask.
    In the first chunk video frame 0 belongs to latent frame 0 and frames 4k−3..4k to
    latent frame k (the VAE's causal stride 4); in a later one frames 4j..4j+3 to its
    latent frame j.
    """
    latent_of_frame = (torch.arange(len(frames)) + (3 if first_chunk else 0)) // 4
    cell = frames.shape[1] // keep.shape[1]
    kept = keep.cpu()[latent_of_frame.clamp(max=keep.shape[0] - 1)]
    kept = kept.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[..., None]
    grey = (frames.float() * 0.25 + 96).to(torch.uint8)
    return torch.where(kept, frames, grey)


def render_outputs(edited, outputs, sources, keep, first):
    """{kind: uint8 frames} of one chunk for every output: each mode's edit, the
    side-by-side comparison (source | full | lipar) and the mask preview."""
    frames = {kind: edited[kind] for kind in outputs if kind in edited}
    if "compare" in outputs:
        frames["compare"] = torch.cat([sources, edited["full"], edited["lipar"]], dim=2)
    if "mask" in outputs:
        frames["mask"] = mask_preview(sources, keep, first_chunk=first)
    return frames


def write_json(path, stats, overwrite=False):
    """The stats as JSON to the file `path`, or to standard output for -."""
    if path == io.STDIO:
        print(json.dumps(stats, indent=2), flush=True)
    else:
        files.write_text(path, json.dumps(stats, indent=2), overwrite)


def guarded(main, argv=None):
    """main(argv) with bad input reported as one sentence and exit code 2, never a
    traceback; Ctrl-C, SIGTERM and SIGHUP stop it as signals.py says."""
    try:
        with signals.handled():
            return main(argv)
    except (UsageError, io.VideoError, WeightsError, files.OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as err:
        print(f"error: {out_of_memory(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if "can't allocate memory" not in str(err):  # the CPU allocator's words
            raise
        print(f"error: {out_of_memory(err)}", file=sys.stderr)
        return 2
    except stream.Interrupted as stop:  # while editing: the finished chunks are kept
        print(stop, file=sys.stderr)
        if stop.code == 1:  # nobody reads standard output any more: keep Python from complaining at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return stop.code
    except KeyboardInterrupt as stop:  # before the edit began: outputs are only ever moved into place when closed
        how = f"stopped by {stop}" if isinstance(stop, signals.Terminated) else "interrupted"
        print(f"{how} before the edit began; nothing was written", file=sys.stderr)
        return getattr(stop, "code", 130)


def out_of_memory(err):
    where = "GPU" if isinstance(err, torch.OutOfMemoryError) and "CUDA" in str(err) else "host"
    lower = "a smaller --height/--width, a smaller --m window, --vae tiny" + (", --text-device cpu" if where == "GPU"
                                                                             else "")
    return f"ran out of {where} memory; give {lower}, or free memory taken by other programs"
