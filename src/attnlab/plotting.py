"""Small matplotlib helpers shared by the plots of compare, vision and the benchmarks."""
from __future__ import annotations


def place_labels(fig, ax, points) -> None:
    """Annotate (x, y, text) points, each label at the first of a few offsets whose box (display coordinates,
    ~6 px a character) overlaps no label placed before it."""
    fig.canvas.draw()
    placed = []
    offsets = [(5, 5), (5, -13), (-5, 5), (-5, -13), (5, 16), (5, -24), (-5, 16), (-5, -24)]
    for x, y, text in points:
        px, py = ax.transData.transform((x, y))
        w, h = 6.0 * len(text), 10.0
        for dx, dy in offsets:
            x0 = px + dx if dx > 0 else px + dx - w
            box = (x0, py + dy, x0 + w, py + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                    ha="left" if dx > 0 else "right")


def save(fig, path, title: str = "", *, dpi: int = 110, title_size: int = 10) -> None:
    """The end of every attnlab plot: a figure title (when given), tight layout, PNG at `dpi`, figure closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
