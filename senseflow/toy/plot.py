"""Line plots of the metrics over distillation iterations: matplotlib when installed, else drawn with PIL.

A panel is ``{"title", "ylabel", "series": [{"label", "x", "y"}], "hlines": [{"label", "y"}]}``; series
are the students, horizontal dashed lines the teacher baselines.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
HLINE_COLORS = [(60, 60, 60), (150, 150, 150), (188, 189, 34)]


def plot_panels(panels: list[dict], path: Path, xlabel: str = "distillation iteration") -> str:
    """Write the panels side by side to ``path`` (PNG); returns the backend used."""
    if importlib.util.find_spec("matplotlib") is not None:
        try:
            _plot_matplotlib(panels, path, xlabel)
            return "matplotlib"
        except Exception as err:  # a broken matplotlib install must not lose the report
            logger.warning("matplotlib failed (%s); drawing the plot with PIL", err)
    _plot_pil(panels, path, xlabel)
    return "pil"


def _hex(c: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c)


def _plot_matplotlib(panels: list[dict], path: Path, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for i, s in enumerate(panel["series"]):
            ax.plot(s["x"], s["y"], marker="o", color=_hex(COLORS[i % len(COLORS)]), label=s["label"])
        for i, h in enumerate(panel.get("hlines", [])):
            ax.axhline(
                h["y"], linestyle="--", color=_hex(HLINE_COLORS[i % len(HLINE_COLORS)]), label=h["label"]
            )
        ax.set_title(panel["title"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


def _plot_pil(panels: list[dict], path: Path, xlabel: str) -> None:
    from PIL import Image, ImageDraw

    pw, ph = 560, 440
    left, right, top, bottom = 60, 16, 30, 150
    img = Image.new("RGB", (pw * len(panels), ph), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for p, panel in enumerate(panels):
        ox = p * pw
        x0, x1, y0, y1 = ox + left, ox + pw - right, top, ph - bottom
        xs = [x for s in panel["series"] for x in s["x"]]
        ys = [y for s in panel["series"] for y in s["y"]] + [h["y"] for h in panel.get("hlines", [])]
        ys = [y for y in ys if math.isfinite(y)]
        xlo, xhi = (min(xs), max(xs)) if xs else (0.0, 1.0)
        ylo, yhi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if xhi <= xlo:
            xhi = xlo + 1
        if yhi <= ylo:
            yhi = ylo + 1
        pad = 0.06 * (yhi - ylo)
        ylo, yhi = ylo - pad, yhi + pad

        def px(x, xlo=xlo, xhi=xhi, x0=x0, x1=x1):
            return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

        def py(y, ylo=ylo, yhi=yhi, y0=y0, y1=y1):
            return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        draw.text((x0, 8), panel["title"], fill=(0, 0, 0))
        for t in _nice_ticks(ylo, yhi):
            draw.line([(x0, py(t)), (x1, py(t))], fill=(230, 230, 230))
            draw.text((ox + 4, py(t) - 6), _fmt(t), fill=(0, 0, 0))
        for t in _nice_ticks(xlo, xhi):
            draw.line([(px(t), y1), (px(t), y1 + 4)], fill=(0, 0, 0))
            draw.text((px(t) - 8, y1 + 6), _fmt(t), fill=(0, 0, 0))
        draw.text(((x0 + x1) // 2 - 50, y1 + 20), xlabel, fill=(0, 0, 0))
        legend = []
        for i, h in enumerate(panel.get("hlines", [])):
            color = HLINE_COLORS[i % len(HLINE_COLORS)]
            yy = py(h["y"])
            for xa in range(int(x0), int(x1), 12):
                draw.line([(xa, yy), (min(xa + 6, x1), yy)], fill=color, width=2)
            legend.append((h["label"], color, True))
        for i, s in enumerate(panel["series"]):
            color = COLORS[i % len(COLORS)]
            pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if math.isfinite(y)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for qx, qy in pts:
                draw.ellipse([qx - 3, qy - 3, qx + 3, qy + 3], fill=color)
            legend.append((s["label"], color, False))
        ly = y1 + 40
        for label, color, dashed in legend:
            if dashed:
                draw.line([(x0, ly + 6), (x0 + 8, ly + 6)], fill=color, width=2)
                draw.line([(x0 + 14, ly + 6), (x0 + 22, ly + 6)], fill=color, width=2)
            else:
                draw.line([(x0, ly + 6), (x0 + 22, ly + 6)], fill=color, width=2)
            draw.text((x0 + 30, ly), label, fill=(0, 0, 0))
            ly += 14
    img.save(path)
