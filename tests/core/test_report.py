"""Behavioural tests for fewstep.core.report and fewstep.core.io (CPU, fast)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from fewstep.core.report import (
    PALETTE,
    Report,
    image_grid,
    line_plot,
    save_image_grid,
    save_line_plot,
)

# --------------------------------------------------------------------------- image_grid


@pytest.mark.parametrize(
    ("n", "c", "nrow", "pad", "upscale", "rows", "cols"),
    [
        (10, 1, 4, 2, 4, 3, 4),  # 3 rows: 4 + 4 + 2
        (9, 3, None, 1, 1, 3, 3),  # default nrow = ceil(sqrt(9)) = 3
        (5, 1, None, 0, 2, 2, 3),  # ceil(sqrt(5)) = 3 per row
        (3, 3, 8, 1, 3, 1, 3),  # nrow larger than N: width shrinks to N tiles
        (1, 1, None, 5, 4, 1, 1),  # one tile: no padding at all
    ],
)
def test_grid_size(n, c, nrow, pad, upscale, rows, cols):
    h, w = 8, 6
    img = image_grid(torch.zeros(n, c, h, w), nrow=nrow, pad=pad, upscale=upscale)
    assert img.size == (
        cols * w * upscale + (cols - 1) * pad,
        rows * h * upscale + (rows - 1) * pad,
    )
    assert img.mode == ("L" if c == 1 else "RGB")


def test_grid_pixel_values_and_layout():
    # tile 0 all -1 (-> 0), tile 1 all +1 (-> 255), tile 2 all 0 (-> 128), tile 3 beyond range
    images = torch.stack([torch.full((1, 8, 8), v) for v in (-1.0, 1.0, 0.0, 7.0)])
    pad, up = 2, 4
    arr = np.asarray(image_grid(images, nrow=2, pad=pad, upscale=up, pad_value=50))
    t = 8 * up
    assert arr.shape == (2 * t + pad, 2 * t + pad)
    assert (arr[:t, :t] == 0).all()
    assert (arr[:t, t + pad :] == 255).all()
    assert (arr[t + pad :, :t] == 128).all()
    assert (arr[t + pad :, t + pad :] == 255).all()  # clamped to the top of value_range
    assert (arr[t : t + pad, :] == 50).all() and (arr[:, t : t + pad] == 50).all()


def test_grid_upscale_is_nearest_neighbour_and_rgb_channels_kept():
    x = torch.tensor([[[-1.0, 1.0], [1.0, -1.0]], [[1.0] * 2] * 2, [[-1.0] * 2] * 2])[None]
    arr = np.asarray(image_grid(x, upscale=3, value_range=(-1, 1)))
    assert arr.shape == (6, 6, 3)
    assert (arr[:3, :3, 0] == 0).all() and (arr[:3, 3:, 0] == 255).all()
    assert (arr[3:, :3, 0] == 255).all() and (arr[3:, 3:, 0] == 0).all()
    assert (arr[..., 1] == 255).all() and (arr[..., 2] == 0).all()


def test_grid_value_range_and_non_finite():
    x = torch.tensor([0.0, 0.5, 1.0, float("nan"), float("inf"), -float("inf")]).view(1, 1, 1, 6)
    arr = np.asarray(image_grid(x, value_range=(0, 1)))
    assert arr.tolist() == [[0, 128, 255, 0, 255, 0]]


def test_grid_last_row_padded_with_pad_value():
    arr = np.asarray(image_grid(torch.ones(3, 1, 4, 4), nrow=2, pad=0, pad_value=9))
    assert (arr[4:, 4:] == 9).all() and (arr[4:, :4] == 255).all()


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (2, 2, 8, 8), (2, 4, 8, 8), (0, 1, 8, 8)])
def test_grid_bad_shape_names_expected_shape(shape):
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        image_grid(torch.zeros(shape))


def test_grid_bad_arguments():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="upscale"):
        image_grid(x, upscale=0)
    with pytest.raises(ValueError, match="value_range"):
        image_grid(x, value_range=(1, 1))
    with pytest.raises(ValueError, match="nrow"):
        image_grid(x, nrow=0)


def test_save_image_grid_writes_png(tmp_path):
    path = save_image_grid(tmp_path / "sub" / "grid.png", torch.zeros(4, 3, 8, 8), upscale=2)
    assert path == tmp_path / "sub" / "grid.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (2 * 16 + 1, 2 * 16 + 1)
    assert os.listdir(path.parent) == ["grid.png"]


# --------------------------------------------------------------------------- line_plot


def _non_background(img: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    arr = np.asarray(img.convert("RGB").crop(box)).reshape(-1, 3)
    return arr[(arr != 255).any(axis=1)]


def _has_colour(img: Image.Image, colour: tuple[int, int, int]) -> bool:
    arr = np.asarray(img.convert("RGB"))
    return bool((arr == np.array(colour)).all(axis=-1).any())


def test_line_plot_size_and_draws_series():
    series = {
        "loss": [(i, math.exp(-i / 10)) for i in range(50)],
        "ema": [(i, 0.5 + 0.1 * math.sin(i)) for i in range(50)],
    }
    img = line_plot(series, "losses", "step", "loss", width=500, height=300)
    assert img.size == (500, 300) and img.mode == "RGB"
    # the centre of the canvas (inside the axes) has ink, and both series colours appear
    assert len(_non_background(img, (100, 60, 350, 240))) > 100
    assert _has_colour(img, PALETTE[0]) and _has_colour(img, PALETTE[1])


def test_line_plot_log_y_and_default_size():
    img = line_plot(
        {"fd": [(1, 100.0), (2, 10.0), (4, 1.0), (8, 0.01)]}, "FD", "NFE", "FD", log_y=True
    )
    assert img.size == (640, 360)
    assert _has_colour(img, PALETTE[0])


def test_line_plot_tolerates_nan_inf_single_and_empty():
    series = {
        "bad": [(0, 1.0), (1, float("nan")), (2, float("inf")), (3, 0.5), (float("nan"), 2.0)],
        "single": [(1.5, 0.7)],
        "empty": [],
    }
    img = line_plot(series, "t", "x", "y")
    assert img.size == (640, 360)
    assert _has_colour(img, PALETTE[0]) and _has_colour(img, PALETTE[1])


def test_line_plot_all_points_non_finite_or_non_positive_for_log():
    img = line_plot({"neg": [(0, -1.0), (1, 0.0)]}, "t", "x", "y", log_y=True)
    assert img.size == (640, 360)


def test_line_plot_only_single_point_and_constant_series():
    img = line_plot({"one": [(3, 7)]}, "t", "x", "y", width=300, height=200)
    assert img.size == (300, 200) and _has_colour(img, PALETTE[0])
    img = line_plot({"flat": [(i, 2.0) for i in range(10)]}, "t", "x", "y")
    assert _has_colour(img, PALETTE[0])


def test_line_plot_empty_draws_no_data():
    empty = line_plot({}, "t", "x", "y", width=400, height=250)
    empty_series = line_plot({"a": []}, "t", "x", "y", width=400, height=250)
    assert empty.size == (400, 250) and empty_series.size == (400, 250)
    # the "no data" text is drawn in the middle of the axes
    assert len(_non_background(empty, (150, 100, 250, 150))) > 0


def test_line_plot_rejects_bad_points():
    with pytest.raises(ValueError, match="series 'a'"):
        line_plot({"a": [(1, 2, 3)]}, "t", "x", "y")
    with pytest.raises(ValueError, match="width"):
        line_plot({"a": [(1, 2)]}, "t", "x", "y", width=10)


def test_save_line_plot(tmp_path):
    path = save_line_plot(tmp_path / "loss.png", {"a": [(0, 1), (1, 0)]}, title="t", height=200)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (640, 200)


# --------------------------------------------------------------------------- Report


def test_report_html(tmp_path):
    out = tmp_path / "run"
    grid = save_image_grid(out / "samples" / "grid 1.png", torch.zeros(2, 1, 8, 8), upscale=4)
    rep = Report(out, 'DMD2 <digits> & "friends"')
    rep.add_text("Setup", "teacher: 50 steps\n<script>alert(1)</script>")
    rep.add_table(
        "Quality",
        [
            {"model": "teacher", "NFE": 50, "FD": 1.23456789},
            {"model": "student", "NFE": 1, "FD": 0.000123456, "extra": torch.tensor(2.5)},
        ],
    )
    rep.add_image("Samples", grid, caption="student <1 step>")
    rep.add_image("Loss", "loss.png")
    rep.add_warning("Student collapsed: diversity 0.001 < 0.05")
    path = rep.write()

    assert path == out / "report.html" == rep.path
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>DMD2 &lt;digits&gt; &amp; &quot;friends&quot;</title>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    # floats to 4 significant digits, ints as they are, missing cells empty
    for cell in (">1.235<", ">0.0001235<", ">50<", ">2.5<", "<td></td>"):
        assert cell in page
    assert "1.23456789" not in page
    # the warning is in a red box before the first section, whenever it was added
    assert "Student collapsed: diversity 0.001 &lt; 0.05" in page
    assert page.index('class="warning"') < page.index("<section>")
    # images are referenced relative to out_dir, pixelated
    assert '<img src="samples/grid%201.png"' in page
    assert '<img src="loss.png"' in page
    assert "student &lt;1 step&gt;" in page
    assert "image-rendering: pixelated" in page
    # sections in insertion order
    assert page.index("Setup") < page.index("Quality") < page.index("Samples") < page.index("Loss")
    assert sorted(os.listdir(out)) == ["report.html", "samples"]


def test_report_table_columns_and_rewrite(tmp_path):
    rep = Report(tmp_path, "t")
    rep.add_table("T", [{"a": 1.0, "b": float("nan"), "c": "x"}], columns=["c", "a"])
    first = rep.write().read_text()
    assert "<th>c</th><th>a</th>" in first and "<th>b</th>" not in first
    rep.add_text("More", "later")
    second = rep.write().read_text()
    assert "later" in second and "later" not in first
    assert os.listdir(tmp_path) == ["report.html"]


def test_report_image_relative_to_cwd_inside_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rep = Report("runs/a", "t")
    rep.add_image("x", Path("runs/a/plots/p.png"))
    assert '<img src="plots/p.png"' in rep.to_html()


# --------------------------------------------------------------------------- io


def test_atomic_write_json_roundtrip_and_no_temp_files(tmp_path):
    path = tmp_path / "nested" / "state.json"
    obj = {"step": 3, "z": [1.5, None], "a": {"ü": True}}
    assert atomic_write_json(path, obj) == path
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == obj
    assert text.endswith("}\n") and text.index('"step"') < text.index('"z"') < text.index('"a"')
    assert '\n  "step": 3' in text  # indent=2
    assert os.listdir(path.parent) == ["state.json"]


def test_atomic_write_json_failure_keeps_old_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})
    before = path.read_text()
    with pytest.raises(TypeError):
        atomic_write_json(path, {"step": 2, "bad": object()})
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_cleans_temp_on_write_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_text_and_bytes(tmp_path):
    p = atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert p.read_bytes() == "héllo\n".encode()
    atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    with pytest.raises(TypeError):
        atomic_write_bytes(p, "not bytes")  # type: ignore[arg-type]
    if os.name == "posix":  # normal permissions, not mkstemp's 0o600
        umask = os.umask(0)
        os.umask(umask)
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask
