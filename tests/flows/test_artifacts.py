"""Artifact markdown a UI user can use: the PNG itself as a data URI, locations as text."""

from __future__ import annotations

import base64
import json
import re

import pytest

from tasks.artifacts import code, location_markdown, location_url, png_markdown


def test_png_markdown_carries_the_png_itself(tmp_path):
    from model.report.scores import plot_losses

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"kind": "log", "step": s, "loss": 4.0 / s}) + "\n" for s in range(1, 50))
                       + json.dumps({"kind": "eval", "step": 49, "val_loss": 0.2}) + "\n")
    png = plot_losses({"pretrain": metrics}, tmp_path / "loss.png")
    markdown = png_markdown(png, "pretrain loss curves")
    match = re.fullmatch(r"!\[pretrain loss curves\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match, markdown[:200]
    assert base64.b64decode(match.group(1)) == png.read_bytes()
    assert png.stat().st_size < 150_000, "the UI loads the whole artifact: keep the figure small"
    assert png_markdown(png, "a [b] title").startswith("![a (b) title](data:image/png;base64,")  # "]" would end the alt text


def test_png_markdown_refuses_a_file_that_is_not_a_png(tmp_path):
    (tmp_path / "loss.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a PNG"):
        png_markdown(tmp_path / "loss.png")


def test_a_local_location_is_text_to_copy_not_a_link(tmp_path):
    out = tmp_path / "data" / "prepare" / "fb749e95a0c611d7"
    markdown = location_markdown("prepare output", out, "fb749e95a0c611d7")
    assert f"`{out}`" in markdown and "`fb749e95a0c611d7`" in markdown
    assert "](" not in markdown and "file:" not in markdown
    assert location_url(out) is None and location_url(out.as_uri()) is None  # file:// opens nothing in a browser


@pytest.mark.parametrize("root", ["s3://homer-bucket/data/prepare/abc", "https://files.example.org/homer/prepare/abc",
                                  "gs://bucket/prepare/abc"])
def test_a_url_location_is_also_a_link(root):
    markdown = location_markdown("prepare output", root, "abc")
    assert location_url(root) == root
    assert f"[{root}]({root})" in markdown and f"`{root}`" in markdown


def test_code_survives_backticks():
    assert code("/srv/homer") == "`/srv/homer`"
    assert code("/srv/a`b") == "``/srv/a`b``"
    assert code("`x") == "`` `x ``"
