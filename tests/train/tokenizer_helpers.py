"""Tokenizers for tests, built in a moment with `tokenizers` (no downloads)."""
from pathlib import Path

from archlab.train.tokenizers import Tokenizer, bytes_to_unicode, load_tokenizer, train_bpe_tokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
NON_ASCII = "naïve café, Ελληνικά, 日本語のテキスト, emoji 🙂🚀, ½ × ∞ — “quotes”\n"


def real_text(n_chars: int) -> str:
    """War and Peace (English prose) with some code and non-ASCII text mixed in."""
    prose = (SHARED / "warpeace.txt").read_text(encoding="utf-8")[:n_chars]
    code = (SHARED / "networkx_py.txt").read_text(encoding="utf-8")[: n_chars // 4]
    return prose + NON_ASCII * 20 + code


def tiny_bpe(path: Path, vocab_size: int = 400, n_chars: int = 60_000) -> Tokenizer:
    """A byte-level BPE (with <|bos|>) trained on a slice of real text."""
    text = real_text(n_chars)
    return train_bpe_tokenizer([text[i: i + 2000] for i in range(0, len(text), 2000)], vocab_size, path)


def single_byte_tokenizer(path: Path) -> Tokenizer:
    """An hf: tokenizer whose tokens are the 256 single bytes with id = byte value and no special tokens (so no
    bos): on any text it gives exactly the `bytes` tokenizer's ids, through the BPE machinery."""
    from tokenizers import Tokenizer as HFModel
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    model = HFModel(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    model.decoder = decoders.ByteLevel()
    model.save(str(path))
    return load_tokenizer(f"hf:{Path(path).resolve()}")
