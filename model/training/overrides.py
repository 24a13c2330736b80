"""The one `--set dotted.key=value` parser, for `homer` and `python -m model.training.loop`.

Values are read as YAML, so `5` is an int, `[64, 64]` a list, `1e-3` a float and `null`
None; a value that is not valid YAML stays a string.

    data = {}
    problems = apply_sets(data, ["pretrain.train.epochs=2", "prepare.seq_len=50"])
"""

from __future__ import annotations

from typing import Any

import yaml


def parse_set(item: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value parsed as YAML); ValueError naming the item when malformed."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_sets(data: dict, items: list[str]) -> list[str]:
    """Set each dotted key in `data` (in place, creating sections); return every problem found."""
    problems = []
    for item in items:
        try:
            keys, value = parse_set(item)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                problems.append(f"--set {item!r}: {'.'.join(keys[:-1])} is not a section")
                break
        else:
            node[keys[-1]] = value
    return problems
