"""Map-style dataset indexing: what ``Subset``, samplers and plain iteration rely on."""

from __future__ import annotations

import operator


def item_index(index, length: int) -> int:
    """``index`` as a plain int in ``[0, length)``: numpy / 0-d tensor ints are accepted, negatives count
    from the end, and an out-of-range index raises ``IndexError`` (which ends ``for item in dataset``)."""
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(f"index: must be an integer, got {type(index).__name__}") from None
    if not -length <= i < length:
        raise IndexError(f"index {i} out of range for {length} items")
    return i % length
