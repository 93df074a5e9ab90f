"""Statistical disclosure control for the ``restricted`` tier (exact aggregates).

Rule, applied by each node to each grouped result before it leaves (DESIGN.md, tiers):

1. Primary suppression: a cell counting more than 0 and fewer than ``min_count`` units
   (distinct values of the privacy unit, or rows when none is declared) is suppressed; so
   is a cell whose SUM is dominated by one row (largest |value| > ``dominance`` × sum of
   |values|). Empty cells are released as zeros: a zero names nobody.
2. Secondary suppression: along every line of the table (all keys fixed but one), if the
   suppressed cells of that line hold more than 0 and fewer than ``min_count`` units, the
   smallest released cells of the line are suppressed too until they hold at least
   ``min_count`` units. So a line's margin, got from another query, minus its released
   cells gives only a total over at least ``min_count`` units, never one small cell.
3. Suppressed values never leave the node: they are sent as NULL with a flag. A cell
   whose key does not come from a declared public domain is not even named: it is
   dropped at the node and counted (``hidden_cells``), so a key cannot leak a rare value.
4. At the coordinator, a merged cell that any node suppressed, or that may contain a
   hidden cell of some node, is suppressed as a whole: adding other nodes' released parts
   to it would let ``merged − other nodes`` recover the suppressed part.
Rounding of released counts (``round_to``) is a presentation rule applied at release; it
is not a protection against a motivated analyst (exact sums and means reveal counts).
Arbitrary differencing across differently-filtered queries is not prevented by any exact
SDC rule; pupil-level data belongs in the ``sensitive`` tier, which is DP.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any


def suppression_mask(
    keys: Sequence[tuple[Any, ...]],
    units: Sequence[int],
    min_count: int,
    dominated: Sequence[bool] | None = None,
) -> list[bool]:
    """Primary + secondary suppression over one grouped result; True = suppressed."""
    n = len(units)
    mask = [0 < u < min_count for u in units]
    if dominated is not None:
        mask = [m or bool(d) for m, d in zip(mask, dominated, strict=True)]
    if min_count <= 0 or not any(mask) or n <= 1:
        return mask
    width = len(keys[0]) if keys else 0
    lines: list[list[int]] = []
    for dim in range(max(width, 1)):
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            groups[key[:dim] + key[dim + 1:]].append(i)
        lines.extend(groups.values())
    changed = True
    while changed:  # a suppression in one line can open another; iterate to a fixpoint
        changed = False
        for line in lines:
            hidden = sum(units[i] for i in line if mask[i])
            if hidden <= 0 or hidden >= min_count:
                continue
            for i in sorted((i for i in line if not mask[i]), key=lambda i: (units[i], i)):
                mask[i] = True
                changed = True
                hidden += units[i]
                if hidden >= min_count:
                    break
    return mask


def round_count(value: int | None, base: int) -> int | None:
    """Round half up to a multiple of ``base`` (conventional SDC rounding)."""
    if value is None or base <= 1:
        return value
    return int((value + base // 2) // base * base)
