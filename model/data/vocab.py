"""Character vocabulary: build it from corpora, encode and decode text with numpy lookups.

(The word and BPE vocabularies are in `model.data.tokenizers`; `Vocab.load` loads any of the three.)

The vocabulary is an ordered list of characters plus one unknown token. Encoding is
vectorised: text becomes a numpy array of code points, and a lookup table maps code
points to ids, so no Python loop runs per character.

    vocab = build_vocab(char_counts, min_count=1)
    ids = vocab.encode("D'oh!")          # (T,) uint16 (uint32 past 65,536 entries)
    assert vocab.decode(ids) == "D'oh!"
    vocab.save(path); Vocab.load(path)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

UNK_TOKEN = "\ufffd"  # shown as the replacement character when decoded
UINT16_LIMIT = 2**16  # ids are stored as uint16 in the shards while the vocabulary has at most this many entries, else uint32
UNICODE_SIZE = 0x110000  # code points; the lookup table is 2.2 MB


def id_dtype(size: int) -> type:
    """The dtype of ids (arrays and shards) for a vocabulary of `size` entries: uint16, or uint32 past 65,536."""
    return np.uint16 if size <= UINT16_LIMIT else np.uint32


class VocabularyError(ValueError):
    """The vocabulary cannot be built or loaded as asked."""


@dataclass(frozen=True)
class Vocab:
    chars: tuple[str, ...]  # id i (i >= 1) is chars[i - 1]; id 0 is the unknown token
    counts: tuple[int, ...] = ()  # training-corpus count of each char in `chars`
    unk_token: str = UNK_TOKEN
    _lookup: np.ndarray = field(default=None, repr=False, compare=False)  # code point -> id

    unk_id = 0
    kind = "char"

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise VocabularyError("vocabulary characters must be distinct single characters")
        lookup = np.zeros(UNICODE_SIZE, dtype=self.id_dtype)  # every code point, so encoding needs no range check
        for i, c in enumerate(self.chars, start=1):
            lookup[ord(c)] = i
        object.__setattr__(self, "_lookup", lookup)
        object.__setattr__(self, "_table", np.array([self.unk_token, *self.chars]))

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    @property
    def id_dtype(self) -> type:
        return id_dtype(self.size)

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"chars": "".join(self.chars), "unk": self.unk_token}, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> np.ndarray:
        """Map text to ids, (T,) id_dtype; characters outside the vocabulary become unk_id."""
        if not text:
            return np.zeros(0, dtype=self.id_dtype)
        # surrogatepass: a lone surrogate (from broken input) becomes the unknown token, not a crash
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # (T,)
        return self._lookup.take(codes)

    def encode_docs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, None]:
        """(N,) ids of the texts concatenated, (D,) their lengths, and None: every token is one character."""
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        return self.encode("".join(texts)), lengths, None

    def unknown_in(self, text: str) -> list[str]:
        """The characters of text outside the vocabulary, sorted, each once."""
        return sorted({c for c, i in zip(text, self.encode(text).tolist()) if i == self.unk_id})

    def decode(self, ids, after: str = "") -> str:
        """The characters of the ids (`after`, the text before them, changes nothing here)."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.size):
            raise VocabularyError(f"id out of range for a vocabulary of {self.size}")
        return "".join(self._table[arr].tolist())

    def to_json(self) -> dict:
        return {
            "chars": list(self.chars),
            "counts": list(self.counts),
            "unk_token": self.unk_token,
            "unk_id": self.unk_id,
            "size": self.size,
            "fingerprint": self.fingerprint,
        }

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """The vocabulary saved at path: a Vocab, or the WordVocab / BpeVocab its `tokenizer` field names."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            kind = data.get("tokenizer", "char")
            if kind != "char":
                from model.data.tokenizers import LOADERS

                if kind not in LOADERS:
                    raise ValueError(f"unknown tokenizer {kind!r}")
                vocab = LOADERS[kind].from_json(data, path)
            else:
                vocab = cls(tuple(data["chars"]), tuple(data.get("counts", ())), data.get("unk_token", UNK_TOKEN))
        except VocabularyError as exc:
            raise VocabularyError(f"{path}: {exc}; re-run the prepare stage") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VocabularyError(f"{path}: not a readable vocab.json ({exc}); re-run the prepare stage") from exc
        if data.get("fingerprint") not in (None, vocab.fingerprint):
            raise VocabularyError(f"{path}: fingerprint does not match its entries; the file was edited or is corrupt")
        return vocab


def count_chars(texts) -> Counter:
    """Character counts over an iterable of strings (vectorised per string)."""
    counts: Counter = Counter()
    for text in texts:
        if not text:
            continue
        codes, n = np.unique(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), return_counts=True)
        for c, k in zip(codes.tolist(), n.tolist()):
            counts[c] += k
    return Counter({chr(c): k for c, k in counts.items()})


def build_vocab(counts: Counter, min_count: int = 1) -> Vocab:
    """Characters seen at least min_count times, most frequent first, ties by code point."""
    kept = sorted(((c, n) for c, n in counts.items() if n >= min_count), key=lambda cn: (-cn[1], ord(cn[0])))
    kept = [(c, n) for c, n in kept if c != UNK_TOKEN]
    return Vocab(tuple(c for c, _ in kept), tuple(n for _, n in kept))
