"""Word and byte-level BPE vocabularies, beside the character one (`model.data.vocab`).

`prepare.tokenizer` chooses how text becomes ids:

- `char`: one id per character (`vocab.Vocab`; the default).
- `word`: lower-cased words, each punctuation mark and each newline a token of its own
  (`WORD_RE`), as a TV-script generator does; words seen fewer than `min_count` times in
  the train split, or beyond the `max_vocab` most frequent, become the unknown token.
  Decoding re-attaches punctuation (`detokenize`).
- `bpe`: a byte-level BPE trained with Hugging Face `tokenizers` on the train split, saved
  as `tokenizer.json` beside `vocab.json` (JSON only, no pickles); its decoder undoes the
  byte-level markers (Ġ, Ċ, ...).

Every vocabulary has the same interface (what prepare, training, generation and the report use):
`size`, `fingerprint`, `unk_id` (0), `counts`, `kind`, `id_dtype`, `encode(text)`,
`encode_docs(texts)` -> (ids, lengths in tokens, characters per token), `decode(ids, after="")`,
`unknown_in(text)`, `save(path)`; `Vocab.load(path)` loads any of them.

Characters per token: how many characters of the document a token accounts for, from the
end of the token before it to its own end (so whitespace counts, and the sum over a
document's tokens after the first is what its targets cover). Bits per character divide
by these sums, so the three tokenizers compare fairly.

    vocab = build_word_vocab(count_words(texts), min_count=2, max_vocab=10_000)
    vocab = train_bpe(texts, vocab_size=4096)
    ids, lengths, chars = vocab.encode_docs(["D'oh!", "Woo-hoo!"])
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from model.data.vocab import UNK_TOKEN, VocabularyError, id_dtype

WORD_RE = re.compile(r"\w+(?:'\w+)?|[^\w\s]|\n")  # words (with one inner apostrophe), single punctuation marks, newlines
TOKENIZER_FILE = "tokenizer.json"  # the BPE's Hugging Face tokenizer, beside vocab.json

# detokenize: no space before these tokens, none after those; a capital after a sentence's end
NO_SPACE_BEFORE = set(",.!?;:'%)]}…-/") | {"\n"}
NO_SPACE_AFTER = set("([{$-/") | {"\n"}
SENTENCE_END = set(".!?") | {"\n"}


def word_spans(text: str) -> tuple[list[str], np.ndarray]:
    """The word tokens of a text (lower-cased) and (T,) the end of each in the text."""
    tokens, ends = [], []
    for m in WORD_RE.finditer(text):
        tokens.append(m.group().lower())
        ends.append(m.end())
    return tokens, np.asarray(ends, dtype=np.int64)


def count_words(texts: Iterable[str]) -> Counter:
    """Word-token counts over texts (the word vocabulary's input)."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(m.lower() for m in WORD_RE.findall(text))
    return counts


def chars_per_token(ends: np.ndarray) -> np.ndarray:
    """(T,) characters each token accounts for: from the end of the token before (0 for the first) to its own end."""
    ends = np.maximum.accumulate(ends) if len(ends) else ends  # byte-level tokens of one character share its end
    return np.diff(ends, prepend=0)


def _fingerprint(content: dict) -> str:
    blob = json.dumps(content, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def detokenize(tokens: list[str], after: str = "") -> str:
    """Word tokens as natural text, to follow `after` (the text before, e.g. a prompt).

    No space before , . ! ? ; : ' and closing brackets, none after opening ones or around
    hyphens and newlines; double quotes alternate opening and closing; a word after a
    sentence's end (or at the very start) starts with a capital, as do "I" and "I'm".
    """
    out: list[str] = []
    prev = after[-1:] if after else ""
    quote_open = after.count('"') % 2 == 1
    sentence_start = not after.strip() or after.rstrip(" ")[-1:] in SENTENCE_END
    for token in tokens:
        if token == '"':
            space = not quote_open and prev not in ("", " ", "\n") and prev not in NO_SPACE_AFTER
            quote_open = not quote_open
        else:
            space = (prev not in ("", " ", "\n") and token not in NO_SPACE_BEFORE and prev not in NO_SPACE_AFTER
                     and not (prev == '"' and quote_open))
        if (sentence_start and token[:1].isalpha()) or token == "i" or token.startswith("i'"):  # and "I", "I'm"
            token = token[0].upper() + token[1:]
            sentence_start = False
        elif token in SENTENCE_END:
            sentence_start = True
        out.append((" " if space else "") + token)
        prev = token[-1:]
    return "".join(out)


class WordVocab:
    """Lower-cased word tokens: id 0 is the unknown token, id i >= 1 is tokens[i - 1] (most frequent first)."""

    kind = "word"
    unk_id = 0

    def __init__(self, tokens: tuple[str, ...], counts: tuple[int, ...] = (), unk_token: str = UNK_TOKEN):
        if len(set(tokens)) != len(tokens) or unk_token in tokens:
            raise VocabularyError("word vocabulary tokens must be distinct and differ from the unknown token")
        self.tokens, self.counts, self.unk_token = tuple(tokens), tuple(counts), unk_token
        self._ids = {t: i for i, t in enumerate(self.tokens, start=1)}
        self._table = [unk_token, *self.tokens]

    @property
    def size(self) -> int:
        return len(self.tokens) + 1

    @property
    def id_dtype(self) -> type:
        return id_dtype(self.size)

    @property
    def fingerprint(self) -> str:
        return _fingerprint({"tokenizer": "word", "tokens": list(self.tokens), "unk": self.unk_token})

    def encode(self, text: str) -> np.ndarray:
        """(T,) ids; a word outside the vocabulary is unk_id."""
        return self.encode_docs([text])[0]

    def encode_docs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N,) ids of the texts concatenated, (D,) tokens per text, (N,) characters per token."""
        ids, lengths, chars = [], [], []
        for text in texts:
            tokens, ends = word_spans(text)
            ids.extend(self._ids.get(t, 0) for t in tokens)
            lengths.append(len(tokens))
            chars.append(chars_per_token(ends))
        return (np.asarray(ids, dtype=self.id_dtype), np.asarray(lengths, dtype=np.int64),
                np.concatenate(chars) if chars else np.zeros(0, np.int64))

    def unknown_in(self, text: str) -> list[str]:
        """The words of text that encode as the unknown token, in order, each once."""
        return list(dict.fromkeys(t for t in word_spans(text)[0] if t not in self._ids))

    def decode(self, ids, after: str = "") -> str:
        """Natural text of the ids (punctuation re-attached) to follow `after`."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.size):
            raise VocabularyError(f"id out of range for a vocabulary of {self.size}")
        return detokenize([self._table[i] for i in arr.tolist()], after)

    def to_json(self) -> dict:
        return {"tokenizer": "word", "tokens": list(self.tokens), "counts": list(self.counts), "unk_token": self.unk_token,
                "unk_id": self.unk_id, "size": self.size, "fingerprint": self.fingerprint}

    def save(self, path: str | os.PathLike) -> None:
        _write(Path(path), json.dumps(self.to_json(), ensure_ascii=False, indent=1))

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "WordVocab":
        return cls(tuple(data["tokens"]), tuple(data.get("counts", ())), data.get("unk_token", UNK_TOKEN))


def build_word_vocab(counts: Counter, min_count: int = 1, max_vocab: int | None = None) -> WordVocab:
    """Words seen at least min_count times, most frequent first (ties alphabetical), at most max_vocab entries with unk."""
    kept = sorted(((t, n) for t, n in counts.items() if n >= min_count and t != UNK_TOKEN), key=lambda tn: (-tn[1], tn[0]))
    if max_vocab is not None:
        kept = kept[:max_vocab - 1]
    return WordVocab(tuple(t for t, _ in kept), tuple(n for _, n in kept))


class BpeVocab:
    """A byte-level BPE (Hugging Face `tokenizers`): id 0 is the unknown token (a special token never produced)."""

    kind = "bpe"
    unk_id = 0

    def __init__(self, tokenizer, counts: tuple[int, ...] = ()):
        self.tokenizer = tokenizer
        self.json = tokenizer.to_str()
        self.counts = tuple(counts)
        self.unk_token = UNK_TOKEN
        if tokenizer.token_to_id(UNK_TOKEN) != 0:
            raise VocabularyError(f"the BPE tokenizer must have its unknown token {UNK_TOKEN!r} at id 0")

    @property
    def size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def id_dtype(self) -> type:
        return id_dtype(self.size)

    @property
    def fingerprint(self) -> str:
        return _fingerprint({"tokenizer": "bpe", "json": self.json})

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=self.id_dtype)

    def encode_docs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N,) ids of the texts concatenated, (D,) tokens per text, (N,) characters per token (from the offsets)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = [np.asarray(e.ids, dtype=self.id_dtype) for e in encodings]
        chars = [chars_per_token(np.asarray([end for _, end in e.offsets], dtype=np.int64)) for e in encodings]
        return (np.concatenate(ids) if ids else np.zeros(0, self.id_dtype), np.asarray([len(i) for i in ids], dtype=np.int64),
                np.concatenate(chars) if chars else np.zeros(0, np.int64))

    def unknown_in(self, text: str) -> list[str]:
        return [UNK_TOKEN] if UNK_TOKEN in text else []  # bytes are never unknown

    def decode(self, ids, after: str = "") -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.size):
            raise VocabularyError(f"id out of range for a vocabulary of {self.size}")
        return self.tokenizer.decode(arr.tolist(), skip_special_tokens=False)

    def to_json(self) -> dict:
        return {"tokenizer": "bpe", "file": TOKENIZER_FILE, "tokenizer_sha256": hashlib.sha256(self.json.encode()).hexdigest(),
                "counts": list(self.counts), "unk_token": self.unk_token, "unk_id": self.unk_id, "size": self.size,
                "fingerprint": self.fingerprint}

    def save(self, path: str | os.PathLike) -> None:
        """vocab.json at path, the tokenizer as tokenizer.json beside it (written first)."""
        path = Path(path)
        _write(path.with_name(TOKENIZER_FILE), self.json)
        _write(path, json.dumps(self.to_json(), ensure_ascii=False, indent=1))

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "BpeVocab":
        from tokenizers import Tokenizer

        file = path.with_name(data.get("file", TOKENIZER_FILE))
        text = file.read_text(encoding="utf-8")
        if hashlib.sha256(text.encode()).hexdigest() != data.get("tokenizer_sha256"):
            raise VocabularyError(f"{file} does not match {path.name}'s tokenizer_sha256; it was edited or is corrupt")
        return cls(Tokenizer.from_str(text), tuple(data.get("counts", ())))


def train_bpe(texts: Iterable[str], vocab_size: int, min_count: int = 1) -> BpeVocab:
    """A byte-level BPE of at most vocab_size entries (the unknown token and the 256 bytes included) trained on texts.

    Deterministic: the same texts give the same merges (a test checks it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_count, special_tokens=[UNK_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return BpeVocab(tokenizer)


def with_counts(vocab: BpeVocab, batches: Iterable[list[str]]) -> BpeVocab:
    """The BPE with each token's count over the texts (an empty prompt's first token is drawn from them)."""
    counts = np.zeros(vocab.size, dtype=np.int64)
    for texts in batches:
        ids, _, _ = vocab.encode_docs(texts)
        counts += np.bincount(ids, minlength=vocab.size)
    return BpeVocab(vocab.tokenizer, tuple(counts[1:].tolist()))


LOADERS = {"word": WordVocab, "bpe": BpeVocab}
