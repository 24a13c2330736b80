"""Markdown for Prefect artifacts that a UI user can see and use.

The Prefect UI renders a markdown artifact's image only when the image travels inside
it (a `data:image/png;base64,...` URI); a `file://` link points into the worker's disk,
which the browser cannot open. Locations are shown as text, with a link only where the
location is a real URL (an `http(s)://` or `s3://`-style artifact root).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A scheme a browser or a cloud console can open; `file:` is the worker's own disk, so no.
_URL = re.compile(r"^(?!file:)[a-z][a-z0-9+.-]*://\S+$", re.IGNORECASE)


def png_markdown(path: str | Path, alt: str = "loss curves") -> str:
    """`![alt](data:image/png;base64,...)`: the PNG itself, so the UI shows the picture."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise ValueError(f"{path}: not a PNG file")
    alt = alt.replace("[", "(").replace("]", ")")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"


def location_url(location: str | Path) -> str | None:
    """The location itself if it is a URL worth linking (http(s)://, s3://, ...); None for a local path."""
    text = str(location)
    return text if _URL.match(text) else None


def code(text: str) -> str:
    """`text` as inline markdown code, whatever backticks it holds."""
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def location_markdown(title: str, location: str | Path, fingerprint: str | None = None, note: str | None = None) -> str:
    """Where an output is, as text to copy (and a link only if the location is a real URL)."""
    lines = [f"### {title}", "", f"- location: {code(str(location))}"]
    if fingerprint:
        lines.append(f"- fingerprint: {code(fingerprint)}")
    if url := location_url(location):
        lines.append(f"- open: [{url}]({url})")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _made_at(ref) -> float:
    """When an output was made: its manifest's mtime here, or for one in a store (whose local copy may be new), its `created`."""
    if "://" in ref.path:
        from datetime import datetime

        return datetime.fromisoformat(ref.manifest()["created"]).timestamp()
    return (ref.dir / "manifest.json").stat().st_mtime


def pipeline_summary_markdown(refs: dict, started: float) -> str:
    """The pipeline run's own artifact: where each stage's output is (made by this run, or reused: its
    manifest is older than `started`, a time.time()), then the report (bits per character, samples)
    with its loss-curve image."""
    lines = ["# recurrent-homer pipeline", "", "| stage | output | fingerprint | this run |", "| --- | --- | --- | --- |"]
    for stage, ref in refs.items():
        made = "reused" if _made_at(ref) < started else "made"
        lines.append(f"| {stage} | {code(ref.path)} | {code(ref.fingerprint)} | {made} |")
    report = refs.get("report")
    if report is not None:
        body = (report.dir / "report.md").read_text(encoding="utf-8")
        body = body.replace("![loss curves](loss.png)", png_markdown(report.dir / "loss.png", "loss curves"))
        lines += ["", body.replace("# recurrent-homer report", "## The report", 1)]
    return "\n".join(lines) + "\n"
