"""Plot the dashboard's main panels from a live Prometheus with Pillow (matplotlib is not a
dependency): time series as lines, per-layer and per-operation panels as bars."""

from __future__ import annotations

import math
import pathlib
import time

from PIL import Image, ImageDraw, ImageFont

from . import live
from .conftest import dashboard_queries

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
PANEL_W, PANEL_H, MARGIN = 560, 300, 48


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _frame(draw: ImageDraw.ImageDraw, box: tuple[int, int], title: str, top: float, unit: str):
    """Axes of one panel; returns the plot area (x0, y0, x1, y1)."""
    x, y = box
    draw.rectangle([x, y, x + PANEL_W - 8, y + PANEL_H - 8], outline="#cccccc")
    draw.text((x + 10, y + 6), title, fill="black", font=_font(15))
    area = (x + MARGIN + 8, y + 34, x + PANEL_W - 24, y + PANEL_H - 58)
    draw.line([area[0], area[1], area[0], area[3], area[2], area[3]], fill="black")
    for fraction in (0, 0.5, 1):
        ty = area[3] - fraction * (area[3] - area[1])
        draw.line([area[0] - 4, ty, area[0], ty], fill="black")
        draw.text((x + 4, ty - 7), f"{top * fraction:.3g}{unit}", fill="#444444", font=_font(11))
    return area


def _legend(draw: ImageDraw.ImageDraw, box: tuple[int, int], names: list[str]) -> None:
    x, y = box[0] + MARGIN, box[1] + PANEL_H - 48
    for index, name in enumerate(names[: len(COLOURS)]):
        column, row = index % 3, index // 3
        lx, ly = x + column * 165, y + row * 14
        draw.rectangle([lx, ly + 3, lx + 10, ly + 11], fill=COLOURS[index])
        draw.text((lx + 14, ly), name[:22], fill="black", font=_font(11))


def _lines(draw, box, title, unit, series: list[tuple[str, list[tuple[float, float]]]], start, end):
    series = [(name, points) for name, points in series if points]
    top = max((v for _, points in series for _, v in points), default=1.0) or 1.0
    area = _frame(draw, box, title, top, unit)
    for index, (_, points) in enumerate(series):
        xy = [
            (
                area[0] + (t - start) / (end - start) * (area[2] - area[0]),
                area[3] - v / top * (area[3] - area[1]),
            )
            for t, v in points
        ]
        if len(xy) > 1:
            draw.line(xy, fill=COLOURS[index % len(COLOURS)], width=2)
    draw.text((area[0], area[3] + 2), "start", fill="#444444", font=_font(11))
    draw.text((area[2] - 60, area[3] + 2), f"+{end - start:.0f} s", fill="#444444", font=_font(11))
    _legend(draw, box, [name for name, _ in series])


def _bars(draw, box, title, unit, bars: list[tuple[str, float]]):
    top = max((v for _, v in bars), default=1.0) or 1.0
    area = _frame(draw, box, title, top, unit)
    width = (area[2] - area[0]) / max(len(bars), 1)
    for index, (label, value) in enumerate(bars):
        x0 = area[0] + index * width + 1
        draw.rectangle(
            [x0, area[3] - value / top * (area[3] - area[1]), x0 + width - 2, area[3]], fill=COLOURS[0]
        )
        if len(bars) <= 8 or index % 5 == 0:
            draw.text((x0, area[3] + 2), label[:12], fill="#444444", font=_font(10))


def _range(api, expr, legend_labels, start, end) -> list[tuple[str, list[tuple[float, float]]]]:
    out = []
    for series in live.query_range(api, expr, start, end, 1):
        name = " ".join(series["metric"].get(label, "") for label in legend_labels).strip() or "all"
        points = [(float(t), float(v)) for t, v in series["values"] if not math.isnan(float(v))]
        out.append((name, points))
    return sorted(out)


def plot_main_panels(api: str, started: float, path: pathlib.Path) -> None:
    """Eight panels of the dashboard over the live run, written as a PNG to path."""
    end = time.time()
    by_title: dict[str, list[str]] = {}
    for title, expr in dashboard_queries(
        {"$model": "smollm2", "$engine": "transformers", "$__rate_interval": "15s"}
    ):
        by_title.setdefault(title, []).append(expr)

    image = Image.new("RGB", (PANEL_W * 2, PANEL_H * 4 + 40), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (10, 10),
        "attnserve dashboard, main panels: a real Prometheus scraping a real attnserve "
        "(transformers, SmolLM2-135M) serving plain and intervened requests",
        fill="black",
        font=_font(14),
    )
    boxes = [(column * PANEL_W + 4, 40 + row * PANEL_H) for row in range(4) for column in range(2)]
    _lines(
        draw,
        boxes[0],
        "Requests finished / s",
        "",
        _range(api, by_title["Requests finished"][0], ["finish_reason"], started, end),
        started,
        end,
    )
    tokens = _range(api, by_title["Tokens"][0], [], started, end)
    tokens = [("prompt", points) for _, points in tokens] + [
        ("generated", points) for _, points in _range(api, by_title["Tokens"][1], [], started, end)
    ]
    _lines(draw, boxes[1], "Tokens / s", "", tokens, started, end)
    _lines(
        draw,
        boxes[2],
        "Time to first token (5 min quantiles)",
        " s",
        _range(api, by_title["Time to first token"][0], ["quantile"], started, end),
        started,
        end,
    )
    _lines(
        draw,
        boxes[3],
        "Inter-token latency (5 min quantiles)",
        " s",
        _range(api, by_title["Inter-token latency"][0], ["quantile"], started, end),
        started,
        end,
    )
    running = _range(api, by_title["Requests running"][0], [], started, end)
    waiting = _range(api, by_title["Requests waiting"][0], [], started, end)
    _lines(
        draw,
        boxes[4],
        "Requests running and waiting",
        "",
        [("running", p) for _, p in running] + [("waiting", p) for _, p in waiting],
        started,
        end,
    )
    applied = live.query(
        api,
        f'sum by (operation) (increase(attnserve_intervention_applied_total{{model="smollm2"}}[{end - started + 5:.0f}s]))',
    )
    _bars(
        draw,
        boxes[5],
        "Interventions applied during the run",
        "",
        sorted((s["metric"]["operation"], float(s["value"][1])) for s in applied),
    )
    for box, title in ((boxes[6], "Sink mass"), (boxes[7], "Normalized entropy")):
        result = live.query(api, by_title[title][0])
        bars = sorted(
            ((s["metric"]["layer"], float(s["value"][1])) for s in result), key=lambda bar: int(bar[0])
        )
        _bars(
            draw,
            box,
            f"{title} per layer (5 min mean), layers 0 to {len(bars) - 1}",
            "",
            [(f"L{layer}", v) for layer, v in bars],
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
