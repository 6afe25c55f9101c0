"""Per-token heat-map rendering of a signal as a self-contained HTML fragment (notebooks, reports).

Inline styles only (no JS, no external CSS) so the fragment survives being pasted into emails, Jupyter output
cells or static reports; pure Python, no numpy or torch.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

__all__ = ["HtmlFragment", "render_html"]

_WHITE = (255, 255, 255)
_RED = (214, 39, 40)
_BLUE = (31, 119, 180)
_CMAPS = ("red", "blue", "diverging")


class HtmlFragment(str):
    """A str of HTML that Jupyter renders as HTML rather than printing its source."""

    def _repr_html_(self) -> str:
        return self


def _mix(end: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    """Linear blend from white (t=0) to `end` (t=1)."""
    r, g, b = (round(w + (e - w) * t) for w, e in zip(_WHITE, end, strict=True))
    return r, g, b


def _colour(t: float, cmap: str) -> tuple[int, int, int]:
    """RGB of a position t in [0, 1] along the colour map."""
    if cmap == "red":
        return _mix(_RED, t)
    if cmap == "blue":
        return _mix(_BLUE, t)
    # diverging: blue at 0, white at 0.5, red at 1
    if t < 0.5:
        return _mix(_BLUE, (0.5 - t) * 2.0)
    return _mix(_RED, (t - 0.5) * 2.0)


def _position(value: float, low: float, high: float) -> float:
    """Where value lies between low and high, clamped to [0, 1]; 0.5 when low == high (no divide by zero)."""
    if high == low:
        return 0.5 if value == low else (0.0 if value < low else 1.0)
    return min(max((value - low) / (high - low), 0.0), 1.0)


def _css(rgb: tuple[int, int, int]) -> str:
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})"


def _token_html(token: str) -> str:
    """Escaped token text with newlines kept visible as a return arrow plus a real line break."""
    return html.escape(token).replace("\r\n", "\n").replace("\n", "\u21b5<br>")


def render_html(
    tokens: Sequence[str],
    values: Sequence[float | None],
    *,
    title: str = "",
    low: float | None = None,
    high: float | None = None,
    cmap: str = "red",
    signal: str = "",
) -> HtmlFragment:
    """Render tokens as <span>s whose background intensity encodes their value (linear from low to high).

    low/high default to the min/max of the finite values; None (and NaN/inf) values are left uncoloured.
    cmap: "red" (white->red), "blue" (white->blue) or "diverging" (blue->white->red, white at (low+high)/2).
    Each span's tooltip reads "{signal}: {value:.3f}" (just the value when signal is empty).
    """
    if len(tokens) != len(values):
        raise ValueError(f"tokens and values differ in length: {len(tokens)} != {len(values)}")
    if cmap not in _CMAPS:
        raise ValueError(f"cmap must be one of {_CMAPS}, got {cmap!r}")
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    lo = float(low) if low is not None else (min(finite) if finite else 0.0)
    hi = float(high) if high is not None else (max(finite) if finite else 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("low and high must be finite")
    if hi < lo:
        raise ValueError(f"high ({hi}) must be >= low ({lo})")
    prefix = f"{signal}: " if signal else ""

    spans: list[str] = []
    for i, (token, value) in enumerate(zip(tokens, values, strict=True)):
        style = "white-space:pre-wrap;border-radius:2px;padding:0 1px"
        if value is None or not math.isfinite(float(value)):
            tip = f"{prefix}n/a"
        else:
            v = float(value)
            tip = f"{prefix}{v:.3f}"
            style += f";background-color:{_css(_colour(_position(v, lo, hi), cmap))}"
        spans.append(
            f'<span data-i="{i}" title="{html.escape(tip, quote=True)}" style="{style}">{_token_html(token)}</span>'
        )

    swatch = "display:inline-block;width:1em;height:0.8em;vertical-align:middle;border:1px solid #ccc"
    legend = (
        '<div style="font-size:0.8em;color:#555;margin-top:0.4em">'
        f"{html.escape(signal) + ' ' if signal else ''}"
        f'low <span style="{swatch};background-color:{_css(_colour(0.0, cmap))}"></span> {lo:.3f}'
        f' &nbsp; high <span style="{swatch};background-color:{_css(_colour(1.0, cmap))}"></span> {hi:.3f}'
        "</div>"
    )
    heading = f'<div style="font-weight:bold;margin-bottom:0.3em">{html.escape(title)}</div>' if title else ""
    body = f'<div style="font-family:monospace;line-height:1.8;color:#000">{"".join(spans)}</div>'
    return HtmlFragment(f'<div style="font-family:sans-serif">{heading}{body}{legend}</div>')
