"""
Fused kernels without compiling in the user's command: the DiT's @fused regions
(model.Block.before_attention and after_attention, model.rotate_keys) compiled ahead
of time with AOTInductor, saved on disk, and loaded by later processes in
milliseconds. sample.py uses them by default on CUDA (`--fusion aot`).

torch.compile (`--fusion compile`) fuses the same regions, but a fresh process pays
Dynamo's tracing and guards for every variant again, seconds even with Inductor's
disk cache warm (BENCHMARKS.md): more than fusion saves on one clip. Here each region
is exported once with torch.export, its weights as inputs (one package serves all 30
blocks) and the token count dynamic (one package serves every kept count; the other
sizes stay fixed, so the kernels do not divide by run-time widths), then compiled by
AOTInductor into a shared library. A package is keyed by everything its code depends
on: the region, the shapes and dtypes of its arguments and weights, the torch and CUDA
versions, the GPU, and the source of model.py and of this file. The first process on a
machine builds what it meets (about a minute a region, reported); later ones load.

The packages live in `kernel_cache()`: $LIPAR_CACHE, else $XDG_CACHE_HOME/lipar, else
~/.cache/lipar, under kernels/. A package is written next to its final name and renamed
into place, so a process that stops while building leaves nothing half written. A
package that fails to load is built again.

Usage: `with model.fusion(aot.Kernels()): ...`: model.fused hands each call of a
region here; a call the packages cannot serve (the CPU, a count of one token, another
attention implementation) runs the plain code.
"""

import hashlib
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn

import model as M

VERSION = 1  # of the export recipe below: part of every package's key

# Where the token count sits in each argument of a region: a dimension index, None for a
# tensor of fixed shape, "const" for a non-tensor (part of the key, not an input), a
# tuple for a tuple of tensors. `module`: the first argument is the block whose weights
# become inputs.
REGIONS = {
    "Block.before_attention": dict(module=True, args=(1, None, (0, 0))),             # x, e, rope
    "Block.after_attention": dict(module=True, args=(1, 1, None, (None, None), "const")),  # x, attended, e, context_kv, impl
    "apply_rope": dict(module=False, args=(1, (0, 0))),                                 # rotate_keys: k, rope
}
MIN_TOKENS, MAX_TOKENS = 2, 1 << 15  # a chunk of 3 frames at 1920×1088 has 24,480 tokens


def kernel_cache():
    """The folder of the compiled packages."""
    root = os.environ.get("LIPAR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lipar"
    return Path(root) / "kernels"


def _source_digest():
    """The code a package was built from: model.py's regions and this recipe."""
    digest = hashlib.sha256(f"{VERSION}".encode())
    for path in (Path(M.__file__), Path(__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _tensors(spec, arg):
    """Flatten `arg` by its spec into [(tensor, token dim or None)] and its constants."""
    if spec == "const":
        return [], [arg]
    if isinstance(spec, tuple):
        tensors, consts = [], []
        for s, a in zip(spec, arg, strict=True):
            t, c = _tensors(s, a)
            tensors += t
            consts += c
        return tensors, consts
    return [(arg, spec)], []


def _describe(tensor, dim):
    """A tensor's part of a key: shape with the token count as -1, dtype, and whether it can be served."""
    shape = list(tensor.shape)
    if dim is not None:
        if not (MIN_TOKENS <= shape[dim] <= MAX_TOKENS):
            return None
        shape[dim] = -1
    return tuple(shape), str(tensor.dtype)


class _Region(nn.Module):
    """The exported form of a region: weights and tensors in, the region's outputs out."""

    def __init__(self, fn, spec, module, consts):
        super().__init__()
        object.__setattr__(self, "fn", fn)        # not registered: its weights are inputs, not constants
        object.__setattr__(self, "module", module)
        self.spec, self.consts = spec, consts

    def forward(self, weights, tensors):
        tensors, consts = list(tensors), list(self.consts)

        def rebuild(spec):
            if spec == "const":
                return consts.pop(0)
            if isinstance(spec, tuple):
                return tuple(rebuild(s) for s in spec)
            return tensors.pop(0)

        args = [rebuild(s) for s in self.spec["args"]]
        if self.module is None:
            return self.fn(*args)
        with torch.nn.utils.stateless._reparametrize_module(self.module, weights):
            return self.fn(self.module, *args)


def export(fn, spec, module, tensors, consts):
    """torch.export of region `fn` on these example arguments, the token count dynamic."""
    weights = {} if module is None else _weights(module)
    tokens = torch.export.Dim("tokens", min=MIN_TOKENS, max=MAX_TOKENS)
    example = tuple(t.contiguous() for t, _ in tensors)
    dims = ({name: None for name in weights}, tuple(None if d is None else {d: tokens} for _, d in tensors))
    with torch.no_grad():
        return torch.export.export(_Region(fn, spec, module, consts), (weights, example), dynamic_shapes=dims,
                                   strict=False)


def written(path, write):
    """write(partial) to `path`'s name in a folder beside it, then moved into place: never
    half a file at `path`. (The name stays: a package's entries are filed under it.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".partial", dir=path.parent)
    partial = os.path.join(folder, path.name)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def build(fn, spec, module, tensors, consts, path):
    """Region `fn`, exported and compiled by AOTInductor into the package `path`."""
    from torch._inductor import aoti_compile_and_package

    program = export(fn, spec, module, tensors, consts)
    written(path, lambda partial: aoti_compile_and_package(program, package_path=partial))


def load(path):
    """A compiled package as a callable (weights, tensors) → outputs."""
    from torch._inductor import aoti_load_package
    return aoti_load_package(str(path))


def _weights(module):
    """A block's weights and buffers by name, as the exported region takes them."""
    return {name: t.detach() for name, t in [*module.named_parameters(), *module.named_buffers()]}


class Kernels:
    """Precompiled kernels for model.fusion: called as kernels(fn, *args) by model.fused, it
    runs fn's package for these argument shapes (loading or building it the first time)
    or, where no package can serve the call, fn itself.

    stats: packages built and loaded, and the seconds each took (sample.py reports them).
    `build` and `load` are AOTInductor's by default; the CPU tests use torch.export's own
    files (the same exported regions, run without compiling) and device_type="cpu".
    """

    def __init__(self, folder=None, build=build, load=load, device_type="cuda"):
        self.folder = Path(folder) if folder is not None else kernel_cache()
        self._build, self._load, self.device_type = build, load, device_type
        self.runners = {}  # package name -> loaded package
        self.names = {}    # a call's shapes -> its package name
        self.weights = weakref.WeakKeyDictionary()  # block -> its weights, as inputs
        self.stats = {"built": 0, "build_s": 0.0, "loaded": 0, "load_s": 0.0, "plain_calls": 0}
        self._source = None

    def key(self, name, module, described, consts):
        """The package's file name: a digest of everything its code depends on."""
        if self._source is None:
            self._source = _source_digest()
        device = torch.cuda.get_device_properties(torch.cuda.current_device()) if torch.cuda.is_available() else None
        parts = [name, self._source, torch.__version__, torch.version.cuda, described, consts,
                 None if device is None else (device.name, device.major, device.minor)]
        if module is not None:
            parts.append([(n, tuple(t.shape), str(t.dtype)) for n, t in self._module_weights(module).items()])
        return f"{name.replace('.', '-')}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:20]}.pt2"

    def _module_weights(self, module):
        if module not in self.weights:
            self.weights[module] = _weights(module)
        return self.weights[module]

    def __call__(self, fn, *args):
        spec = REGIONS.get(fn.__qualname__)
        module = args[0] if spec is not None and spec["module"] else None
        rest = args[1:] if module is not None else args
        if spec is None or len(rest) != len(spec["args"]):
            return self._plain(fn, args)
        tensors, consts = _tensors(spec["args"], rest)
        if any(not isinstance(t, torch.Tensor) or t.device.type != self.device_type for t, _ in tensors):
            return self._plain(fn, args)
        described = [_describe(t, d) for t, d in tensors]
        if None in described or not any(d is not None for _, d in tensors):
            return self._plain(fn, args)
        memo = (fn.__qualname__, None if module is None else id(module), tuple(described), tuple(consts))
        name = self.names.get(memo) or self.names.setdefault(memo, self.key(fn.__qualname__, module, described,
                                                                             consts))
        runner = self.runners.get(name)
        if runner is None:
            runner = self.runners[name] = self._ready(fn, spec, module, tensors, consts, self.folder / name)
        weights = {} if module is None else self._module_weights(module)
        return runner(weights, tuple(t.contiguous() for t, _ in tensors))  # packages assume contiguous inputs

    def _plain(self, fn, args):
        self.stats["plain_calls"] += 1
        return fn(*args)

    def _ready(self, fn, spec, module, tensors, consts, path):
        """The package at `path`, loaded; built first when absent or unreadable."""
        if path.exists():
            start = time.perf_counter()
            try:
                runner = self._load(path)
            except Exception:  # a package from a crashed build or another torch: build it again
                runner = None
            if runner is not None:
                self.stats["loaded"] += 1
                self.stats["load_s"] += time.perf_counter() - start
                return runner
        start = time.perf_counter()
        self._build(fn, spec, module, tensors, consts, path)
        self.stats["built"] += 1
        self.stats["build_s"] += time.perf_counter() - start
        start = time.perf_counter()
        runner = self._load(path)
        self.stats["loaded"] += 1
        self.stats["load_s"] += time.perf_counter() - start
        return runner

    def describe(self):
        """One line on what this process did with the packages, for the summary."""
        s = self.stats
        if s["built"]:
            return (f"fused kernels: {s['built']} built for this GPU in {s['build_s']:.0f} s (once; kept in "
                    f"{self.folder}), {s['loaded']} loaded")
        return f"fused kernels: {s['loaded']} loaded from {self.folder} in {s['load_s']:.2f} s"
