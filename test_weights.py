"""weights.py: Meta and Hugging Face checkpoint folders, in every file layout, read back to the model written into
them (Hugging Face's q/k layout undone); damaged, foreign or hostile files refused in one sentence; train.py's
model.pt checked; weights.read's own result, ModelArgs' fields and Meta-named tensors. The model: test_model.py.

    python -m pytest -q test_weights.py
"""
import contextlib
import glob
import json
import math
import os
import re
import struct
import sys
from dataclasses import asdict, replace

import pytest
import torch

from conftest import named_pipe
from model import ModelArgs, Transformer, apply_rotary, rope_cos_sin, saved_model
from test_model import logits_of, tiny_model
from weights import check_saved, describe, hf_to_meta_qk, read

# ---------------------------------------------------------------------------------------------------
# the Hugging Face q/k layout

def meta_to_hf_qk(w, n_heads):
    """HF's converter direction: within each head, even rows first, then odd rows."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return torch.cat([w.view(n_heads, hd, in_dim)[:, 0::2],
                     w.view(n_heads, hd, in_dim)[:, 1::2]], dim=1).reshape(out_dim, in_dim)


def hf_rope(x, positions, theta):
    """HF's rotary: rotate the first half of each head against the second half."""
    hd = x.shape[-1]
    angles = positions.double()[..., None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cat([angles, angles], -1).cos()[:, :, None], torch.cat([angles, angles], -1).sin()[:, :, None]
    rotated = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)
    return x * cos + rotated * sin


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_hf_permutation_round_trips(n_heads):
    w = torch.randn(n_heads * 8, 12)
    assert torch.equal(hf_to_meta_qk(meta_to_hf_qk(w, n_heads), n_heads), w)
    assert not torch.equal(meta_to_hf_qk(w, n_heads), w)


def test_unpermuted_hf_weights_give_equal_attention_scores():
    torch.manual_seed(0)
    dim, H, Hkv, hd, T = 32, 4, 2, 8, 6
    wq, wk = torch.randn(H * hd, dim, dtype=torch.float64), torch.randn(Hkv * hd, dim, dtype=torch.float64)
    x, positions = torch.randn(1, T, dim, dtype=torch.float64), torch.arange(T)[None]
    wq_hf, wk_hf = meta_to_hf_qk(wq, H), meta_to_hf_qk(wk, Hkv)
    q_hf = hf_rope((x @ wq_hf.T).view(1, T, H, hd), positions, 1e4)
    k_hf = hf_rope((x @ wk_hf.T).view(1, T, Hkv, hd), positions, 1e4)
    cos, sin = rope_cos_sin(positions, hd, 1e4)
    q = apply_rotary((x @ hf_to_meta_qk(wq_hf, H).T).view(1, T, H, hd), cos.double(), sin.double())
    k = apply_rotary((x @ hf_to_meta_qk(wk_hf, Hkv).T).view(1, T, Hkv, hd), cos.double(), sin.double())
    scores_hf = torch.einsum("bthd,bshd->bhts", q_hf, k_hf.repeat_interleave(H // Hkv, dim=2))
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(H // Hkv, dim=2))
    torch.testing.assert_close(scores, scores_hf, atol=1e-5, rtol=1e-5)  # apply_rotary works in float32


# ---------------------------------------------------------------------------------------------------
# checkpoint loading: directories written by the test from the in-memory model's weights

def write_meta_dir(model, path, embedding_split_dim):
    """Two model-parallel shards as Meta's fairscale layers split them, with rope.freqs and vocab -1."""
    a = model.args
    shards = [{}, {}]
    for name, t in model.state_dict().items():
        if t.dim() == 1:
            parts = [t, t]  # norms are replicated
        elif name.endswith(("wo.weight", "w2.weight")):
            parts = t.chunk(2, dim=1)  # row-parallel
        elif name == "tok_embeddings.weight":
            parts = t.chunk(2, dim=embedding_split_dim)
        else:
            parts = t.chunk(2, dim=0)  # column-parallel
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.randn(a.dim // a.n_heads // 2)
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=-1,
                  multiple_of=a.multiple_of, norm_eps=a.norm_eps, rope_theta=a.rope_theta)
    (path / "params.json").write_text(json.dumps(params))


def hf_state_dict(model):
    a = model.args
    layer_names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                   "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                   "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                   "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                   "ffn_norm": "post_attention_layernorm", "attention.q_norm": "self_attn.q_norm",
                   "attention.k_norm": "self_attn.k_norm"}
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not a.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(a.n_layers):
        for meta, hf in layer_names.items():
            for kind in ("weight", "bias"):
                if f"layers.{i}.{meta}.{kind}" not in sd:
                    continue
                t = sd[f"layers.{i}.{meta}.{kind}"]
                rows = t if kind == "weight" else t[:, None]
                if meta == "attention.wq":
                    t = meta_to_hf_qk(rows, a.n_heads).reshape(t.shape)
                if meta == "attention.wk":
                    t = meta_to_hf_qk(rows, a.n_kv_heads).reshape(t.shape)
                if meta in ("attention.q_norm", "attention.k_norm"):  # a head's components, moved as its rows
                    t = meta_to_hf_qk(t[:, None], 1).reshape(t.shape)
                out[f"model.layers.{i}.{hf}.{kind}"] = t.clone()
    return out


def hf_config(model, model_type="llama"):
    a = model.args
    return dict(model_type=model_type, architectures=["LlamaForCausalLM"], hidden_size=a.dim,
                num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                intermediate_size=a.ffn_hidden_dim, vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps,
                rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len, hidden_act="silu",
                tie_word_embeddings=a.tie_embeddings, torch_dtype="float32", sliding_window=a.sliding_window,
                head_dim=a.head_dim)


def write_hf_bin_dir(model, path):
    """pytorch_model-0000{1,2}-of-00002.bin with an index, plus the inv_freq buffers old conversions kept."""
    sd = hf_state_dict(model)
    names = list(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, half in enumerate(halves):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        shard = {n: sd[n] for n in half}
        shard["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.randn(4)
        torch.save(shard, path / file)
        weight_map.update({n: file for n in shard})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(hf_config(model)))


def write_safetensors(tensors, file):
    """The safetensors format by hand: u64 header length, JSON header, then the raw bytes."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().flatten().view(torch.uint8).numpy().tobytes()  # bytes as stored: float8 too
        kind = {torch.float32: "F32", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64",
                torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[t.dtype]
        header[name] = {"dtype": kind, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.mark.parametrize("n_kv_heads", [2, 4])
@pytest.mark.parametrize("embedding_split_dim", [0, 1])  # LLaMA 3 splits the vocabulary, LLaMA 2 the width
def test_meta_sharded_directory_loads_to_identical_logits(tmp_path, n_kv_heads, embedding_split_dim):
    model = tiny_model(n_kv_heads=n_kv_heads, rope_theta=5e5)
    write_meta_dir(model, tmp_path, embedding_split_dim)
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.args.vocab_size == model.args.vocab_size and loaded.args.rope_theta == 5e5
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def test_meta_shards_are_joined_in_their_numbers_order_whatever_order_the_folder_lists_them(tmp_path, monkeypatch):
    """A folder lists its files in no set order (glob follows it): consolidated.01.pth listed first is still the
    second slice of every split weight."""
    model = tiny_model()
    write_meta_dir(model, tmp_path, 0)
    listed = glob.glob
    monkeypatch.setattr(glob, "glob", lambda pattern: sorted(listed(pattern), reverse=True))
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(Transformer.from_pretrained(tmp_path), tokens), logits_of(model, tokens))


@pytest.mark.parametrize("n_kv_heads", [2, 4])
@pytest.mark.parametrize("config_style", ["transformers4", "transformers5"])
def test_hf_sharded_bin_directory_loads_to_identical_logits(tmp_path, n_kv_heads, config_style):
    model = tiny_model(n_kv_heads=n_kv_heads, rope_theta=5e5)
    write_hf_bin_dir(model, tmp_path)
    if config_style == "transformers5":  # rope_theta moved into rope_parameters
        config = json.loads((tmp_path / "config.json").read_text())
        config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
        (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def test_hf_hand_written_safetensors_loads_to_identical_logits(tmp_path):
    pytest.importorskip("safetensors")
    model = tiny_model()
    write_safetensors(hf_state_dict(model), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    loaded = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def saved_tiny_model(path, layout):
    """A tiny model, written to path as a Hugging Face ("hf") or a Meta ("meta") folder."""
    model = tiny_model()
    if layout == "hf":
        write_hf_bin_dir(model, path)
    else:
        write_meta_dir(model, path, 0)
    return model


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_configuration_files_with_a_bom_load_as_the_clean_files(tmp_path, layout):
    """A UTF-8 byte-order mark (as an editor may save one) in config.json, params.json or a weight index was "not valid
    JSON (line 1: Unexpected UTF-8 BOM ...)", where files.read_json (the tokenizer_config.json beside the same
    checkpoint) and the tokenizer's readers take one."""
    model = saved_tiny_model(tmp_path, layout)
    clean = Transformer.from_pretrained(tmp_path).args
    marked = sorted(tmp_path.glob("*.json"))
    assert len(marked) == (2 if layout == "hf" else 1)
    for file in marked:
        file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes())
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.args == clean
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_from_pretrained_converts_dtype(tmp_path, layout):
    model = saved_tiny_model(tmp_path, layout)
    loaded = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, model.args.vocab_size, (1, 12))
    logits = logits_of(loaded, tokens)
    assert logits.dtype == torch.float32  # the contract: float32 logits (and loss) from a bf16 model
    assert torch.equal(logits, logits_of(model.to(torch.bfloat16), tokens))


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_from_pretrained_puts_every_weight_on_the_device_asked_for(tmp_path, layout):
    """device= reaches every tensor as it is read, in both layouts (the meta device here: a GPU's path without one)."""
    saved_tiny_model(tmp_path, layout)
    loaded = Transformer.from_pretrained(tmp_path, device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in loaded.state_dict().values()} == {("meta", torch.bfloat16)}


@pytest.mark.parametrize("layout", ["hf", "meta"])
@pytest.mark.parametrize("dtype", ["bfloat16", torch.int8, torch.complex64])
def test_a_dtype_that_is_not_a_floating_point_torch_dtype_is_refused_in_one_sentence(tmp_path, layout, dtype):
    """dtype="bfloat16" was a TypeError from deep in the reader; int8 a load_state_dict error after
    reading every weight; complex64 a complex model that failed only at its first forward."""
    saved_tiny_model(tmp_path, layout)
    with pytest.raises(ValueError, match=f"^dtype={re.escape(repr(dtype))} is not a floating-point torch.dtype; "):
        Transformer.from_pretrained(tmp_path, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# errors a user can cause

def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_a_file_given_for_the_checkpoint_directory_is_named_as_not_a_folder_not_as_missing(tmp_path):
    """from_pretrained("folder/model.safetensors") said that a file which is there does not exist."""
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(NotADirectoryError) as error:
        Transformer.from_pretrained(tmp_path / "model.safetensors")
    assert_one_sentence(error, f"checkpoint directory {str(tmp_path / 'model.safetensors')!r} is not a folder; pass "
                               "the folder that holds params.json (Meta) or config.json (Hugging Face)")


def test_a_meta_folder_that_also_holds_a_config_json_loads_its_consolidated_weights(tmp_path):
    """params.json beside consolidated.*.pth is Meta's layout even with a config.json there (Mistral's folders hold a
    params.json beside consolidated.safetensors, which is why config.json wins without .pth files)."""
    model = tiny_model()
    write_meta_dir(model, tmp_path, 0)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    tokens = torch.randint(0, model.args.vocab_size, (1, 8))
    torch.testing.assert_close(Transformer.from_pretrained(tmp_path)(tokens)[0], model(tokens)[0])


def test_a_meta_vocab_size_of_0_is_read_from_the_embedding_as_minus_1_is_and_a_missing_embedding_is_named(tmp_path):
    model = tiny_model()
    write_meta_dir(model, tmp_path, 0)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(params | {"vocab_size": 0}))
    assert Transformer.from_pretrained(tmp_path).args.vocab_size == model.args.vocab_size
    (tmp_path / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "vocab_size"}))
    assert Transformer.from_pretrained(tmp_path).args.vocab_size == model.args.vocab_size  # absent: as -1
    for file in tmp_path.glob("consolidated.*.pth"):
        shard = torch.load(file, weights_only=True)
        del shard["tok_embeddings.weight"]
        torch.save(shard, file)
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, str(tmp_path), "lacks weights the model needs: tok_embeddings.weight")


def test_unknown_layout_is_reported(tmp_path):
    with pytest.raises(ValueError, match="neither params.json.*nor config.json"):
        Transformer.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = tiny_model()
    sd = hf_state_dict(model)
    del sd["model.layers.1.mlp.up_proj.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    with pytest.raises(ValueError, match=r"lacks weights the model needs: layers\.1\.feed_forward\.w3\.weight"):
        Transformer.from_pretrained(tmp_path)
    sd = hf_state_dict(model)
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"does not know: model\.layers\.0\.mlp\.extra\.weight"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("extra, like", [("model.layers.0.self_attn.q_proj.weight.absmax", "q_proj.weight"),
                                         ("lm_head.scales", "lm_head.weight")])  # a suffix as long as ".weight"
def test_a_weight_whose_name_only_starts_or_ends_like_a_known_one_is_unknown_not_taken_for_it(tmp_path, extra, like):
    """A quantiser's companions of a weight (bitsandbytes' absmax, GPTQ's scales) would replace the weight whose
    name they resemble, silently."""
    model = tiny_model()
    sd = hf_state_dict(model)
    sd[extra] = torch.zeros(next(t for n, t in sd.items() if n.endswith(like)).shape)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, f"has weights this model does not know: {extra} (in pytorch_model.bin)")


def test_a_null_tie_word_embeddings_reads_as_untied_a_bool_as_a_saved_model_must_hold(tmp_path):
    """null is allowed for the key (transformers' default: untied); the field stays a bool, so that the model.pt
    of a run from this folder passes check_saved when a later run starts from it."""
    model = tiny_model()
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model) | {"tie_word_embeddings": None}))
    fields, state = read(tmp_path)
    assert fields["tie_embeddings"] is False and "output.weight" in state
    saved = asdict(Transformer.from_pretrained(tmp_path).args)
    check_saved(saved, state, "model.pt", saved.keys())


@pytest.mark.parametrize("name, model_type", [("q_proj.weight", "llama"), ("k_proj.weight", "llama"),
                                              ("q_norm.weight", "qwen3")])
def test_a_q_or_k_weight_of_the_wrong_size_is_a_shape_mismatch_not_an_error_of_the_row_reordering(
        tmp_path, name, model_type):
    """wq, wk and Qwen3's q_norm have their rows put back in Meta's order only when they have the configured shape;
    a row more (an odd count) cannot be reordered and is left for the shape check to name."""
    model = tiny_model(**(dict(qk_norm=True, head_dim=32) if model_type == "qwen3" else {}))
    sd = hf_state_dict(model)
    name = f"model.layers.0.self_attn.{name}"
    sd[name] = torch.cat([sd[name], sd[name][:1]])
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model, model_type)))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    meta = {"q_proj": "attention.wq", "k_proj": "attention.wk", "q_norm": "attention.q_norm"}[name.split(".")[-2]]
    rows = model.state_dict()[f"layers.0.{meta}.weight"].shape[0]
    assert_one_sentence(error, f"layers.0.{meta}.weight has shape ({rows + 1},", f"the model expects ({rows},")


def test_a_folder_with_both_model_safetensors_and_pytorch_model_bin_reads_the_safetensors(tmp_path):
    """As transformers does: no pickle, memory-mapped. The .bin beside it (another model's here) is not read."""
    pytest.importorskip("safetensors")
    model = tiny_model()
    write_safetensors(hf_state_dict(model), tmp_path / "model.safetensors")
    torch.save(hf_state_dict(tiny_model(seed=1)), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(Transformer.from_pretrained(tmp_path), tokens), logits_of(model, tokens))


def test_a_pytorch_model_bin_is_read_before_a_safetensors_file_of_another_name_beside_it(tmp_path):
    """As transformers does: pytorch_model.bin is the checkpoint, not another *.safetensors in its folder (Mistral's
    consolidated.safetensors; another model's here), which only a folder without either single file falls back to."""
    pytest.importorskip("safetensors")
    model = tiny_model()
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    write_safetensors(hf_state_dict(tiny_model(seed=1)), tmp_path / "consolidated.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(Transformer.from_pretrained(tmp_path), tokens), logits_of(model, tokens))


@pytest.mark.parametrize("n", [5, 7])
def test_unknown_weights_are_named_five_at_most_and_the_rest_counted(tmp_path, n):
    model = tiny_model()
    extra = [f"model.layers.0.mlp.extra{i}.weight" for i in range(n)]
    torch.save(hf_state_dict(model) | {name: torch.zeros(2) for name in extra}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    listed = ", ".join(extra[:5]) + (f" and {n - 5} more" if n > 5 else "")
    assert_one_sentence(error, f"does not know: {listed} (in pytorch_model.bin)")


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model-00001-of-00002.bin", "consolidated.00.pth"])
def test_a_weight_file_whose_link_leads_nowhere_is_named_as_a_broken_link(tmp_path, name):
    """Hugging Face's cache links each file of a snapshot to a blob: a blob gone (an interrupted download) leaves a
    link that the folder lists and that cannot be opened, which is a missing file, not a damaged one (a .bin's or a
    .pth's was torch's bare "[Errno 2] No such file or directory")."""
    if name.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    if name.endswith(".pth"):  # Meta's files, as in the original/ folder of a Hugging Face download
        (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 8}))
    else:
        (tmp_path / "config.json").write_text(json.dumps(hf_config(tiny_model())))
    (tmp_path / name).symlink_to(tmp_path / "blobs" / "0123abcd")
    with pytest.raises(FileNotFoundError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, f"{tmp_path / name} is a broken link ({tmp_path / 'blobs' / '0123abcd'} does not "
                               "exist); download it again")


def test_a_config_json_without_model_type_is_read_as_llamas(tmp_path):
    """Hand-written and older conversions leave model_type out; transformers' LlamaConfig reads them."""
    model = tiny_model()
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    config = hf_config(model)
    del config["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(Transformer.from_pretrained(tmp_path), tokens), logits_of(model, tokens))


def test_a_config_json_naming_silu_swish_is_read_as_silu(tmp_path):
    """transformers' ACT2FN maps "swish" to the same nn.SiLU as "silu": such a config was refused."""
    model = tiny_model()
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model) | {"hidden_act": "swish"}))
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(Transformer.from_pretrained(tmp_path), tokens), logits_of(model, tokens))


def test_shape_mismatch_names_weight_and_both_shapes_and_the_folder(tmp_path):
    """The folder too: train.py's init_from may be one of several, and the sentence said only "the config"."""
    model = tiny_model()
    config = hf_config(model)
    config["intermediate_size"] += 32
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(config))
    f = model.args.ffn_hidden_dim
    shapes = rf"layers\.0\.feed_forward\.w1\.weight has shape \({f}, 64\).*expects \({f + 32}, 64\)"
    with pytest.raises(ValueError, match=shapes) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, f"; the configuration in {str(tmp_path)!r} does not fit its weights")


def test_missing_safetensors_package_says_how_to_install(tmp_path, monkeypatch):
    model = tiny_model()
    write_safetensors(hf_state_dict(model), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` fail
    with pytest.raises(ImportError, match="pip install safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_llama31_scaled_rope_is_refused(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4,
                                                     "vocab_size": 8, "use_scaled_rope": True}))
    with pytest.raises(ValueError, match="use_scaled_rope"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, rope", [
    ("rope_scaling", {"rope_type": "dynamic", "factor": 8.0, "rope_theta": 5e5}),
    ("rope_parameters", {"rope_type": "yarn", "factor": 8.0, "rope_theta": 5e5}),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),  # older transformers wrote "type", not "rope_type"
])
def test_hf_rope_scaling_other_than_llama3_is_refused(tmp_path, key, rope):
    model = tiny_model()
    config = hf_config(model)
    config[key] = rope
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"rotary scaling.*{rope.get('rope_type', rope.get('type'))}") as error:
        Transformer.from_pretrained(tmp_path)
    assert "instead of its rope_parameters" not in str(error.value)  # the config has only one of the two


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
ROPE_PRECEDENCE = [  # config.json's rotary keys -> (rope_theta, scaling) as transformers 5 reads them, or the refusal
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_theta": 5e5}, (1e4, None)),
    ({"rope_scaling": {"rope_type": "default", "rope_theta": 3e5}, "rope_parameters": {"rope_theta": 1e4}},
     (3e5, None)),
    ({"rope_scaling": LLAMA3_ROPE, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
     (1e4, (8.0, 1.0, 4.0, 64))),  # rope_scaling replaces rope_parameters whole, its rope_theta included
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
      "rope_scaling": {"type": "linear", "factor": 4.0}},
     "rotary scaling {'type': 'linear', 'factor': 4.0} (its rope_scaling, which transformers reads instead of"),
    ({"rope_scaling": LLAMA3_ROPE | {"type": "linear"}}, (1e4, (8.0, 1.0, 4.0, 64))),  # "rope_type" before "type"
]


@pytest.mark.parametrize("rotary, want", ROPE_PRECEDENCE)
def test_hf_rotary_settings_are_read_with_transformers_precedence(tmp_path, rotary, want):
    """rope_scaling, when present, replaces rope_parameters, and a rope_theta inside the one read overrides the
    top-level one, as in transformers; a scaling that wins but is not implemented is refused, not ignored."""
    model = tiny_model()
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    config = {k: v for k, v in hf_config(model).items() if k != "rope_theta"} | rotary
    (tmp_path / "config.json").write_text(json.dumps(config))
    if isinstance(want, str):
        with pytest.raises(ValueError) as error:
            Transformer.from_pretrained(tmp_path)
        return assert_one_sentence(error, str(tmp_path), want)
    args = Transformer.from_pretrained(tmp_path).args
    assert (args.rope_theta, args.rope_scaling) == want
    try:
        from transformers import LlamaConfig
    except ImportError:
        return
    assert LlamaConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] == want[0]


@pytest.mark.parametrize("change, message", [
    (lambda r: {k: v for k, v in r.items() if k != "factor"}, "has no 'factor'"),
    (lambda r: r | {"original_max_position_embeddings": 0.5}, "original_max_position_embeddings=0.5"),
    (lambda r: r | {"low_freq_factor": 4.0}, "low_freq_factor=4.0 not below high_freq_factor=4.0"),
])
def test_malformed_llama3_rope_scaling_is_one_sentence(tmp_path, change, message):
    config = hf_config(tiny_model())
    config["rope_scaling"] = change({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(message)):
        Transformer.from_pretrained(tmp_path)


def assert_one_sentence(error, *names):
    text = str(error.value)
    assert "\n" not in text and all(n in text for n in names), text
    assert error.value.__cause__ is None  # no chained traceback
    assert error.value.__context__ is None or error.value.__suppress_context__


def write_single_file_dir(path, layout):
    """A directory of the given layout holding the tiny model; returns the file whose damage is tested."""
    model = tiny_model()
    if layout == "meta":
        write_meta_dir(model, path, 0)
        return path / "consolidated.01.pth"
    (path / "config.json").write_text(json.dumps(hf_config(model)))
    if layout == "safetensors":
        write_safetensors(hf_state_dict(model), path / "model.safetensors")
        return path / "model.safetensors"
    if layout == "bin index":
        write_hf_bin_dir(model, path)
        return path / "pytorch_model-00002-of-00002.bin"
    torch.save(hf_state_dict(model), path / "pytorch_model.bin")
    return path / "pytorch_model.bin"


CONFIG_FAULTS = [  # layout, file, how it is broken, what the message names
    ("bin", "config.json", lambda c: '{"hidden_size": 64,', "is not valid JSON (line 1"),
    ("bin", "config.json", lambda c: "[1, 2]", "holds a JSON list, not an object"),
    ("meta", "params.json", lambda c: "4096", "holds a JSON int, not an object"),  # a dict's .get was its traceback
    ("bin", "config.json", lambda c: b'{"model_type": "llama\xff"}', "is not UTF-8 text"),
    ("bin", "config.json", lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "has no 'hidden_size'"),
    ("bin", "config.json", lambda c: {k: v for k, v in c.items() if k != "num_attention_heads"},
     "has no 'num_attention_heads'"),
    ("bin", "config.json", lambda c: c | {"num_hidden_layers": "4"}, "has num_hidden_layers='4' where a positive int"),
    ("bin", "config.json", lambda c: c | {"rms_norm_eps": -1.0}, "has rms_norm_eps=-1.0 where a positive number"),
    ("bin", "config.json", lambda c: c | {"vocab_size": True}, "has vocab_size=True where a positive integer"),
    ("bin", "config.json", lambda c: c | {"rope_theta": 0}, "has rope_theta=0 where a positive number"),
    ("bin", "config.json", lambda c: c | {"intermediate_size": None},  # not LLaMA's hidden_dim formula
     "has intermediate_size=None where a positive integer"),
    ("bin", "config.json", lambda c: {k: v for k, v in c.items() if k != "rope_theta"}
     | {"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
     "has rope_theta=-1.0 where a positive number"),
    ("bin", "config.json", lambda c: c | {"tie_word_embeddings": "false"},  # bool("false"): lm_head dropped
     "has tie_word_embeddings='false' where true or false"),
    ("bin", "config.json", lambda c: c | {"rope_theta": math.inf}, "has rope_theta=inf where a positive number"),
    ("bin", "config.json", lambda c: c | {"model_type": "mistral", "sliding_window": True},  # True == 1: a window of 1
     "has sliding_window=True where a positive integer or null belongs"),
    ("bin", "config.json", lambda c: c | {"rope_scaling": [8.0, 1.0]},
     "has rotary settings [8.0, 1.0] where an object"),
    ("meta", "params.json", lambda c: c | {"ffn_dim_multiplier": math.inf},  # was an OverflowError's traceback
     "has ffn_dim_multiplier=inf where a positive number"),
    ("meta", "params.json", lambda c: "{'dim': 64}", "is not valid JSON (line 1"),
    ("bin", "config.json", lambda c: "[" * 100_000 + "]" * 100_000, "is nested too deeply to read"),  # RecursionError
    ("meta", "params.json", lambda c: '{"dim": ' + "9" * 5000 + "}", "holds a number too long to read"),
    ("meta", "params.json", lambda c: {k: v for k, v in c.items() if k != "dim"}, "has no 'dim'"),
    ("meta", "params.json", lambda c: c | {"n_heads": 4.0}, "has n_heads=4.0 where a positive integer"),
    ("meta", "params.json", lambda c: c | {"vocab_size": 512.5}, "has vocab_size=512.5 where an integer belongs"),
    ("meta", "params.json", lambda c: c | {"norm_eps": None}, "has norm_eps=None where a positive number"),
    # JSON's integers have no bound: past int64 each was an OverflowError's traceback at the first forward
    ("bin", "config.json", lambda c: c | {"rms_norm_eps": 10**30}, f"has rms_norm_eps={10**30} where a positive"),
    ("meta", "params.json", lambda c: c | {"rope_theta": 2**63},
     f"has rope_theta={2**63} where a positive number below 2**63 (int64) belongs"),
    ("bin", "config.json", lambda c: c | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 10**30}},
     f"has original_max_position_embeddings={10**30} where a positive integer"),
    # json keeps a key's last value: a config giving a key twice loaded silently, the first value dropped unseen
    ("bin", "config.json", lambda c: json.dumps(c)[:-1] + ', "rope_theta": 500000.0}',
     "gives the key 'rope_theta' twice; keep one of them or download it again"),
    ("meta", "params.json", lambda c: '{"dim": 64, ' + json.dumps(c)[1:], "gives the key 'dim' twice"),
    ("bin index", "pytorch_model.bin.index.json",  # a weight mapped to two files, inside the object weight_map
     lambda c: json.dumps(c)[:-2] + ', "model.norm.weight": "pytorch_model-00001-of-00002.bin"}}',
     "gives the key 'model.norm.weight' twice"),
    ("bin index", "pytorch_model.bin.index.json", lambda c: "{", "is not valid JSON"),
    ("bin index", "pytorch_model.bin.index.json", lambda c: {"metadata": {}}, 'has no "weight_map"'),
    ("bin index", "pytorch_model.bin.index.json", lambda c: {"weight_map": {"model.norm.weight": None}},
     'has no "weight_map"'),
    ("bin index", "pytorch_model.bin.index.json",
     lambda c: {"weight_map": c["weight_map"] | {"x.weight": "pytorch_model-00003-of-00003.bin"}},
     "names weight files that are not in"),
]


@pytest.mark.parametrize("layout, name, damage, message", CONFIG_FAULTS,
                         ids=[f"{n} {m.split('(')[0].strip()}" for _, n, _, m in CONFIG_FAULTS])
def test_a_broken_configuration_file_is_one_sentence_naming_file_and_key(tmp_path, layout, name, damage, message):
    write_single_file_dir(tmp_path, layout)
    config = json.loads((tmp_path / name).read_text())
    broken = damage(config)
    (tmp_path / name).write_bytes(broken if isinstance(broken, bytes) else
                                  (broken if isinstance(broken, str) else json.dumps(broken)).encode())
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, str(tmp_path / name))


def test_an_integer_configuration_value_up_to_the_largest_int64_loads(tmp_path):
    """The bound is int64's: 2**63 - 1 fits it and loads (2**63 is refused, above)."""
    write_single_file_dir(tmp_path, "meta")
    config = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(config | {"rope_theta": 2**63 - 1}))
    assert Transformer.from_pretrained(tmp_path).args.rope_theta == 2**63 - 1


@pytest.mark.parametrize("eps", [0, -1e-5, math.nan, math.inf, 1, 1.0, 2.5])
def test_a_norm_eps_that_is_not_a_small_positive_number_is_one_sentence_naming_the_file_and_key(tmp_path, eps):
    """A norm's epsilon is added to its input's mean square: at 1 or more it outweighs that of any activations of a
    size below 1, which then pass unnormalised; this was loaded without a word (0 or less, NaN and inf were refused
    already, not said to be out of (0, 1)). Refused in params.json, config.json, a model.pt and ModelArgs."""
    for layout, name, key in (("meta", "params.json", "norm_eps"), ("bin", "config.json", "rms_norm_eps")):
        folder = tmp_path / layout
        folder.mkdir()
        write_single_file_dir(folder, layout)
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(config | {key: eps}))  # NaN and Infinity: as json and Python write them
        with pytest.raises(ValueError) as error:
            Transformer.from_pretrained(folder)
        assert_one_sentence(error, f"{folder / name} has {key}={eps!r} where a positive number below 1 belongs")
    with pytest.raises(ValueError) as error:
        saved_model(*saved_tiny(norm_eps=eps), "model.pt")
    assert_one_sentence(error, f"the model_args of model.pt has norm_eps={eps!r} where a positive number below 1")
    with pytest.raises(ValueError, match=re.escape(f"ModelArgs has norm_eps={eps!r} where a positive number below 1")):
        replace(tiny_model().args, norm_eps=eps)


def test_a_norm_eps_below_1_loads_and_a_float_past_int64_is_not_called_an_int64():
    """The bound is 1 for an epsilon alone; an infinite float is named as not a positive number, not as past int64."""
    assert replace(tiny_model().args, norm_eps=0.5).norm_eps == 0.5
    assert replace(tiny_model().args, rope_theta=1e30).rope_theta == 1e30
    with pytest.raises(ValueError) as error:
        replace(tiny_model().args, rope_theta=math.inf)
    assert str(error.value) == "ModelArgs has rope_theta=inf where a positive number belongs; pass one"


def test_a_config_json_or_params_json_whose_link_leads_nowhere_is_named_as_a_broken_link(tmp_path):
    """Hugging Face's cache links each file to a blob: a config.json whose blob is gone was "holds neither params.json
    nor config.json", as if the file were not there; a shards' index whose blob is gone was passed over unsaid."""
    for layout, name in (("bin", "config.json"), ("meta", "params.json"),
                         ("bin index", "pytorch_model.bin.index.json")):
        folder = tmp_path / layout
        folder.mkdir()
        write_single_file_dir(folder, layout)
        (folder / name).unlink()
        (folder / name).symlink_to(tmp_path / "blobs" / "0123abcd")
        with pytest.raises(FileNotFoundError) as error:
            Transformer.from_pretrained(folder)
        assert_one_sentence(error, f"{folder / name} is a broken link ({tmp_path / 'blobs' / '0123abcd'} does not "
                                   "exist); download it again")


def test_a_configuration_file_over_64_mib_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """json reads a file whole: a weight file saved as config.json (gigabytes) filled memory before it was found not to
    be JSON. Real configuration files hold kilobytes; one over 64 MiB (here sparse: nothing written) is named unread."""
    read, load = [], json.load
    monkeypatch.setattr(json, "load", lambda f, **kw: (read.append(f.name), load(f, **kw))[1])
    for layout, name in (("bin", "config.json"), ("meta", "params.json"),
                         ("bin index", "pytorch_model.bin.index.json")):
        folder = tmp_path / layout
        folder.mkdir()
        write_single_file_dir(folder, layout)
        os.truncate(folder / name, (64 << 20) + 1)  # its own text, then zero bytes, as a cut-off copy holds
        with pytest.raises(ValueError) as error:
            Transformer.from_pretrained(folder)
        assert_one_sentence(error, f"{folder / name} is over 64 MiB, far more than a configuration file holds; "
                                   "download it again from the checkpoint's source")
    assert read == [str(tmp_path / "bin index" / "config.json")]  # the index's folder: its config.json, of kilobytes
    folder = tmp_path / "exactly"
    folder.mkdir()
    write_single_file_dir(folder, "bin")
    (folder / "config.json").write_text((folder / "config.json").read_text().ljust(64 << 20))  # 64 MiB: not over
    assert isinstance(Transformer.from_pretrained(folder), Transformer)


@pytest.mark.parametrize("layout, name", [("bin", "config.json"), ("meta", "params.json"), ("meta", "weights"),
                                          ("bin index", "pytorch_model.bin.index.json"), ("safetensors", "weights")])
@pytest.mark.parametrize("kind", ["named pipe", "folder"])
def test_a_configuration_or_weight_file_that_is_a_named_pipe_or_a_folder_is_one_sentence(tmp_path, layout, name, kind):
    """A named pipe was opened and waited on forever (for no writer); a folder was IsADirectoryError's traceback."""
    if layout == "safetensors":
        pytest.importorskip("safetensors")
    weights = write_single_file_dir(tmp_path, layout)
    path = weights if name == "weights" else tmp_path / name
    content = path.read_bytes()
    path.unlink()
    if kind == "folder":
        path.mkdir()
    with named_pipe(path, content) if kind == "named pipe" else contextlib.nullcontext():
        with pytest.raises(ValueError) as error:
            Transformer.from_pretrained(tmp_path)
    want = "a named pipe or a device" if kind == "named pipe" else "a folder"
    assert_one_sentence(error, f"{path} is {want}, not a file; put the checkpoint's own {path.name} there")


def test_a_configuration_file_that_can_not_be_read_is_one_sentence(tmp_path, monkeypatch):
    """chmod 000 (these tests run as root, which reads it anyway): PermissionError was a traceback."""
    write_single_file_dir(tmp_path, "bin")
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if os.path.basename(file) == "config.json":
            raise PermissionError(13, "Permission denied", file)
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr("builtins.open", refusing_open)
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, f"{tmp_path / 'config.json'} cannot be read (Permission denied)")


@pytest.mark.parametrize("sizes", [{"hidden_size": 2**40, "intermediate_size": 2**40},
                                   {"num_attention_heads": 2**32, "head_dim": 2**32}])
def test_a_configuration_past_any_memory_is_refused_before_anything_is_built(tmp_path, sizes):
    """hidden_size = intermediate_size = 2**40: a weight of 2**80 elements overflowed the meta build (a RuntimeError's
    traceback), and 2**32 heads of 2**32, a weight dimension past int64, was torch.empty's TypeError; sizes that fit
    in a meta tensor are refused by the weights' shapes, before any memory is taken."""
    write_single_file_dir(tmp_path, "bin")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | sizes))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, f"the configuration of the checkpoint in {str(tmp_path)!r} describes a model too large")


def saved_tiny(**args_changes):
    """(model_args, state) as train.py's model.pt holds them, for a tiny model."""
    model = tiny_model()
    return asdict(model.args) | args_changes, dict(model.state_dict())


@pytest.mark.parametrize("overrides", [{}, dict(rope_scaling=(8.0, 1.0, 4.0, 64), sliding_window=8, qkv_bias=True),
                                       dict(tie_embeddings=True, qk_norm=True, hidden_dim=96, ffn_dim_multiplier=1.3,
                                            n_kv_heads=4)])
def test_a_saved_model_is_read_back_as_it_was_saved(overrides):
    model = tiny_model(**overrides)
    model_args, state = asdict(model.args), dict(model.state_dict())
    args, read = saved_model(model_args, state, "model.pt")
    assert args == ModelArgs(**model_args) and read is state
    # as ModelArgs takes them, filled in from n_heads: multi-head attention's n_kv_heads, and every head_dim
    unfilled = model_args | {"head_dim": None} | ({"n_kv_heads": None} if args.n_kv_heads == args.n_heads else {})
    assert saved_model(unfilled, state, "model.pt")[0] == ModelArgs(**unfilled) == args


def test_saved_model_args_that_are_not_a_dict_are_one_sentence():
    model_args, state = saved_tiny()
    for foreign in (list(model_args.items()), None):
        with pytest.raises(ValueError) as error:
            saved_model(foreign, state, "model.pt")
        assert_one_sentence(error, "model.pt holds no model_args dict beside a dict of named tensors")


def test_a_saved_model_whose_names_are_not_strings_is_one_sentence_not_a_type_error():
    """torch.load(weights_only=True) gives back any dict key (an int, a tuple): the layer count's regex and the sorted
    list of unknown fields took them for strings and raised a TypeError's traceback."""
    model_args, state = saved_tiny()
    for name in (5, ("layers", 0)):
        with pytest.raises(ValueError) as error:
            saved_model(model_args, {**state, name: torch.zeros(2)}, "model.pt")
        assert_one_sentence(error, "model.pt holds no model_args dict beside a dict of named tensors")
    with pytest.raises(ValueError) as error:
        saved_model({**model_args, 3: 1, "evil": 1}, state, "model.pt")
    assert_one_sentence(error, "the model_args of model.pt has fields this model does not know: [3, 'evil']")


@pytest.mark.parametrize("n", [1, 5, 6, 9])
def test_every_missing_weight_is_named_or_counted(n):
    """Up to five names are listed, and 'and K more' counts the rest: together they are all that is missing."""
    model_args, state = saved_tiny()
    gone = sorted(state)[:n]
    for name in gone:
        del state[name]
    with pytest.raises(ValueError) as error:
        saved_model(model_args, state, "model.pt")
    listed = str(error.value).split("lacks weights the model needs: ")[1].split("; ")[0]
    named = [name for name in gone if name in listed]
    more = re.search(r" and (\d+) more$", listed)
    assert len(named) == min(n, 5) and len(named) + (int(more.group(1)) if more else 0) == n, listed


SAVED_FAULTS = [  # (model_args changes, state change, what the sentence says)
    (dict(evil=1), None, "the model_args of model.pt has fields this model does not know: ['evil']"),
    (dict(dim=-64), None, "the model_args of model.pt has dim=-64 where a positive integer belongs"),
    (dict(dim="64"), None, "the model_args of model.pt has dim='64' where a positive integer belongs"),
    (dict(rope_scaling=[8.0, 1.0]), None, "of model.pt has rope_scaling=[8.0, 1.0] where null or 4 numbers belong"),
    (dict(rope_scaling=[8.0, 1.0, 4.0, 64, 2.0]), None,  # a fifth number: the rotation's unpacking fails later
     "of model.pt has rope_scaling=[8.0, 1.0, 4.0, 64, 2.0] where null or 4 numbers belong"),
    (dict(rope_scaling=[8.0, 4.0, 1.0, 8192]), None,
     "of model.pt has low_freq_factor=4.0 not below high_freq_factor=1.0"),
    (dict(n_layers=10**6), None, "the model_args of model.pt says 1000000 layers but the weights in 'model.pt' hold 4"),
    (dict(vocab_size=10**12), None, "weight tok_embeddings.weight has shape (512, 64) in the checkpoint but the model "
                                    "expects (1000000000000, 64)"),
    (dict(dim=2**40, head_dim=None), None, "describes a model too large to build"),
    (dict(n_heads=2**32, head_dim=2**32), None, "describes a model too large to build"),  # torch.empty's TypeError
    ({}, lambda s: s.pop("layers.0.feed_forward.w1.weight"), "lacks weights the model needs: layers.0.feed_forward"),
    ({}, lambda s: s.update({"layers.0.extra.weight": torch.zeros(2)}),
     "has weights this model does not know: layers.0.extra.weight"),
    ({}, lambda s: s["norm.weight"].fill_(math.nan), "weight norm.weight in model.pt holds NaN or inf values"),
    ({}, lambda s: s.update(step="3"), "model.pt holds no model_args dict beside a dict of named tensors"),
    (dict(rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64}), None,
     "of model.pt has rope_scaling={'factor': 8.0"),
    (dict(rope_scaling=[8.0, "1", 4.0, 64]), None,
     "of model.pt has low_freq_factor='1' where a positive number belongs"),
    (dict(rope_scaling=[8.0, 4.0, 4.0, 64]), None,
     "of model.pt has low_freq_factor=4.0 not below high_freq_factor=4.0"),
    (dict(max_seq_len=100.5), None, "has max_seq_len=100.5 where a positive integer belongs"),
    (dict(qkv_bias=1), None, "has qkv_bias=1 where true or false belongs"),  # 1 == True, but not what train.py writes
    (dict(sliding_window=0), None, "has sliding_window=0 where a positive integer belongs"),
    (dict(tie_embeddings=None), None, "has tie_embeddings=None where true or false belongs"),  # not null: untied
    (dict(rope_scaling="8142"), None, "of model.pt has rope_scaling='8142' where null or 4 numbers belong"),
]


@pytest.mark.parametrize("changes, damage, message", SAVED_FAULTS, ids=[m[:40] for _, _, m in SAVED_FAULTS])
def test_a_damaged_or_foreign_saved_model_is_refused_before_any_memory_is_taken(changes, damage, message):
    """train.py's init_from=model.pt took model_args and weights on trust: a missing weight trained on whatever memory
    to_empty left (here NaN: 'lower the learning rate'), 10**6 layers built modules for minutes, and other fields were
    a TypeError's or RuntimeError's traceback, or an out-of-memory error with advice about batch sizes."""
    model_args, state = saved_tiny(**changes)
    if damage:
        damage(state)
    with pytest.raises(ValueError) as error:
        saved_model(model_args, state, "model.pt")
    assert_one_sentence(error, message)


WEIGHT_FAULTS = ["half", "all but 10 bytes", "empty", "garbage", "objects", "a tensor", "nested", "numbered"]


@pytest.mark.parametrize("layout", ["bin", "bin index", "meta", "safetensors"])
@pytest.mark.parametrize("damage", WEIGHT_FAULTS)
def test_a_truncated_or_foreign_weight_file_is_one_sentence_naming_it(tmp_path, layout, damage):
    if layout == "safetensors":
        pytest.importorskip("safetensors")
        if damage in ("objects", "a tensor", "nested", "numbered"):
            pytest.skip("torch.save content")
    file = write_single_file_dir(tmp_path, layout)
    raw = file.read_bytes()
    if damage == "half":
        file.write_bytes(raw[:len(raw) // 2])
    elif damage == "all but 10 bytes":
        file.write_bytes(raw[:-10])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "garbage":
        file.write_bytes(b"<html>404 Not Found</html>\n" * 50)  # what a failed download often saves
    elif damage == "objects":
        torch.save({"model.norm.weight": torch.ones(64), "step": object.__new__(ModelArgs)}, file)
    elif damage == "a tensor":
        torch.save(torch.ones(3), file)
    elif damage == "nested":  # a training checkpoint's layout (weights under a key, beside plain values)
        torch.save({"state_dict": {"model.norm.weight": torch.ones(64)}, "epoch": 3}, file)
    else:  # tensors under numbers, not names: the layer count's regex raised a TypeError on them
        torch.save({0: torch.ones(64)}, file)
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    want = {"objects": "holds Python objects besides tensors", "a tensor": "holds a Tensor, not a dict of named",
            "nested": "holds a dict, not a dict of named tensors", "numbered": "holds a dict, not a dict of named"}
    assert_one_sentence(error, str(file), want.get(damage, "download it again"))
    if damage not in want:
        kind = "a safetensors file" if layout == "safetensors" else "a PyTorch checkpoint"
        assert f"{file} is truncated or not {kind}" in str(error.value)


def test_a_loaders_complaint_is_cut_to_its_own_first_sentence_past_torchs_paragraphs_on_weights_only(tmp_path):
    """torch wraps what its weights_only unpickler found in paragraphs of advice: the message keeps the finding (the
    first sentence after "WeightsUnpickler error:"), a first sentence only, at most 120 characters, else the type."""
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02\x82\x01.")  # EXT1 (opcode 130): not a weights opcode
    (tmp_path / "config.json").write_text(json.dumps(hf_config(tiny_model())))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, "pytorch_model.bin is truncated or not a PyTorch checkpoint (Unsupported operand 130)")
    assert describe(RuntimeError("header cut. Check the file.\nAt byte 8")) == "header cut"
    assert describe(OSError("x" * 500)) == "x" * 120 and describe(EOFError()) == "EOFError"


def rewrite_weight_file(file, change):
    """Apply change (a dict of tensors -> a dict of tensors) to a weight file, keeping its format."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        write_safetensors(change(load_file(file)), file)
    else:
        torch.save(change(torch.load(file, weights_only=True)), file)


@pytest.mark.parametrize("layout", ["bin", "bin index", "meta", "safetensors"])
@pytest.mark.parametrize("damage", ["nan", "inf", "int8", "int32",  # int32: GPTQ's and AWQ's packing
                                    "float8_e4m3fn", "float8_e5m2"])  # floating point, but no CPU matmul takes it
def test_a_weight_with_nan_inf_or_integers_is_refused_at_load_naming_tensor_and_file(tmp_path, layout, damage):
    """A damaged download (NaN, inf) or a quantised one (integers, float8) is found when it is read, not at the first
    loss: a float8 weight loaded, and the model's first forward was a matmul's traceback (in a Meta shard beside a
    float32 one, torch.cat's)."""
    if layout == "safetensors":
        pytest.importorskip("safetensors")
    file = write_single_file_dir(tmp_path, layout)
    names = []

    def spoil(sd):
        names.append(next(n for n in sd if "freq" not in n))
        integers = damage.startswith(("int", "float8"))
        t = sd[names[0]] = sd[names[0]].to(getattr(torch, damage) if integers else torch.float32, copy=True)
        t.view(-1)[3] = 1 if integers else float(damage)
        return sd
    rewrite_weight_file(file, spoil)
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    want = f"holds torch.{damage} values" if damage.startswith(("int", "float8")) else "holds NaN or inf values"
    assert_one_sentence(error, str(file), names[0], want)


@pytest.mark.parametrize("layout", ["bin", "bin index", "model.pt"])
def test_a_weight_that_shows_more_values_than_it_stores_is_refused_before_they_are_summed(tmp_path, layout):
    """torch.save keeps a view's strides: a weight of 10**7 x 10**7 values from one stored number (a stride of 0), in
    a file of a megabyte, was summed by the NaN check for hours. Here 10**4 x 10**4, which the old check summed."""
    repeated = torch.ones(1).expand(10**4, 10**4)
    if layout == "model.pt":
        model_args, state = saved_tiny()
        with pytest.raises(ValueError) as error:
            saved_model(model_args, state | {"norm.weight": repeated}, "model.pt")
        return assert_one_sentence(error, "weight norm.weight in model.pt shows more values than it stores")
    file = write_single_file_dir(tmp_path, layout)
    names = []

    def spoil(sd):
        names.append(next(n for n in sd if "freq" not in n))
        return sd | {names[0]: repeated}
    rewrite_weight_file(file, spoil)
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, f"weight {names[0]} in {file} shows more values than it stores")


@pytest.mark.parametrize("layout", ["bin", "bin index", "meta", "model.pt"])
@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_a_weight_without_dense_values_is_refused_naming_tensor_and_file(tmp_path, layout, kind):
    """torch.load gives back a sparse tensor, and one of a model built on the meta device (a save of no values): the
    checks' first look at its storage was NotImplementedError's traceback, or RuntimeError's (Tensor.item() on meta)."""
    def spoil(sd):
        name = next(n for n in sd if "freq" not in n)
        return sd | {name: sd[name].to_sparse() if kind == "sparse" else torch.empty_like(sd[name], device="meta")}
    if layout == "model.pt":
        model_args, state = saved_tiny()
        with pytest.raises(ValueError) as error:
            saved_model(model_args, spoil(state), "model.pt")
        return assert_one_sentence(error, f"weight {next(iter(state))} in model.pt is a sparse or meta tensor")
    file = write_single_file_dir(tmp_path, layout)
    names = []
    rewrite_weight_file(file, lambda sd: names.append(next(n for n in sd if "freq" not in n)) or spoil(sd))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, f"weight {names[0]} in {file} is a sparse or meta tensor, without values; save dense")


@pytest.mark.parametrize("layout", ["bin", "meta"])
def test_a_checkpoint_whose_weights_mix_dtypes_loads_as_one_float32_model_that_runs(tmp_path, layout):
    """Norms kept in float16 beside float32 weights: loaded as stored, the model's first matmul was a RuntimeError's
    traceback ("expected m1 and m2 to have the same dtype")."""
    model = tiny_model()
    with torch.no_grad():  # norms that float16 holds exactly
        for name, p in model.named_parameters():
            p.copy_(p.half().float() if "norm" in name else p)
    if layout == "meta":
        write_meta_dir(model, tmp_path, 0)
        files = sorted(tmp_path.glob("consolidated.*.pth"))
    else:
        torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
        (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
        files = [tmp_path / "pytorch_model.bin"]
    for file in files:
        rewrite_weight_file(file, lambda sd: {n: t.half() if "norm" in n else t for n, t in sd.items()})
    loaded = Transformer.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def test_a_float16_weight_whose_sum_passes_float16s_largest_value_is_not_called_damaged(tmp_path):
    """The NaN/inf check sums each tensor in float32: a finite float16 weight whose sum passes 65504 (a float16
    sum would be inf) loads as it was written."""
    file = write_single_file_dir(tmp_path, "bin")
    name = "model.embed_tokens.weight"

    def large(sd):
        sd = {n: t.half() for n, t in sd.items()}
        sd[name] = torch.full_like(sd[name], 4.0)
        assert not torch.isfinite(sd[name].sum())  # the sum in float16 overflows
        return sd
    rewrite_weight_file(file, large)
    loaded = Transformer.from_pretrained(tmp_path)
    weight = loaded.tok_embeddings.weight
    assert weight.dtype == torch.float16 and torch.equal(weight, torch.full_like(weight, 4.0))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    """A pytorch_model.bin whose pickle calls os.system: weights_only refuses it, and the message says why."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    model = tiny_model()
    torch.save(hf_state_dict(model) | {"x": Payload()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert not marker.exists()
    assert_one_sentence(error, str(tmp_path / "pytorch_model.bin"), "holds Python objects besides tensors",
                        "system", "could run code")


@pytest.mark.parametrize("damage", ["columns", "0-d", "absent", "absent from the first"])
def test_meta_shards_that_do_not_hold_equal_slices_are_refused_naming_tensor_and_files(tmp_path, damage):
    write_meta_dir(tiny_model(), tmp_path, 0)
    name = "layers.0.attention.wo.weight"  # split along its columns
    shards = {"0-d": ("00", "01"), "absent from the first": ("00",)}.get(damage, ("01",))
    for shard in (f"consolidated.{s}.pth" for s in shards):
        change = {"columns": lambda sd: sd | {name: sd[name][:, :-1]}, "0-d": lambda sd: sd | {name: torch.tensor(1.0)},
                  "absent": lambda sd: {n: t for n, t in sd.items() if n != name},
                  "absent from the first": lambda sd: {n: t for n, t in sd.items() if n != name}}[damage]
        rewrite_weight_file(tmp_path / shard, change)
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, name, "consolidated.00.pth", "consolidated.01.pth", "equal slices")


def test_legacy_non_zip_torch_save_files_still_load(tmp_path):
    model = tiny_model()
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    tokens = torch.randint(0, model.args.vocab_size, (1, 8))
    assert torch.equal(logits_of(Transformer.from_pretrained(tmp_path), tokens), logits_of(model, tokens))


class _RunsCode:
    """Pickled as a call of os.mkdir: what a hostile weight file holds to run code when it is loaded."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_legacy_non_zip_file_is_read_with_weights_only_too_so_it_runs_no_code(tmp_path):
    """The legacy format cannot be memory-mapped and is read a second way: that read refuses objects too."""
    model, ran = tiny_model(), tmp_path / "ran"
    torch.save({**hf_state_dict(model), "extra": _RunsCode(str(ran))}, tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert not ran.exists()
    assert_one_sentence(error, "pytorch_model.bin holds Python objects besides tensors")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's list of a process's mapped files")
@pytest.mark.parametrize("layout", ["bin", "bin index", "meta, one shard", "safetensors"])
def test_weights_read_as_stored_stay_memory_mapped_not_copied_into_memory(tmp_path, layout):
    """A 7B model's files are paged in from disk as the model is filled, not first copied whole into memory: each
    weight (dtype and device as stored) lies in its file's mapping, but Hugging Face's wq and wk, whose rows are
    put back in Meta's order. LLaMA-2-7B is one Meta shard."""
    if layout == "safetensors":
        pytest.importorskip("safetensors")
    model = tiny_model()
    if layout == "meta, one shard":
        write_meta_dir(model, tmp_path, 0)
        (tmp_path / "consolidated.01.pth").unlink()
        torch.save(model.state_dict(), tmp_path / "consolidated.00.pth")
    else:
        write_single_file_dir(tmp_path, layout)
    fields, state = read(tmp_path)
    spans = [[int(a, 16) for a in line.split()[0].split("-")] for line in open("/proc/self/maps")
             if os.path.dirname(line.split()[-1]) == str(tmp_path)]
    copied = [n for n, t in state.items() if not any(lo <= t.data_ptr() < hi for lo, hi in spans)]
    assert all(n.endswith(("wq.weight", "wk.weight")) and layout != "meta, one shard" for n in copied), copied


def test_a_weight_file_that_may_not_be_read_says_so_not_that_it_is_truncated(tmp_path, monkeypatch):
    """Root reads any file, so the refusal a user gets is played by torch.load."""
    file = write_single_file_dir(tmp_path, "bin")

    def refuse(f, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(f))
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ValueError) as error:
        read(tmp_path)
    assert_one_sentence(error, f"{file} cannot be read (Permission denied); check that it is a weight file you may")


# ---------------------------------------------------------------------------------------------------
# Qwen2 / Qwen2.5 and Mistral

@pytest.mark.parametrize("model_type, overrides", [
    ("qwen2", dict(qkv_bias=True, tie_embeddings=True, rope_theta=1e6)),
    ("qwen2", dict(qkv_bias=True, n_kv_heads=4)),
    ("mistral", dict(sliding_window=64)),
    ("qwen3", dict(qk_norm=True, head_dim=32, tie_embeddings=True, rope_theta=1e6)),  # 4 heads of 32 over 64
])
def test_qwen_and_mistral_folders_round_trip_to_identical_logits(tmp_path, model_type, overrides):
    """Our own Hugging Face-layout writer (biases permuted like their rows, no lm_head when tied) and reader."""
    model = tiny_model(**overrides)
    assert ("layers.0.attention.wq.bias" in model.state_dict()) == (model_type == "qwen2")
    write_hf_bin_dir(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model, model_type)))
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.args.sliding_window == model.args.sliding_window
    assert (loaded.args.qkv_bias, loaded.args.tie_embeddings) == (model.args.qkv_bias, model.args.tie_embeddings)
    assert (loaded.args.qk_norm, loaded.args.head_dim) == (model.args.qk_norm, model.args.head_dim)
    assert (loaded.output is None) == model.args.tie_embeddings
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


@pytest.mark.parametrize("model_type, key, value", [
    ("qwen2", "model_type", "qwen3_moe"), ("qwen2", "use_sliding_window", True), ("qwen3", "use_sliding_window", True),
    ("qwen2", "hidden_act", "gelu"), ("mistral", "sliding_window", "wide"), ("mistral", "sliding_window", 0),
    ("qwen2", "use_sliding_window", "yes"), ("qwen2", "max_window_layers", None),
    ("llama", "attention_bias", True), ("qwen3", "attention_bias", True), ("llama", "mlp_bias", True)])
def test_what_hf_configs_ask_beyond_this_model_is_refused(tmp_path, model_type, key, value):
    """Each key where transformers' class of that model type reads it: a bias in LLaMA's attention (its o_proj too)
    or MLP, or Qwen3's attention, and Qwen's window where it covers a layer (max_window_layers 0: every layer);
    where the class ignores the key, so does this model (test_config_keys_that_transformers_ignores_...)."""
    model = tiny_model(qkv_bias=True)
    write_hf_bin_dir(model, tmp_path)
    config = {**hf_config(model, model_type), "sliding_window": 16, "max_window_layers": 0, key: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        Transformer.from_pretrained(tmp_path)


def _transformers_model(transformers, model_type, tmp_path, tie=False, window=None, **extra):
    """A small random checkpoint written by transformers itself, biases and norms made non-trivial; extra: more keys
    for its config (config.json keeps them)."""
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tie, **extra)
    if model_type == "llama":
        config, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    elif model_type == "qwen2":
        config, cls = transformers.Qwen2Config(rope_theta=1e6, **kw), transformers.Qwen2ForCausalLM
    elif model_type == "qwen3":  # a head width of its own: 4 heads of 32 over a width of 64
        config, cls = transformers.Qwen3Config(rope_theta=1e6, head_dim=32, **kw), transformers.Qwen3ForCausalLM
    else:
        config, cls = transformers.MistralConfig(sliding_window=window, **kw), transformers.MistralForCausalLM
    torch.manual_seed(0)
    hf = cls(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("model_type, tie, window", [("qwen2", True, None), ("qwen2", False, None),
                                                     ("qwen3", True, None), ("qwen3", False, None),
                                                     ("mistral", False, None), ("mistral", False, 32)])
def test_logits_equal_transformers_qwen_and_mistral_written_by_transformers(tmp_path, model_type, tie, window):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    hf = _transformers_model(transformers, model_type, tmp_path, tie, window)
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert ours.args.qkv_bias == (model_type == "qwen2") and ours.args.sliding_window == window
    assert ours.args.qk_norm == (model_type == "qwen3") and ours.args.head_dim == (32 if model_type == "qwen3" else 16)
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        want = hf(tokens).logits.float()
    got = logits_of(ours, tokens)
    assert (got - want).abs().max().item() < 1e-4
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("model_type, extra", [
    ("llama", dict(sliding_window=8)),  # LlamaAttention passes no window on: not Mistral's
    ("qwen2", dict(attention_bias=True)),  # Qwen2's q, k and v are biased (o is not) whatever the key says
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),  # the window from layer 2 on
    ("qwen3", dict(use_sliding_window=True, sliding_window=8)),  # max_window_layers' default, 28: no layer windowed
    ("qwen2", dict(mlp_bias=True)), ("qwen3", dict(mlp_bias=True)),  # their MLPs: never a bias
    ("mistral", dict(attention_bias=True, mlp_bias=True)),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else v)
def test_config_keys_that_transformers_ignores_for_a_model_type_are_ignored_here_too(tmp_path, model_type, extra):
    """A key transformers' class of that model type does not read, or reads to no effect, was refused (a LLaMA's
    sliding_window was taken as Mistral's, refusing sequences past it): the logits are transformers', for sequences
    longer than any window named, with and without the layer_types transformers 5 writes (older configs have none)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    hf = _transformers_model(transformers, model_type, tmp_path, **extra)
    config = json.loads((tmp_path / "config.json").read_text())
    assert all(config[k] == v for k, v in extra.items())  # the keys reach config.json, as in a published folder
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        want = hf(tokens).logits.float()
    for kept in (config, {k: v for k, v in config.items() if k != "layer_types"}):
        (tmp_path / "config.json").write_text(json.dumps(kept))
        ours = Transformer.from_pretrained(tmp_path).eval()
        assert ours.args.sliding_window is None and ours.args.qkv_bias == (model_type == "qwen2")
        assert (logits_of(ours, tokens) - want).abs().max().item() < 1e-4
        assert ours.num_params() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_a_qwen_window_is_refused_exactly_where_transformers_puts_one_on_a_layer(tmp_path, model_type):
    """use_sliding_window windows the layers from max_window_layers on, or those a given layer_types names (it wins),
    and none without a sliding_window: refused where transformers' config windows a layer, else full attention."""
    transformers = pytest.importorskip("transformers")
    model = tiny_model(qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3")  # 4 layers
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    config_class = transformers.Qwen2Config if model_type == "qwen2" else transformers.Qwen3Config
    full, sliding = ["full_attention"] * 4, ["full_attention"] * 3 + ["sliding_attention"]
    for changes in (dict(max_window_layers=3), dict(max_window_layers=4), dict(max_window_layers=-1),
                    dict(max_window_layers=0, sliding_window=None), dict(max_window_layers=0, layer_types=full),
                    dict(max_window_layers=4, layer_types=sliding), dict(use_sliding_window=False, max_window_layers=0),
                    dict(max_window_layers=28), dict(sliding_window=...)):  # ...: left out (4096 from layer 28 on)
        config = hf_config(model, model_type) | {"use_sliding_window": True, "sliding_window": 8} | changes
        config = {k: v for k, v in config.items() if v is not ...}
        (tmp_path / "config.json").write_text(json.dumps(config))
        hf = config_class(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
        if "sliding_attention" in hf.layer_types:
            with pytest.raises(ValueError) as error:
                Transformer.from_pretrained(tmp_path)
            assert_one_sentence(error, "has use_sliding_window=True with a window on some layers")
        else:
            loaded = Transformer.from_pretrained(tmp_path)
            assert loaded.args.sliding_window is None, changes
            tokens = torch.randint(0, model.args.vocab_size, (1, 12))  # longer than the window of 8
            assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def test_a_mistral_folder_that_also_holds_its_own_params_json_and_consolidated_weights_loads_its_hf_weights(tmp_path):
    """Mistral's Hugging Face folders (v0.2 on) add Mistral's own format beside transformers': a params.json (with a
    head_dim Meta's has not; it was read first, and refused) and consolidated.safetensors under Meta's names. The
    folder loads from config.json and model*.safetensors, with or without their index."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    hf = _transformers_model(transformers, "mistral", tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    write_safetensors(ours.state_dict(), tmp_path / "consolidated.safetensors")
    a = ours.args
    (tmp_path / "params.json").write_text(json.dumps(dict(
        dim=a.dim, n_layers=a.n_layers, head_dim=a.head_dim, hidden_dim=a.ffn_hidden_dim, n_heads=a.n_heads,
        n_kv_heads=a.n_kv_heads, norm_eps=a.norm_eps, vocab_size=a.vocab_size, rope_theta=a.rope_theta)))
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        want = hf(tokens).logits.float()
    assert (logits_of(Transformer.from_pretrained(tmp_path), tokens) - want).abs().max().item() < 1e-4
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00001.safetensors")  # no index: found by name
    assert (logits_of(Transformer.from_pretrained(tmp_path), tokens) - want).abs().max().item() < 1e-4


def test_weights_under_metas_names_in_a_hugging_face_folder_are_refused_not_un_permuted(tmp_path):
    """A config.json beside Meta-named weights (Mistral's consolidated.safetensors alone): those names are not Hugging
    Face's, so they are refused, naming the file; they were taken as they stand and their q/k rows un-permuted as if
    they were Hugging Face's (wrong logits, no error)."""
    pytest.importorskip("safetensors")
    model = tiny_model()
    write_safetensors(model.state_dict(), tmp_path / "consolidated.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model, "mistral")))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, str(tmp_path), "does not know: layers.0.attention.wk.weight", "consolidated.safetensors")


@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_transformers_llama31_rope_scaling_written_by_transformers(tmp_path, tie):
    """LLaMA 3.1 / 3.2's rope_type "llama3", at sizes where every regime shows: with head_dim 16, theta 1e4 and
    an original context of 64 tokens, two pairs turn at full speed, two blend and four are slowed."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    rope = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_parameters=rope)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than the initial weights give: positions, hence rotations, count
        for name, p in hf.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert ours.args.rope_scaling == (8.0, 1.0, 4.0, 64) and ours.args.tie_embeddings == tie
    tokens = torch.randint(0, 97, (2, 200))
    with torch.no_grad():
        want = hf(tokens).logits.float()
    got = logits_of(ours, tokens)
    assert (got - want).abs().max().item() < 1e-4
    unscaled = Transformer(replace(ours.args, rope_scaling=None))
    unscaled.load_state_dict(ours.state_dict())
    assert (logits_of(unscaled.eval(), tokens) - want).abs().max().item() > 1e-2  # the scaling is what agrees


@pytest.mark.parametrize("model_type, top_level, in_scaling, want", [
    ("llama", 32, 16, 32), ("qwen2", 32, None, 32), ("mistral", None, None, 48), ("qwen3", None, 16, 16)])
def test_llama3_rope_takes_its_original_context_where_transformers_does(tmp_path, model_type, top_level, in_scaling,
                                                                        want):
    """transformers 5 sets a "llama3" scaling's original_max_position_embeddings from a top-level key of that name
    (Phi-3's place) over the scaling's own, and from max_position_embeddings where neither gives it: the first was
    read from the scaling (other logits, no error), the second refused as a damaged file."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    family = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[model_type]
    config = getattr(transformers, f"{family}Config")(
        vocab_size=61, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=48, initializer_range=0.1)
    torch.manual_seed(0)
    hf = getattr(transformers, f"{family}ForCausalLM")(config)
    with torch.no_grad():  # sharp attention: the rotation's frequencies show in the logits
        for name, p in hf.named_parameters():
            p.mul_(5.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0)
    hf.save_pretrained(tmp_path)
    rope = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    given = {"rope_parameters": rope | ({"original_max_position_embeddings": in_scaling} if in_scaling else {})}
    given |= {"original_max_position_embeddings": top_level} if top_level else {}
    (tmp_path / "config.json").write_text(json.dumps(json.loads((tmp_path / "config.json").read_text()) | given))
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert ours.args.rope_scaling == (8.0, 1.0, 4.0, want)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 61, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (logits_of(ours, tokens) - hf(tokens).logits).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------------
# added from mutation testing

def test_meta_context_length_follows_rope_theta_unless_given(tmp_path):
    """params.json has no context length: LLaMA 3 (rope_theta 500000) gets 8192, LLaMA 2 4096;
    from_pretrained(max_seq_len=...) overrides either, and the model then refuses longer inputs."""
    for theta, want in ((5e5, 8192), (1e4, 4096)):
        path = tmp_path / str(int(theta))
        path.mkdir()
        write_meta_dir(tiny_model(rope_theta=theta), path, 0)
        assert Transformer.from_pretrained(path).args.max_seq_len == want
    params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps(params | {"max_seq_len": 1024}))  # given: kept
    assert Transformer.from_pretrained(path).args.max_seq_len == 1024
    loaded = Transformer.from_pretrained(tmp_path / "500000", max_seq_len=16)
    assert loaded.args.max_seq_len == 16
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        loaded(torch.zeros(1, 17, dtype=torch.long))


def test_from_pretrained_refuses_a_max_seq_len_of_0_rather_than_keep_the_checkpoints_own(tmp_path):
    """max_seq_len=0 is an override like any other, refused as ModelArgs refuses it: taken as "not given", the
    model would silently run the checkpoint's context length instead."""
    write_meta_dir(tiny_model(), tmp_path, 0)
    with pytest.raises(ValueError, match="max_seq_len=0 where a positive integer belongs"):
        Transformer.from_pretrained(tmp_path, max_seq_len=0)


def test_a_tied_hf_checkpoint_that_also_stores_lm_head_loads(tmp_path):
    """Some tied checkpoints store lm_head.weight, a copy of the embedding: it is dropped, not refused."""
    model = tiny_model(qkv_bias=True, tie_embeddings=True)
    sd = hf_state_dict(model)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model, "qwen2")))
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.output is None
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def test_a_tied_hf_checkpoint_whose_lm_head_differs_from_the_embedding_is_read_untied_as_transformers_5_reads_it(
        tmp_path):
    """tie_word_embeddings=true beside an lm_head.weight that is not the embedding's copy: transformers 5 unties them
    and uses each as stored. The lm_head was dropped and the embedding used in its place: another model, no word."""
    model = tiny_model(qkv_bias=True, tie_embeddings=True)
    sd = hf_state_dict(model)
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model, "qwen2")))
    loaded = Transformer.from_pretrained(tmp_path)
    untied = Transformer(replace(model.args, tie_embeddings=False))
    untied.load_state_dict(model.state_dict() | {"output.weight": sd["lm_head.weight"]})
    assert loaded.output is not None and not loaded.args.tie_embeddings
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(untied, tokens))


def test_an_untied_hf_checkpoint_whose_lm_head_equals_the_embedding_stays_untied(tmp_path):
    """tie_word_embeddings=false is the config's word even where the stored lm_head equals the embedding (a model
    initialised tied, saved untied): two weights, as transformers reads it, which full training updates apart."""
    model = tiny_model(tie_embeddings=False)
    sd = hf_state_dict(model)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    loaded = Transformer.from_pretrained(tmp_path)
    assert not loaded.args.tie_embeddings and loaded.output is not None


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_a_config_without_tie_word_embeddings_is_untied_as_transformers_defaults_it(tmp_path, model_type):
    """LlamaConfig, Qwen2Config and MistralConfig default tie_word_embeddings to false: an lm_head equal to the
    embedding stays a weight of its own, and a folder without one lacks it (not tied in silence)."""
    model = tiny_model(qkv_bias=model_type == "qwen2")
    sd = hf_state_dict(model)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    config = {k: v for k, v in hf_config(model, model_type).items() if k != "tie_word_embeddings"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    args, state = read(tmp_path)
    assert args["tie_embeddings"] is False and torch.equal(state["output.weight"], sd["lm_head.weight"])
    del sd["lm_head.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lacks weights the model needs: output.weight"):
        Transformer.from_pretrained(tmp_path)


def test_meta_params_json_with_use_scaled_rope_false_loads_and_unknown_fields_are_refused(tmp_path):
    model = tiny_model()
    write_meta_dir(model, tmp_path, 0)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(params | {"use_scaled_rope": False}))
    tokens = torch.randint(0, model.args.vocab_size, (1, 8))
    assert torch.equal(logits_of(Transformer.from_pretrained(tmp_path), tokens), logits_of(model, tokens))
    (tmp_path / "params.json").write_text(json.dumps(params | {"moe_args": {"num_experts": 16}}))
    with pytest.raises(ValueError, match=r"has fields this model does not know: \['moe_args'\]") as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, str(tmp_path))


def test_mixture_of_experts_checkpoints_are_refused_in_one_sentence(tmp_path):
    """This model has one dense FFN per block: Mixtral (Hugging Face model_type) and Meta's MoE params.json (its
    "moe" field) are refused by name, not loaded as a dense model or failing in ModelArgs."""
    model = tiny_model()
    write_hf_bin_dir(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**hf_config(model), "model_type": "mixtral",
                                                      "num_local_experts": 8, "num_experts_per_tok": 2}))
    with pytest.raises(ValueError, match=re.escape("model_type='mixtral'")) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, str(tmp_path))
    meta = tmp_path / "meta"
    meta.mkdir()
    write_meta_dir(model, meta, 0)
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps(params | {"moe": {"num_experts": 8, "num_experts_per_tok": 2}}))
    with pytest.raises(ValueError, match=re.escape("does not know: ['moe']")) as error:
        Transformer.from_pretrained(meta)
    assert_one_sentence(error, str(meta))


@pytest.mark.parametrize("field, message", [
    ({"head_dim": "16"}, "does not know: ['head_dim']"), ({"sliding_window": "4096"}, "['sliding_window']"),
    ({"rope_scaling": 5}, "['rope_scaling']"), ({"rope_scaling": "abc"}, "['rope_scaling']"),
    ({"qkv_bias": "yes"}, "['qkv_bias']"), ({"tie_embeddings": "false"}, "['tie_embeddings']"),
    ({"use_scaled_rope": "false"}, "has use_scaled_rope='false' where true or false belongs"),
    ({"use_scaled_rope": None}, "has use_scaled_rope=None where true or false belongs"),
])
def test_meta_params_json_takes_only_metas_own_keys_each_of_its_type(tmp_path, field, message):
    """Keys that only this model's ModelArgs has (not Meta's params.json) would be passed on unchecked."""
    write_meta_dir(tiny_model(), tmp_path, 0)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(params | field))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, str(tmp_path), message)


@pytest.mark.parametrize("model_type, config_class", [("llama", "LlamaConfig"), ("mistral", "MistralConfig"),
                                                      ("qwen2", "Qwen2Config"), ("qwen3", "Qwen3Config")])
def test_a_null_max_position_embeddings_is_the_model_types_default_context_as_an_absent_one(tmp_path, model_type,
                                                                                          config_class):
    """"max_position_embeddings": null gives the context transformers' config class defaults for that model type,
    as leaving the key out does: a Mistral's was LLaMA's 2048, refusing its sequences past that."""
    transformers = pytest.importorskip("transformers")
    model = tiny_model(qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3")
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model, model_type) | {"max_position_embeddings": None}))
    default = getattr(transformers, config_class)().max_position_embeddings
    assert Transformer.from_pretrained(tmp_path).args.max_seq_len == default


def test_a_mistrals_null_sliding_window_is_no_window_not_the_default_of_an_absent_one(tmp_path):
    """Only a null context length takes the type's default: Mistral v0.2 and later ship "sliding_window": null,
    every token seeing the whole context, where an absent key is v0.1's window of 4096."""
    model = tiny_model()
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    for given, window in (({"sliding_window": None}, None), ({}, 4096)):
        config = {k: v for k, v in hf_config(model, "mistral").items() if k != "sliding_window"} | given
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert Transformer.from_pretrained(tmp_path).args.sliding_window == window


@pytest.mark.parametrize("model_type, config_class", [("llama", "LlamaConfig"), ("mistral", "MistralConfig"),
                                                      ("qwen2", "Qwen2Config"), ("qwen3", "Qwen3Config")])
def test_absent_hf_config_keys_take_transformers_defaults_for_the_model_type(tmp_path, model_type, config_class):
    """A config.json that gives only what it must: the rest as transformers' config class of that model type
    defaults it (KV heads, tied output, rms_norm_eps, context, rope_theta, Mistral's sliding window, Qwen3's
    head width)."""
    transformers = pytest.importorskip("transformers")
    required = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=32, vocab_size=512, intermediate_size=96)
    hf = getattr(transformers, config_class)(**required)
    theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    window = None if model_type.startswith("qwen") else getattr(hf, "sliding_window", None)
    head_dim = getattr(hf, "head_dim", None) if model_type == "qwen3" else None  # the others: 64 / 32 heads
    model = tiny_model(n_layers=2, n_heads=32, n_kv_heads=hf.num_key_value_heads, hidden_dim=96,
                       norm_eps=hf.rms_norm_eps, rope_theta=theta, qkv_bias=model_type == "qwen2",
                       tie_embeddings=hf.tie_word_embeddings, sliding_window=window, head_dim=head_dim,
                       qk_norm=model_type == "qwen3")
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **required}))
    loaded = Transformer.from_pretrained(tmp_path)
    a = loaded.args
    assert (a.n_kv_heads, a.tie_embeddings, a.norm_eps) == (hf.num_key_value_heads, hf.tie_word_embeddings,
                                                            hf.rms_norm_eps)
    assert (a.max_seq_len, a.rope_theta, a.sliding_window) == (hf.max_position_embeddings, theta, window)
    assert a.head_dim == (head_dim or 2)
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def test_qwen2_sliding_window_is_ignored_when_use_sliding_window_is_false(tmp_path):
    """Qwen2 configs carry a sliding_window that is switched off: sequences longer than it are attended in full."""
    model = tiny_model(qkv_bias=True)
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    config = hf_config(model, "qwen2") | {"sliding_window": 8, "use_sliding_window": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.args.sliding_window is None
    tokens = torch.randint(0, model.args.vocab_size, (1, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def test_qwen3_sliding_window_is_ignored_when_use_sliding_window_is_false(tmp_path):
    """Qwen3 configs, like Qwen2's, may carry a sliding_window that use_sliding_window switches off (transformers'
    Qwen3Config then sets it to None): sequences longer than it are attended in full."""
    model = tiny_model(qk_norm=True, head_dim=32, rope_theta=1e6)
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    config = hf_config(model, "qwen3") | {"sliding_window": 8, "use_sliding_window": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.args.sliding_window is None and loaded.args.qk_norm
    tokens = torch.randint(0, model.args.vocab_size, (1, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


@pytest.mark.parametrize("layout", ["bin", "safetensors"])
def test_sharded_hf_weights_without_an_index_are_found_by_name(tmp_path, layout):
    """No index file and no single model.safetensors / pytorch_model.bin: every shard is read."""
    model = tiny_model()
    if layout == "bin":
        write_hf_bin_dir(model, tmp_path)
        (tmp_path / "pytorch_model.bin.index.json").unlink()
    else:
        pytest.importorskip("safetensors")
        sd = hf_state_dict(model)
        names = list(sd)
        for i, half in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
            write_safetensors({n: sd[n] for n in half}, tmp_path / f"model-{i + 1:05d}-of-00002.safetensors")
        (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(Transformer.from_pretrained(tmp_path), tokens), logits_of(model, tokens))


def test_a_tensor_in_two_shards_without_an_index_is_refused_naming_both_files(tmp_path):
    """Without an index nothing says which copy is meant: refused, where reading in order would let the last win."""
    write_hf_bin_dir(tiny_model(), tmp_path)
    (tmp_path / "pytorch_model.bin.index.json").unlink()
    first, second = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    rewrite_weight_file(tmp_path / second, lambda sd: sd | {"model.embed_tokens.weight": torch.zeros(512, 64)})
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, "model.embed_tokens.weight", first, second)


def test_an_index_names_the_weight_files_and_others_beside_it_are_not_read(tmp_path):
    """The index is the list of weight files: a stray safetensors file beside the shards (a leftover of an
    earlier download with other sharding) is not read, where a glob would let its tensors override the shards'."""
    pytest.importorskip("safetensors")
    model = tiny_model()
    sd = hf_state_dict(model)
    names, weight_map = list(sd), {}
    for i, half in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors({n: sd[n] for n in half}, tmp_path / file)
        weight_map.update(dict.fromkeys(half, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_safetensors({n: torch.zeros_like(t) for n, t in sd.items()}, tmp_path / "model-00003-of-00003.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(Transformer.from_pretrained(tmp_path), tokens), logits_of(model, tokens))


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_a_null_num_key_value_heads_is_one_kv_head_per_query_head_as_transformers_reads_it(tmp_path, model_type):
    """LlamaConfig and MistralConfig take num_key_value_heads=None as num_attention_heads (Mistral's default of 8 is
    for an absent key): plain multi-head attention, its k rows un-permuted per head like q's."""
    model = tiny_model(n_kv_heads=None)
    config = hf_config(model, model_type) | {"num_key_value_heads": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.args.n_kv_heads == loaded.args.n_heads == model.args.n_heads
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def test_with_both_indexes_the_safetensors_index_and_its_shards_are_read_not_the_bin_ones(tmp_path):
    """As transformers prefers them: a download holding both sharded formats (another model's .bin shards here)
    reads model.safetensors.index.json and its files, never the pickles."""
    pytest.importorskip("safetensors")
    model, other = tiny_model(), hf_state_dict(tiny_model(seed=1))
    sd = hf_state_dict(model)
    names = list(sd)
    maps = {"safetensors": {}, "bin": {}}
    for i, half in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors({n: sd[n] for n in half}, tmp_path / file)
        maps["safetensors"].update(dict.fromkeys(half, file))
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: other[n] for n in half}, tmp_path / file)
        maps["bin"].update(dict.fromkeys(half, file))
    for index, weight_map in (("model.safetensors.index.json", maps["safetensors"]),
                              ("pytorch_model.bin.index.json", maps["bin"])):
        (tmp_path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(Transformer.from_pretrained(tmp_path), tokens), logits_of(model, tokens))


@pytest.mark.parametrize("layout, n_layers", [("meta", 10**6), ("bin index", 100000), ("safetensors", 2)])
def test_a_layer_count_the_weights_do_not_hold_is_refused_before_any_block_is_built(tmp_path, monkeypatch, layout,
                                                                                    n_layers):
    """params.json / config.json declaring other than the 4 layers the weights hold is refused from the weights'
    names, before a block is built (10**6 of them would fill the memory), in the meta-device dry run too."""
    if layout == "safetensors":
        pytest.importorskip("safetensors")
    write_single_file_dir(tmp_path, layout)
    name, key = ("params.json", "n_layers") if layout == "meta" else ("config.json", "num_hidden_layers")
    config = json.loads((tmp_path / name).read_text())
    (tmp_path / name).write_text(json.dumps(config | {key: n_layers}))
    monkeypatch.setattr("model.TransformerBlock.__init__", lambda *a: pytest.fail("a block was built"))
    for device in (None, "meta"):  # "meta": train.py's dry run
        with pytest.raises(ValueError) as error:
            Transformer.from_pretrained(tmp_path, device=device)
        assert_one_sentence(error, str(tmp_path / name), f"says {n_layers} layers", "hold 4 (layers.0 .. layers.3)",
                            f"fix {key}")
        assert ("download the missing weight files" in str(error.value)) == (n_layers > 4)


@pytest.mark.parametrize("layout", ["meta", "bin", "safetensors"])
def test_one_weight_named_far_past_the_layers_held_does_not_make_a_huge_layer_count_look_held(tmp_path, monkeypatch,
                                                                                             layout):
    """The count held was the highest layer number plus one: a config saying 100000 layers passed beside the 4 held
    once one weight was named layers.99999, and 100000 blocks were built for minutes before the rest was missed.
    (A few layers missing are named weight by weight by the model: test_every_missing_weight_is_named_or_counted.)"""
    if layout == "safetensors":
        pytest.importorskip("safetensors")
    file = write_single_file_dir(tmp_path, layout)
    prefix = "" if layout == "meta" else "model."
    rewrite_weight_file(file, lambda sd: sd | {f"{prefix}layers.99999.attention_norm.weight": torch.ones(64)})
    name, key = ("params.json", "n_layers") if layout == "meta" else ("config.json", "num_hidden_layers")
    (tmp_path / name).write_text(json.dumps(json.loads((tmp_path / name).read_text()) | {key: 100000}))
    monkeypatch.setattr("model.TransformerBlock.__init__", lambda *a: pytest.fail("a block was built"))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path, device="meta")
    assert_one_sentence(error, str(tmp_path / name), "says 100000 layers",
                        "hold 5 (layers.0 .. layers.99999 with gaps)")


def test_a_layer_number_too_long_for_python_to_read_is_an_unknown_weight_not_pythons_own_error(tmp_path):
    """int() refuses strings past 4300 digits with a ValueError of its own, which named no file and advised
    sys.set_int_max_str_digits(); such a name is no layer of this model."""
    file = write_single_file_dir(tmp_path, "bin")
    far = "9" * 5000
    rewrite_weight_file(file, lambda sd: sd | {f"model.layers.{far}.input_layernorm.weight": torch.ones(64)})
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, str(tmp_path), f"has weights this model does not know: layers.{far}.attention_norm")


def test_weights_whose_names_hold_no_layer_are_said_to_hold_none(tmp_path):
    """Weights under another prefix (a multimodal checkpoint's language_model.model.layers.N) hold no layer this
    loader reads: the message says none, not one layer or layers.-1."""
    file = write_single_file_dir(tmp_path, "bin")
    rewrite_weight_file(file, lambda sd: {f"language_model.{n}": t for n, t in sd.items()})
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, str(tmp_path / "config.json"), "says 4 layers", "hold none; fix num_hidden_layers")


def test_a_null_tie_word_embeddings_loads_an_untied_output_layer(tmp_path):
    """"tie_word_embeddings": null is not a broken config (transformers treats it as false): the output layer is the
    file's own weight."""
    write_single_file_dir(tmp_path, "bin")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": None}))
    loaded = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, loaded.args.vocab_size, (2, 12))
    assert not loaded.args.tie_embeddings and torch.equal(logits_of(loaded, tokens), logits_of(tiny_model(), tokens))


@pytest.mark.parametrize("index", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_an_index_entry_that_is_not_a_file_beside_it_is_refused_naming_index_and_entry(tmp_path, index, where):
    """An index names files in its own folder: "../x", "/x" and "sub/x" are refused, not read, even where they exist."""
    folder, shard = tmp_path / "model", "pytorch_model-00002-of-00002.bin"
    folder.mkdir()
    write_hf_bin_dir(tiny_model(), folder)
    weight_map = json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    (folder / "pytorch_model.bin.index.json").unlink()
    target = {"parent": tmp_path, "absolute": tmp_path / "elsewhere", "subfolder": folder / "sub"}[where] / shard
    target.parent.mkdir(exist_ok=True)
    os.replace(folder / shard, target)
    entry = {"parent": f"../{shard}", "absolute": str(target), "subfolder": f"sub/{shard}"}[where]
    weight_map = {n: entry if f == shard else f for n, f in weight_map.items()}
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(folder)
    first = next(n for n, f in weight_map.items() if f == entry)  # the entry's line in the index, found by its weight
    assert_one_sentence(error, str(folder / index), f"maps {first} to {entry!r}", "not a plain file name")


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_a_configuration_without_weight_files_is_one_sentence_naming_what_to_put_there(tmp_path, layout):
    model = tiny_model()
    if layout == "meta":
        write_meta_dir(model, tmp_path, 0)
        for shard in tmp_path.glob("consolidated.*.pth"):
            shard.unlink()
    else:
        (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    with pytest.raises(FileNotFoundError) as error:
        Transformer.from_pretrained(tmp_path)
    want = "has params.json but no consolidated.*.pth" if layout == "meta" else "has config.json but no *.safetensors"
    assert_one_sentence(error, str(tmp_path), want)


# ---------------------------------------------------------------------------------------------------
# weights.read and check_saved: what model.py builds the model from

@pytest.mark.parametrize("layout, overrides", [
    ("meta", dict(max_seq_len=4096)), ("meta", dict(n_kv_heads=4, rope_theta=5e5, max_seq_len=8192)),
    ("llama", dict(hidden_dim=192, multiple_of=256)),
    ("qwen2", dict(hidden_dim=192, multiple_of=256, qkv_bias=True, tie_embeddings=True, rope_theta=1e6)),
    ("qwen3", dict(hidden_dim=192, multiple_of=256, qk_norm=True, head_dim=32, rope_theta=1e6)),
])
def test_read_gives_model_args_fields_and_the_models_own_tensors_without_model_py(tmp_path, layout, overrides):
    """weights.read with model.py out of reach: ModelArgs' fields as a plain dict, which build the args the folder
    was written from, and the model's state dict under Meta's names, every tensor equal (Meta's shards joined,
    Hugging Face's q/k rows, biases and per-head norms un-permuted)."""
    model = tiny_model(**overrides)
    if layout == "meta":
        write_meta_dir(model, tmp_path, 0)
    else:
        write_hf_bin_dir(model, tmp_path)
        (tmp_path / "config.json").write_text(json.dumps(hf_config(model, layout)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "model", None)  # an `import model` in weights.py would fail
        fields, state = read(tmp_path)
    assert type(fields) is dict and all(v is None or type(v) in (int, float, bool, tuple) for v in fields.values())
    assert ModelArgs(**fields) == model.args
    want = model.state_dict()
    assert type(state) is dict and state.keys() == want.keys()
    assert all(torch.equal(state[name], t) for name, t in want.items())


@pytest.mark.parametrize("width, heads, head_dim, message", [
    (24, 8, None, "dim=24 must split into n_heads=8 heads of even width"),  # heads of 3
    (26, 8, None, "dim=26 must split into n_heads=8 heads of even width"),  # 26 / 8 is not whole
    (64, 4, 3, "head_dim=3 must be even"),  # a head width of its own (Qwen3's key), odd
])
def test_a_hugging_face_config_without_heads_of_even_width_is_refused_in_model_args_sentence(tmp_path, width, heads,
                                                                                             head_dim, message):
    """weights.read leaves q and k as stored where a head's rows cannot be un-permuted in pairs, so weights shaped as
    the config says reach ModelArgs, which refuses the config in its sentence, not a reshape's RuntimeError; the
    sentence names the folder (it named none: under train.py it read as if about a setting of the run)."""
    hd, kv = head_dim or width // heads, heads // 2
    layer = {"self_attn.q_proj": (heads * hd, width), "self_attn.k_proj": (kv * hd, width),
             "self_attn.v_proj": (kv * hd, width), "self_attn.o_proj": (width, heads * hd),
             "mlp.gate_proj": (48, width), "mlp.up_proj": (48, width), "mlp.down_proj": (width, 48),
             "input_layernorm": (width,), "post_attention_layernorm": (width,)}
    shapes = {"model.embed_tokens.weight": (32, width), "lm_head.weight": (32, width), "model.norm.weight": (width,),
              **{f"model.layers.0.{name}.weight": shape for name, shape in layer.items()}}
    torch.save({name: torch.randn(shape) for name, shape in shapes.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=width, num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, intermediate_size=48, vocab_size=32)))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, f"the configuration in {str(tmp_path)!r} does not fit together: {message}")


def test_a_config_json_whose_head_counts_do_not_fit_together_is_refused_naming_the_folder(tmp_path):
    """ModelArgs' sentence alone named no file: under train.py it read as if about a setting of the run."""
    write_single_file_dir(tmp_path, "bin")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_key_value_heads": 3}))
    with pytest.raises(ValueError) as error:
        Transformer.from_pretrained(tmp_path)
    assert_one_sentence(error, f"the configuration in {str(tmp_path)!r} does not fit together: n_heads=4 is not a "
                        "multiple of n_kv_heads=3")


@pytest.mark.parametrize("changes, message", [(dict(n_kv_heads=3), "n_heads=4 is not a multiple of n_kv_heads=3"),
                                             (dict(dim=26, head_dim=None), "dim=26 must split into n_heads=4 heads")])
def test_a_saved_model_whose_fields_do_not_fit_together_is_refused_naming_the_file(changes, message):
    """Each field of the right kind, together refused by ModelArgs: its sentence alone named no file (a model.pt given
    as init_from read as if about a setting of the run), as a folder's config.json is named above."""
    with pytest.raises(ValueError) as error:
        saved_model(*saved_tiny(**changes), os.path.join("runs", "base", "model.pt"))
    where = repr(os.path.join("runs", "base", "model.pt"))
    assert_one_sentence(error, f"the configuration in {where} does not fit together: {message}")


@pytest.mark.parametrize("layout", ["bin", "model.pt"])
@pytest.mark.parametrize("changes", [dict(rope_theta=1e-300),  # 0 in float32: theta^(-2i/hd) is inf
                                     dict(rope_scaling=(1e-300, 1.0, 4.0, 64)),  # inv_freq / factor: inf
                                     dict(rope_theta=1e-30, max_seq_len=2**62)])  # finite, but not times 2**62
def test_rotary_settings_whose_angles_pass_float32_are_refused_naming_the_checkpoint(tmp_path, layout, changes):
    """Positive, so of the right kind, but the rotation's angles were NaN: the first loss was NaN, blamed on the
    learning rate. Refused once the weights' shapes fit (head_dim is then the weights': no huge arange), where
    rope_cos_sin itself gives NaN at the first or last position; the published bases' settings pass."""
    model = tiny_model()
    args = replace(model.args, **changes)
    ends = torch.tensor([[0, args.max_seq_len - 1]])
    assert rope_cos_sin(ends, args.head_dim, args.rope_theta, args.rope_scaling)[0].isnan().any()
    if layout == "model.pt":
        with pytest.raises(ValueError) as error:
            saved_model(asdict(args), dict(model.state_dict()), "model.pt")
        where = "'model.pt'"
    else:
        write_single_file_dir(tmp_path, layout)
        config = json.loads((tmp_path / "config.json").read_text())
        factor, low, high, context = args.rope_scaling or (None,) * 4
        (tmp_path / "config.json").write_text(json.dumps(config | {
            "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len, "rope_scaling": factor and {
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": context}}))
        with pytest.raises(ValueError) as error:
            Transformer.from_pretrained(tmp_path)
        where = repr(str(tmp_path))
    assert_one_sentence(error, f"the configuration in {where} has rope_theta={args.rope_theta} and rope_scaling="
                        f"{args.rope_scaling}, whose rotation angles pass float32")
    for name in ("llama3.1-8b", "qwen3-8b", "mistral-7b", "llama2-7b"):
        a = ModelArgs.from_name(name, max_seq_len=2**62)
        cos = rope_cos_sin(torch.tensor([[0, a.context - 1]]), a.head_dim, a.rope_theta, a.rope_scaling)[0]
        assert cos.isfinite().all(), name


def test_rotary_settings_finite_up_to_the_last_position_are_accepted_though_one_past_it_is_not():
    """The check reads the positions a model uses, 0 to context - 1, not one past: rope_theta is bisected (in log
    space) to the boundary where the angle at max_seq_len - 1 is finite and the one at max_seq_len passes float32."""
    model, context = tiny_model(), 2**20  # float32 holds every position below 2**24 exactly
    finite = lambda theta, pos: rope_cos_sin(torch.tensor([[pos]]), model.args.head_dim, theta)[0].isfinite().all()
    low, high = 1e-300, 1.0  # low's angles overflow at context - 1; high's (1: angle = position) do not
    for _ in range(200):
        mid = math.sqrt(low) * math.sqrt(high)
        low, high = (low, mid) if finite(mid, context - 1) else (mid, high)
    assert finite(high, context - 1) and not finite(high, context)
    args, _ = saved_model(asdict(replace(model.args, rope_theta=high, max_seq_len=context)),
                          dict(model.state_dict()), "model.pt")
    assert args.rope_theta == high and args.context == context


@pytest.mark.parametrize("changes, message", [
    (dict(n_heads=6, head_dim=None), "dim=64 must split into n_heads=6 heads of even width"),
    (dict(n_kv_heads=3), "n_heads=4 is not a multiple of n_kv_heads=3"),
    (dict(head_dim=5), "head_dim=5 must be even"),
])
def test_a_saved_model_whose_fields_do_not_fit_together_is_refused_in_model_args_sentence(changes, message):
    """check_saved checks each field's kind, not how the fields fit together: that is ModelArgs' check, whose one
    sentence saved_model passes on (not a shape mismatch found later, or a traceback)."""
    model_args, state = saved_tiny(**changes)
    check_saved(model_args, state, "model.pt", set(model_args))  # every field of its kind
    with pytest.raises(ValueError) as error:
        saved_model(model_args, state, "model.pt")
    assert_one_sentence(error, message)


def test_check_saved_knows_the_fields_it_is_given_not_a_list_of_its_own():
    """model.py gives check_saved ModelArgs' fields, so a field added to ModelArgs is known to it at once."""
    model_args, state = saved_tiny()
    check_saved(model_args | {"experts": 4}, state, "model.pt", set(model_args) | {"experts"})
    with pytest.raises(ValueError) as error:
        check_saved(model_args, state, "model.pt", set(model_args) - {"qk_norm"})
    assert_one_sentence(error, "the model_args of model.pt has fields this model does not know: ['qk_norm']")


@pytest.mark.parametrize("field", ["dim", "n_layers", "n_heads", "vocab_size"])
def test_a_saved_model_without_a_field_that_has_no_default_is_refused_naming_it(field):
    """ModelArgs has no default for these four: a model.pt without one is one sentence naming the field from
    check_saved, not a KeyError, nor a model built from ModelArgs' defaults."""
    model_args, state = saved_tiny()
    del model_args[field]
    with pytest.raises(ValueError) as error:
        check_saved(model_args, state, "model.pt", set(model_args) | {field})
    assert_one_sentence(error, f"the model_args of model.pt has no '{field}', which the model needs")
