"""Pictures and pages: the alignment and attention figures (matplotlib, Agg) and index.html.

Figures are drawn on `matplotlib.figure.Figure` objects (no pyplot, so no global backend or
figure registry is touched) with constrained layout, and saved at a fixed size: a figure of
`alignment_figure_size(...)` inches at `DPI` is exactly that many pixels.
"""

from __future__ import annotations

import html
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .loading import InspectError

DPI = 150
DEFAULT_SIZE = (640, 480)  # the canvas when an image's meta has no width/height
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SPECIAL_COLOR = "#777777"
_LABEL_COLUMN = 2.0  # inches right of the image for the region labels


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise InspectError(
            "the inspector draws with matplotlib, which is not installed: "
            "pip install 'uniter-fast[inspect]' (or pip install 'matplotlib>=3.7')"
        ) from None
    return matplotlib


def _figure(size: tuple[float, float]):
    _matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def region_colors(k: int) -> list:
    """k colours that stay apart on white and on photos: tab10, Dark2, then hues."""
    mpl = _matplotlib()
    base = list(mpl.colormaps["tab10"].colors) + list(mpl.colormaps["Dark2"].colors)
    if k <= len(base):
        return base[:k]
    extra = mpl.colormaps["hsv"](np.linspace(0, 1, k - len(base), endpoint=False))
    return base + [tuple(c[:3]) for c in extra]


def _is_special(token: str) -> bool:
    return token.startswith("[") and token.endswith("]")


def _is_tag(token: str) -> bool:
    """VCR's object tags, `<person p>` (`loading.token_names`)."""
    return token.startswith("<person ") and token.endswith(">")


def _style_labels(labels, texts: Sequence[str]) -> None:
    """[CLS]/[SEP]/... grey italic, object tags bold."""
    for label, text in zip(labels, texts, strict=True):
        if _is_special(text):
            label.set_color(_SPECIAL_COLOR)
            label.set_style("italic")
        elif _is_tag(text):
            label.set_fontweight("bold")


def _clip(x: float, lo: float, hi: float) -> float:
    return float(min(max(x, lo), hi))


# --- the image ---------------------------------------------------------------------------------


@dataclass
class Canvas:
    """What the right panel draws on: a photo (H, W, 3) or None for a blank canvas."""

    width: int
    height: int
    pixels: np.ndarray | None = None
    source: str = ""


def find_image(images: str | os.PathLike | None, key: str, meta: dict) -> Path | None:
    """`images/<meta file_name>`, for VCR `images/<meta image_id>` (the frame's img_fn, e.g.
    `lsmdc_x/x_00.01@0.jpg`), or `images/<key>`, with a .jpg/.jpeg/.png suffix (or as named)."""
    if images is None:
        return None
    root = Path(images)
    fields = (
        ("file_name", "file", "image_id") if meta.get("task") == "vcr" else ("file_name", "file")
    )
    named = [str(meta[k]) for k in fields if meta.get(k)]
    # Names inside `images` only.
    stems = [n for n in named if not Path(n).is_absolute() and ".." not in Path(n).parts]
    stems.append(key)
    for stem in stems:
        direct = root / stem
        if direct.suffix.lower() in IMAGE_SUFFIXES and direct.is_file():
            return direct
        for suffix in IMAGE_SUFFIXES:
            path = root / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def load_canvas(images: str | os.PathLike | None, key: str, meta: dict) -> Canvas:
    """The pair's photo when `images` holds it, else a blank canvas of meta's width x height."""
    path = find_image(images, key, meta)
    if path is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise InspectError(f"image for sample {key!r}: cannot read {path} ({e})") from None
        return Canvas(pixels.shape[1], pixels.shape[0], pixels, str(path))
    width, height = DEFAULT_SIZE
    try:
        w, h = int(meta.get("width", 0)), int(meta.get("height", 0))
    except (TypeError, ValueError):
        w = h = 0
    if w > 0 and h > 0:
        width, height = w, h
    return Canvas(width, height)


# --- the alignment figure ----------------------------------------------------------------------


def _heat_width(num_regions: int) -> float:
    return _clip(0.12 * num_regions + 3.2, 7.0, 15.0)


def alignment_figure_size(
    num_text: int, num_regions: int, width: int, height: int
) -> tuple[float, float]:
    """(width, height) in inches of the figure for a plan of num_text x num_regions and an image
    of width x height pixels."""
    heat_w = _heat_width(num_regions)
    panel_h = _clip(0.17 * num_text + 2.6, 5.5, 12.0)
    img_w = _clip(panel_h * width / max(height, 1), 4.0, 9.5)
    return round(heat_w + img_w + _LABEL_COLUMN, 2), round(panel_h + 1.3, 2)


def figure_pixels(size: tuple[float, float]) -> tuple[int, int]:
    """The PNG's (width, height) in pixels for a figure of `size` inches saved at DPI (Agg
    truncates, as here)."""
    return int(size[0] * DPI), int(size[1] * DPI)


@dataclass
class AlignmentView:
    """Everything the alignment figure draws, independent of how it was computed.

    plan: (m, n) text rows by regions; tokens: the m row labels; boxes: (n, 4) normalised
    x1, y1, x2, y2; title: the figure's heading (key, caption); stats: the heat map's title.
    region_labels: the n column labels (default `r<j>`; VCR's ground-truth boxes carry their
    object, `r0 person 1`); ground_truth: how many of the first regions are ground-truth boxes
    (VCR), the rest detected; 0 when the regions are all of one kind.
    """

    plan: np.ndarray
    tokens: list[str]
    boxes: np.ndarray
    title: str
    stats: str
    canvas: Canvas
    max_boxes: int = 12
    note: str = ""
    region_labels: list[str] | None = None
    ground_truth: int = 0
    shown: list[int] = field(default_factory=list)  # filled by draw: the regions drawn

    def labels(self) -> list[str]:
        n = self.plan.shape[1]
        if self.region_labels is None:
            return [f"r{j}" for j in range(n)]
        if len(self.region_labels) != n:
            raise ValueError(f"{len(self.region_labels)} region labels for {n} regions")
        return list(self.region_labels)

    def ranked_regions(self) -> list[int]:
        """The regions drawn: the top `max_boxes` by the mass sent to their best text row."""
        peak = self.plan.max(axis=0)
        order = np.argsort(-peak, kind="stable")
        return [int(j) for j in order[: self.max_boxes]]


_BOX_LABEL_CHARS = 36


def _box_label(region: str, token: str) -> str:
    """`r3 -> word` (an arrow), cut to _BOX_LABEL_CHARS with an ellipsis."""
    text = f"{region} \u2192 {token}"
    return text if len(text) <= _BOX_LABEL_CHARS else text[: _BOX_LABEL_CHARS - 1] + "\u2026"


def draw_alignment(view: AlignmentView, path: str | os.PathLike) -> tuple[int, int]:
    """Write the two-panel PNG; returns its (width, height) in pixels."""
    _matplotlib()
    from matplotlib.patches import Rectangle

    m, n = view.plan.shape
    canvas = view.canvas
    size = alignment_figure_size(m, n, canvas.width, canvas.height)
    fig = _figure(size)
    heat_w = _heat_width(n)
    grid = fig.add_gridspec(1, 2, width_ratios=[heat_w, size[0] - heat_w])
    ax_plan, ax_img = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])

    shown = view.ranked_regions()
    view.shown = shown
    colors = dict(zip(shown, region_colors(len(shown)), strict=True))
    best = view.plan.argmax(axis=0)
    region_labels = view.labels()
    gt = view.ground_truth if 0 < view.ground_truth < n else 0

    # Left: the plan.
    im = ax_plan.imshow(view.plan, aspect="auto", cmap="viridis", interpolation="nearest")
    ax_plan.set_yticks(range(m))
    ax_plan.set_yticklabels(view.tokens, fontsize=_clip(12 - m / 8, 6.5, 9))
    _style_labels(ax_plan.get_yticklabels(), view.tokens)
    ax_plan.set_xticks(range(n))
    ax_plan.set_xticklabels(region_labels, rotation=90, fontsize=_clip(10 - n / 12, 5.5, 8))
    for j, label in enumerate(ax_plan.get_xticklabels()):
        if j in colors:
            label.set_color(colors[j])
            label.set_fontweight("bold")
        else:
            label.set_color(_SPECIAL_COLOR)
    for j in shown:  # the cell each drawn region is labelled with
        ax_plan.add_patch(
            Rectangle((j - 0.5, best[j] - 0.5), 1, 1, fill=False, edgecolor=colors[j], linewidth=2)
        )
    if gt:  # ground-truth boxes | detected boxes
        ax_plan.axvline(gt - 0.5, color="white", linewidth=1.5, linestyle="--")
    kinds = f"{gt} ground-truth | {n - gt} detected" if gt else f"{n}"
    ax_plan.set_xlabel(f"regions ({kinds}; coloured: the {len(shown)} boxes drawn on the right)")
    ax_plan.set_ylabel(f"text tokens ({m})")
    ax_plan.set_title(view.stats, fontsize=11)
    bar = fig.colorbar(im, ax=ax_plan, fraction=_clip(0.3 / heat_w, 0.02, 0.05), pad=0.01)
    bar.set_label("transport plan T (mass)", fontsize=9)
    bar.ax.tick_params(labelsize=8)

    # Right: the image and the boxes, weakest first so that the strongest is drawn on top.
    W, H = canvas.width, canvas.height
    if canvas.pixels is not None:
        ax_img.imshow(canvas.pixels, extent=(0, W, H, 0), interpolation="antialiased")
        where = Path(canvas.source).name
    else:
        ax_img.add_patch(Rectangle((0, 0), W, H, facecolor="#f4f4f4", edgecolor="#999999"))
        where = "no image file: blank canvas"
    ax_img.set_xlim(0, W)
    ax_img.set_ylim(H, 0)
    ax_img.set_aspect("equal")
    # Labels in a column right of the image, top to bottom in the order of the boxes' centres,
    # each joined to its box by a line: they never cover each other or the boxes.
    k = len(shown)
    texts = {j: _box_label(region_labels[j], view.tokens[best[j]]) for j in shown}
    # Small enough that the longest label fits the column (DejaVu Sans: ~0.6 em a character).
    longest = max((len(t) for t in texts.values()), default=1)
    label_size = _clip(min(10 - k / 6, 0.9 * _LABEL_COLUMN * 72 / (0.6 * longest)), 5.5, 9)
    centre_y = {j: float(view.boxes[j, 1] + view.boxes[j, 3]) / 2 for j in shown}
    slots = {j: r for r, j in enumerate(sorted(shown, key=lambda j: (centre_y[j], j)))}
    for j in reversed(shown):
        x1, y1, x2, y2 = (view.boxes[j] * np.array([W, H, W, H])).tolist()
        c = colors[j]
        # Ground-truth boxes solid, detected ones dashed.
        style = "--" if gt and j >= gt else "-"
        ax_img.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, lw=2, linestyle=style)
        )
        ax_img.annotate(
            texts[j],
            xy=(x2, (y1 + y2) / 2),
            xycoords="data",
            xytext=(1.04, 1 - (slots[j] + 0.5) / k),
            textcoords="axes fraction",
            va="center",
            ha="left",
            color="white",
            fontsize=label_size,
            annotation_clip=False,
            bbox={"facecolor": c, "edgecolor": "none", "alpha": 0.9, "pad": 2},
            arrowprops={"arrowstyle": "-", "color": c, "lw": 1, "shrinkA": 0, "shrinkB": 0},
        )
    solid = "; solid: ground truth, dashed: detected" if gt else ""
    ax_img.set_title(
        f"{where} ({W}x{H})\ntop {k} of {n} regions by mass on their best token{solid}",
        fontsize=9,
    )
    ax_img.tick_params(labelsize=7)

    wrap = max(40, int(size[0] * 10))
    heading = "\n".join(textwrap.wrap(view.title, wrap)[:6])
    if view.note:
        heading += "\n" + view.note
    fig.suptitle(heading, fontsize=11, ha="center")
    fig.savefig(path, dpi=DPI, format="png")
    return figure_pixels(size)


# --- the attention figure ----------------------------------------------------------------------


def _attention_side(length: int) -> float:
    return _clip(0.11 * length + 3.0, 7.0, 20.0)


def attention_figure_size(length: int) -> tuple[float, float]:
    """(width, height) in inches of the attention map of a sequence of `length` positions."""
    side = _attention_side(length)
    return round(side + 1.2, 2), round(side + 0.8, 2)


def draw_attention(
    probs: np.ndarray,
    labels: Sequence[str],
    num_text: int,
    title: str,
    path: str | os.PathLike,
    *,
    ground_truth: int = 0,
) -> tuple[int, int]:
    """Write an (L, L) attention map: query rows, key columns, text then regions; a line
    separates the text ([CLS] ... [SEP]) from the regions, and a dashed one VCR's `ground_truth`
    boxes from the detected ones. Returns (width, height) in pixels."""
    length = probs.shape[0]
    size = attention_figure_size(length)
    fig = _figure(size)
    ax = fig.add_subplot()
    im = ax.imshow(probs, cmap="viridis", interpolation="nearest", vmin=0)
    # About two thirds of a row's height (the axes take the side less the labels' margin).
    fontsize = _clip(0.65 * 72 * (_attention_side(length) - 1.5) / max(length, 1), 3.5, 8)
    ax.set_xticks(range(length))
    ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(length))
    ax.set_yticklabels(labels, fontsize=fontsize)
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        _style_labels(tick_labels, labels)
    if 0 < num_text < length:
        for line in (ax.axhline, ax.axvline):
            line(num_text - 0.5, color="white", linewidth=1.5)
    regions = length - num_text
    gt = ground_truth if 0 < ground_truth < regions else 0
    if gt:
        for line in (ax.axhline, ax.axvline):
            line(num_text + gt - 0.5, color="white", linewidth=1, linestyle="--")
    kinds = f"{gt} ground-truth | {regions - gt} detected" if gt else f"{regions}"
    ax.set_xlabel(f"keys: text ({num_text}) | regions ({kinds})")
    ax.set_ylabel("queries")
    bar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01)
    bar.set_label("attention probability", fontsize=9)
    ax.set_title("\n".join(textwrap.wrap(title, max(40, int(size[0] * 10)))[:6]), fontsize=10)
    fig.savefig(path, dpi=DPI, format="png")
    return figure_pixels(size)


# --- the index page ----------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; }
.meta { color: #555; font-size: 0.9em; }
.pair { border-top: 1px solid #ccc; padding: 1em 0; }
.pair h2 { font-size: 1.1em; margin: 0 0 0.3em 0; font-family: monospace; }
.caption { margin: 0.3em 0; }
table.stats { border-collapse: collapse; margin: 0.3em 0; }
table.stats td { padding: 0.1em 1em 0.1em 0; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
"""


@dataclass
class IndexEntry:
    png: str  # relative to the page
    key: str
    caption: str
    stats: list[tuple[str, str]]


def write_index(
    path: str | os.PathLike, title: str, meta: list[tuple[str, str]], entries: list[IndexEntry]
) -> None:
    """A self-contained HTML page (inline style, relative image paths, no scripts)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        '<table class="meta">',
        *(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in meta),
        "</table>",
    ]
    for rank, entry in enumerate(entries, 1):
        stats = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in entry.stats)
        parts += [
            '<div class="pair">',
            f"<h2>{rank}. {esc(entry.key)}</h2>",
            f'<p class="caption">{esc(entry.caption)}</p>',
            f'<table class="stats">{stats}</table>',
            f'<a href="{esc(entry.png)}"><img src="{esc(entry.png)}" alt="{esc(entry.key)}" '
            'loading="lazy"></a>',
            "</div>",
        ]
    parts.append("</body></html>")
    Path(path).write_text("\n".join(parts) + "\n", encoding="utf-8")
