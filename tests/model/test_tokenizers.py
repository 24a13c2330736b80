"""Tokenizers (prepare.tokenizer): word and BPE vocabularies, uint32 shards, bits per character, end to end to `generate`."""

import math
import re
import warnings

import numpy as np
import pytest
import torch

from model.data.prepare import PrepareConfig, count_part, split_of, write_corpus, write_shards
from model.data.shards import open_split, read_overlap, read_split, read_target_chars
from model.data.tokenizers import (BpeVocab, WordVocab, build_word_vocab, count_words, detokenize, train_bpe, word_spans,
                                   with_counts)
from model.data.vocab import Vocab
from model.generation.sampling import generate
from model.network.checkpoint import load_model_from_checkpoint, save_checkpoint
from model.network.rnn import ModelConfig, build_model
from model.report.scores import bits_per_char
from model.store.outputs import fingerprint_view
from model.training.loop import TrainConfig, train

LINES = ["Homer: D'oh! I want a doughnut, Marge.", "Marge: Homie, you \"promised\" (again) to stop.",
         "Bart: Eat my shorts! Why? Because it's 5 o'clock...", "Lisa: Dad, the plant is melting down!"]


def _docs(n: int = 60, seed: int = 0) -> list[tuple[str, str]]:
    """Documents of 3-8 lines of LINES; each starts with "x " so its first token is one character for word and BPE."""
    rng = np.random.default_rng(seed)
    return [(f"doc{i}", "x " + "\n".join(rng.choice(LINES, size=int(rng.integers(3, 9))))) for i in range(n)]


def _vocab(kind: str, docs: list[tuple[str, str]], **kw):
    texts = [t for _, t in docs]
    return build_word_vocab(count_words(texts), **kw) if kind == "word" else with_counts(train_bpe(texts, kw.get("vocab_size", 300)), [texts])


def test_word_tokens_are_lowercased_words_punctuation_and_newlines():
    tokens, ends = word_spans("Homer: D'oh!\n  Woo-hoo")
    assert tokens == ["homer", ":", "d'oh", "!", "\n", "woo", "-", "hoo"]
    assert ends.tolist() == [5, 6, 11, 12, 13, 18, 19, 22]


def test_word_decoding_reattaches_punctuation():
    vocab = _vocab("word", _docs())
    text = 'Homer: I want a doughnut, marge.\nMarge: homie, you "promised" (again) to stop... Why?'
    decoded = vocab.decode(vocab.encode(text.upper()))
    assert decoded == text  # lower-cased, with capitals after a sentence's end or a newline, and "I"
    assert not re.search(r" [,.!?;:')]", decoded) and "( " not in decoded
    assert detokenize(["d'oh", "!", "woo", "-", "hoo"], after="Homer said ") == "d'oh! Woo-hoo"
    assert vocab.decode(vocab.encode("marge"), after="Homer,") == " marge"  # spaced from a prompt that ends in a word
    assert vocab.decode(vocab.encode("marge"), after="Homer, ") == "marge"


def test_word_min_count_and_max_vocab_make_unknowns(tmp_path):
    counts = count_words(["the the the cat cat dog . ."])
    assert build_word_vocab(counts).tokens == ("the", ".", "cat", "dog")  # by count, ties alphabetical
    assert build_word_vocab(counts, min_count=2).tokens == ("the", ".", "cat")
    small = build_word_vocab(counts, max_vocab=3)  # the unknown token included
    assert small.size == 3 and small.tokens == ("the", ".")
    ids = small.encode("The cat.")
    assert ids.tolist() == [1, small.unk_id, 2] and small.unknown_in("The cat and dog.") == ["cat", "and", "dog"]
    small.save(tmp_path / "vocab.json")
    loaded = Vocab.load(tmp_path / "vocab.json")
    assert isinstance(loaded, WordVocab) and loaded.tokens == small.tokens and loaded.fingerprint == small.fingerprint


def test_bpe_respects_vocab_size_is_deterministic_and_round_trips(tmp_path):
    texts = [t for _, t in _docs()]
    first, again = train_bpe(texts, 300), train_bpe(texts, 300)
    assert first.size <= 300 and first.fingerprint == again.fingerprint
    assert train_bpe(texts, 280).size <= 280 and train_bpe(texts, 280).fingerprint != first.fingerprint
    text = "Homer: café 🍩 D'oh!\n"
    assert first.decode(first.encode(text)) == text and "Ġ" not in first.decode(first.encode(" a b"))
    first.save(tmp_path / "vocab.json")
    assert (tmp_path / "tokenizer.json").is_file() and not list(tmp_path.glob("*.pkl"))
    loaded = Vocab.load(tmp_path / "vocab.json")
    assert isinstance(loaded, BpeVocab) and loaded.fingerprint == first.fingerprint
    assert loaded.encode(text).tolist() == first.encode(text).tolist()


def test_default_config_keeps_its_fingerprint():
    """The tokenizer fields at their defaults are left out, so outputs made before them keep their fingerprints."""
    before = {"seq_len": 100, "val_fraction": 0.1, "test_fraction": 0.1, "min_count": 1, "lines_per_doc": 20,
              "rows_per_shard": 50_000, "split_salt": "homer"}
    assert fingerprint_view(PrepareConfig()) == before
    assert fingerprint_view(PrepareConfig(tokenizer="word")) == dict(before, tokenizer="word")
    assert PrepareConfig().model_dump()["tokenizer"] == "char"  # every field is still in the config itself


def test_word_vocabulary_past_uint16_writes_uint32_shards(tmp_path):
    words = [f"w{i}" for i in range(70_000)]  # 70,000 distinct words: 70,001 entries with the unknown token
    docs = [(f"doc{i}", " ".join(words[i * 100:(i + 1) * 100])) for i in range(700)]
    write_corpus(iter(docs), tmp_path / "corpus.parquet")
    cfg = PrepareConfig(seq_len=30, tokenizer="word", val_fraction=0.05, test_fraction=0.05, rows_per_shard=500)
    vocab = build_word_vocab(count_words(t for _, t in docs))
    assert vocab.size == 70_001 and vocab.id_dtype == np.uint32
    write_shards(tmp_path / "corpus.parquet", vocab, tmp_path / "shards", "toy", cfg)
    windows, _ = read_split(tmp_path / "shards", "train")
    assert windows.dtype == np.uint32 and windows.max() > 65_535
    mapped = open_split(tmp_path / "shards", "train", cache=tmp_path / "cache")
    assert mapped[:].dtype == np.uint32 and (mapped[:] == windows).all()
    numbers = [int(w[1:]) for w in vocab.decode(windows[0]).lower().split()]
    assert numbers == list(range(numbers[0], numbers[0] + 31))  # 31 consecutive words of one document


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_bits_per_char_divides_total_bits_by_the_characters_scored(tmp_path, kind):
    docs = _docs(n=40)
    write_corpus(iter(docs), tmp_path / "corpus.parquet")
    cfg = PrepareConfig(seq_len=12, tokenizer=kind, val_fraction=0.3, test_fraction=0.3)
    vocab = _vocab(kind, docs)
    stats = write_shards(tmp_path / "corpus.parquet", vocab, tmp_path / "shards", "toy", cfg)
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=8, hidden_sizes=[16], dropout=0.0)
    model = build_model(config, vocab.size)
    save_checkpoint(tmp_path / "ckpt", model=model, vocab=vocab, model_config=config, state={})
    got = bits_per_char(tmp_path / "ckpt", tmp_path / "shards", "test", device="cpu")
    # independently: every target's loss from the model, window by window, over the text's characters
    windows, _ = read_split(tmp_path / "shards", "test")
    overlap = read_overlap(tmp_path / "shards", "test")
    model.eval()
    with torch.no_grad():
        batch = torch.from_numpy(windows.astype(np.int64))
        logits, _ = model(batch[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").double()  # (W, T)
    total = sum(nll[w, overlap[w]:].sum().item() for w in range(len(windows)))
    test = split_of([d for d, _ in docs], cfg.val_fraction, cfg.test_fraction, cfg.split_salt) == 2
    token_counts = vocab.encode_docs([t for (_, t), m in zip(docs, test) if m])[1]
    chars = sum(len(t) - 1 for ((_, t), m) in zip(docs, test) if m and len(vocab.encode(t)) > cfg.seq_len)  # "x" is context
    assert chars > 0 and got["chars"] == chars == stats["test"]["scored_chars"]
    assert got["bits_per_char"] == pytest.approx(total / chars / math.log(2), rel=1e-6)
    assert got["tokens"] == sum(n - 1 for n in token_counts if n > cfg.seq_len) and got["tokenizer"] == kind
    assert read_target_chars(tmp_path / "shards", "test").sum() == chars


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_prepare_train_generate(tmp_path, kind, tiny_model_config):
    """Each tokenizer end to end: shards, a few training steps, samples that read naturally."""
    docs = _docs(n=40, seed=1)
    write_corpus(iter(docs), tmp_path / "corpus.parquet")
    cfg = PrepareConfig(seq_len=16, tokenizer=kind, val_fraction=0.2, test_fraction=0.2)
    if kind == "char":
        from model.data.vocab import build_vocab, count_chars

        vocab = build_vocab(count_chars([t for _, t in docs]))
        assert "char_counts" in count_part(iter([([d for d, _ in docs], [t for _, t in docs])]), cfg)
    else:
        vocab = _vocab(kind, docs)
    write_shards(tmp_path / "corpus.parquet", vocab, tmp_path / "shards", "toy", cfg)
    result = train(model_config=tiny_model_config, vocab=vocab, shards_dir=tmp_path / "shards", out_dir=tmp_path / "run",
                   train_config=TrainConfig(batch_size=8, epochs=1, max_steps=4, eval_every_steps=4, device="cpu",
                                            early_stopping_patience=None, learning_rate=1e-2))
    assert result.steps == 4 and 0 < result.best_val_bpc < 30
    model, loaded, _ = load_model_from_checkpoint(tmp_path / "run" / "best")
    assert loaded.fingerprint == vocab.fingerprint and type(loaded) is type(vocab)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        texts = generate(model, loaded, prompt="Homer: Duff", length=30, num_samples=2, seed=0)
        beams = generate(model, loaded, prompt="Homer: ", length=5, num_samples=2, beam_width=3)
    assert all(t.startswith("Homer: Duff") for t in texts) and all(b.startswith("Homer: ") for b in beams)
    if kind == "word":
        assert any("duff" in str(w.message) for w in caught)  # an unknown prompt word: a warning, not a failure
        for text in texts:
            body = text[len("Homer: Duff"):]
            assert not re.search(r" [,.!?;:')]", body)
            assert set(count_words([body])) <= set(loaded.tokens), body  # words of its vocabulary only
    if kind == "bpe":
        assert not any(marker in t for t in texts for marker in "ĠĊ")
