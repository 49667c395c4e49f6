"""
The tokenizer behind one encode / decode: a LLaMA-2 SentencePiece model, a LLaMA-3 tiktoken file
(told apart by content), or a Hugging Face tokenizer.json (Qwen2.5, Mistral, ...). data.py encodes
the authors' records with it; evaluation.py and sample.py decode what the model generates.
"""
import base64
import binascii
import json
import os
import re

from errors import UserError
from files import check_openable_by_torch, read_json

PROMPT_EOS = "</s>"  # build_dataset.py's PROMPT_TEMPLATE is "{instruction}</s>", whatever the tokenizer

# LLaMA-3's tokenizer.model is a tiktoken file (base64 token, rank); Meta's tokenizer.py adds this
# pre-tokenizer regex and 256 special tokens numbered after the 128000 ranks.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])
LLAMA3_PAD = "<|reserved_special_token_2|>"  # LLaMA-3.1 renamed it <|finetune_right_pad_id|>
MAX_VOCAB = 2**24  # 64 times the largest real vocabulary: past it, an id is a damaged file's, not a token's
NO_TOKEN = "\x00no token"  # the unknown token given to a BPE model that has none: no vocabulary holds it
VOCAB_PADDING = 1024  # base models round their embedding up past the tokenizer's vocabulary by less than this


def _looks_like_tiktoken(path):
    """Whether the file's first line is "<base64 token> <rank>", past a UTF-8 BOM and blank lines (which tiktoken's
    own reader skips, as _load_tiktoken does)."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    first = head.split(b"\n", 1)[0].split()
    return len(first) == 2 and first[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/]+=*", first[0])


def _looks_like_json(path):  # a tokenizer.json saved under another name (a SentencePiece model starts with 0x0a)
    with open(path, "rb") as f:
        return f.read(64).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{")


def _bpe_problem(ranks):
    """What is wrong with a tiktoken file's {token bytes: rank}, or None. tiktoken's Rust side panics (a
    BaseException, past `except Exception`) on a rank given twice, and on encoding a byte without a token;
    the specials are numbered after the ranks, so those must be 0 .. n-1, as in Meta's file."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        return "its ranks are not 0, 1, 2, ... each once"
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    return f"it has no token for the byte {missing[0]:#04x}, and tiktoken needs all 256" if missing else None


class Tokenizer:
    """LLaMA-2 / Chinese-LLaMA-2 SentencePiece model, LLaMA-3 tiktoken file (told apart by content), or a
    Hugging Face tokenizer.json (Qwen2.5, Mistral, ...; a folder holding one works too), read by the
    `tokenizers` package with BOS and EOS from the tokenizer_config.json beside it. With every one, the
    authors' literal "</s>" (the prompt's end) is the model's EOS id under special=True unless it has a "</s>"
    token of its own (so LLaMA-3's two files give the same ids); a model without a BOS (Qwen) gets none.

    encode(text) treats all text as text, like Meta's tokenizers; encode(text, special=True) turns
    special-token strings ("</s>", "<|end_of_text|>", ...) into their ids, like Hugging Face's.
    LLaMA-2 has no pad token: pad_id is <unk> (0). Batches mark padding with a mask, never by id,
    so nothing is trained on it whatever it is."""

    def __init__(self, path):
        self.path = str(path)
        if os.path.isdir(self.path) and os.path.isfile(os.path.join(self.path, "tokenizer.json")):
            self.path = os.path.join(self.path, "tokenizer.json")
        if os.path.isdir(self.path):
            inside = os.path.join(self.path, "tokenizer.model")
            hint = f" such as {inside}" if os.path.isfile(inside) else " (tokenizer.model)"
            raise UserError(f"tokenizer {self.path} is a folder, not a file; pass the tokenizer file inside it{hint}")
        if os.path.exists(self.path) and not os.path.isfile(self.path):  # a named pipe would wait for a writer forever
            raise UserError(f"tokenizer {self.path} is a named pipe or a device, not a file; pass the tokenizer.model "
                            "of your checkpoint")
        if not os.path.isfile(self.path):
            raise UserError(f"tokenizer file {self.path} not found; pass the tokenizer.model of your checkpoint")
        # SentencePiece and tokenizers take the path as UTF-8 text: a name of other bytes (Latin-1's é) was "neither a
        # SentencePiece model nor a tiktoken BPE file" in data.py prepare, which train.py's check_config refuses before
        check_openable_by_torch({"tokenizer": self.path}, ("tokenizer",))
        try:
            tiktoken_file = _looks_like_tiktoken(self.path)
            json_file = self.path.endswith(".json") or _looks_like_json(self.path)
        except OSError as e:
            raise UserError(f"tokenizer file {self.path} cannot be read ({e.strerror or e}); "
                            "check its permissions") from None
        if tiktoken_file:
            self._load_tiktoken()
        elif json_file:
            self._load_hf_json()
        else:
            self._load_sentencepiece()
        # split on special tokens, longest first, keeping them (HF's no-split tokens)
        alternatives = sorted(self.specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def _load_sentencepiece(self):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except Exception:  # sentencepiece raises RuntimeError / OSError with a C++ message
            raise UserError(f"{self.path} is neither a SentencePiece model (LLaMA-2) nor a tiktoken BPE file "
                            "(LLaMA-3); pass the checkpoint's tokenizer.model") from None
        self.kind, self.vocab_size = "sentencepiece", self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        missing = [name for name, i in (("bos_id=-1", self.bos_id), ("eos_id=-1", self.eos_id)) if i < 0]
        if missing:  # trained with bos_id=-1 or eos_id=-1: sentencepiece raises IndexError on the piece of id -1
            raise UserError(f"{self.path} is a SentencePiece model trained with {' and '.join(missing)}; the records "
                            "need a BOS and an EOS token, so pass a tokenizer.model that has both, as LLaMA-2's does")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        # transformers' slow LlamaTokenizer never splits <unk>, <s>, </s> (its special tokens)
        self.specials = {self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.bos_id, self.eos_id)}
        slash_s = self.sp.piece_to_id(PROMPT_EOS)  # the authors' "</s>": a piece of that name, else EOS (Gemma's <eos>)
        self.specials.setdefault(PROMPT_EOS, self.eos_id if self.sp.is_unknown(slash_s) else slash_s)
        self.eos_text = self.sp.id_to_piece(self.eos_id)

    def _load_tiktoken(self):
        try:
            import tiktoken
        except ImportError:
            raise UserError(f"{self.path} is a tiktoken BPE file (LLaMA-3); reading it needs the tiktoken "
                            "package: pip install tiktoken") from None
        ranks = {}
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                line = line.removeprefix(b"\xef\xbb\xbf") if n == 1 else line  # a BOM, as an editor may save it
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except (ValueError, binascii.Error):
                    raise UserError(f"{self.path} line {n}: expected '<base64 token> <rank>' as in LLaMA-3's "
                                    "tokenizer.model; pass an unmodified tokenizer file") from None
        problem = _bpe_problem(ranks)
        if problem:
            raise UserError(f"{self.path} is a damaged tiktoken BPE file: {problem}; pass the checkpoint's "
                            "unmodified tokenizer.model")
        self.specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
        self.enc = tiktoken.Encoding(name=os.path.basename(self.path), pat_str=LLAMA3_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=self.specials)
        self.kind, self.vocab_size = "tiktoken", self.enc.n_vocab
        self.bos_id, self.eos_id = self.specials["<|begin_of_text|>"], self.specials["<|end_of_text|>"]
        self.pad_id, self.eos_text = self.specials[LLAMA3_PAD], "<|end_of_text|>"
        self.specials = {**self.specials, PROMPT_EOS: self.eos_id}  # the authors' "</s>": EOS, as tokenizer.json's

    def _load_hf_json(self):
        try:
            import tokenizers
        except ImportError:
            raise UserError(f"{self.path} is a Hugging Face tokenizer.json; reading it needs the tokenizers package: "
                            "pip install tokenizers") from None
        try:  # from the text, past a UTF-8 BOM (as an editor may save it), which the package refuses as not JSON
            with open(self.path, encoding="utf-8-sig") as f:
                self.hf = tokenizers.Tokenizer.from_str(f.read())
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path} is not UTF-8 text ({e.reason}), so not a tokenizer.json; pass the "
                            "checkpoint's unmodified tokenizer.json") from None
        except Exception as e:  # the Rust side raises Exception with its own message
            raise UserError(f"{self.path} is not a valid tokenizer.json ({str(e)[:100]}); pass the checkpoint's "
                            "unmodified tokenizer.json") from None
        numbers = sorted(self.hf.get_vocab(with_added_tokens=True).values())
        if not numbers:  # an empty vocabulary: no token to give any text, nor an id for the EOS
            raise UserError(f"{self.path} has no tokens at all; pass the checkpoint's unmodified tokenizer.json")
        twice = next((a for a, b in zip(numbers, numbers[1:]) if a == b), None)
        if twice is not None:  # the package keeps one of the two at random, for decode and for to_str below
            raise UserError(f"{self.path} gives two tokens the same id {twice}; pass the checkpoint's unmodified "
                            "tokenizer.json")
        if numbers[-1] >= MAX_VOCAB:  # sparse ids are fine, but the model gets an embedding row for every number
            raise UserError(f"{self.path} numbers a token {numbers[-1]:,}, where this reads ids below {MAX_VOCAB:,} "
                            "(64 times the largest real vocabulary, of about 262,000 tokens), and a model would need "
                            f"{numbers[-1] + 1:,} embedding rows; pass the checkpoint's unmodified tokenizer.json, or "
                            "number its tokens from 0 without gaps")
        if isinstance(self.hf.model, tokenizers.models.BPE) and self.hf.model.unk_token is None:
            # a BPE model without an unknown token drops a character it has no token for (and no byte token, under
            # byte fallback) without a word; an unknown token that is not in the vocabulary makes it raise instead,
            # as WordLevel, WordPiece and Unigram do. Byte-level BPE (GPT-2's, Qwen's) has a token for every byte.
            self.hf.model.unk_token = NO_TOKEN
        # plain text stays text; encode(special=True) goes to a copy that splits on the added tokens itself, as
        # transformers' fast tokenizers do: encoding the pieces between them one by one would give each its own
        # "▁" under a Metaspace pre-tokenizer with prepend_scheme "first" (Mistral's, LLaMA-2's tokenizer.json)
        self.hf_special = tokenizers.Tokenizer.from_str(self.hf.to_str())
        self.hf.encode_special_tokens = True
        config_file = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        fix = "put the checkpoint's unmodified tokenizer_config.json next to its tokenizer.json"
        # a folder or a pipe is named; a key given twice (json keeps the last) or a file of gigabytes is refused
        config = read_json(config_file, fix, records=True, limit=64 << 20) if os.path.exists(config_file) else {}

        def token(key):  # a string, an AddedToken dict ({"content": ...}) or null
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(value, str):
                raise UserError(f"{config_file} gives the {key} {json.dumps(value)[:40]}, not a token string; {fix}")
            return value
        # every added token: the package matches each one whole in a text, marked special or not
        added = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items()}
        ids = {name: self.hf.token_to_id(token(name)) if token(name) else None
               for name in ("bos_token", "eos_token", "pad_token")}
        for name in ids:  # a BOS the tokenizer lacks, dropped, would train without the BOS the base expects
            if token(name) and ids[name] is None:
                raise UserError(f"{config_file} gives the {name} {token(name)!r}, which {self.path} does not have; "
                                f"{fix}")
        if ids["eos_token"] is None:
            raise UserError(f"{config_file} gives no eos_token that {self.path} knows; put the checkpoint's "
                            "tokenizer_config.json next to its tokenizer.json")
        self.kind, self.vocab_size = "tokenizers", numbers[-1] + 1  # not the count: ids may skip numbers
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
        self.eos_text = token("eos_token")
        self.specials = {**added, PROMPT_EOS: added.get(PROMPT_EOS, self.eos_id)}  # its own "</s>", else EOS
        # transformers adds the config's tokens as special tokens, so they are never split (a token they already are)
        self.hf_special.add_special_tokens([token(name) for name in ids if token(name)])

    def check_base_vocabulary(self, vocab_size):
        """Refuse a base model of vocab_size embedding rows that was not trained with this tokenizer, as train.py's run
        (preflight) and its dry run do, before step 1."""
        if not vocab_size - VOCAB_PADDING < self.vocab_size <= vocab_size:
            raise UserError(f"the tokenizer has {self.vocab_size:,} tokens but the base model {vocab_size:,}, so it is "
                            "not the tokenizer the base model was trained with: pass that one.")

    def _encode_plain(self, text):
        if self.kind == "tiktoken":
            return self.enc.encode(text, disallowed_special=())
        if self.kind == "tokenizers":
            return self._encode_hf(self.hf, text)
        return self.sp.encode(text)

    def _encode_hf(self, hf, text):
        try:
            return hf.encode(text, add_special_tokens=False).ids
        except Exception as e:  # a model without an unknown token, on text it lacks
            why = "it has no token for one of its characters" if NO_TOKEN in str(e) else str(e)[:80]
            raise UserError(f"tokenizer {self.path} cannot encode the text {text[:40]!r} ({why}); "
                            "remove that text from the records, or pass a tokenizer whose model has an unknown "
                            "token") from None

    def encode(self, text, bos=False, eos=False, special=False):
        if not special:
            ids = self._encode_plain(text)
        elif self.kind == "tokenizers":  # the package splits on its added tokens, with their lstrip / rstrip
            if self.specials[PROMPT_EOS] == self.eos_id and PROMPT_EOS != self.eos_text:
                text = text.replace(PROMPT_EOS, self.eos_text)
            ids = self._encode_hf(self.hf_special, text)
        else:  # one SentencePiece call per piece between special tokens, as transformers does
            ids = []
            for piece in self._special_re.split(text):
                if piece in self.specials:
                    ids.append(self.specials[piece])
                elif piece:
                    ids.extend(self._encode_plain(piece))
        return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * eos

    def decode(self, ids):
        # ids past the vocabulary (a base's padding rows, which generation can draw) have no text, as in tokenizers;
        # a negative one, none either (tokenizers raised OverflowError on it, the others an IndexError or KeyError)
        ids = [i for i in map(int, ids) if 0 <= i < self.vocab_size]
        if self.kind == "tokenizers":
            return self.hf.decode(ids, skip_special_tokens=False)
        return self.enc.decode(ids) if self.kind == "tiktoken" else self.sp.decode(ids)
