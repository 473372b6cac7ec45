"""What the benchmark scripts share: machine info, writing their JSON and printing a
markdown table."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def machine() -> dict:
    """The machine and torch settings a result was measured with."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "load_average_1_5_15min": list(os.getloadavg()),  # other work sharing the CPU
    }


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
