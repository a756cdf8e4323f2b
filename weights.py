"""
Weight files: one safetensors reader and one checker shared by the DiT, the two VAEs
and the text encoder; each network's key layouts (the original releases and the
diffusers/transformers ones) mapped onto our module names; `--check-weights` and the
one-time conversion of a pickled checkpoint. The networks (model.py, vae.py,
tiny_vae.py, text_encoder.py) know nothing of files; this module builds them from files.
"""

import json
import re
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch

from configs import ConfigError, agree, build, check
from fp8 import quantize_ffn
from model import CausalWanModel, DiTConfig
from text_encoder import T5Config, TextEncoder, Tokenizer, UMT5Encoder
from tiny_vae import TGrow, TinyVAE, TinyVAEConfig
from vae import VAEConfig, WanVAE


class WeightsError(Exception):
    """A weight file is missing, unreadable or does not match the model."""


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_json(path, what):
    """A JSON file beside the weights, or one WeightsError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise WeightsError(f"{path} ({what}) cannot be read as JSON ({err}); download it again") from None


def read_safetensors(path, shapes_only=False):
    """Read a .safetensors file, or a folder holding one or several shards.

    Returns (tensors, config): tensors is a flat {name: tensor} dict on the CPU,
    config the parsed config.json beside the weights (or None). A folder may hold
    a single *.safetensors file or shards listed in a *.index.json, as the
    diffusers repos' transformer/, vae/ and text_encoder/ folders do. With
    shapes_only the tensors are empty `meta` tensors (of the stored dtype) read from
    the file headers: enough to check names and shapes of a multi-GB checkpoint in a second.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise WeightsError(f"{path} is a link that leads nowhere (or to itself); point it at the weights")
    if not path.exists():
        raise WeightsError(f"weights not found: {path} does not exist (see weights.md for what to download)")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            index = read_json(indexes[0], "the index of the shards")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{indexes[0]} has no weight_map of tensor names to shard files; download it "
                                   "again")
            if outside := [name for name in weight_map.values() if not isinstance(name, str) or Path(name).name != name
                           or name in ("", ".", "..")]:
                raise WeightsError(f"{indexes[0]} names the shard {outside[0]!r}, not a file in {path}; download "
                                   "the index again")
            shards = sorted({path / name for name in weight_map.values()})
        else:
            shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise WeightsError(f"no .safetensors file in {path} (see weights.md for the expected layout)")
        if len(shards) > 1 and not indexes:
            raise WeightsError(f"{path} holds several .safetensors files but no *.index.json; point to one file instead")
    else:
        if path.suffix in (".pt", ".pth", ".bin"):
            raise WeightsError(f"{path} is a pickled checkpoint; convert it once to safetensors as weights.md shows")
        shards = [path]
    tensors = {}
    for shard in shards:
        if shard.is_symlink() and not shard.exists():
            raise WeightsError(f"{shard} is a link that leads nowhere (or to itself); point it at the shard")
        if not shard.exists():
            raise WeightsError(f"shard {shard.name} listed in the index of {folder} is missing")
        try:
            if shapes_only:
                with safe_open(str(shard), "pt") as f:
                    for k in f.keys():
                        stored = f.get_slice(k)
                        tensors[k] = torch.empty(stored.get_shape(), device="meta",
                                                 dtype=SAFETENSORS_DTYPES.get(stored.get_dtype(), torch.uint8))
            else:
                tensors.update(load_file(str(shard)))
        except Exception as err:  # safetensors raises several types; name the file once
            raise WeightsError(f"{shard} is not a readable safetensors file ({err})") from None
    config_file = folder / "config.json"
    config = read_json(config_file, "the model's configuration") if config_file.exists() else None
    if config is not None and not isinstance(config, dict):
        raise WeightsError(f"{config_file} is not a JSON object of settings; download it again")
    return tensors, config


def check_tensors(module, tensors, layout, what):
    """Raise one WeightsError listing the missing, unexpected, mis-shaped and mis-typed tensors
    (a number where the model holds a weight must be a floating-point one)."""
    expected = {name: p for name, p in module.state_dict(keep_vars=True).items()}
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    misshaped = [f"{n} {tuple(tensors[n].shape)} != {tuple(p.shape)}"
                 for n, p in expected.items() if n in tensors and tensors[n].shape != p.shape]
    mistyped = [f"{n} {str(tensors[n].dtype).removeprefix('torch.')}" for n, p in expected.items()
                if n in tensors and p.is_floating_point() and not tensors[n].is_floating_point()]
    if missing or unexpected or misshaped or mistyped:
        def first(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        problems = [f"{label} {len(items)}: {first(items)}"
                    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                                         ("not floating-point", mistyped)) if items]
        raise WeightsError(f"{what} weights ({layout} layout detected) do not match the model: " + "; ".join(problems))


def load_into(module, tensors, layout, what, device="cpu", dtype=torch.float32):
    """Check `tensors` against `module`'s parameters, then assign them in place.

    `module` is built on the meta device, so the weights are never held twice:
    each tensor is moved to (device, dtype) and becomes the parameter itself.
    """
    check_tensors(module, tensors, layout, what)
    for name in list(tensors):
        tensor = tensors.pop(name)  # drop our reference as we go: one copy in memory
        tensors[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    module.load_state_dict(tensors, assign=True)
    return module.to(device)


def rename(tensors, rules):
    """Apply (regex, replacement) rules to every key; the first rule that matches wins."""
    renamed = {}
    for key, tensor in tensors.items():
        for pattern, repl in rules:
            new, hits = re.subn(pattern, repl, key)
            if hits:
                key = new
                break
        renamed[key] = tensor
    return renamed


# -----------------------------------------------------------------------------
# The DiT


# diffusers (WanTransformer3DModel) names → native Wan names, which our modules use.
DIT_DIFFUSERS_TO_NATIVE = [
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.", r"blocks.\1.self_attn."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.", r"blocks.\1.cross_attn."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # the cross-attention norm
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]


def native_dit_tensors(tensors):
    """Bring a DiT state dict of any supported layout to native Wan names.

    Returns (tensors, layout). The Self-Forcing checkpoint holds two generators; its
    EMA weights (`generator_ema.`) are the ones the authors sample with.
    """
    if any(k.startswith("generator_ema.") for k in tensors):
        tensors = {k[len("generator_ema."):]: t for k, t in tensors.items() if k.startswith("generator_ema.")}
        layout = "Self-Forcing (generator_ema)"
    elif any(k.startswith("generator.") for k in tensors):
        tensors = {k[len("generator."):]: t for k, t in tensors.items() if k.startswith("generator.")}
        layout = "Self-Forcing (generator)"
    else:
        layout = None
    if tensors and all(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: t for k, t in tensors.items()}
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in tensors):
        return rename(tensors, DIT_DIFFUSERS_TO_NATIVE), "diffusers"
    return tensors, layout or "native Wan"


def config_path(path):
    """The config.json beside the weights at `path` (a file or its folder)."""
    path = Path(path)
    return (path if path.is_dir() else path.parent) / "config.json"


def block_count(tensors, prefix="blocks."):
    """How many numbered blocks (`blocks.N...`) the tensors hold."""
    return len({k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)})


@contextmanager
def reading_config():
    """A config.json value that cannot build the network (configs.py) is a WeightsError."""
    try:
        yield
    except ConfigError as err:
        raise WeightsError(str(err)) from None


def dit_config(config, tensors, path):
    """The DiTConfig of a checkpoint: from either release's config.json (native Wan:
    dim, num_heads, ...; diffusers: num_attention_heads, ...) or, without one, from the
    tensors' shapes (every released model has 128-dim heads)."""
    if config is not None:
        where, names = config_path(path), {"in_channels": "in_dim", "out_channels": "out_dim"}
        if "num_attention_heads" in config:  # diffusers: the width is heads × head width
            names = {"num_heads": "num_attention_heads"}
            with reading_config():
                for key in ("num_attention_heads", "attention_head_dim"):
                    check(where, key, config.get(key), 1)
            config = dict(config, dim=config["num_attention_heads"] * config["attention_head_dim"],
                          num_heads=config["num_attention_heads"], in_dim=config.get("in_channels"),
                          out_dim=config.get("out_channels"))
        renamed = dict(config, in_channels=config.get("in_dim"), out_channels=config.get("out_dim"))
        known = {f.name for f in fields(DiTConfig)}
        with reading_config():
            cfg = build(DiTConfig, {k: v for k, v in renamed.items() if k in known and v is not None}, where, names)
            if cfg.dim % cfg.num_heads or cfg.head_dim % 2:
                raise ConfigError(f"{where}: dim={cfg.dim} does not split into num_heads={cfg.num_heads} heads of "
                                  "an even width (rotary embeddings turn pairs); download the config.json again")
            agree(where, f"num_layers={cfg.num_layers}", cfg.num_layers, block_count(tensors), "DiT blocks")
        return cfg
    dim, in_channels = tensors["patch_embedding.weight"].shape[:2]
    if dim % 128:
        raise WeightsError(f"{path}: cannot infer the head count of a {dim}-wide DiT without a config.json")
    return DiTConfig(dim=dim, in_channels=in_channels, num_heads=dim // 128, num_layers=block_count(tensors),
                     ffn_dim=tensors["blocks.0.ffn.0.weight"].shape[0],
                     freq_dim=tensors["time_embedding.0.weight"].shape[1],
                     text_dim=tensors["text_embedding.0.weight"].shape[1],
                     out_channels=tensors["head.head.weight"].shape[0] // 4)


def load_dit(path, device="cpu", dtype=torch.float32, fp8=False):
    """Load the causal DiT from a safetensors file or folder in either layout (see weights.md).
    On device "meta" only the file headers are read: a quick check of names and shapes.
    fp8: the FFN projections quantised to e4m3 once loaded (fp8.py, --fp8)."""
    tensors, config = read_safetensors(path, shapes_only=str(device) == "meta")
    tensors, layout = native_dit_tensors(tensors)
    try:
        cfg = dit_config(config, tensors, path)
    except KeyError as missing:
        raise WeightsError(f"{path} is not a Wan DiT checkpoint ({layout} layout detected): "
                           f"tensor {missing} is missing") from None
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    model = load_into(model, tensors, layout, "DiT", device, dtype).eval().requires_grad_(False)
    return quantize_ffn(model) if fp8 else model


# -----------------------------------------------------------------------------
# The umT5 text encoder and its tokenizer


T5_HF_CONFIG = {"vocab": "vocab_size", "dim": "d_model", "ffn": "d_ff", "heads": "num_heads", "head_dim": "d_kv",
                "layers": "num_layers", "buckets": "relative_attention_num_buckets",
                "max_distance": "relative_attention_max_distance", "eps": "layer_norm_epsilon"}  # ours: theirs


def t5_config_from_hf(config, where="the text encoder's config.json"):
    """From a transformers UMT5Config dict (the config.json of the diffusers text_encoder/)."""
    if config.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise WeightsError(f"{where} has feed_forward_proj={config['feed_forward_proj']!r}; umT5 uses 'gated-gelu'")
    if missing := [key for key in list(T5_HF_CONFIG.values())[:6] if key not in config]:
        raise WeightsError(f"{where} has no {', '.join(missing)}; download the config.json again")
    with reading_config():
        return build(T5Config, {ours: config[theirs] for ours, theirs in T5_HF_CONFIG.items() if theirs in config},
                     where, T5_HF_CONFIG)


def t5_config_from_tensors(tensors):
    """Read the sizes off native-named tensors (Wan's release ships no T5 config.json)."""
    needed = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
              "blocks.0.pos_embedding.embedding.weight"]
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise WeightsError(f"text encoder weights lack {', '.join(missing)}: cannot infer the model size")
    vocab, dim = tensors["token_embedding.weight"].shape
    buckets, heads = tensors["blocks.0.pos_embedding.embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
    return T5Config(vocab=vocab, dim=dim, ffn=tensors["blocks.0.ffn.fc1.weight"].shape[0], heads=heads,
                    head_dim=tensors["blocks.0.attn.q.weight"].shape[0] // heads, layers=layers, buckets=buckets)


# HF / diffusers text_encoder/ names -> ours (first match wins). The HF gated FFN
# computes act(wi_0(x)) * wi_1(x): wi_0 is the GELU branch (our gate.0), wi_1 is fc1.
T5_HF_RULES = [
    (r"^shared\.", "token_embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.", r"blocks.\1.pos_embedding.embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.", r"blocks.\1.attn."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.final_layer_norm\.", "norm."),
]


def t5_to_native(tensors):
    """Detect the key layout of umT5 tensors and return (tensors under our names, layout).

    HF files hold the token embedding as `shared.weight` and/or its tied copy
    `encoder.embed_tokens.weight` (transformers ties the latter to the former). We take
    `shared.weight` when present, else the copy; if both are there they must be equal.
    """
    if any(k.startswith(("shared.", "encoder.")) for k in tensors):
        tensors = dict(tensors)
        copy = tensors.pop("encoder.embed_tokens.weight", None)
        if copy is not None:
            shared = tensors.setdefault("shared.weight", copy)
            if shared is not copy and not any(t.is_meta for t in (shared, copy)) and not (
                    shared.shape == copy.shape and torch.equal(shared, copy)):
                raise WeightsError("text encoder: shared.weight and its tied copy encoder.embed_tokens.weight differ")
        return rename(tensors, T5_HF_RULES), "hf"
    if any(k.startswith(("blocks.", "token_embedding.")) for k in tensors):
        return tensors, "native"
    raise WeightsError("text encoder weights are in no known layout (expected Wan's `blocks.N.attn.q.weight` "
                       f"or HF's `encoder.block.N...`); first keys: {', '.join(list(tensors)[:5])}")


def load_tokenizer(path, text_len=512):
    """The umT5 tokenizer from a tokenizer.json (or the folder holding it)."""
    import tokenizers

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise WeightsError(f"tokenizer not found: {path} does not exist (see weights.md)")
    try:
        return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), text_len)
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise WeightsError(f"{path} is not a usable T5 tokenizer.json ({err})") from None


def load_text_encoder(path, tokenizer_path, device="cpu", dtype=torch.float32):
    """umT5-XXL from safetensors (a file, or the diffusers text_encoder/ folder) in either layout.

    The size comes from a T5 config.json beside the weights when there is one, else
    from the tensor shapes (Wan's release folder holds the DiT's config.json, which is ignored).
    On device "meta" only the file headers are read: a quick check of names and shapes.
    """
    tensors, config = read_safetensors(path, shapes_only=str(device) == "meta")
    tensors, layout = t5_to_native(tensors)
    if config and ("d_model" in config or "feed_forward_proj" in config):  # a T5 config, not the DiT's
        cfg = t5_config_from_hf(config, config_path(path))
        with reading_config():
            agree(config_path(path), f"num_layers={cfg.layers}", cfg.layers, block_count(tensors), "encoder blocks")
    else:
        cfg = t5_config_from_tensors(tensors)
    with torch.device("meta"):
        encoder = UMT5Encoder(cfg)
    load_into(encoder, tensors, layout, "umT5 text encoder", device=device, dtype=dtype)
    return TextEncoder(encoder.eval().requires_grad_(False), load_tokenizer(tokenizer_path, cfg.text_len))


# -----------------------------------------------------------------------------
# The Wan VAE


def vae_config_from_diffusers(config, where="the VAE's config.json"):
    """A diffusers AutoencoderKLWan config.json as a VAEConfig; refuse settings this (Wan 2.1) VAE does not implement."""
    if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise WeightsError(f"the config.json beside the VAE weights is for {config['_class_name']}, "
                           f"not AutoencoderKLWan; point to the VAE's own folder")
    wan21 = {"z_dim": 16, "attn_scales": [], "is_residual": False, "decoder_base_dim": None,
             "patch_size": None, "in_channels": 3, "out_channels": 3}
    other = [f"{key}={config[key]!r}" for key, value in wan21.items() if key in config and config[key] != value]
    if other:
        raise WeightsError(f"the VAE config.json asks for {', '.join(other)}, but only the Wan 2.1 VAE is implemented")
    names = {"base_dim": "base_dim", "dim_mult": "dim_mult", "num_res_blocks": "num_res_blocks",
             "temporal_downsample": "temperal_downsample"}  # ours: theirs
    with reading_config():
        return build(VAEConfig, {ours: config[theirs] for ours, theirs in names.items() if theirs in config}, where,
                     names)


def vae_config_to_diffusers(cfg):
    """A VAEConfig as an AutoencoderKLWan config.json (diffusers spells "temperal")."""
    return {"_class_name": "AutoencoderKLWan", "base_dim": cfg.base_dim, "z_dim": cfg.z_dim,
            "dim_mult": list(cfg.dim_mult), "num_res_blocks": cfg.num_res_blocks,
            "temperal_downsample": list(cfg.temporal_downsample)}


def is_diffusers_layout(tensors):
    """True for AutoencoderKLWan key names, False for the release's (ours)."""
    markers = ("quant_conv.", "conv_in.", "down_blocks.", "mid_block.", "up_blocks.")
    return any(marker in key for key in tensors for marker in markers)


def diffusers_rules(cfg):
    """(regex, replacement) rules turning AutoencoderKLWan keys into ours, in two passes.

    First the layers inside residual blocks (in diffusers keys, norm1/conv1/... occur
    nowhere else), then the block prefixes. The release lists each decoder level
    flat (num_res_blocks + 1 residual blocks, then the upsampler) where diffusers
    nests them in up_blocks, so those rules are generated per block.
    """
    layers = [(r"\.norm1\.", ".residual.0."), (r"\.conv1\.", ".residual.2."),
              (r"\.norm2\.", ".residual.3."), (r"\.conv2\.", ".residual.6."),
              (r"\.conv_shortcut\.", ".shortcut.")]
    blocks = [(r"^quant_conv\.", "conv1."), (r"^post_quant_conv\.", "conv2."),
              (r"^(en|de)coder\.conv_in\.", r"\1coder.conv1."),
              (r"^(en|de)coder\.mid_block\.resnets\.0\.", r"\1coder.middle.0."),
              (r"^(en|de)coder\.mid_block\.attentions\.0\.", r"\1coder.middle.1."),
              (r"^(en|de)coder\.mid_block\.resnets\.1\.", r"\1coder.middle.2."),
              (r"^(en|de)coder\.norm_out\.", r"\1coder.head.0."),
              (r"^(en|de)coder\.conv_out\.", r"\1coder.head.2."),
              (r"^encoder\.down_blocks\.", "encoder.downsamples.")]
    blocks_per_level = cfg.num_res_blocks + 2
    for level in range(len(cfg.dim_mult)):
        first = level * blocks_per_level
        for j in range(cfg.num_res_blocks + 1):
            blocks.append((rf"^decoder\.up_blocks\.{level}\.resnets\.{j}\.", f"decoder.upsamples.{first + j}."))
        if level < len(cfg.dim_mult) - 1:  # the last level keeps its resolution
            blocks.append((rf"^decoder\.up_blocks\.{level}\.upsamplers\.0\.",
                           f"decoder.upsamples.{first + cfg.num_res_blocks + 1}."))
    return layers, blocks


def diffusers_to_native(tensors, cfg):
    """Rename an AutoencoderKLWan state dict to our (the release's) names."""
    layers, blocks = diffusers_rules(cfg)
    return rename(rename(tensors, layers), blocks)


def load_vae(path, device="cpu", dtype=torch.float32):
    """Load the Wan 2.1 VAE from safetensors in either key layout (see weights.md).

    path: the diffusers repo's vae/ folder (or its .safetensors file), or the
    release's Wan2.1_VAE.pth converted to safetensors. The architecture comes
    from the (diffusers-style) config.json beside the weights; without one it is
    the released model's. On device "meta" only the file headers are read: a
    quick check of names and shapes.
    """
    tensors, file_config = read_safetensors(path, shapes_only=str(device) == "meta")
    diffusers = is_diffusers_layout(tensors)
    config = vae_config_from_diffusers(file_config, config_path(path)) if file_config else VAEConfig()
    levels = len(config.dim_mult)  # the encoder: num_res_blocks blocks a level, a downsampling between levels
    with reading_config():
        agree(config_path(path), f"num_res_blocks={config.num_res_blocks}", levels * config.num_res_blocks + levels - 1,
              block_count(tensors, "encoder.down_blocks." if diffusers else "encoder.downsamples."), "encoder blocks")
    if diffusers:
        tensors = diffusers_to_native(tensors, config)
    with torch.device("meta"):
        vae = WanVAE(config)
    return load_into(vae, tensors, "diffusers" if diffusers else "native", "VAE", device, dtype).eval()


# -----------------------------------------------------------------------------
# The tiny VAE (TAEHV)


def load_tiny_vae(path, device="cpu", dtype=torch.float32):
    """TAEHV for Wan 2.1 from safetensors (taew2_1.safetensors, or the folder holding it:
    weights/tiny_vae/ in weights.md's layout). A config.json beside it, if any, sets
    the widths (the tests' narrow models); without one it is taew2_1. On device "meta"
    only the file header is read (a check of names and shapes).
    """
    tensors, config = read_safetensors(path, shapes_only=str(device) == "meta")
    with reading_config():  # a config.json is our own, for narrow test models; taew2_1 comes without one
        cfg = build(TinyVAEConfig, config, config_path(path)) if config else TinyVAEConfig()
    with torch.device("meta"):
        vae = TinyVAE(cfg)
    # The reference loader (taehv.py, patch_tgrow_layers) accepts temporal-growth
    # layers stored with more output rows than the model uses (a checkpoint that grows
    # time more than this model does) and keeps the *last* rows: the latest
    # timestep's. taew2_1 is stored exactly at the model's size; others are cut alike.
    for name, layer in vae.decoder.named_children():
        key = f"decoder.{name}.conv.weight"
        if isinstance(layer, TGrow) and key in tensors and tensors[key].shape[0] > layer.conv.out_channels:
            tensors[key] = tensors[key][-layer.conv.out_channels:]
    return load_into(vae, tensors, "taehv", "tiny VAE", device, dtype).eval()


# -----------------------------------------------------------------------------
# Checking


def check_weights(weights):
    """--check-weights: every file present, every tensor named and shaped right; headers only."""
    weights = Path(weights)
    if not weights.exists():
        raise WeightsError(f"no weights folder at {weights}; download the files listed in weights.md")
    load_dit(weights / "dit", device="meta")
    load_vae(weights / "vae", device="meta")
    load_text_encoder(weights / "text_encoder", weights / "tokenizer", device="meta")
    if (weights / "tiny_vae").exists():
        load_tiny_vae(weights / "tiny_vae", device="meta")
        return f"{weights}: DiT, VAE, tiny VAE, text encoder and tokenizer present, all names and shapes as expected"
    return (f"{weights}: DiT, VAE, text encoder and tokenizer present, all names and shapes as expected (no tiny VAE, "
            f"which --vae tiny needs: see weights.md)")
