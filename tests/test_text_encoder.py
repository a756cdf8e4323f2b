"""umT5 text encoder and tokenizer: parity with transformers, key layouts, errors."""

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from text_encoder import T5Config, UMT5Encoder, clean_prompt
from weights import (WeightsError, load_text_encoder, load_tokenizer, t5_config_from_tensors,
                     t5_to_native)

WEIGHTS = Path(__file__).resolve().parent / "manifests"  # copies of shared/reference/weights
TEXT_LEN = 512


def read_tsv(name):
    rows = (WEIGHTS / name).read_text().splitlines()[1:]
    return {name: tuple(ast.literal_eval(shape)) for name, shape in (row.split("\t") for row in rows)}


# --- a tiny tokenizer.json shaped like umT5's (Unigram + Metaspace, </s> appended) ---

PIECES = ["a", "b", "c", "cat", "dog", "red", "blue"]


def make_tokenizer_json(folder, post_processor=True):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in PIECES] + [(ch, -4.0) for ch in "abcdeglortu"]
    tok = HFTokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


PROMPTS = ["a red cat", " ".join(["blue dog"] * 400), "c  b\n a"]  # the second is 800 tokens long


def test_tokenizer_pad_truncate_eos_matches_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    path = make_tokenizer_json(tmp_path)
    ids, mask = load_tokenizer(path)(PROMPTS)
    assert ids.shape == mask.shape == (3, TEXT_LEN) and ids.dtype == torch.long
    # short prompt: ▁a ▁red ▁cat </s>, then <pad> (id 0) with mask 0
    assert ids[0, :4].tolist() == [4, 9, 7, 1] and mask[0].sum() == 4
    assert (ids[0, 4:] == 0).all() and (mask[0, 4:] == 0).all()
    # long prompt: cut to 511 tokens, </s> kept as the last one
    assert mask[1].all() and ids[1, -1] == 1 and (ids[1, :-1] != 1).all()
    # exactly what transformers' fast tokenizer does with Wan's arguments (on the cleaned text)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    ref = hf([clean_prompt(p) for p in PROMPTS], padding="max_length", truncation=True, max_length=TEXT_LEN,
             add_special_tokens=True, return_tensors="pt")
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
    # a tokenizer.json without the </s> post-processor gives the same ids (EOS added once, by us)
    ids2, mask2 = load_tokenizer(make_tokenizer_json(tmp_path / "plain", post_processor=False))(PROMPTS)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)


def test_whitespace_cleaning(tmp_path):
    assert clean_prompt("  a   b\n c\t") == "a b c"
    assert clean_prompt("cat &amp;amp; dog") == "cat & dog"  # Wan unescapes html twice
    tok = load_tokenizer(make_tokenizer_json(tmp_path))
    ids, mask = tok(["a   b\n c", "a b c"])
    assert torch.equal(ids[0], ids[1]) and torch.equal(mask[0], mask[1])
    assert ids[0, :4].tolist() == [4, 5, 6, 1]


# --- parity with transformers.UMT5EncoderModel --------------------------------

def hf_tiny_model(seed=0):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = T5Config.tiny()
    hf_cfg = UMT5Config(vocab_size=cfg.vocab, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.ffn,
                        num_layers=cfg.layers, num_heads=cfg.heads, relative_attention_num_buckets=cfg.buckets,
                        relative_attention_max_distance=cfg.max_distance, layer_norm_epsilon=cfg.eps,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(seed)
    model = UMT5EncoderModel(hf_cfg).eval()
    with torch.no_grad():  # random weights of a size that makes every part matter
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name or "shared" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    return model, hf_cfg


def hf_state(model):
    """The HF file as transformers writes it for the diffusers repo: both tied names present."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert "shared.weight" in state and "encoder.embed_tokens.weight" in state
    return state


def native_state(hf):
    """HF -> Wan native names, written out key by key (independent of t5_section's rules)."""
    out = {"token_embedding.weight": hf["shared.weight"], "norm.weight": hf["encoder.final_layer_norm.weight"]}
    for i in range(T5Config.tiny().layers):
        h = f"encoder.block.{i}.layer."
        out[f"blocks.{i}.norm1.weight"] = hf[h + "0.layer_norm.weight"]
        for p in "qkvo":
            out[f"blocks.{i}.attn.{p}.weight"] = hf[h + f"0.SelfAttention.{p}.weight"]
        out[f"blocks.{i}.pos_embedding.embedding.weight"] = hf[h + "0.SelfAttention.relative_attention_bias.weight"]
        out[f"blocks.{i}.norm2.weight"] = hf[h + "1.layer_norm.weight"]
        out[f"blocks.{i}.ffn.gate.0.weight"] = hf[h + "1.DenseReluDense.wi_0.weight"]  # GELU branch
        out[f"blocks.{i}.ffn.fc1.weight"] = hf[h + "1.DenseReluDense.wi_1.weight"]    # linear branch
        out[f"blocks.{i}.ffn.fc2.weight"] = hf[h + "1.DenseReluDense.wo.weight"]
    return out


def random_ids(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), TEXT_LEN), generator=g)
    mask = torch.zeros(len(lengths), TEXT_LEN, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, n - 1] = 1          # </s>
        ids[i, n:] = 0             # <pad>
        mask[i, :n] = 1
    return ids, mask


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", ["hf", "hf_shared_only", "hf_embed_only", "native", "native_no_config"])
def test_umt5_parity_with_transformers(tmp_path, layout):
    model, hf_cfg = hf_tiny_model()
    state = hf_state(model)
    config = hf_cfg.to_dict()
    if layout == "hf_shared_only":
        del state["encoder.embed_tokens.weight"]
    elif layout == "hf_embed_only":
        del state["shared.weight"]
    elif layout.startswith("native"):
        state = native_state(state)
        # Wan's release folder holds the DiT's config.json beside the T5 file: must be ignored
        config = {"dim": 1536, "num_layers": 30} if layout == "native_no_config" else None
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    encoder = load_text_encoder(folder, make_tokenizer_json(tmp_path / "tok")).encoder
    assert encoder.cfg == T5Config.tiny()

    # lengths past max_distance (128) exercise the log-spaced and the last buckets
    lengths = [300, 9, TEXT_LEN]
    ids, mask = random_ids(lengths, T5Config.tiny().vocab)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = encoder(ids, mask)
    assert ours.shape == (3, TEXT_LEN, T5Config.tiny().dim)
    for i, n in enumerate(lengths):
        err = rel_err(ours[i, :n], ref[i, :n])
        print(f"{layout} prompt {i} (len {n}): rel err {err:.2e}, max abs {(ours[i, :n] - ref[i, :n]).abs().max():.2e}")
        assert err < 1e-5
        assert (ours[i, n:] == 0).all()


def test_parity_test_catches_swapped_gate():
    """Sanity check of the test itself: the gate/linear branches are not interchangeable."""
    model, _ = hf_tiny_model()
    native = native_state(hf_state(model))
    for i in range(T5Config.tiny().layers):
        g, f = f"blocks.{i}.ffn.gate.0.weight", f"blocks.{i}.ffn.fc1.weight"
        native[g], native[f] = native[f], native[g]
    encoder = UMT5Encoder(T5Config.tiny())
    encoder.load_state_dict(native)
    ids, mask = random_ids([40], T5Config.tiny().vocab)
    with torch.no_grad():
        err = rel_err(encoder(ids, mask)[0, :40], model(input_ids=ids, attention_mask=mask).last_hidden_state[0, :40])
    assert err > 1e-2


def test_bf16_runs_close_to_fp32(tmp_path):
    model, hf_cfg = hf_tiny_model()
    save_file(hf_state(model), str(tmp_path / "t5.safetensors"))
    tok = make_tokenizer_json(tmp_path / "tok")
    fp32 = load_text_encoder(tmp_path / "t5.safetensors", tok)  # no config.json: sizes from shapes
    bf16 = load_text_encoder(tmp_path / "t5.safetensors", tok, dtype=torch.bfloat16)
    a, b = fp32.encode(["a red cat", "blue dog"]), bf16.encode(["a red cat", "blue dog"])
    assert b.dtype == torch.bfloat16 and rel_err(b.float()[:, :4], a[:, :4]) < 5e-2
    assert (a[0, 4:] == 0).all() and (b[1, 3:] == 0).all()


# --- the full-size model and the published key layouts ------------------------

def test_full_size_names_and_shapes_match_native_tsv():
    with torch.device("meta"):
        encoder = UMT5Encoder(T5Config())
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert ours == read_tsv("umt5_xxl_encoder_native.tsv")


def test_hf_layout_maps_one_to_one_onto_native():
    hf = read_tsv("umt5_xxl_encoder_hf.tsv")
    native = read_tsv("umt5_xxl_encoder_native.tsv")
    assert "shared.weight" in hf and "encoder.embed_tokens.weight" in hf
    tensors = {k: torch.empty(s, device="meta") for k, s in hf.items()}
    mapped, layout = t5_to_native(tensors)
    assert layout == "hf"
    assert {k: tuple(v.shape) for k, v in mapped.items()} == native
    assert len(mapped) == len(hf) - 1  # only the tied duplicate is dropped
    for key in hf:  # every HF tensor lands on a distinct native one (the tied pair on the same)
        if key != "encoder.embed_tokens.weight":
            assert any(mapped[n] is tensors[key] for n in mapped), key
    same, layout = t5_to_native({k: torch.empty(s, device="meta") for k, s in native.items()})
    assert layout == "native" and set(same) == set(native)
    assert t5_config_from_tensors(mapped) == T5Config()


# --- errors -----------------------------------------------------------------

def write_broken(tmp_path, edit):
    model, hf_cfg = hf_tiny_model()
    state = hf_state(model)
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg.to_dict()))
    return tmp_path


def test_missing_tensor_is_named(tmp_path):
    folder = write_broken(tmp_path, lambda s: s.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight"))
    with pytest.raises(WeightsError, match=r"hf layout.*missing 1: blocks\.1\.ffn\.fc2\.weight"):
        load_text_encoder(folder, make_tokenizer_json(tmp_path / "tok"))


def test_wrong_shape_is_named(tmp_path):
    def edit(s):
        s["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(16, 32)
    folder = write_broken(tmp_path, edit)
    with pytest.raises(WeightsError, match=r"mis-shaped 1: blocks\.0\.attn\.q\.weight \(16, 32\) != \(32, 32\)"):
        load_text_encoder(folder, make_tokenizer_json(tmp_path / "tok"))


def test_tied_copies_must_agree_and_unknown_layout_fails(tmp_path):
    def edit(s):
        s["encoder.embed_tokens.weight"] = s["encoder.embed_tokens.weight"] + 1
    folder = write_broken(tmp_path, edit)
    with pytest.raises(WeightsError, match="tied copy"):
        load_text_encoder(folder, make_tokenizer_json(tmp_path / "tok"))
    with pytest.raises(WeightsError, match="no known layout"):
        t5_to_native({"transformer.h.0.weight": torch.zeros(1)})
