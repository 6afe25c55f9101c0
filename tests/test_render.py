"""Token heat-map HTML: escaping, one span per token, colour ordering, None handling, notebook display."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from interpgw_client.render import HtmlFragment, render_html

_SPAN = re.compile(r'<span data-i="(\d+)" title="([^"]*)" style="([^"]*)">(.*?)</span>', re.S)
_BG = re.compile(r"background-color:rgb\((\d+),(\d+),(\d+)\)")


def _spans(fragment: str) -> list[tuple[int, str, str, str]]:
    return [(int(i), title, style, text) for i, title, style, text in _SPAN.findall(fragment)]


def _rgb(style: str) -> tuple[int, int, int] | None:
    m = _BG.search(style)
    return None if m is None else (int(m[1]), int(m[2]), int(m[3]))


def test_tokens_escaped() -> None:
    out = render_html(["<script>alert(1)</script>", ' "q" & '], [0.1, 0.2], title="<b>t</b>", signal="x<y")
    assert "<script>" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert "&quot;q&quot; &amp;" in out
    assert "&lt;b&gt;t&lt;/b&gt;" in out
    assert 'title="x&lt;y: 0.100"' in out


def test_newline_kept_visible() -> None:
    out = render_html(["a\nb", "c"], [1.0, 2.0])
    assert _spans(out)[0][3] == "a\u21b5<br>b"


def test_one_span_per_token_in_order() -> None:
    tokens = ["The", " cat", " sat", "\n", " on"]
    out = render_html(tokens, [0.1, 0.5, None, 0.9, 0.3], signal="entropy")
    spans = _spans(out)
    assert [s[0] for s in spans] == list(range(len(tokens)))
    assert out.count("data-i=") == len(tokens)
    assert spans[1][1] == "entropy: 0.500"


@pytest.mark.parametrize("cmap", ["red", "blue"])
def test_sequential_colours_monotone_in_value(cmap: str) -> None:
    values = [0.3, -1.0, 2.5, 0.0, 1.7, 1.0]
    spans = _spans(render_html([f"t{i}" for i in range(len(values))], values, cmap=cmap))
    rgbs = [_rgb(s[2]) for s in spans]
    brightness = {v: sum(rgb) for v, rgb in zip(values, rgbs, strict=True) if rgb is not None}
    ordered = [brightness[v] for v in sorted(values)]
    assert all(a > b for a, b in zip(ordered, ordered[1:], strict=False))  # darker with larger value
    assert brightness[-1.0] == 3 * 255  # low end is white


def test_diverging_centre_white_and_sides() -> None:
    spans = _spans(render_html(["a", "b", "c"], [-1.0, 0.0, 1.0], cmap="diverging"))
    low, mid, high = (_rgb(s[2]) for s in spans)
    assert mid == (255, 255, 255)
    assert low is not None and low[2] > low[0]  # blue side
    assert high is not None and high[0] > high[2]  # red side


def test_explicit_low_high_clamp() -> None:
    spans = _spans(render_html(["a", "b", "c"], [-5.0, 0.5, 5.0], low=0.0, high=1.0))
    assert _rgb(spans[0][2]) == (255, 255, 255)
    assert _rgb(spans[2][2]) == _rgb(render_html(["z"], [1.0], low=0.0, high=1.0))
    legend = render_html(["a"], [0.5], low=0.0, high=1.0).split("low ", 1)[1]
    assert "0.000" in legend and "1.000" in legend


def test_none_and_nan_uncoloured() -> None:
    spans = _spans(render_html(["a", "b", "c"], [None, 1.0, float("nan")], signal="s"))
    assert _rgb(spans[0][2]) is None
    assert _rgb(spans[2][2]) is None
    assert spans[0][1] == "s: n/a"
    assert _rgb(spans[1][2]) is not None


def test_equal_values_no_division_by_zero() -> None:
    spans = _spans(render_html(["a", "b"], [0.7, 0.7]))
    assert _rgb(spans[0][2]) == _rgb(spans[1][2]) is not None
    out = render_html(["a", "b"], [None, None])  # no values at all
    assert len(_spans(out)) == 2


def test_errors() -> None:
    with pytest.raises(ValueError, match="length"):
        render_html(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="cmap"):
        render_html(["a"], [1.0], cmap="green")
    with pytest.raises(ValueError, match="high"):
        render_html(["a"], [1.0], low=2.0, high=1.0)


def test_repr_html_and_self_contained() -> None:
    out = render_html(["a", "b"], [0.0, 1.0], title="T")
    assert isinstance(out, HtmlFragment) and isinstance(out, str)
    assert out._repr_html_() == out
    assert "<script" not in out and "<style" not in out and "<link" not in out
    assert "class=" not in out


def test_render_does_not_import_torch_or_numpy() -> None:
    # Load render.py by path: the package __init__ pulls in the gRPC client (numpy), render itself must not.
    import interpgw_client.render as render

    probe = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('render_alone', {render.__file__!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "m.render_html(['a'], [1.0]); "
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
