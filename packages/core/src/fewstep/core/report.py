"""A run's human-readable report: sample grids, line charts, and one self-contained HTML page.

Everything is drawn with Pillow alone (no matplotlib), so every domain can write a report
with core's dependencies only.

* :func:`image_grid` / :func:`save_image_grid` tile a batch ``(N, C, H, W)`` of samples into
  one picture, with an integer nearest-neighbour upscale so 8×8 digits stay readable.
* :func:`line_plot` / :func:`save_line_plot` draw loss curves, FD-versus-NFE and the like:
  axes, ticks, grid, one colour per series, a legend; non-finite points are skipped.
* :class:`Report` collects text, tables, images and warnings in insertion order and writes
  ``report.html`` atomically, so a report rewritten during training is never half-written.
"""

from __future__ import annotations

import html
import io
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from PIL import Image, ImageDraw, ImageFont

from fewstep.core.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "PALETTE",
    "Report",
    "image_grid",
    "line_plot",
    "save_image_grid",
    "save_line_plot",
]

# Tableau-10: distinguishable, and readable on white.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)

_BACKGROUND = (255, 255, 255)
_FOREGROUND = (0, 0, 0)
_GRID = (225, 225, 225)
_MUTED = (110, 110, 110)


# --------------------------------------------------------------------------- image grids


def _to_uint8(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Map ``(N, C, H, W)`` floats in ``value_range`` to uint8 0..255 (NaN -> low end)."""
    lo, hi = float(value_range[0]), float(value_range[1])
    x = images.detach().to(device="cpu", dtype=torch.float64)
    x = torch.nan_to_num(x, nan=lo, posinf=hi, neginf=lo).clamp(lo, hi)
    return torch.round((x - lo) * (255.0 / (hi - lo))).to(torch.uint8)


def image_grid(
    images: torch.Tensor,
    nrow: int | None = None,
    pad: int = 1,
    value_range: tuple[float, float] = (-1.0, 1.0),
    upscale: int = 1,
    pad_value: int = 0,
) -> Image.Image:
    """Tile a batch of images into one PIL image.

    Args:
        images: tensor (or array) of shape ``(N, C, H, W)`` with ``C`` in ``{1, 3}``.
        nrow: images per row; default ``ceil(sqrt(N))``.
        pad: pixels between neighbouring tiles (not around the border), after upscaling.
        value_range: ``(low, high)``; values are clamped to it and mapped linearly to 0..255
            (``low`` -> 0, ``high`` -> 255). NaN and -inf map to 0, +inf to 255.
        upscale: integer nearest-neighbour magnification of every tile (8×8 digits: use 4).
        pad_value: grey level 0..255 of the padding and of empty cells in the last row.

    Returns:
        An ``"L"`` (C=1) or ``"RGB"`` (C=3) image of width ``ncol*W*upscale + (ncol-1)*pad``
        and height ``nrows*H*upscale + (nrows-1)*pad``, where ``ncol = min(nrow, N)`` and
        ``nrows = ceil(N / nrow)``.
    """
    if not isinstance(images, torch.Tensor):
        try:
            images = torch.as_tensor(images)
        except Exception as exc:  # re-raised below with the expected shape
            raise ValueError(
                f"image_grid expects a tensor of shape (N, C, H, W) with C in {{1, 3}}, "
                f"got {type(images).__name__}"
            ) from exc
    shape = tuple(images.shape)
    if images.ndim != 4 or shape[1] not in (1, 3) or min(shape) < 1:
        raise ValueError(
            f"image_grid expects a tensor of shape (N, C, H, W) with C in {{1, 3}} and "
            f"N, H, W >= 1, got shape {shape}"
        )
    if images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"image_grid expects real-valued images, got dtype {images.dtype}")
    if not (isinstance(upscale, int) and upscale >= 1):
        raise ValueError(f"upscale must be an integer >= 1, got {upscale!r}")
    if not (isinstance(pad, int) and pad >= 0):
        raise ValueError(f"pad must be an integer >= 0, got {pad!r}")
    if nrow is not None and not (isinstance(nrow, int) and nrow >= 1):
        raise ValueError(f"nrow must be an integer >= 1 or None, got {nrow!r}")
    if len(value_range) != 2 or not float(value_range[1]) > float(value_range[0]):
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    if not 0 <= int(pad_value) <= 255:
        raise ValueError(f"pad_value must be in 0..255, got {pad_value!r}")

    n, c, h, w = shape
    per_row = nrow if nrow is not None else math.ceil(math.sqrt(n))
    ncol = min(per_row, n)
    nrows = math.ceil(n / per_row)

    tiles = _to_uint8(images, value_range)
    if upscale > 1:
        tiles = tiles.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    th, tw = h * upscale, w * upscale

    grid = torch.full(
        (c, nrows * th + (nrows - 1) * pad, ncol * tw + (ncol - 1) * pad),
        int(pad_value),
        dtype=torch.uint8,
    )
    for i in range(n):
        r, q = divmod(i, per_row)
        y, x = r * (th + pad), q * (tw + pad)
        grid[:, y : y + th, x : x + tw] = tiles[i]

    if c == 1:
        return Image.fromarray(grid[0].numpy())
    return Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())


def _save_png(path: str | os.PathLike[str], img: Image.Image) -> Path:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_image_grid(path: str | os.PathLike[str], images: torch.Tensor, **kw: Any) -> Path:
    """:func:`image_grid` written as PNG to ``path`` (atomically, parents created)."""
    return _save_png(path, image_grid(images, **kw))


# --------------------------------------------------------------------------- line plots


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled default font (Aileron) at ``size`` px; the bitmap font without FreeType.

    At Pillow's default 10 px, Aileron's spaces nearly vanish ("no data" reads "nodata").
    """
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # no FreeType, or Pillow < 10.1
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    if not text:
        return 0, 0
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any, fill: Any
) -> None:
    """Draw ``text`` with its ink box's top-left corner at ``xy``."""
    x0, y0, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - x0, xy[1] - y0), text, font=font, fill=fill)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, max_w: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits in ``max_w`` pixels."""
    if _text_size(draw, text, font)[0] <= max_w:
        return text
    while text and _text_size(draw, text + "...", font)[0] > max_w:
        text = text[:-1]
    return text + "..."


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        mant, exp = f"{v:.2e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return f"{v:.6g}"


def _nice_ticks(lo: float, hi: float, target: int) -> list[float]:
    """Round-numbered ticks (1, 2, 2.5, 5 × 10^k steps) inside ``[lo, hi]``, about ``target``."""
    span = hi - lo
    if not span > 0:
        return [lo]
    mag = 10.0 ** math.floor(math.log10(span / max(target - 1, 1)))

    def ticks(step: float) -> list[float]:
        i0 = math.ceil(lo / step - 1e-9)
        i1 = math.floor(hi / step + 1e-9)
        return [i * step for i in range(i0, i1 + 1)]

    # The round step whose tick count is closest to target (ties: the larger step).
    steps = [m * mag for m in (10.0, 5.0, 2.5, 2.0, 1.0, 0.5)]
    best = min(steps, key=lambda st: abs(len(ticks(st)) - target))
    return ticks(best)


def _expand(lo: float, hi: float) -> tuple[float, float]:
    """Give a degenerate (single-value) range some width."""
    if hi - lo > 1e-12 * max(abs(lo), abs(hi), 1e-300):
        return lo, hi
    d = abs(lo) * 0.05 if lo != 0 else 0.5
    return lo - d, hi + d


def _clean_series(
    name: str, points: Iterable[Sequence[float]], log_y: bool
) -> tuple[list[list[tuple[float, float]]], int]:
    """Split a series into runs of plottable points; return ``(segments, n_skipped)``.

    A point is skipped (and breaks the line) when x or y is NaN/inf, or when ``log_y`` and
    ``y <= 0``. With ``log_y`` the returned y values are ``log10(y)``.
    """
    segments: list[list[tuple[float, float]]] = []
    current: list[tuple[float, float]] = []
    skipped = 0
    for k, p in enumerate(points):
        try:
            x, y = p
            x, y = float(x), float(y)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"series {name!r}: point {k} must be an (x, y) pair of numbers, got {p!r}"
            ) from exc
        ok = math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)
        if ok:
            current.append((x, math.log10(y) if log_y else y))
        else:
            skipped += 1
            if current:
                segments.append(current)
                current = []
    if current:
        segments.append(current)
    return segments, skipped


def _paste_rotated_text(
    img: Image.Image, draw: ImageDraw.ImageDraw, text: str, font: Any, center: tuple[int, int]
) -> None:
    """Draw ``text`` rotated 90° counter-clockwise, centred on ``center``."""
    w, h = _text_size(draw, text, font)
    if w == 0:
        return
    mask = Image.new("L", (w + 2, h + 2), 0)
    _draw_text(ImageDraw.Draw(mask), (1, 1), text, font, 255)
    mask = mask.rotate(90, expand=True)
    x = center[0] - mask.width // 2
    y = center[1] - mask.height // 2
    img.paste(_FOREGROUND, (x, y, x + mask.width, y + mask.height), mask)


def line_plot(
    series: Mapping[str, Iterable[Sequence[float]]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    width: int = 640,
    height: int = 360,
    log_y: bool = False,
) -> Image.Image:
    """Draw a line chart of one or more ``(x, y)`` series with Pillow only.

    Args:
        series: ``{name: [(x, y), ...]}``; points are joined in the order given. Points with
            a NaN/inf coordinate (or ``y <= 0`` when ``log_y``) are skipped and break the
            line; the legend says how many were skipped. A run of a single point is drawn as
            a dot. Series get colours from :data:`PALETTE` in order (cycling).
        title, xlabel, ylabel: text above the chart, under the x axis, left of the y axis.
        width, height: image size in pixels (at least 200 × 120).
        log_y: logarithmic y axis.

    Returns:
        An RGB image of exactly ``(width, height)``. With nothing plottable, the axes frame
        shows "no data".
    """
    if not isinstance(series, Mapping):
        raise ValueError(
            f"series must be a mapping {{name: [(x, y), ...]}}, got {type(series).__name__}"
        )
    if int(width) < 200 or int(height) < 120:
        raise ValueError(f"line_plot needs width >= 200 and height >= 120, got {width}x{height}")
    width, height = int(width), int(height)

    cleaned = []
    for name, pts in series.items():
        segs, skipped = _clean_series(str(name), pts, log_y)
        cleaned.append((str(name), segs, skipped))
    all_pts = [p for _, segs, _ in cleaned for seg in segs for p in seg]
    has_data = bool(all_pts)

    img = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font()
    gap = 6
    tick_len = 4
    _, line_h = _text_size(draw, "Ag0", font)

    # ---- data ranges and ticks (y in log10 units when log_y)
    n_xt = max(3, min(10, width // 110))
    n_yt = max(3, min(8, height // 60))
    if has_data:
        xlo, xhi = _expand(min(p[0] for p in all_pts), max(p[0] for p in all_pts))
        ylo, yhi = min(p[1] for p in all_pts), max(p[1] for p in all_pts)
        if log_y and yhi - ylo < 1e-12:
            ylo, yhi = ylo - 0.5, yhi + 0.5
        ylo, yhi = _expand(ylo, yhi)
        margin = 0.05 * (yhi - ylo)
        ylo, yhi = ylo - margin, yhi + margin
        xticks = [(v, _fmt_tick(v)) for v in _nice_ticks(xlo, xhi, n_xt)]
        if not log_y:
            yticks = [(v, _fmt_tick(v)) for v in _nice_ticks(ylo, yhi, n_yt)]
        elif yhi - ylo >= 1.0:
            exps = list(range(math.ceil(ylo), math.floor(yhi) + 1))
            stride = max(1, math.ceil(len(exps) / n_yt))
            yticks = [(float(e), _fmt_tick(10.0**e)) for e in exps[::stride]]
        else:
            vals = _nice_ticks(10.0**ylo, 10.0**yhi, n_yt)
            yticks = [(math.log10(v), _fmt_tick(v)) for v in vals if v > 0]
    else:
        xlo, xhi, ylo, yhi = 0.0, 1.0, 0.0, 1.0
        xticks, yticks = [], []

    # ---- layout: title on top; y label and tick labels on the left; legend on the right
    title_h = _text_size(draw, title, font)[1] if title else 0
    xlabel_h = _text_size(draw, xlabel, font)[1] if xlabel else 0
    ylabel_w = _text_size(draw, ylabel, font)[1] if ylabel else 0  # rotated: height -> width
    ytick_w = max((_text_size(draw, s, font)[0] for _, s in yticks), default=0)

    legend = []
    for i, (name, segs, skipped) in enumerate(cleaned):
        label = name
        if not segs:
            label += " (no data)"
        elif skipped:
            label += f" ({skipped} skipped)"
        legend.append((label, PALETTE[i % len(PALETTE)]))
    swatch = 14
    legend_max_w = width // 3
    legend = [(_fit_text(draw, s, font, legend_max_w - swatch - gap), c) for s, c in legend]
    legend_w = max((_text_size(draw, s, font)[0] for s, _ in legend), default=0)
    legend_w = legend_w + swatch + gap if legend else 0

    left = gap + (ylabel_w + gap if ylabel else 0) + ytick_w + gap + tick_len
    right = width - gap - (legend_w + 2 * gap if legend else 0)
    top = gap + (title_h + gap if title else 0) + line_h // 2
    bottom = height - (gap + (xlabel_h + gap if xlabel else 0) + line_h + gap + tick_len)
    if right - left < 40:  # very long labels: give the plot at least a strip
        right = min(width - gap, left + 40)
    pw, ph = right - left, bottom - top

    def px(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * pw

    def py(y: float) -> float:
        return bottom - (y - ylo) / (yhi - ylo) * ph

    # ---- grid, frame, ticks
    for v, s in xticks:
        x = round(px(v))
        draw.line([(x, top), (x, bottom)], fill=_GRID)
        draw.line([(x, bottom), (x, bottom + tick_len)], fill=_FOREGROUND)
        tw, _ = _text_size(draw, s, font)
        tx = min(max(x - tw / 2, 0), width - tw)
        _draw_text(draw, (tx, bottom + tick_len + gap // 2), s, font, _FOREGROUND)
    for v, s in yticks:
        y = round(py(v))
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.line([(left - tick_len, y), (left, y)], fill=_FOREGROUND)
        tw, th = _text_size(draw, s, font)
        _draw_text(draw, (left - tick_len - gap // 2 - tw, y - th / 2), s, font, _FOREGROUND)
    draw.rectangle([left, top, right, bottom], outline=_FOREGROUND)

    # ---- data
    if has_data:
        for i, (_, segs, _) in enumerate(cleaned):
            colour = PALETTE[i % len(PALETTE)]
            n_pts = sum(len(seg) for seg in segs)
            for seg in segs:
                xy = [(px(x), py(y)) for x, y in seg]
                if len(xy) > 1:
                    draw.line(xy, fill=colour, width=2, joint="curve")
                if len(xy) == 1 or n_pts <= 20:
                    r = 3 if len(xy) == 1 else 2
                    for cx, cy in xy:
                        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        tw, th = _text_size(draw, "no data", font)
        _draw_text(draw, (left + (pw - tw) / 2, top + (ph - th) / 2), "no data", font, _MUTED)

    # ---- legend (outside the plot, right of it, so it never hides data)
    if legend:
        lx = right + 2 * gap
        for k, (label, colour) in enumerate(legend):
            ly = top + k * (line_h + gap)
            if ly + line_h > height:
                break
            mid = ly + line_h / 2
            draw.line([(lx, mid), (lx + swatch, mid)], fill=colour, width=3)
            _draw_text(draw, (lx + swatch + gap, ly), label, font, _FOREGROUND)

    # ---- title and axis labels
    if title:
        tw, _ = _text_size(draw, title, font)
        _draw_text(draw, (max((width - tw) / 2, 0), gap), title, font, _FOREGROUND)
    if xlabel:
        tw, _ = _text_size(draw, xlabel, font)
        _draw_text(draw, (left + (pw - tw) / 2, height - gap - xlabel_h), xlabel, font, _FOREGROUND)
    if ylabel:
        _paste_rotated_text(img, draw, ylabel, font, (gap + ylabel_w // 2, top + ph // 2))
    return img


def save_line_plot(
    path: str | os.PathLike[str], series: Mapping[str, Iterable[Sequence[float]]], **kw: Any
) -> Path:
    """:func:`line_plot` written as PNG to ``path`` (atomically, parents created)."""
    return _save_png(path, line_plot(series, **kw))


# --------------------------------------------------------------------------- HTML report

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
.warning { background: #fdecea; border: 2px solid #d32f2f; color: #8b0000; border-radius: 6px;
           padding: .7em 1em; margin: 1em 0; font-weight: 600; white-space: pre-wrap; }
.text { white-space: pre-wrap; }
table { border-collapse: collapse; margin: .5em 0; font-size: .95em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: .5em 0; }
img { image-rendering: pixelated; max-width: 100%; }
figcaption { color: #555; font-size: .9em; margin-top: .3em; }
""".strip()


def _format_cell(v: Any) -> tuple[str, bool]:
    """Cell text and whether it is numeric; floats get 4 significant digits."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if v is None:
        return "", False
    if isinstance(v, bool):
        return str(v), False
    if isinstance(v, numbers.Integral):
        return str(int(v)), True
    if isinstance(v, numbers.Real):
        return f"{float(v):.4g}", True
    return str(v), False


class Report:
    """Collect a run's results and write them as ``<out_dir>/report.html``.

    Sections appear in the order they were added; warnings (see :meth:`add_warning`) go in
    a red box at the top. :meth:`write` may be called any number of times (e.g. after each
    evaluation); each call rewrites the page atomically.

    Example::

        rep = Report(run_dir, "DMD2 on digits")
        rep.add_table("Quality", [{"model": "teacher", "NFE": 50, "FD": 1.234567}])
        rep.add_image("Samples", save_image_grid(run_dir / "samples.png", x, upscale=4))
        rep.write()
    """

    FILENAME = "report.html"

    def __init__(self, out_dir: str | os.PathLike[str], title: str) -> None:
        self.out_dir = Path(out_dir)
        self.title = str(title)
        self._warnings: list[str] = []
        self._sections: list[str] = []  # rendered HTML, in insertion order

    @property
    def path(self) -> Path:
        """Where :meth:`write` puts the page."""
        return self.out_dir / self.FILENAME

    # ---- content

    @staticmethod
    def _heading(heading: str) -> str:
        return f"<h2>{html.escape(str(heading))}</h2>\n" if heading else ""

    def add_warning(self, text: str) -> None:
        """Show ``text`` prominently at the top of the page (e.g. "student collapsed")."""
        self._warnings.append(str(text))

    def add_text(self, heading: str, text: str) -> None:
        """A section of plain text; line breaks are kept, markup is escaped."""
        body = f'<div class="text">{html.escape(str(text))}</div>'
        self._sections.append(f"<section>\n{self._heading(heading)}{body}\n</section>")

    def add_table(
        self,
        heading: str,
        rows: Sequence[Mapping[str, Any]],
        columns: Sequence[str] | None = None,
    ) -> None:
        """A table with one row per dict. Floats show 4 significant digits.

        ``columns`` picks and orders the columns; by default every key, in order of first
        appearance. A row that lacks a column gets an empty cell.
        """
        if columns is None:
            seen: dict[str, None] = {}
            for row in rows:
                for k in row:
                    seen.setdefault(k, None)
            columns = list(seen)
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        lines = [f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>"]
        for row in rows:
            cells = []
            for c in columns:
                text, numeric = _format_cell(row.get(c))
                cls = ' class="num"' if numeric else ""
                cells.append(f"<td{cls}>{html.escape(text)}</td>")
            lines.append(f"<tr>{''.join(cells)}</tr>")
        lines.append("</tbody>\n</table>")
        body = "\n".join(lines)
        self._sections.append(f"<section>\n{self._heading(heading)}{body}\n</section>")

    def _relative_src(self, png_path: str | os.PathLike[str]) -> str:
        """``png_path`` as a URL relative to ``out_dir``.

        An absolute path, or a relative path that (from the current directory) lies inside
        ``out_dir``, is made relative to ``out_dir``; any other relative path is taken to be
        relative to ``out_dir`` already.
        """
        p = Path(png_path)
        out = self.out_dir.resolve()
        if p.is_absolute():
            try:
                rel = os.path.relpath(p.resolve(), out)
            except ValueError:  # another drive on Windows: no relative path exists
                return p.resolve().as_uri()
        else:
            resolved = p.resolve()
            rel = str(resolved.relative_to(out)) if resolved.is_relative_to(out) else str(p)
        return quote(Path(rel).as_posix(), safe="/")

    def add_image(self, heading: str, png_path: str | os.PathLike[str], caption: str = "") -> None:
        """An image (referenced, not embedded), shown with pixelated upscaling."""
        src = html.escape(self._relative_src(png_path))
        alt = html.escape(str(caption or heading or Path(png_path).name))
        cap = f"\n<figcaption>{html.escape(str(caption))}</figcaption>" if caption else ""
        body = f'<figure>\n<img src="{src}" alt="{alt}">{cap}\n</figure>'
        self._sections.append(f"<section>\n{self._heading(heading)}{body}\n</section>")

    # ---- output

    def to_html(self) -> str:
        """The whole page as a string."""
        title = html.escape(self.title)
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{title}</title>",
            f"<style>\n{_CSS}\n</style>",
            "</head>",
            "<body>",
            f"<h1>{title}</h1>",
        ]
        parts += [
            f'<div class="warning" role="alert">&#9888; {html.escape(w)}</div>'
            for w in self._warnings
        ]
        parts += self._sections
        parts += ["</body>", "</html>", ""]
        return "\n".join(parts)

    def write(self) -> Path:
        """Write ``<out_dir>/report.html`` atomically (folders created); return its path."""
        return atomic_write_text(self.path, self.to_html())
