"""Rewrite entries of the flash kernel's tile table, ``src/jattn/kernels/block_sizes.json``.

Shared by ``autotune_flash.py`` (timings on a GPU) and ``triton_static.py --choose --write``
(compile facts without one). The file keeps one line per entry, so a change reads as a small diff.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources

TABLE = str(resources.files("jattn.kernels").joinpath("block_sizes.json"))


def write_entries(lowering: str, target: str, entries: dict, sources: dict, output: str = TABLE) -> None:
    """Merge ``entries`` ``{dtype: {head_dim: BlockSizes fields}}`` into ``lowering``'s ``target``
    table, each noted with its ``sources[dtype][head_dim]`` (how it was chosen); entries not given
    keep theirs and their sources (``{lowering/target: {dtype: {head_dim: source}}}``)."""
    with open(TABLE) as f:
        table = json.load(f)
    by_dtype = table.setdefault(lowering, {}).setdefault(target, {})
    noted = table.setdefault("sources", {}).setdefault(f"{lowering}/{target}", {})
    for dtype, by_dim in entries.items():
        by_dtype.setdefault(dtype, {}).update(by_dim)
        noted.setdefault(dtype, {}).update({dim: sources[dtype][dim] for dim in by_dim})
    # A new file moved over the old one: a run killed while writing leaves the old table whole.
    folder = os.path.dirname(os.path.abspath(output))
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".json", delete=False) as f:
        f.write(_format(table) + "\n")
    os.chmod(f.name, 0o644)  # a temporary file is private; the table is not
    os.replace(f.name, output)


def one_source(entries: dict, source: str) -> dict:
    """``sources`` for ``write_entries`` that note every entry with ``source``."""
    return {dtype: dict.fromkeys(by_dim, source) for dtype, by_dim in entries.items()}


def _format(node, indent: int = 0) -> str:
    """JSON with every innermost object (one table entry) on one line."""
    if not isinstance(node, dict) or not any(isinstance(value, dict) for value in node.values()):
        return json.dumps(node)
    pad = " " * (indent + 2)
    items = [f"{pad}{json.dumps(key)}: {_format(value, indent + 2)}" for key, value in node.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
