"""Data: where text comes from and what training reads.

- `sources`: the ingest readers (Hugging Face hub, local files, the Kaggle CSV, the bundled sample)
- `vocab`: the character vocabulary (and `Vocab.load`, which loads any vocabulary)
- `tokenizers`: the word and byte-level BPE vocabularies (prepare.tokenizer), characters per token
- `prepare`: corpora, the document split (train/val/test) and windows
- `shards`: Parquet sequence shards, written and read

May import: numpy, pyarrow, datasets, kagglehub, ftfy, pydantic, tokenizers, and `model.store` (to name a damaged file's output).
"""
