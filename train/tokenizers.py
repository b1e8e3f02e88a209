"""Tokenizers named by a spec: `bytes`, `tiktoken:<name>` or `hf:<path to tokenizer.json>`, all from local files.

Every tokenizer knows the UTF-8 byte count of each token's text (`token_bytes`), so any model's loss can be
reported in bits per byte: summed nats / (ln 2 * the bytes of exactly the tokens scored). Nothing is downloaded
at run time: tiktoken's own loader would fetch its ranks file, so the known encodings are built here from a local
`<name>.tiktoken` with the pattern and special tokens tiktoken uses for them.

A byte-level BPE in Hugging Face's format (what `train_bpe_tokenizer` writes) is encoded with tiktoken built from
its ranks, which gives the same tokens several times faster (tests check the equality on real text); any other
tokenizer.json is encoded with `tokenizers` itself.
"""
from __future__ import annotations

import base64
import functools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from archlab.kernels.common.files import atomic_path
from archlab.train.data import cache_dir, data_roots, resolve_data_path, sha256_of_file
from archlab.train.errors import DataError

MAX_VOCAB = 2**32  # token ids are stored as uint32 at most
BOS_CANDIDATES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<|endoftext|>")  # document-start tokens, in preference
TRAINED_BOS = "<|bos|>"

# tiktoken's pre-tokenization patterns and special tokens (tiktoken_ext/openai_public.py), and the sha256 of each
# ranks file; gpt2 is r50k_base's ranks under another name.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""])
TIKTOKEN_ENCODINGS = {
    "gpt2": (R50K_PATTERN, {"<|endoftext|>": 50256}, "r50k_base",
             "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    "r50k_base": (R50K_PATTERN, {"<|endoftext|>": 50256}, "r50k_base",
                  "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    "p50k_base": (R50K_PATTERN, {"<|endoftext|>": 50256}, "p50k_base",
                  "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"),
    "cl100k_base": (CL100K_PATTERN, {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                     "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}, "cl100k_base",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    "o200k_base": (O200K_PATTERN, {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}, "o200k_base",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


class Tokenizer:
    """Text <-> token ids. Subclasses set spec, identity, vocab_size and bos_id and implement the three codecs."""

    spec: str
    identity: dict  # what a manifest and a run config record: the spec and the sha256 of its file
    vocab_size: int
    bos_id: int | None  # the document-start token prepended to each document, if the tokenizer has one

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: the UTF-8 byte count of each token's text, 0 for special tokens."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """The identity on UTF-8 bytes: 256 tokens of one byte each, no special tokens."""

    spec, vocab_size, bos_id = "bytes", 256, None
    identity = {"spec": "bytes"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken Encoding; special tokens in the text are encoded as plain text (encode_ordinary)."""

    def __init__(self, spec: str, identity: dict, path: Path, encoding, bos_id: int | None):
        self.spec, self.identity, self.path, self.encoding, self.bos_id = spec, identity, path, encoding, bos_id
        self.vocab_size = encoding.n_vocab
        _check_vocab_size(spec, self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)  # specials and unused ids (o200k has gaps) stay 0
        for token, rank in self.encoding._mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, encoded without adding its template's special tokens."""

    def __init__(self, spec: str, identity: dict, path: Path):
        from tokenizers import Tokenizer as HFModel

        self.spec, self.identity, self.path = spec, identity, path
        try:
            self.model = HFModel.from_file(str(path))
            self.config = json.loads(path.read_text(encoding="utf-8"))
        except Exception as err:  # the library's parse errors have no common type
            raise DataError(f"{path} is not a valid tokenizer.json ({str(err).splitlines()[0]}); point the "
                            "tokenizer spec at a Hugging Face tokenizer.json") from None
        vocab = self.model.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1  # ids may leave gaps
        _check_vocab_size(spec, self.vocab_size)
        self.special_ids = {t["id"] for t in self.config.get("added_tokens", []) if t.get("special")}
        self.bos_id = next((vocab[name] for name in BOS_CANDIDATES if vocab.get(name) in self.special_ids), None)
        self.fast = _tiktoken_twin(self.config, vocab, self.special_ids)

    def encode(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast.encode_ordinary(text)
        return self.model.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.fast is not None:
            return [self.fast.encode_ordinary(text) for text in texts]
        return [e.ids for e in self.model.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.model.decode([int(i) for i in ids], skip_special_tokens=False)

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """Exact for byte-level models (each character of a token stands for one byte); otherwise the UTF-8 length
        of the token decoded alone, which is what its text contributes once joined to its neighbours."""
        byte_level = (self.config.get("decoder") or {}).get("type") == "ByteLevel"
        added = {t["id"] for t in self.config.get("added_tokens", [])}  # written as plain text, not byte characters
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.model.get_vocab(with_added_tokens=True).items():
            if i in self.special_ids:
                continue
            if i in added:
                lengths[i] = len(token.encode("utf-8"))
            elif byte_level:
                lengths[i] = len(token)
            else:
                lengths[i] = len(self.model.decode([i]).encode("utf-8"))
        return lengths


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _tiktoken_twin(config: dict, vocab: dict[str, int], special_ids: set[int]):
    """A tiktoken Encoding that encodes exactly like this tokenizer.json, or None when it is not a plain byte-level
    BPE with GPT-2's pre-tokenization whose merges create tokens in id order (then tiktoken's rule, merge the
    adjacent pair whose concatenation has the lowest id, is the same as applying the merges in order)."""
    import tiktoken

    model, pre = config.get("model") or {}, config.get("pre_tokenizer") or {}
    plain_bpe = (model.get("type") == "BPE" and not model.get("dropout") and not model.get("byte_fallback")
                 and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix"))
    gpt2_split = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"))
    if not (plain_bpe and gpt2_split and config.get("normalizer") is None):
        return None
    to_byte = {char: b for b, char in bytes_to_unicode().items()}
    try:
        ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items() if i not in special_ids}
    except KeyError:  # a token outside the byte alphabet
        return None
    merged_ids = [vocab.get("".join(pair) if isinstance(pair, list) else pair.replace(" ", "", 1))
                  for pair in model.get("merges", [])]
    singles = sum(len(token) == 1 for token in ranks)
    if (singles != 256 or len(ranks) != 256 + len(merged_ids) or None in merged_ids
            or any(a >= b for a, b in zip(merged_ids, merged_ids[1:], strict=False))):
        return None
    # only encode_ordinary is used (special tokens in text stay text, as with tokenizers' encode), so no specials
    return tiktoken.Encoding("archlab-bpe", pat_str=R50K_PATTERN, mergeable_ranks=ranks, special_tokens={})


def _check_vocab_size(spec: str, vocab_size: int) -> None:
    if vocab_size > MAX_VOCAB:
        raise DataError(f"tokenizer {spec} has {vocab_size:,} tokens, more than uint32 token ids can hold "
                        f"({MAX_VOCAB:,}); use a smaller vocabulary")


def _tiktoken_folders(root: Path | None) -> list[Path]:
    if root is not None:
        return [Path(root)]
    return [r / "tokenizers" for r in data_roots()] + [cache_dir() / "tokenizers"]


def _load_tiktoken(spec: str, name: str, root: Path | None) -> TiktokenTokenizer:
    import tiktoken

    if name not in TIKTOKEN_ENCODINGS:
        raise DataError(f"unknown tiktoken encoding {name!r} in {spec!r}; known: {', '.join(TIKTOKEN_ENCODINGS)}")
    pattern, specials, ranks_name, expected_sha256 = TIKTOKEN_ENCODINGS[name]
    folders = _tiktoken_folders(root)
    path = next((f / f"{name}.tiktoken" for f in folders if (f / f"{name}.tiktoken").is_file()), None)
    if path is None:
        raise DataError(f"tokenizer {spec} needs the file {name}.tiktoken in one of {', '.join(map(str, folders))}; "
                        f"where there is a network, download {TIKTOKEN_URL.format(ranks_name)} and save it there "
                        f"as {name}.tiktoken")
    sha256 = sha256_of_file(path)
    if sha256 != expected_sha256:
        raise DataError(f"{path} has sha256 {sha256}, not {name}'s {expected_sha256}; the file is damaged or another "
                        f"encoding: download {TIKTOKEN_URL.format(ranks_name)} again")
    ranks = parse_tiktoken_ranks(path)
    encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return TiktokenTokenizer(spec, {"spec": spec, "sha256": sha256}, path, encoding, specials["<|endoftext|>"])


def parse_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A .tiktoken file (one `base64(token) rank` a line). tiktoken.load reads the same format but also copies the
    file into a cache under /tmp, which a run must not do."""
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise DataError(f"line {n} of {path} is not `base64-token rank`; the file is damaged") from None
    return ranks


def load_tokenizer(spec: str, *, root: Path | None = None) -> Tokenizer:
    """The tokenizer a spec names. Files are looked up under the data roots (tiktoken: `tokenizers/<name>.tiktoken`
    in each, then in the cache's tokenizers/), or only in `root` when given (a prepared dataset's folder)."""
    kind, _, rest = spec.partition(":")
    if spec == "bytes":
        return ByteTokenizer()
    if kind == "tiktoken" and rest:
        return _load_tiktoken(spec, rest, root)
    if kind == "hf" and rest:
        path = Path(root) / rest if root is not None else resolve_data_path(rest)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist; put the tokenizer.json there (where there is a "
                            "network, e.g. from the model's Hugging Face repository) or fix the hf: path")
        return HFTokenizer(spec, {"spec": spec, "sha256": sha256_of_file(path)}, path)
    raise DataError(f"unknown tokenizer {spec!r}; use bytes, tiktoken:<name> or hf:<path to tokenizer.json>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_path: Path) -> Tokenizer:
    """A byte-level BPE trained on `texts` (GPT-2 pre-tokenization, all 256 bytes in the initial alphabet, one
    special token <|bos|> as id 0), saved as a tokenizer.json at out_path and loaded back from there."""
    from tokenizers import Tokenizer as HFModel
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"a byte-level BPE needs a vocabulary of at least 257 (256 bytes + {TRAINED_BOS}), got "
                        f"{vocab_size}; raise the vocabulary size")
    model = HFModel(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[TRAINED_BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(texts, trainer)
    with atomic_path(Path(out_path)) as temporary:
        model.save(str(temporary))
    return load_tokenizer(f"hf:{out_path.resolve()}")
