"""Vocabulary encode/decode and the Parquet shard contract."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.data.shards import ShardError, ShardWriter, list_shards, read_split
from model.data.vocab import UNK_TOKEN, Vocab, VocabularyError, build_vocab, count_chars


def test_vocab_round_trip_and_unknown():
    vocab = build_vocab(count_chars(["D'oh! Mmm… doughnuts", "Woo-hoo!"]))
    text = "Mmm… D'oh!"
    assert vocab.decode(vocab.encode(text)) == text
    ids = vocab.encode("Zé")
    assert ids.dtype == np.uint16 and (ids == vocab.unk_id).all()
    assert vocab.decode(ids) == UNK_TOKEN * 2


def test_vocab_order_is_deterministic_and_min_count_applies():
    counts = Counter({"a": 3, "b": 3, "c": 1, "d": 5})
    assert build_vocab(counts).chars == ("d", "a", "b", "c")
    assert build_vocab(counts, min_count=2).chars == ("d", "a", "b")


def test_vocab_save_load_and_fingerprint(tmp_path):
    vocab = build_vocab(count_chars(["hello world"]))
    vocab.save(tmp_path / "vocab.json")
    again = Vocab.load(tmp_path / "vocab.json")
    assert again == vocab and again.fingerprint == vocab.fingerprint
    assert build_vocab(count_chars(["hello there"])).fingerprint != vocab.fingerprint


def test_vocab_past_uint16_encodes_uint32():
    counts = Counter({chr(0x4E00 + i): 1 for i in range(70_000)})
    vocab = build_vocab(counts)
    text = chr(0x4E00) + chr(0x4E00 + 69_999)
    ids = vocab.encode(text)
    assert vocab.size > 65_536 and ids.dtype == np.uint32 and ids.max() > 65_535 and vocab.decode(ids) == text


def test_shards_round_trip_and_contract(tmp_path):
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 60, size=(25, 11), dtype=np.uint16)
    with ShardWriter(tmp_path, "train", seq_len=10, corpus="c", vocab_fingerprint="abc", rows_per_shard=10) as writer:
        writer.add(windows[:7])
        writer.add(windows[7:])
    names = [p.name for p in list_shards(tmp_path, "train")]
    assert names == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    schema = pq.read_schema(tmp_path / names[0])
    ids_type = schema.field("ids").type
    assert ids_type.list_size == 11 and str(ids_type.value_type) == "uint16" and ids_type.num_fields == 1
    assert "fixed_size_list" in str(ids_type)
    assert pq.ParquetFile(tmp_path / names[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    got, meta = read_split(tmp_path, "train")
    assert np.array_equal(got, windows)
    assert meta["vocab_fingerprint"] == "abc" and meta["seq_len"] == 10 and meta["corpus"] == "c"


def test_missing_shard_is_detected(tmp_path):
    with ShardWriter(tmp_path, "val", seq_len=2, corpus="c", vocab_fingerprint="f", rows_per_shard=1) as writer:
        writer.add(np.zeros((2, 3), dtype=np.uint16))
    (tmp_path / "val-00001-of-00002.parquet").unlink()
    with pytest.raises(ShardError, match="incomplete"):
        read_split(tmp_path, "val")
    with pytest.raises(ShardError, match="no train shards"):
        read_split(tmp_path, "train")


def test_failed_writer_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", seq_len=2, corpus="c", vocab_fingerprint="f", rows_per_shard=1) as writer:
            writer.add(np.zeros((3, 3), dtype=np.uint16))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_lone_surrogate_becomes_unknown_not_a_crash():
    vocab = build_vocab(count_chars(["abc"]))
    assert vocab.encode("a\ud800b").tolist() == [vocab.encode("a")[0], vocab.unk_id, vocab.encode("b")[0]]


def test_open_split_memory_maps_the_same_windows_and_keeps_copies_by_checksum(tmp_path, monkeypatch, write_shards):
    import numpy as np

    from model.data.shards import ShardError, open_split, read_split

    monkeypatch.setenv("HOMER_CACHE_DIR", str(tmp_path / "cache"))
    text = "D'oh! Mmm... donuts. Woo-hoo! Why you little...! "
    vocab = build_vocab(count_chars([text]))
    shards = write_shards(tmp_path / "shards", vocab, text * 200, text * 3, rows_per_shard=50)
    windows, _ = read_split(shards, "train")
    mapped = open_split(shards, "train")
    assert mapped.shape == windows.shape and mapped.meta["shards"] > 3
    rows = np.random.default_rng(0).permutation(len(windows))[:64]
    assert (mapped[rows] == windows[rows]).all() and (mapped[7:133] == windows[7:133]).all()
    assert all(isinstance(a, np.memmap) for a in mapped.arrays)  # nothing of the split is read into memory
    copies = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "windows").iterdir()}
    assert len(copies) == mapped.meta["shards"]
    open_split(shards, "train")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "windows").iterdir()} == copies  # reused
    # Other bytes under the same name get a copy of their own: copies are kept by checksum, not by path.
    write_shards(tmp_path / "shards", vocab, (text * 200)[::-1], text * 3, rows_per_shard=50)
    assert (open_split(shards, "train")[:] == read_split(shards, "train")[0]).all()
    first = sorted(shards.glob("train-*.parquet"))[0]
    first.write_bytes(first.read_bytes()[:100])  # truncated: named, with the stage that remakes it
    with pytest.raises(ShardError, match=first.name):
        open_split(shards, "train")
