"""
Reads checkpoint files for model.py: a Meta folder (params.json + consolidated.*.pth, its model-parallel shards
joined), a Hugging Face one (config.json + *.safetensors or pytorch_model*.bin, with or without an index; names mapped
to Meta's, q/k rows un-permuted), and the checks of train.py's model.pt. read() returns ModelArgs' fields as a dict
and the tensors under Meta's names; model.py builds the model (Transformer.from_pretrained, saved_model).

Every file is read as if it could be damaged or hostile: tensors are read by safetensors or by torch.load with
weights_only=True (no file runs code), memory-mapped where the format allows; each configuration key is checked for
its kind, and the weights' names, shapes, dtypes and values against the configuration, before the model takes any
memory. Each problem is one sentence naming the file and the fix: a ValueError, a FileNotFoundError for a missing
file (NotADirectoryError: a file given as the folder), an ImportError for a missing safetensors package.
"""

import glob
import json
import math
import os
import pickle
import re

import torch


def read(path, dtype=None, device=None):
    """(fields, state) of a Meta directory (params.json + consolidated.*.pth) or a Hugging Face one (config.json +
    *.safetensors or pytorch_model*.bin): ModelArgs' fields as a dict, and name -> tensor under Meta's names,
    memory-mapped where the format allows and converted to dtype / device as read (None: as stored)."""
    path = os.fspath(path)
    if dtype is not None and not getattr(dtype, "is_floating_point", False):  # "bfloat16": a TypeError mid-read
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch.dtype; pass e.g. torch.bfloat16, or None")
    if not os.path.isdir(path):
        error, what = (NotADirectoryError, "is not a folder") if os.path.exists(path) else (FileNotFoundError,
                                                                                           "does not exist")
        raise error(f"checkpoint directory {path!r} {what}; pass the folder that holds params.json (Meta) or "
                    "config.json (Hugging Face).")
    hf = os.path.lexists(os.path.join(path, "config.json"))  # a broken link: named as one, not as no config
    # Mistral's Hugging Face folders also hold its own params.json (beside consolidated.safetensors, not .pth)
    if os.path.lexists(os.path.join(path, "params.json")) and (
            not hf or glob.glob(os.path.join(path, "consolidated.*.pth"))):
        return _read_meta(path, dtype, device)
    if hf:
        return _read_hf(path, dtype, device)
    raise ValueError(f"{path!r} holds neither params.json (Meta layout) nor config.json (Hugging Face layout); "
                     "point to the folder with the weights (for Meta's files in a Hugging Face download, its "
                     "original/ folder)")


# what a saved model's model_args (dataclasses.asdict of ModelArgs) may hold, as _check_fields reads it
_ARGS = {"dim": ("positive int", False), "n_layers": ("positive int", False), "n_heads": ("positive int", False),
         "vocab_size": ("positive int", False)}
_ARGS_OPTIONAL = {"n_kv_heads": ("positive int", True), "multiple_of": ("positive int", False),
                  "ffn_dim_multiplier": ("positive", True), "norm_eps": ("positive below 1", False),
                  "rope_theta": ("positive", False), "max_seq_len": ("positive int", False),
                  "hidden_dim": ("positive int", True), "qkv_bias": ("bool", False), "tie_embeddings": ("bool", False),
                  "sliding_window": ("positive int", True), "head_dim": ("positive int", True),
                  "qk_norm": ("bool", False)}  # rope_scaling: null or _LLAMA3_ROPE's four numbers


def check_args(fields):
    """ModelArgs' fields (a dict) of the kinds a saved model's must be, else a ValueError naming the field; vocab_size
    only an int: Meta's -1 is resolved by its reader, and Transformer names one <= 0 itself."""
    _check_fields(fields, "ModelArgs", {}, {**_ARGS, **_ARGS_OPTIONAL, "vocab_size": ("int", False)}, "pass one")
    _check_rope_scaling(fields.get("rope_scaling"), "ModelArgs", "pass one")


def _check_rope_scaling(scaling, where, fix):
    """A ValueError unless scaling is None or _LLAMA3_ROPE's four numbers, low_freq_factor below high_freq_factor."""
    if scaling is not None and (not isinstance(scaling, (list, tuple)) or len(scaling) != len(_LLAMA3_ROPE)):
        raise ValueError(f"{where} has rope_scaling={scaling!r} where null or {len(_LLAMA3_ROPE)} numbers belong; "
                         f"{fix}")
    _check_fields(dict(zip(_LLAMA3_ROPE, scaling or ())), where, _LLAMA3_ROPE if scaling else {}, {}, fix)
    if scaling and scaling[1] >= scaling[2]:  # the rotation's smoothing would divide by zero or less
        raise ValueError(f"{where} has low_freq_factor={scaling[1]} not below high_freq_factor={scaling[2]} in its "
                         f"rotary scaling; {fix}")


def check_saved(model_args, state, path, known):
    """A model saved as {"model_args": asdict(ModelArgs), "model": name -> tensor} (train.py's model.pt), checked as
    read() checks a checkpoint folder: a ValueError naming path for a field unknown (not in known) or of the wrong
    kind, a layer count its weights' names do not hold, or a weight not floating point or holding NaN or inf.
    model.saved_model checks the rest: the fields against ModelArgs, the weights' names and shapes against the model."""
    if not isinstance(model_args, dict) or not isinstance(state, dict) or \
            not all(isinstance(n, str) and isinstance(t, torch.Tensor) for n, t in state.items()):
        raise ValueError(f"{path} holds no model_args dict beside a dict of named tensors, so it is not a model.pt "
                         "written by train.py; give one, or a Meta or Hugging Face folder")
    where = f"the model_args of {path}"
    if unknown := model_args.keys() - known:
        raise ValueError(f"{where} has fields this model does not know: {sorted(unknown, key=str)[:5]}; give a "
                         "model.pt written by train.py")
    _check_fields(model_args, where, _ARGS, _ARGS_OPTIONAL)
    _check_rope_scaling(model_args.get("rope_scaling"), where, "give a model.pt written by train.py")
    _check_layer_count(model_args["n_layers"], [state], where, "n_layers", path)
    for name, t in state.items():
        _checked(name, t, path)


# The readers convert each tensor to dtype/device as soon as it is read: at most one tensor exists twice at a time.

def _check_regular(file):
    """A ValueError naming file when it is there but not a regular file: a pipe waits forever, /dev/zero never ends."""
    if os.path.islink(file) and not os.path.exists(file):  # a cache's deleted blob: the loaders said only errno's
        raise FileNotFoundError(f"{file} is a broken link ({os.readlink(file)} does not exist); download it again")
    if os.path.exists(file) and not os.path.isfile(file):
        what = "a folder" if os.path.isdir(file) else "a named pipe or a device"
        raise ValueError(f"{file} is {what}, not a file; put the checkpoint's own {os.path.basename(file)} there")


def _unique_keys(pairs):  # json's object_pairs_hook: the object, or a KeyError naming a key it gives twice
    value = dict(pairs)  # its keys in the order they first appear: the first pair out of step with them repeats one
    if len(value) < len(pairs):
        raise KeyError(next(key for (key, _), first in zip(pairs, [*value, None]) if key != first))
    return value


def _read_json(file):  # not files.read_json: model.py and weights.py are copied alone, with torch their one import
    """The JSON object in a checkpoint's configuration file; a ValueError naming the file if it is not one."""
    again = "download it again from the checkpoint's source"
    _check_regular(file)
    if os.path.isfile(file) and os.path.getsize(file) > 64 << 20:  # json reads it whole: a wrong file's gigabytes
        raise ValueError(f"{file} is over 64 MiB, far more than a configuration file holds; {again}")
    try:
        with open(file, encoding="utf-8-sig") as f:  # past a UTF-8 BOM, as files.read_json and an editor take it
            value = json.load(f, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON (line {e.lineno}: {e.msg}); {again}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text; {again}") from None
    except RecursionError:
        raise ValueError(f"{file} is nested too deeply to read; {again}") from None
    except KeyError as e:  # _unique_keys': json alone would keep the last value and drop the first unseen
        raise ValueError(f"{file} gives the key {e.args[0]!r} twice; keep one of them or {again}") from None
    except ValueError:  # json's own, not a JSONDecodeError
        raise ValueError(f"{file} holds a number too long to read; {again}") from None
    except PermissionError as e:
        raise ValueError(f"{file} cannot be read ({e.strerror}); check that it is a file you may read") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} holds a JSON {type(value).__name__}, not an object; {again}")
    return value


# what the readers take from a configuration file: key -> (kind, may be null), each kind as its errors word it. The
# "positive" kinds are also finite and, if integers, below 2**63 (torch's int64); "int": any integer (Meta's vocab_size
# is -1). The Meta tables list every key params.json may have: others are refused, not passed to ModelArgs unchecked.
_KINDS = {"positive int": "a positive integer", "int": "an integer", "positive": "a positive number",
          "positive below 1": "a positive number below 1", "bool": "true or false"}  # below 1: a norm's epsilon
_META_PARAMS = {"dim": ("positive int", False), "n_layers": ("positive int", False), "n_heads": ("positive int", False)}
_META_OPTIONAL = {"n_kv_heads": ("positive int", True), "vocab_size": ("int", False),
                  "multiple_of": ("positive int", False), "ffn_dim_multiplier": ("positive", True),
                  "norm_eps": ("positive below 1", False), "rope_theta": ("positive", False),
                  "max_seq_len": ("positive int", False), "hidden_dim": ("positive int", True),
                  "use_scaled_rope": ("bool", False)}
# what transformers' Mistral, Qwen2 and Qwen3 configs assume for a key config.json leaves out, where LlamaConfig differs
_QWEN = {"num_key_value_heads": 32, "max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28}
_HF_TYPE_DEFAULTS = {"mistral": {"num_key_value_heads": 8, "max_position_embeddings": 131072, "sliding_window": 4096},
                     "qwen2": _QWEN, "qwen3": {**_QWEN, "head_dim": 128}}
_HF_CONFIG = {"hidden_size": ("positive int", False), "num_hidden_layers": ("positive int", False),
              "num_attention_heads": ("positive int", False), "vocab_size": ("positive int", False),
              "intermediate_size": ("positive int", False)}
_LLAMA3_ROPE = {"factor": ("positive", False), "low_freq_factor": ("positive", False),
                "high_freq_factor": ("positive", False), "original_max_position_embeddings": ("positive int", False)}
_HF_OPTIONAL = {"num_key_value_heads": ("positive int", True), "rms_norm_eps": ("positive below 1", True),
                "rope_theta": ("positive", True), "max_position_embeddings": ("positive int", True),
                "head_dim": ("positive int", True), "tie_word_embeddings": ("bool", True)}
_QWEN_WINDOW = {"use_sliding_window": ("bool", True), "max_window_layers": ("int", False)}  # Qwen2Config's (strict)


def _check_fields(config, file, required, optional, fix="fix it or download the file again"):
    """A ValueError naming the file and the key when a needed key is absent or a value is not of the right kind."""
    for key, (kind, nullable) in {**required, **optional}.items():
        if key not in config and key in required:
            raise ValueError(f"{file} has no {key!r}, which the model needs; download the complete file again from "
                             "the checkpoint's source")
        value = config.get(key)
        if key not in config or value is None and nullable:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        top = 1 if kind == "positive below 1" else math.inf if isinstance(value, float) else 2**63
        if (not isinstance(value, bool) if kind == "bool" else not number
                or (kind.endswith("int") and not isinstance(value, int))
                or (kind.startswith("positive") and not 0 < value < top)):
            want = _KINDS[kind] + (" below 2**63 (int64)" if number and top == 2**63 <= value else "")
            raise ValueError(f"{file} has {key}={value!r} where {want} belongs; {fix}")


def describe(error):
    """The first sentence of an exception's message, short: what a loader said about a broken file."""
    text = str(error).split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(". ")[0].rstrip(".")
    return text[:120] or type(error).__name__


def _torch_load(file):
    """The dict of tensors in a torch.save file, memory-mapped (weights_only: no file can run code); a
    ValueError naming the file when it is truncated, foreign, or holds other Python objects."""
    try:
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "_use_new_zipfile_serialization" not in str(e):
                raise
            # the legacy (pre-1.6, non-zip) format cannot be memory-mapped: read it into memory
            state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (PermissionError, IsADirectoryError) as e:
        raise ValueError(f"{file} cannot be read ({e.strerror}); check that it is a weight file you may read") from None
    except Exception as e:  # zip, unpickling, EOF, and OSError(EINVAL) from mmap on a cut file
        # a class: "Unsupported global: GLOBAL x.y was not an allowed global"; os, sys: "unsupported GLOBAL x.y whose"
        found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(e), re.IGNORECASE)
        if found and isinstance(e, pickle.UnpicklingError):  # weights_only refused a class: more than tensors
            raise ValueError(f"{file} holds Python objects besides tensors ({found.group(1)}), which are not loaded "
                             "because loading them could run code; use a checkpoint of plain tensors (e.g. its "
                             ".safetensors)") from None
        raise ValueError(f"{file} is truncated or not a PyTorch checkpoint ({describe(e)}); "
                         "download it again") from None
    if not isinstance(state, dict) or not all(isinstance(n, str) and torch.is_tensor(t) for n, t in state.items()):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a dict of named tensors, so it is not a "
                         "LLaMA weight file; point to the checkpoint's weight files")
    return state


def _read_meta(path, dtype, device):
    params_file = os.path.join(path, "params.json")
    params = _read_json(params_file)
    _check_fields(params, params_file, _META_PARAMS, _META_OPTIONAL)
    if params.pop("use_scaled_rope", False):
        raise ValueError(f"{path!r} is a LLaMA 3.1+ checkpoint (use_scaled_rope), whose params.json does not give its "
                         "rotary scaling; load its Hugging Face folder (config.json) instead")
    if unknown := params.keys() - _META_PARAMS.keys() - _META_OPTIONAL.keys():
        raise ValueError(f"params.json in {path!r} has fields this model does not know: {sorted(unknown)}; only the "
                         "keys of Meta's LLaMA 2 and LLaMA 3 params.json are supported (for others load the Hugging "
                         "Face folder)")
    if not (files := sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))):
        raise FileNotFoundError(f"{path!r} has params.json but no consolidated.*.pth weight files; put the weights in "
                                "the same folder")
    shards = [_open_weights(f) for f in files]
    _check_layer_count(params["n_layers"], shards, params_file, "n_layers", path)
    state = {}
    for name in dict.fromkeys(n for s in shards for n in s):  # every shard's names: one only the last has too
        if name == "rope.freqs":  # precomputed rotary frequencies in old checkpoints; we compute them
            continue
        parts = [s.get(name) for s in shards]
        if len(parts) > 1 and (any(p is None or p.shape != parts[0].shape for p in parts) or parts[0].dim() == 0):
            shapes = ", ".join(f"{os.path.basename(f)} {'none' if p is None else tuple(p.shape)}"
                               for f, p in zip(files, parts))
            raise ValueError(f"weight {name} is not split into equal slices of at least one dimension across the "
                             f"shards in {path!r} ({shapes}); download the consolidated.*.pth files again")
        parts = [_checked(name, p, f) for f, p in zip(files, parts)]
        t = parts[0] if len(parts) == 1 or parts[0].dim() == 1 else torch.cat(  # a single shard, or a norm
            parts, dim=_meta_split_dim(name, parts[0], params["dim"]))  # (norms are replicated on every shard)
        state[name] = t.to(device=device, dtype=dtype)
    if params.get("vocab_size", -1) <= 0:  # -1 in Meta's files: the embedding's row count says it
        if "tok_embeddings.weight" not in state:
            raise ValueError(f"the checkpoint in {path!r} lacks weights the model needs: tok_embeddings.weight; check "
                             "that all weight files are present")
        params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    # params.json does not give the context length: LLaMA 3 (rope_theta 500000) was trained on 8192
    # tokens, LLaMA 2 on 4096; from_pretrained(max_seq_len=...) overrides this
    params.setdefault("max_seq_len", 8192 if params.get("rope_theta", 1e4) >= 5e5 else 4096)
    return params, state


def _meta_split_dim(name, part, dim):
    # Meta's model-parallel shards (fairscale): column-parallel layers (wq, wk, wv, w1, w3, output)
    # split their output rows, row-parallel ones (wo, w2) their input columns. The embedding is
    # split along the embedding dim in LLaMA 2 and along the vocabulary in LLaMA 3.
    if name == "tok_embeddings.weight":
        return 0 if part.shape[1] == dim else 1
    return 1 if name.endswith(("wo.weight", "w2.weight")) else 0


def hf_to_meta_qk(w, n_heads):
    """Undo the row permutation Hugging Face's converter applies to wq and wk (pass n_kv_heads for
    wk). HF's rotary code rotates the first half of a head against the second half, so its
    converter moves row 2j of each head to j and row 2j+1 to j + hd/2; this moves them back."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


_HF_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
_HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm"}  # the last two: Qwen3's


def _hf_to_meta_name(name):
    if (m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)) and m.group(2) in _HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if name.endswith(".weight") and name[:-len(".weight")] in _HF_NAMES:
        return _HF_NAMES[name[:-len(".weight")]] + ".weight"
    return name  # unknown: reported as unexpected


def _hf_rope(config, config_file, path):
    """(rotary settings, LLaMA 3.1's scaling or None) of a config.json. Its other fields (_HF_CONFIG) are checked
    here too, between the rotary kind and the scaling's fields: the order of refusals _read_hf had. transformers 5
    writes rope_parameters (rope_theta inside); older versions rope_theta and rope_scaling. Read as transformers 5
    reads them: a rope_scaling replaces rope_parameters whole, and a rope_theta inside the one read overrides the
    top-level rope_theta."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{config_file} has rotary settings {rope!r} where an object belongs; fix it or download "
                         "the file again")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        read = (" (its rope_scaling, which transformers reads instead of its rope_parameters)"
                if config.get("rope_scaling") and config.get("rope_parameters") else "")
        raise ValueError(f"config.json in {path!r} asks for rotary scaling {rope!r}{read}, which this model does not "
                         "implement (only LLaMA 3.1's \"llama3\"); use a checkpoint without it")
    _check_fields(config, config_file, _HF_CONFIG, _HF_OPTIONAL)
    if kind == "llama3":  # as transformers 5 reads it: a top-level original_max_position_embeddings (Phi-3's place)
        # wins over the scaling's own, and the context length stands in where neither gives one
        rope = {**rope, "original_max_position_embeddings": config.get("original_max_position_embeddings", rope.get(
            "original_max_position_embeddings", config.get("max_position_embeddings") or 2048))}
    _check_fields(rope, config_file, _LLAMA3_ROPE if kind == "llama3" else {}, {"rope_theta": ("positive", True)})
    scaling = tuple(rope[k] for k in _LLAMA3_ROPE) if kind == "llama3" else None
    _check_rope_scaling(scaling, config_file, "fix it or download the file again")
    return rope, scaling


def _read_hf(path, dtype, device):
    config_file = os.path.join(path, "config.json")
    kind = (config := _read_json(config_file)).get("model_type")
    unsupported = {"model_type": ("llama", "mistral", "qwen2", "qwen3", None), "hidden_act": ("silu", "swish", None),
                   "attention_bias": (False, None), "mlp_bias": (False, None)}
    read_by = {"attention_bias": ("llama", "qwen3", None), "mlp_bias": ("llama", None)}  # transformers 5's classes
    for key, allowed in unsupported.items():  # that read the key: others have no bias there (Qwen2's q, k, v: always)
        if config.get(key) not in allowed and kind in read_by.get(key, (kind,)):
            raise ValueError(f"config.json in {path!r} has {key}={config[key]!r}, which this model does not implement; "
                             "LLaMA 2/3/3.1/3.2, Qwen2/Qwen2.5/Qwen3 and Mistral checkpoints are supported")
    # keys a config leaves out take transformers' defaults for its model type (LLaMA's: in the code below); a null
    # context length too (transformers 5 refuses it, 4 left it unused): the type's, not LLaMA's 2048 for a Mistral
    given = {k: v for k, v in config.items() if not (k == "max_position_embeddings" and v is None)}
    config = {**_HF_TYPE_DEFAULTS.get(kind, {}), **given}
    qwen2, qwen3 = kind == "qwen2", kind == "qwen3"  # q, k, v with biases; q and k normalised per head
    if qwen := qwen2 or qwen3:
        _check_fields(config, config_file, {}, _QWEN_WINDOW)
    window = config.get("sliding_window") if kind == "mistral" else None  # LLaMA's: none (LlamaAttention takes none)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ValueError(f"{config_file} has sliding_window={window!r} where a positive integer or null belongs; "
                         "fix it or download the file again")
    rope, scaling = _hf_rope(config, config_file, path)
    if qwen and config.get("use_sliding_window") and config["sliding_window"] is not None:  # Qwen2Config's window:
        types = config.get("layer_types") or ["sliding_attention"] * (  # on the layers from max_window_layers on, or
            config["max_window_layers"] < config["num_hidden_layers"])  # as layer_types says; on none: full attention
        if not isinstance(types, list) or "sliding_attention" in types:
            raise ValueError(f"config.json in {path!r} has use_sliding_window=True with a window on some layers (by "
                             "max_window_layers or layer_types), which this model does not implement; use one without")
    n_heads = config["num_attention_heads"]
    # LlamaConfig's defaults where a key is absent (rms_norm_eps 1e-6, max_position_embeddings 2048)
    args = dict(dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
                hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps") or 1e-6,
                rope_theta=rope.get("rope_theta") or config.get("rope_theta") or 10000.0,
                max_seq_len=config.get("max_position_embeddings") or 2048, qkv_bias=qwen2,
                tie_embeddings=bool(config.get("tie_word_embeddings")), sliding_window=window,
                rope_scaling=scaling, head_dim=config.get("head_dim"), qk_norm=qwen3)
    head_dim = args["head_dim"] or args["dim"] // n_heads  # as ModelArgs derives it (and checks it, once built)
    shards = {file: _open_weights(os.path.join(path, file)) for file in _hf_weight_files(path)}
    _check_layer_count(args["n_layers"], shards.values(), config_file, "num_hidden_layers", path)
    state, source, unknown = {}, {}, {}  # source: the file each weight came from
    for file, tensors in shards.items():
        for hf_name, t in tensors.items():
            if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer that older conversions saved
                continue
            name = _hf_to_meta_name(hf_name)
            if name == hf_name:  # not a Hugging Face name, even where it is one of Meta's (Mistral's consolidated.*)
                unknown[hf_name] = file
                continue
            if hf_name in source:  # no rule says which copy is meant (reading in order would take the last)
                raise ValueError(f"weight {hf_name} is in both {source[hf_name]} and {file} in {path!r}; remove the "
                                 "file that does not belong to this checkpoint or download the checkpoint again")
            source[hf_name] = file
            t = _checked(hf_name, t, os.path.join(path, file))
            if name.endswith(("attention.wq.weight", "attention.wk.weight", "attention.wq.bias", "attention.wk.bias")):
                heads = n_heads if ".wq." in name else args["n_kv_heads"]
                rows = t if t.dim() == 2 else t[:, None]  # a bias permutes like a one-column weight
                if head_dim % 2 == 0 and rows.shape == (heads * head_dim, args["dim"] if t.dim() == 2 else 1):
                    t = hf_to_meta_qk(rows, heads).reshape(t.shape)
            if name.endswith(("q_norm.weight", "k_norm.weight")) and t.shape == (head_dim,) and head_dim % 2 == 0:
                t = hf_to_meta_qk(t[:, None], 1).reshape(t.shape)  # a head's components, moved as its rows are
            state[name] = t.to(device=device, dtype=dtype)
    if unknown:  # Meta-layout names would otherwise be taken as they stand, their q/k rows permuted as HF's
        listed = ", ".join(sorted(unknown)[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(f"the checkpoint in {path!r} has weights this model does not know: {listed} (in "
                         f"{', '.join(sorted(set(unknown.values())))}); keep only the Hugging Face weight files of a "
                         "LLaMA, Qwen or Mistral model in that folder")
    stored = [shards[source[n]][n] for n in ("lm_head.weight", "model.embed_tokens.weight") if n in source]
    if args["tie_embeddings"] and len(stored) == 2:  # a different lm_head: untied, as transformers 5 reads it
        args["tie_embeddings"] = torch.equal(*stored)
    if args["tie_embeddings"]:
        state.pop("output.weight", None)  # tied: the embedding serves both (some files store the copy)
    return args, state


def _hf_weight_files(path):
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index)
        if os.path.lexists(index):  # a broken link too (a cache's deleted blob): named, not read past to the shards
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index} has no \"weight_map\" of weight names to file names; download it again "
                                 "from the checkpoint's source")
            outside = next(((n, f) for n, f in weight_map.items() if os.path.basename(f) != f), None)
            if outside:  # "../x", "/x" or "sub/x" would be read from outside the checkpoint folder
                raise ValueError(f"{index} maps {outside[0]} to {outside[1]!r}, which is not a plain file name in its "
                                 "folder; download the index again from the checkpoint's source")
            files = sorted(set(weight_map.values()))
            if missing := [f for f in files if not os.path.isfile(os.path.join(path, f))]:
                raise FileNotFoundError(f"{index} names weight files that are not in {path!r}: {', '.join(missing)}; "
                                        "download them into the same folder")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [single]
    # transformers names its files model*.safetensors; Mistral's folders add consolidated.safetensors (Meta's names)
    files = (sorted(glob.glob(os.path.join(path, "model*.safetensors")))
             or sorted(glob.glob(os.path.join(path, "*.safetensors")))
             or sorted(glob.glob(os.path.join(path, "pytorch_model*.bin"))))
    if not files:
        raise FileNotFoundError(f"{path!r} has config.json but no *.safetensors or pytorch_model*.bin weight files; "
                                "put the weights in the same folder")
    return [os.path.basename(f) for f in files]


def _check_layer_count(n_layers, shards, config_file, key, path):
    """A ValueError when the configuration declares another number of layers than the shards' names hold: checked
    before the model is built, as an absurd count (100000) would build modules until memory runs out."""
    layers = {int(m.group(1)) for s in shards for n in s if (m := re.match(r"(?:model\.)?layers\.(\d{1,9})\.", n))}
    held = 1 + max(layers, default=-1)
    if held != n_layers or len(layers) < n_layers / 2:  # most absent (a lone layers.99999): refused before 100000 built
        span = f"{len(layers)} (layers.0 .. layers.{held - 1}{' with gaps' * (len(layers) < held)})" if held else "none"
        raise ValueError(f"{config_file} says {n_layers} layers but the weights in {path!r} hold {span}; fix {key}"
                         + (" or download the missing weight files" if len(layers) < n_layers else ""))


def _open_weights(file):
    """name -> tensor of one weight file, memory-mapped where the format allows: its names, with no data read yet."""
    _check_regular(file)
    return _read_safetensors(file) if file.endswith(".safetensors") else _torch_load(file)


def _checked(name, t, file):
    """t; a ValueError naming the file and the tensor when it is sparse or meta (no values), not floating point or
    float8 (quantised: no CPU matmul takes it, its scales are elsewhere), shows more values than stored, or NaN/inf."""
    if t.layout != torch.strided or t.is_meta:  # torch.load gives both back: a save of a model built on meta
        raise ValueError(f"weight {name} in {file} is a sparse or meta tensor, without values; save dense weights")
    if not t.is_floating_point() or t.element_size() == 1:
        raise ValueError(f"weight {name} in {file} holds {t.dtype} values, which this model does not take "
                         "(quantised checkpoints are not supported); use the checkpoint's floating-point weights")
    if t.untyped_storage().nbytes() < t.numel() * t.element_size():  # strides of 0: 10**14 values from 4 bytes
        raise ValueError(f"weight {name} in {file} shows more values than it stores (repeated); download it again")
    if not torch.isfinite(t.sum(dtype=torch.float32)):  # one pass, no copy: a NaN or inf makes the sum one
        raise ValueError(f"weight {name} in {file} holds NaN or inf values: the download is damaged; download it again")
    return t


def _read_safetensors(file):
    """name -> tensor of a safetensors file, memory-mapped."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(f"reading {file} needs the safetensors package: pip install safetensors (or load Meta's "
                          "consolidated.*.pth files, e.g. the original/ folder of a Hugging Face download)") from None
    try:
        with safe_open(file, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError: a cut or foreign file
        raise ValueError(f"{file} is truncated or not a safetensors file ({describe(e)}); download it again") from None
