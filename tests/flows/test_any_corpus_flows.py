"""Any corpus through the whole pipeline: articles from a folder of .txt files and fine-tuning lines
from a .txt file, with the sample profile's small model and a few steps (the README's example)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from flows.config import load_config
from model.data.sources import SAMPLE_SIMPSONS, WikipediaConfig, read_simpsons_csv, read_wikipedia
from model.store.outputs import read_manifest

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

FEW_STEPS = [
    "pretrain.model.embedding_dim=16", "pretrain.model.hidden_sizes=[32]", "pretrain.train.max_steps=4",
    "pretrain.train.batch_size=16", "pretrain.train.max_val_windows=32",
    "finetune.train.max_steps=3", "finetune.train.batch_size=8", "finetune.train.max_val_windows=16",
    "report.length=20", "report.num_samples=1", "report.temperatures=[1.0]",
]


def test_pipeline_on_a_folder_of_txt_articles_and_a_txt_of_lines(tmp_path, data_dir):
    from flows.pipeline import homer_pipeline

    articles = tmp_path / "articles"
    articles.mkdir()
    for article in read_wikipedia(WikipediaConfig(source="sample", max_articles=30)):
        (articles / f"{article['id']}.txt").write_text(article["text"], encoding="utf-8")
    lines, _ = read_simpsons_csv(SAMPLE_SIMPSONS, "Homer Simpson")
    homer = tmp_path / "homer.txt"
    homer.write_text("\n\n".join(x["text"] for x in lines[:300]), encoding="utf-8")  # blank lines between: not rows

    cfg = load_config("sample", None, FEW_STEPS + ["wikipedia.source=local", f"wikipedia.path={articles}",
                                                   "simpsons.source=local", f"simpsons.path={homer}"])
    refs = homer_pipeline(cfg)
    assert read_manifest(refs["ingest-wikipedia"].dir)["counts"]["articles"] == 30
    kept = pq.read_table(refs["ingest-simpsons"].dir / "lines.parquet").column("text").to_pylist()
    assert kept == [x["text"] for x in lines[:300]]
    corpora = read_manifest(refs["prepare"].dir)["counts"]["corpora"]
    assert corpora["wikipedia"]["documents"] == 30 and corpora["simpsons"]["documents"] == 30  # 10 lines a document
    report = (refs["report"].dir / "report.md").read_text(encoding="utf-8")
    assert "bits/char" in report and "| pretrain | wikipedia |" in report and "| finetune | simpsons |" in report  # both corpora
