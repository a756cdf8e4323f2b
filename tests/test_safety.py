"""Nothing outside what the user named is ever written, replaced or lost: outputs checked
against the inputs and one another before any work, one writer discipline for every
file (files.py), stopping signals (signals.py), bounds before allocation, and every
entry point (--convert-checkpoint, --check-weights, manifests, pipes) held to the same
rules: one sentence, exit code 2, nothing touched."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cli
import demo
import evaluate
import files
import sample
import video as io

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--height", "64", "--width", "112", "--device", "cpu", "--vae", "tiny"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "ball.mp4"
    io.write_video(path, demo.demo_frames(64, 112, 12), 24.0)  # one chunk of the tiny VAE
    return path


def run_cli(args, weights):
    return cli.guarded(sample.main, ["--weights", str(weights), *SMALL, *args])  # later flags win


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_error(capsys):
    """The one `error:` line on standard error (a progress bar that was drawn is cleared with carriage returns)."""
    err = capsys.readouterr().err
    err = "\n".join(line.split("\r")[-1] for line in err.split("\n") if line.split("\r")[-1].strip()) + "\n"
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def snapshot(folder):
    """{relative path: bytes digest or 'dir'} of everything under `folder` (links not followed)."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() and not p.is_symlink() else
            "link" if p.is_symlink() else "fifo" if p.is_fifo() else digest(p) for p in Path(folder).rglob("*")}


def refused_before_work(argv, weights, tmp_path, monkeypatch, capsys, named):
    """The run is refused in one sentence naming `named`, and nothing under tmp_path changed."""
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(sample, "edit_video", lambda *a, **k: pytest.fail("the edit ran before the refusal"))
    assert run_cli(argv, weights) == 2
    err = one_error(capsys)
    assert named in err, err
    assert snapshot(tmp_path) == before
    return err


# -----------------------------------------------------------------------------
# 1, 12: --json and every other output, checked against each other and the input first


def test_json_that_is_the_input_is_refused_and_the_input_untouched(clip, weights, tmp_path, monkeypatch, capsys):
    source = tmp_path / "x.mp4"
    source.write_bytes(clip.read_bytes())
    refused_before_work(["--video", str(source), "--json", "x.mp4", "--out", "e.mp4"], weights, tmp_path,
                        monkeypatch, capsys, "--json x.mp4 is the input video")
    assert digest(source) == digest(clip)


@pytest.mark.parametrize("flags, named", [
    (["--out", "e.mp4", "--json", "e.mp4"], "--json e.mp4 is also the lipar output"),
    (["--out", "e.mp4", "--save-mask", "--json", "e_mask.mp4"], "--json e_mask.mp4 is also the mask output"),
    (["--compare", "--out", "e.mp4", "--json", "./e_compare.mp4"], "is also the compare output"),
])
def test_json_that_is_another_output_is_refused(flags, named, clip, weights, tmp_path, monkeypatch, capsys):
    refused_before_work(["--video", str(clip), *flags], weights, tmp_path, monkeypatch, capsys, named)


def test_an_existing_json_needs_overwrite(clip, weights, tmp_path, monkeypatch, capsys):
    (tmp_path / "stats.json").write_text("{}")
    refused_before_work(["--video", str(clip), "--out", "e.mp4", "--json", "stats.json"], weights, tmp_path,
                        monkeypatch, capsys, "stats.json already exists; pass --overwrite or choose another --json")


def test_output_inside_the_weights_folder_is_refused(clip, weights, tmp_path, monkeypatch, capsys):
    before = snapshot(weights)
    for flags in (["--out", str(weights / "dit" / "e.mp4")], ["--out", "e.mp4", "--json",
                                                                str(weights / "dit" / "config.json"), "--overwrite"]):
        refused_before_work(["--video", str(clip), *flags], weights, tmp_path, monkeypatch, capsys,
                            "is inside the weights folder")
    assert snapshot(weights) == before


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_an_output_that_is_a_link_to_the_input_is_refused(link, clip, weights, tmp_path, monkeypatch, capsys):
    source = tmp_path / "in.mp4"
    source.write_bytes(clip.read_bytes())
    (os.link if link == "hard" else os.symlink)(source, tmp_path / "out.mp4")
    refused_before_work(["--video", str(source), "--out", "out.mp4", "--overwrite"], weights, tmp_path, monkeypatch,
                        capsys, "out.mp4 is the input video")
    assert digest(source) == digest(clip)


def test_json_into_a_missing_folder_is_made_and_a_stale_partial_is_cleaned(clip, weights, tmp_path, monkeypatch,
                                                                           capsys):
    """The --json folder is made before the edit; a partial file left by a killed run
    (its process gone) is removed by the next run writing that name; another live
    run's partial is left alone."""
    monkeypatch.chdir(tmp_path)
    dead = tmp_path / f".e.mp4.{2**22 + 12345}.deadbeef.partial"  # beyond Linux's largest pid: no such process
    live = tmp_path / f".e.mp4.{os.getpid()}.cafe.partial"
    dead.write_bytes(b"half a video"), live.write_bytes(b"another run's video")
    assert run_cli(["--video", str(clip), "--out", "e.mp4", "--json", "new/deeper/stats.json"], weights) == 0
    stats = json.loads((tmp_path / "new" / "deeper" / "stats.json").read_text())
    assert stats["outputs"] == {"lipar": "e.mp4"} and len(io.read_video(tmp_path / "e.mp4")[0]) == 12
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["stats.json"]


@pytest.mark.parametrize("target, named", [
    ("folder.mp4", "folder.mp4 is a folder"),
    ("/proc/x.mp4", "cannot write into the folder /proc"),
    ("noext", "give the output a .mp4 name"),
    ("/dev/null", "give the output a .mp4 name"),
])
def test_outputs_that_cannot_be_written_are_refused_before_work(target, named, clip, weights, tmp_path, monkeypatch,
                                                                capsys):
    (tmp_path / "folder.mp4").mkdir()
    refused_before_work(["--video", str(clip), "--out", target, "--overwrite"], weights, tmp_path, monkeypatch,
                        capsys, named)


def test_overwrite_replaces_only_regular_files(clip, weights, tmp_path, monkeypatch, capsys):
    """A named pipe, a link and a device node called *.mp4 are not replaced even with
    --overwrite (as root, renaming over /dev/full replaced the device)."""
    os.mkfifo(tmp_path / "pipe.mp4")
    (tmp_path / "elsewhere.mp4").write_bytes(b"not to be touched")
    os.symlink(tmp_path / "elsewhere.mp4", tmp_path / "link.mp4")
    for target, kind in (("pipe.mp4", "a device or pipe"), ("link.mp4", "a link")):
        refused_before_work(["--video", str(clip), "--out", target, "--overwrite"], weights, tmp_path, monkeypatch,
                            capsys, f"{target} is {kind}")
    assert files.target_problem("/dev/full", overwrite=True) == ("/dev/full is a device or pipe, not a file; give "
                                                                 "the output a file name of its own")
    assert (tmp_path / "pipe.mp4").is_fifo() and (tmp_path / "elsewhere.mp4").read_bytes() == b"not to be touched"


def test_publish_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    """A target that another run wrote while this one was writing is kept, and this
    run is refused (files.publish hard-links: it never renames over)."""
    target = tmp_path / "t.txt"
    with pytest.raises(files.OutputError, match="t.txt appeared while this run was writing it"):
        with files.writing(target) as partial:
            partial.write_text("this run")
            target.write_text("the other run")
    assert target.read_text() == "the other run" and sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_two_runs_on_one_output_never_swap_contents(weights, tmp_path):
    """Two processes edit different clips to the same --out at the same time: one writes
    it (exit 0), the other says the file appeared and exits 2, and the file holds the
    whole edit of the run that said it wrote it."""
    clips = {}
    for name, count in (("a", 12), ("b", 24)):
        clips[name] = tmp_path / f"{name}.mp4"
        io.write_video(clips[name], demo.demo_frames(64, 112, count), 24.0)
    runs = {name: subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--video", str(path), "--out", "same.mp4",
                                    "--weights", str(weights), *SMALL], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=tmp_path) for name, path in clips.items()}
    results = {name: (run.wait(timeout=300), *run.communicate()) for name, run in runs.items()}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], results
    winner = next(name for name, (code, _, _) in results.items() if code == 0)
    loser = next(name for name, (code, _, _) in results.items() if code == 2)
    assert "wrote lipar: same.mp4" in results[winner][1]
    assert "appeared while" in results[loser][2] and "Traceback" not in results[loser][2]
    assert len(io.read_video(tmp_path / "same.mp4")[0]) == {"a": 12, "b": 24}[winner]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4", "same.mp4"]


# -----------------------------------------------------------------------------
# 5: signals


def edit_in_a_process(tmp_path, weights, frames=45):
    """sample.py editing `frames` frames with the Wan VAE (slow enough on tiny weights to
    be stopped part-way: chunks of 9, then 12 frames)."""
    clip = tmp_path / "long.mp4"
    io.write_video(clip, demo.demo_frames(64, 112, frames), 24.0)
    out = tmp_path / "out" / "edited.mp4"
    process = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--video", str(clip), "--weights",
                                str(weights), *SMALL, "--vae", "wan", "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    return process, out


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_keep_every_finished_chunk(signum, code, weights, tmp_path):
    process, out = edit_in_a_process(tmp_path, weights)
    seen = ""
    while " 9/45 " not in seen:  # the progress bar: the first chunk is written
        char = process.stderr.read(1)
        assert char, f"sample.py ended before its first chunk was written: {seen}"
        seen += char
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "frame" not in line[:25]]
    assert process.returncode == code, seen + err
    frames = len(io.read_video(out)[0])
    assert frames in (9, 21, 33) and lines == [f"stopped by {signal.Signals(signum).name}: {out} holds the {frames} "
                                            f"edited frames finished so far (every finished chunk, playable)"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["edited.mp4"]


def test_a_signal_while_python_is_still_loading_is_one_line(weights, tmp_path):
    """Ctrl-C during the imports (here: as soon as the process runs)."""
    process = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--weights", str(weights)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(0.3)  # the interpreter is up and importing torch
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err == "interrupted while starting; nothing was written\n", err
    assert list(tmp_path.iterdir()) == []


def test_a_signal_before_the_edit_leaves_nothing(weights, tmp_path, monkeypatch, capsys, clip):
    """SIGTERM while the models load: no output exists yet, one line, 143."""
    monkeypatch.chdir(tmp_path)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    monkeypatch.setattr(sample, "encode_prompts", terminated)
    assert run_cli(["--video", str(clip), "--out", "e.mp4"], weights) == 143
    assert capsys.readouterr().err == "stopped by SIGTERM before the edit began; nothing was written\n"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers are put back


# -----------------------------------------------------------------------------
# 6: bounds before allocation


@pytest.mark.parametrize("flags, named", [
    (["--height", "10000", "--width", "10000"], "--height 10000 is not a size this tool takes"),
    (["--height", "2048", "--width", "2048"], "is more than 1080p"),
    (["--height", "0"], "--height 0 is not a size"),
    (["--width", "-16"], "--width -16 is not a size"),
    (["--m", "1,10000000"], "spans more than the 21 latent frames"),
    (["--m", "10,12"], "spans more than the 21 latent frames"),
    (["--seed", str(2**70)], "--seed 1180591620717411303424 is out of range"),
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--device", "mps"], "--device 'mps': not a device the models run on here"),
    (["--device", "meta"], "--device 'meta': not a device the models run on here"),
    (["--text-device", "tpu"], "--text-device 'tpu': not a device"),
])
def test_bounds_are_checked_with_the_flags(flags, named, clip, weights, tmp_path, monkeypatch, capsys):
    refused_before_work(["--video", str(clip), "--out", "e.mp4", *flags], weights, tmp_path, monkeypatch, capsys,
                        named)


def test_an_8192_square_source_edits_in_bounded_host_memory(weights, tmp_path):
    """One smooth 8192x8192 frame (a small file; 805 MB as float32 RGB, 201 MB as uint8):
    frames are shrunk as they are decoded, so the whole process peaks below what one
    source-size float32 frame would add to it (0.6 GiB here: Python, torch and the
    decoder's own 8192x8192 picture)."""
    source = tmp_path / "huge.mp4"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width = stream.height = 8192
        stream.pix_fmt = "yuv420p"
        ramp = np.linspace(0, 255, 8192, dtype=np.float32)
        pixels = np.stack([np.broadcast_to(ramp, (8192, 8192)), np.broadcast_to(ramp[:, None], (8192, 8192)),
                           np.full((8192, 8192), 128, np.float32)], axis=-1).astype(np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    del pixels
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--video", str(source), "--out", "e.mp4",
                             "--json", "stats.json", "--weights", str(weights), *SMALL], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["frames"] == 1 and stats["peak_host_memory_gib"] < 1.25, stats["peak_host_memory_gib"]


@pytest.mark.parametrize("error, where", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "GPU"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 143 GB"), "host"),
    (MemoryError(), "host"),
])
def test_running_out_of_memory_is_one_sentence_saying_what_to_lower(error, where, clip, weights, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def allocate(*args, **kwargs):
        raise error
    monkeypatch.setattr(sample, "edit_chunks", allocate)
    assert run_cli(["--video", str(clip), "--out", "e.mp4"], weights) == 2
    err = one_error(capsys)
    assert f"ran out of {where} memory; give a smaller --height/--width" in err
    assert not (tmp_path / "e.mp4").exists() and not list(tmp_path.glob(".*partial"))


# -----------------------------------------------------------------------------
# 7: --convert-checkpoint


class Payload:
    """A pickle that would run code when loaded without weights_only."""

    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ.get('TMPDIR', '/tmp')) / 'lipar-pwned'}",))


def convert(argv, capsys):
    code = cli.guarded(sample.main, ["--convert-checkpoint", *map(str, argv)])
    return code, capsys.readouterr()


@pytest.mark.parametrize("make, named", [
    (None, "does not exist"),
    (lambda p: p.write_text("a text file\n"), "is not a PyTorch checkpoint (torch.load cannot read it)"),
    (lambda p: torch.save({"generator_ema": {"w": torch.ones(2), "step": "ten"}}, p),
     "holds no state dict of tensors (found dict with other values)"),
    (lambda p: torch.save([torch.ones(2)], p), "holds no state dict of tensors (found list)"),
    (lambda p: torch.save({"w": Payload()}, p), "holds objects other than tensors"),
    (lambda p: torch.save({"w": Payload()}, p, _use_new_zipfile_serialization=False), "holds objects other than"),
    (lambda p: torch.save({"generator_ema": {}}, p), "holds an empty state dict"),
    (lambda p: torch.save({"model.a": torch.ones(2), "a": torch.zeros(2)}, p), "holds both 'model.a' and 'a'"),
    (lambda p: torch.save({"__metadata__": torch.ones(2)}, p), "a tensor named __metadata__"),
    (lambda p: torch.save({"w": torch.eye(2).to_sparse()}, p), "the tensor 'w' in"),
    (lambda p: torch.save({"w": torch.empty(2, device="meta")}, p), "is without data (on the meta device)"),
    (lambda p: torch.save({"w": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}, p), "is quantized"),
])
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")  # making the quantized case; not the code's
def test_bad_checkpoints_are_one_sentence_and_run_nothing(make, named, tmp_path, capsys):
    pwned = Path(os.environ.get("TMPDIR", "/tmp")) / "lipar-pwned"
    pwned.unlink(missing_ok=True)
    source = tmp_path / "self_forcing_dmd.pt"
    if make:
        make(source)
    code, printed = convert([source, tmp_path / "dit.safetensors"], capsys)
    assert code == 2 and named in printed.err and len(printed.err.strip().splitlines()) == 1, printed.err
    assert not (tmp_path / "dit.safetensors").exists() and not pwned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["self_forcing_dmd.pt"] if make else [])


def test_a_legacy_checkpoint_converts_and_an_existing_target_needs_overwrite(tmp_path, capsys):
    weights = {"blocks.0.w": torch.randn(3, 2), "head.b": torch.randn(4)}
    source = tmp_path / "old.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in weights.items()}, "generator": {}}, source,
               _use_new_zipfile_serialization=False)  # no zip: mmap cannot read it; it is read whole
    target = tmp_path / "out" / "dit.safetensors"
    code, printed = convert([source, target], capsys)
    assert code == 0 and printed.out.strip() == f"wrote 2 tensors to {target}"
    assert {k: v.tolist() for k, v in load_file(target).items()} == {k: v.tolist() for k, v in weights.items()}
    before = digest(target)
    code, printed = convert([source, target], capsys)
    assert code == 2 and "already exists; pass --overwrite" in printed.err and digest(target) == before
    code, printed = convert([source, source], capsys)
    assert code == 2 and "safetensors name" in printed.err
    code, printed = convert([source, tmp_path / "old.safetensors"], capsys)
    assert code == 0


def test_tied_tensors_convert_each_under_its_name_and_a_full_disk_is_one_sentence(tmp_path, capsys, monkeypatch):
    """Tensors that share memory (tied weights, views of one buffer), which safetensors
    refuses to save as they are, are written each whole; a write that fails part-way
    (a full disk) is one sentence and leaves nothing."""
    import errno

    import safetensors.torch

    shared, buffer = torch.randn(3, 2), torch.arange(8.0)
    source = tmp_path / "tied.pt"
    torch.save({"embed": shared, "head": shared, "low": buffer[:4], "high": buffer[4:]}, source)
    code, printed = convert([source, tmp_path / "tied.safetensors"], capsys)
    assert code == 0, printed.err
    written = load_file(tmp_path / "tied.safetensors")
    assert written["embed"].tolist() == written["head"].tolist() == shared.tolist()
    assert written["low"].tolist() == [0, 1, 2, 3] and written["high"].tolist() == [4, 5, 6, 7]

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, printed = convert([source, tmp_path / "full.safetensors"], capsys)
    assert code == 2 and "could not write" in printed.err and "No space left on device" in printed.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tied.pt", "tied.safetensors"]


def test_an_unwritable_target_folder_is_refused_before_the_checkpoint_is_read(tmp_path, capsys, monkeypatch):
    source = tmp_path / "c.pt"
    torch.save({"w": torch.ones(1)}, source)
    (tmp_path / "file").write_text("a file where the folder would go")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("read before the target was checked"))
    code, printed = convert([source, tmp_path / "file" / "dit.safetensors"], capsys)
    assert code == 2 and f"cannot create the output folder {tmp_path / 'file'}: a file of that name" in printed.err


# -----------------------------------------------------------------------------
# 9: --check-weights passes only what the loader takes


def damaged_copy(weights, tmp_path):
    copy = tmp_path / "w"
    for path in weights.rglob("*"):
        target = copy / path.relative_to(weights)
        target.mkdir(parents=True, exist_ok=True) if path.is_dir() else target.write_bytes(path.read_bytes())
    return copy


def check(weights, capsys):
    code = cli.guarded(sample.main, ["--check-weights", "--weights", str(weights)])
    return code, capsys.readouterr().err


def test_check_weights_refuses_an_integer_weight(weights, tmp_path, capsys):
    copy = damaged_copy(weights, tmp_path)
    tensors = load_file(copy / "dit" / "model.safetensors")
    name = next(k for k in tensors if k.endswith("weight"))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, copy / "dit" / "model.safetensors")
    code, err = check(copy, capsys)
    assert code == 2 and f"not floating-point 1: {name} int32" in err and len(err.strip().splitlines()) == 1


def set_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **changes}))


T5 = {"vocab_size": 300, "d_model": 32, "d_ff": 48, "num_heads": 4, "d_kv": 8, "num_layers": 2}


@pytest.mark.parametrize("damage, named", [
    (lambda w: set_config(w / "dit", dim="64"), "dim='64' is not a whole number from 1 to 1048576"),
    (lambda w: set_config(w / "dit", dim=64.0), "dim=64.0 is not a whole number"),
    (lambda w: set_config(w / "dit", patch_size=5), "patch_size=5 is not a list of 3 whole numbers"),
    (lambda w: set_config(w / "dit", num_heads=0), "num_heads=0 is not a whole number"),
    (lambda w: set_config(w / "dit", num_heads=3), "dim=64 does not split into num_heads=3 heads"),
    (lambda w: set_config(w / "dit", eps="small"), "eps='small' is not a positive number"),
    (lambda w: set_config(w / "dit", num_layers=10 ** 6), "num_layers=1000000 makes 1000000 DiT blocks, but the "
                                                           "weights hold 2"),
    (lambda w: set_config(w / "vae", dim_mult=4), "dim_mult=4 is not a list of 4 whole numbers"),
    (lambda w: set_config(w / "vae", num_res_blocks=7), "num_res_blocks=7 makes 31 encoder blocks, but the weights "
                                                         "hold 11"),
    (lambda w: set_config(w / "tiny_vae", channels="8"), "channels='8' is not a whole number"),
    (lambda w: set_config(w / "tiny_vae", decoder_channels=8), "decoder_channels=8 is not a list of 4"),
    (lambda w: set_config(w / "tiny_vae", width=8), "'width' is no setting of this network"),
    (lambda w: set_config(w / "text_encoder", **{k: v for k, v in T5.items() if k != "num_layers"}),
     "has no num_layers"),
    (lambda w: set_config(w / "text_encoder", **T5, feed_forward_proj="relu"), "feed_forward_proj='relu'"),
    (lambda w: set_config(w / "text_encoder", **T5, layer_norm_epsilon=True), "layer_norm_epsilon=True is not a"),
    (lambda w: (w / "vae" / "model.safetensors.index.json").write_text("[1]"), "has no weight_map"),
    (lambda w: (w / "vae" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../dit/model.safetensors"}})), "names the shard '../dit/model.safetensors'"),
])
def test_check_weights_refuses_config_values_that_cannot_build_the_network(damage, named, weights, tmp_path, capsys):
    copy = damaged_copy(weights, tmp_path)
    damage(copy)
    code, err = check(copy, capsys)
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("damage, named", [
    (lambda w: (w / "dit" / "config.json").write_text("{not json"), "config.json (the model's configuration) "
                                                                     "cannot be read as JSON"),
    (lambda w: (w / "dit" / "config.json").write_text("[1, 2]"), "config.json is not a JSON object of settings"),
    (lambda w: (w / "vae" / "model.safetensors.index.json").write_text('{"metadata": {}}'), "has no weight_map"),
    (lambda w: ((w / "vae" / "model.safetensors").unlink(), os.symlink("model.safetensors",
                                                                       w / "vae" / "model.safetensors")),
     "is a link that leads nowhere (or to itself)"),
    (lambda w: ((w / "text_encoder" / "model.safetensors").write_bytes(b"\x00" * 7)), "not a readable safetensors"),
])
def test_check_weights_names_bad_configs_indexes_and_links(damage, named, weights, tmp_path, capsys):
    copy = damaged_copy(weights, tmp_path)
    damage(copy)
    code, err = check(copy, capsys)
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_a_weights_path_that_is_a_file_is_one_sentence(tmp_path, capsys):
    (tmp_path / "weights").write_text("not a folder")
    code, err = check(tmp_path / "weights", capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


# -----------------------------------------------------------------------------
# 4, 8: manifests


def test_manifest_names_stay_in_the_results_folder_and_miss_the_reports_files(clip, tmp_path):
    manifest = tmp_path / "m" / "jobs.jsonl"
    manifest.parent.mkdir()
    lines = [{"video": str(clip), "prompt": "p", "name": "../../../victim/settings"},
             {"video": str(clip), "prompt": "p", "name": "report"},
             {"video": str(clip), "prompt": "p", "name": ".hidden"},
             {"video": str(clip), "prompt": "p", "name": "/etc/passwd"},
             {"video": str(clip), "prompt": "p", "name": "..", "seed": 2**70},
             {"video": str(clip), "prompt": "p", "seed": -3},
             {"video": str(clip), "prompt": "p", "name": "a\u00e9\u4e2d/b"}]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    base = evaluate.parser().parse_args(["--manifest", str(manifest)])
    out = tmp_path / "results"
    jobs, failures = evaluate.read_manifest(manifest, base, ["lipar"], out)
    assert [j.name for j in jobs] == ["_.._.._victim_settings", "report_2", "hidden", "_etc_passwd", "a___b"]
    for job in jobs:
        assert Path(job.out).resolve().parent == out.resolve()
    assert [(f["line"], "seed" in f["error"]) for f in failures] == [(5, True), (6, True)]


def test_a_bad_value_in_one_job_skips_that_job_and_the_batch_goes_on(clip, weights, tmp_path, capsys):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"video": str(clip), "prompt": "p", "seed": 2**70}) + "\n"
                        + json.dumps({"video": str(clip), "prompt": "p", "name": "good"}) + "\n")
    code = cli.guarded(evaluate.main, ["--manifest", str(manifest), "--weights", str(weights), "--out",
                                       str(tmp_path / "r"), *SMALL])
    printed = capsys.readouterr()
    assert code == 1 and "line 1:" in printed.out and "1 of 2 jobs edited" in printed.out, printed
    assert len(io.read_video(tmp_path / "r" / "good.mp4")[0]) == 12


def test_a_manifest_in_another_encoding_is_one_sentence(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.jsonl").write_bytes(b'{"video": "caf\xe9.mp4", "prompt": "p"}\n')
    assert cli.guarded(evaluate.main, ["--manifest", "jobs.jsonl", "--weights", str(weights)]) == 2
    err = one_error(capsys)
    assert "jobs.jsonl is not UTF-8 text" in err


def test_an_existing_job_stats_file_is_not_replaced(clip, weights, tmp_path, capsys):
    """A job whose video is new but whose stats file exists (another batch's) is
    refused with its line, without --overwrite; the file is kept."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "ball.json").write_text('{"someone": "else"}')
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"video": str(clip), "prompt": "p"}) + "\n")
    code = cli.guarded(evaluate.main, ["--manifest", str(manifest), "--weights", str(weights), "--out", str(out),
                                       *SMALL])
    printed = capsys.readouterr()
    assert code == 1 and "ball.json already exists" in printed.out, printed
    assert (out / "ball.json").read_text() == '{"someone": "else"}' and not (out / "ball.mp4").exists()


# -----------------------------------------------------------------------------
# 10, 11: pipes and cut-short inputs


def feed(path, data):
    def write():
        with open(path, "wb") as pipe:
            pipe.write(data)
    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_a_named_pipe_is_read_as_a_stream(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "in.mkv"
    with av.open(str(source), "w") as out:  # matroska: readable front to back
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 112, 64, "yuv420p"
        for pixels in demo.demo_frames(64, 112, 12).numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.mkfifo(tmp_path / "fifo")
    writer = feed(tmp_path / "fifo", source.read_bytes())
    assert run_cli(["--video", "fifo", "--out", "e.mp4"], weights) == 0
    writer.join(timeout=10)
    assert len(io.read_video(tmp_path / "e.mp4")[0]) == 12 and (tmp_path / "fifo").is_fifo()


def test_process_substitution_dev_fd_is_read(clip, weights, tmp_path):
    """`--video <(cat clip.mp4)`: bash hands the program /dev/fd/N, a pipe."""
    result = subprocess.run(["bash", "-c", f'"{sys.executable}" "{ROOT / "sample.py"}" --video <(cat "{clip}") '
                             f'--out e.mp4 --weights "{weights}" ' + " ".join(SMALL)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(io.read_video(tmp_path / "e.mp4")[0]) == 12


def test_a_cut_short_faststart_mp4_says_how_many_frames_it_edited(weights, tmp_path, monkeypatch, capsys):
    """A faststart mp4 (its index first) cut in half: the index states every frame; the
    frames present are edited, and a note says how many of how many."""
    monkeypatch.chdir(tmp_path)
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 112, 64, "yuv420p"
        grain = torch.randint(0, 40, (41, 64, 112, 3), generator=torch.Generator().manual_seed(0))
        frames = (demo.demo_frames(64, 112, 41) + grain - 20).clamp(0, 255).to(torch.uint8)  # half holds 13 frames
        for pixels in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = whole.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
    assert run_cli(["--video", "cut.mp4", "--out", "e.mp4", "--json", "s.json"], weights) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    edited = len(io.read_video(tmp_path / "e.mp4")[0])
    assert 0 < edited < 41 and stats["frames"] == edited
    assert any(note.startswith(f"cut.mp4 ended after {edited} of the 41 frames") for note in stats["notes"]), stats


def test_an_empty_pipe_is_one_sentence(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    writer = feed(tmp_path / "fifo", b"")
    assert run_cli(["--video", "fifo", "--out", "e.mp4"], weights) == 2
    writer.join(timeout=10)
    one_error(capsys)
    assert not (tmp_path / "e.mp4").exists()


# -----------------------------------------------------------------------------
# 12, and the demo: what would be ignored is said or refused


def test_a_prompt_longer_than_the_encoder_reads_is_noted(weights):
    models = sample.Models(weights, "cpu", torch.float32, "cpu", vae="tiny")
    notes = []
    prompt = " ".join(["ball"] * 600)
    sample.encode_prompts(models.text_encoder, [prompt], "cpu", torch.float32, notes)
    assert notes == ["the prompt is 601 tokens long; the text encoder reads its first 511 (and the end mark): "
                     "shorten it to keep the rest"]


def test_the_demo_honours_mode_and_refuses_what_that_mode_ignores(tmp_path, monkeypatch, capsys):
    """`python sample.py --mode full` runs the demo in that mode alone (with the mask
    preview); a flag that mode ignores is refused as it is for a given video."""
    monkeypatch.chdir(tmp_path)
    assert cli.guarded(sample.main, ["--mode", "full", "--m", "1,6", "--device", "cpu"]) == 2
    assert "--m sets the M-degree window" in one_error(capsys)
    args, settings, _ = cli.parse(["--mode", "full", "--device", "cpu"])
    assert settings.modes == ["full"] and cli.output_kinds(args, settings.modes) == ["full", "mask"]
    args, settings, _ = cli.parse(["--device", "cpu"])
    assert cli.output_kinds(args, settings.modes) == ["full", "lipar", "compare", "mask"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, named", [
    (["--check-weights", "--video", "x.mp4"], "--check-weights runs on its own and edits nothing; drop --video"),
    (["--convert-checkpoint", "a.pt", "b.safetensors", "--out", "e.mp4", "--json", "s.json"],
     "--convert-checkpoint runs on its own and edits nothing; drop --out, --json"),
    (["--check-weights", "--convert-checkpoint", "a.pt", "b.safetensors"], "drop --convert-checkpoint"),
    (["--check-weights", "--fp8"], "--check-weights runs on its own and edits nothing; drop --fp8"),
    (["--check-weights", "--theta", "0.2", "--seed", "3", "--overwrite"], "drop --theta, --seed, --overwrite"),
    (["--convert-checkpoint", "a.pt", "b.safetensors", "--prompt", "a cat", "--weights", "w"],
     "drop --prompt, --weights"),
])
def test_the_weight_tools_refuse_edit_flags_they_would_ignore(flags, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.guarded(sample.main, flags) == 2
    assert named in one_error(capsys) and list(tmp_path.iterdir()) == []


def test_a_text_output_that_cannot_be_written_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk or a file-size limit while --json (or a report) is written: OutputError
    (exit 2 through cli.guarded), neither the target nor its partial file left."""
    import errno

    def full(self, text):
        raise OSError(errno.EFBIG, "File too large")
    monkeypatch.setattr(Path, "write_text", full)
    target = tmp_path / "stats.json"
    with pytest.raises(files.OutputError, match="could not write .*File too large"):
        files.write_text(target, "{}")
    assert list(tmp_path.iterdir()) == []
