"""One look for every figure archlab writes, and figures as PNG bytes (so they can be written atomically).
matplotlib is imported inside the functions: it is slow to import and only plotting needs it."""
from __future__ import annotations

import io

STYLE = {"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 8.5}
DPI = 120


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed) with STYLE applied."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt


def png_bytes(figure) -> bytes:
    """The figure laid out tight and rendered as PNG at DPI; the figure is closed either way."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=DPI)
    finally:
        plt.close(figure)
    return buffer.getvalue()
