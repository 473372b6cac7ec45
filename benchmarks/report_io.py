"""What the benchmark scripts share: writing their JSON and printing a markdown table."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


def markdown_table(rows: list[dict], keys: list[str] | None = None) -> str:
    """Rows as a markdown table; columns = ``keys`` or every key in order of appearance."""
    keys = keys or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
