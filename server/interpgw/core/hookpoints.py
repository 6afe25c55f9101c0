"""Canonical hook-point names (TransformerLens conventions) and their validation.

Names: `hook_embed`, `blocks.{L}.hook_resid_pre|hook_attn_out|hook_resid_mid|hook_mlp_out|hook_resid_post`,
`ln_final.hook_normalized`. Negative layer indices count from the end. Attention patterns are not offered:
paged attention never materialises them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from interpgw.core.errors import InvalidArgument
from interpgw.core.requests import quoted

LAYER_KINDS: tuple[str, ...] = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
)
EMBED = "hook_embed"
LN_FINAL = "ln_final.hook_normalized"

# ASCII digits only (`\d` also matches other scripts' digits, which int() accepts), at most 9 of them (int() refuses
# strings of over 4300 digits with a ValueError), and the whole name (`$` would also match before a final newline)
_LAYER_RE = re.compile(r"blocks\.(-?[0-9]{1,9})\.(\w+)", re.ASCII)


@dataclass(frozen=True, order=True)
class HookPoint:
    """A resolved hook point: `layer` is None for the embedding and the final norm."""

    order: int  # position in the forward pass, for sorting
    layer: int | None
    kind: str

    @property
    def name(self) -> str:
        if self.layer is None:
            return self.kind
        return f"blocks.{self.layer}.{self.kind}"


def all_hook_names(n_layers: int) -> list[str]:
    """Every valid canonical name, in forward order."""
    names = [EMBED]
    for layer in range(n_layers):
        names.extend(f"blocks.{layer}.{kind}" for kind in LAYER_KINDS)
    names.append(LN_FINAL)
    return names


def _describe_valid(n_layers: int) -> str:
    kinds = "|".join(LAYER_KINDS)
    return f"valid hook points: {EMBED}, blocks.{{L}}.{{{kinds}}} with L in [{-n_layers}, {n_layers - 1}], {LN_FINAL}"


def parse_hook(name: str, n_layers: int) -> HookPoint:
    """Resolve a (possibly negative-layer) hook name; InvalidArgument names the valid choices."""
    if name == EMBED:
        return HookPoint(order=-1, layer=None, kind=EMBED)
    if name == LN_FINAL:
        return HookPoint(order=n_layers * len(LAYER_KINDS), layer=None, kind=LN_FINAL)
    match = _LAYER_RE.fullmatch(name)
    if not match:
        raise InvalidArgument(f"unknown hook point {quoted(name)}; {_describe_valid(n_layers)}")
    layer, kind = int(match.group(1)), match.group(2)
    if kind not in LAYER_KINDS:
        raise InvalidArgument(
            f"unknown hook kind {quoted(kind)} in {quoted(name)}; valid kinds: {', '.join(LAYER_KINDS)}"
        )
    if not -n_layers <= layer < n_layers:
        raise InvalidArgument(
            f"layer {layer} out of range in {quoted(name)}: the model has {n_layers} layers, "
            f"so L must be in [{-n_layers}, {n_layers - 1}]"
        )
    layer %= n_layers
    return HookPoint(order=layer * len(LAYER_KINDS) + LAYER_KINDS.index(kind), layer=layer, kind=kind)


def parse_hooks(names: list[str], n_layers: int) -> list[HookPoint]:
    """Resolve, de-duplicate (a negative and a positive alias are one hook) and sort into forward order."""
    if not names:
        raise InvalidArgument(f"no hook points requested; {_describe_valid(n_layers)}")
    return sorted({parse_hook(name, n_layers) for name in names})
