"""Pictures of small graphs with Pillow alone: a grid of panels, one graph per panel.

Tree-set graphs (with ``root_mask``; edges child -> parent) are drawn as layered trees, roots
on top (outlined); other graphs on a circle. Node colour = node label (argmax of ``x`` when a
graph has no ``node_label``), from core's report palette."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def _positions_tree(g, w: int, h: int) -> list[tuple[float, float]]:
    n = int(g.num_nodes)
    parent = [-1] * n
    for c, p in g.edge_index.t().tolist():
        parent[c] = p
    depth = [0] * n
    for v in range(n):  # nodes are in BFS order per tree, so parents come first
        depth[v] = depth[parent[v]] + 1 if parent[v] >= 0 else 0
    roots = torch.nonzero(g.root_mask).view(-1).tolist() + [n]
    pos: list[tuple[float, float]] = [(0.0, 0.0)] * n
    max_d = max(depth) if depth else 0
    col_w = w / max(1, len(roots) - 1)
    for t, (a, b) in enumerate(zip(roots[:-1], roots[1:])):
        levels: dict[int, list[int]] = {}
        for v in range(a, b):
            levels.setdefault(depth[v], []).append(v)
        for d, vs in levels.items():
            for k, v in enumerate(vs):
                x = t * col_w + (k + 0.5) * col_w / len(vs)
                y = 8 + d * (h - 16) / max(1, max_d)
                pos[v] = (x, y)
    return pos


def _positions_circle(g, w: int, h: int) -> list[tuple[float, float]]:
    n = int(g.num_nodes)
    r = 0.42 * min(w, h)
    return [
        (
            w / 2 + r * math.cos(2 * math.pi * k / max(n, 1)),
            h / 2 + r * math.sin(2 * math.pi * k / max(n, 1)),
        )
        for k in range(n)
    ]


def draw_graphs(graphs: list, path: str | Path, per_row: int = 5, panel: int = 200) -> Path:
    """Write a PNG grid of ``graphs`` (at most 100 drawn) to ``path``; returns the path."""
    import io

    from fewstep.core.io import atomic_write_bytes
    from fewstep.core.report import PALETTE

    graphs = list(graphs)[:100]
    if not graphs:
        raise ValueError("draw_graphs needs at least one graph")
    rows = math.ceil(len(graphs) / per_row)
    img = Image.new("RGB", (per_row * panel, rows * panel), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, g in enumerate(graphs):
        ox, oy = (i % per_row) * panel, (i // per_row) * panel
        draw.rectangle([ox, oy, ox + panel - 1, oy + panel - 1], outline=(220, 220, 220))
        tree = getattr(g, "root_mask", None) is not None
        pos = (_positions_tree if tree else _positions_circle)(g, panel - 8, panel - 20)
        pos = [(ox + 4 + x, oy + 16 + y) for x, y in pos]
        for a, b in g.edge_index.t().tolist():
            draw.line([pos[a], pos[b]], fill=(150, 150, 150), width=1)
        nl = getattr(g, "node_label", None)
        labels = nl.tolist() if nl is not None else g.x.argmax(1).tolist()
        roots = set(torch.nonzero(g.root_mask).view(-1).tolist()) if tree else set()
        r = 4 if g.num_nodes < 40 else 2
        for v, (x, y) in enumerate(pos):
            outline = (0, 0, 0) if v in roots else None
            draw.ellipse(
                [x - r, y - r, x + r, y + r],
                fill=PALETTE[labels[v] % len(PALETTE)],
                outline=outline,
            )
        caption = f"class {int(g.y)}"
        if getattr(g, "weight", None) is not None:
            caption += f"  w={float(g.weight):.0f}"
        draw.text((ox + 4, oy + 2), caption, fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
