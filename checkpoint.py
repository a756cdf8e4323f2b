"""
The one-time conversion of a pickled checkpoint (Self-Forcing's self_forcing_dmd.pt,
TAEHV's taew2_1.pth) to the safetensors file weights.py reads: `sample.py
--convert-checkpoint PT SAFETENSORS`. Nothing in the checkpoint runs (weights_only),
and the target is written whole or not at all (files.py).
"""

from pathlib import Path

import torch

import files
from weights import WeightsError


def convert_checkpoint(source, target, overwrite=False):
    """One-time conversion of Self-Forcing's pickled self_forcing_dmd.pt (or taew2_1.pth)
    to safetensors.

    The .pt is read with weights_only=True (tensors and plain containers only: no code
    runs); we keep the EMA generator, which is what the authors sample with. Every
    problem with the source or the target is one WeightsError; the target is written
    whole or not at all (files.py).
    """
    import pickle
    import warnings

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    source, target = Path(source), Path(target)
    if not source.is_file():
        state = "is a folder" if source.is_dir() else "does not exist"
        raise WeightsError(f"the checkpoint {source} {state}; give the path of the .pt or .pth file")
    if target.suffix != ".safetensors":
        raise WeightsError(f"{target}: the converted file is a safetensors file; give it a .safetensors name")
    if files.same_file(source, target):
        raise WeightsError(f"{target} is the checkpoint itself; choose another path")
    if problem := files.target_problem(target, overwrite):
        raise WeightsError(problem)
    try:
        files.prepare_folder(target)  # before reading a multi-GB checkpoint
    except files.OutputError as err:
        raise WeightsError(str(err)) from None
    for mmap in (True, False):  # mmap reads only zip checkpoints; older (legacy) ones are read whole
        try:
            with warnings.catch_warnings():  # torch's notes on old pickles: the user can do nothing about them
                warnings.simplefilter("ignore")
                checkpoint = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except pickle.UnpicklingError as err:
            if "Weights only load failed" in str(err):
                raise WeightsError(f"{source} holds objects other than tensors and plain containers, which are "
                                   "refused unread (no code from a checkpoint ever runs); give the checkpoint as "
                                   "its authors published it") from None
            failure = err
        except Exception as err:  # torch.load's errors on a file that is no checkpoint vary by what it holds
            if mmap and "mmap" in str(err):
                continue
            failure = err
        if isinstance(failure, OSError):
            raise WeightsError(f"cannot read {source} ({failure.strerror or failure}); check its permissions") \
                from None
        raise WeightsError(f"{source} is not a PyTorch checkpoint (torch.load cannot read it); give the .pt or "
                           ".pth file as downloaded, or download it again") from None
    state = checkpoint.get("generator_ema", checkpoint.get("generator", checkpoint)) \
        if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{source} holds no state dict of tensors (found {type(state).__name__}"
                           + (" with other values" if isinstance(state, dict) else "") + "); give the checkpoint "
                           "whose weights to convert")
    tensors = checkpoint_tensors(state, source)
    try:
        with files.writing(target, overwrite) as partial:
            try:
                save_file(tensors, str(partial))
            except (OSError, SafetensorError) as err:  # a full disk, a file-size limit
                raise WeightsError(f"could not write {target} ({getattr(err, 'strerror', None) or err}); free some "
                                   "space or choose another path") from None
    except files.OutputError as err:
        raise WeightsError(str(err)) from None
    return f"wrote {len(tensors)} tensors to {target}"


def checkpoint_tensors(state, source):
    """{name: tensor} to save from a checkpoint's state dict: names without the "model."
    prefix, each tensor dense and with its own memory (safetensors stores no views);
    a state dict safetensors cannot hold as the loaders read it is one WeightsError."""
    if not state:
        raise WeightsError(f"{source} holds an empty state dict; give the checkpoint whose weights to convert")
    tensors, names, storages = {}, {}, set()
    for key, tensor in state.items():
        name = str(key).removeprefix("model.")
        if name in names:
            raise WeightsError(f"{source} holds both {names[name]!r} and {key!r}, one name once the \"model.\" "
                               "prefix is dropped; give the checkpoint as its authors published it")
        if name == "__metadata__":
            raise WeightsError(f"{source} holds a tensor named __metadata__, a name safetensors keeps for itself; "
                               "give the checkpoint as its authors published it")
        kind = "sparse" if tensor.layout != torch.strided else "quantized" if tensor.is_quantized else \
            "without data (on the meta device)" if tensor.is_meta else None
        if kind:
            raise WeightsError(f"the tensor {key!r} in {source} is {kind}, which the loaders do not read; give the "
                               "checkpoint of dense weights as its authors published it")
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():  # tied weights: safetensors stores each once, by name
            tensor = tensor.clone()
        storages.add(storage)
        tensors[name], names[name] = tensor, key
    return tensors
