"""OpenAI CLIP byte-level BPE (the tokenizer of OpenCLIP and of the released VTP text tower).

The merges file ships with this package (vtp_jax/data/assets/, MIT-licensed, as OpenCLIP ships
it); $VTP_BPE_VOCAB or `vocab_path=` point at another copy.
"""
from __future__ import annotations

import functools
import gzip
import html
import os
from importlib import resources
from typing import Sequence

import numpy as np

VOCAB_SIZE = 49408
SOT, EOT, PAD = 49406, 49407, 0
CONTEXT_LENGTH = 77
_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2
HOW_TO_GET_VOCAB = (f"Unset VTP_BPE_VOCAB to use the {_VOCAB_FILE} shipped with vtp_jax, or point it at a copy "
                    "of that file.")


def find_vocab_file() -> str:
    """The merges file: $VTP_BPE_VOCAB when set, else the one shipped with the package."""
    if os.environ.get("VTP_BPE_VOCAB"):
        path = os.environ["VTP_BPE_VOCAB"]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VTP_BPE_VOCAB={path} does not exist. " + HOW_TO_GET_VOCAB)
        return path
    return str(resources.files("vtp_jax.data") / "assets" / _VOCAB_FILE)


def _byte_alphabet() -> dict[int, str]:
    """Every byte -> a printable character, so BPE never sees whitespace or controls.

    Dict order is the vocabulary order: printable bytes map to themselves first, then the rest
    are moved to chr(256 + n) in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


class Tokenizer:
    """Text -> CLIP ids; `bpe` results are cached per word, which makes 16k captions cheap."""

    def __init__(self, vocab_path: str | None = None):
        import ftfy
        import regex  # third-party `regex`: needs \p{L} / \p{N} classes.

        self._ftfy = ftfy
        with gzip.open(vocab_path or find_vocab_file(), "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:_N_MERGES + 1]]
        self.byte_encoder = _byte_alphabet()
        units = list(self.byte_encoder.values())
        vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        assert len(self.encoder) == VOCAB_SIZE, len(self.encoder)
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pattern = regex.compile(
            r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)
        self.bpe = functools.lru_cache(maxsize=1 << 18)(self._bpe)

    def _bpe(self, word: str) -> tuple[int, ...]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            rank, best = min((self.ranks.get(pair, np.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == np.inf:
                break
            first, second = parts[best], parts[best + 1]
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.encoder[p] for p in parts)

    def clean(self, text: str) -> str:
        text = self._ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return " ".join(text.split()).lower()

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in self.pattern.findall(self.clean(text)):
            ids.extend(self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def __call__(self, texts: Sequence[str] | str, context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), context_length), np.int32)
        for row, text in enumerate(texts):
            ids = [SOT] + self.encode(text)[:context_length - 2] + [EOT]
            out[row, :len(ids)] = ids
        return out


@functools.lru_cache(maxsize=None)
def get_tokenizer(vocab_path: str | None = None) -> Tokenizer:
    return Tokenizer(vocab_path)


def tokenize(texts: Sequence[str] | str, context_length: int = CONTEXT_LENGTH, vocab_path: str | None = None) -> np.ndarray:
    """(B, context_length) int32: SOT, BPE ids, EOT, zero padding; over-long texts end in EOT."""
    return get_tokenizer(vocab_path)(texts, context_length)
