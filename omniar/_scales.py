"""Scale schedules (coarse to fine code-map sizes) shared by the tokenizer and the backbone, which may not
import each other: validation to a canonical form, and the ``(h, w)`` and token count of every map."""

from __future__ import annotations

from ._checks import check_int, require
from .limits import MAX_SCALE

Scales = tuple[int, ...] | tuple[tuple[int, int], ...]


def check_scales(scales, name: str = "scales") -> Scales:
    """A scale schedule, coarse to fine, in canonical form: a tuple of ints (square ``n x n`` maps) when
    every entry is an int, else a tuple of ``(h, w)`` pairs (an int entry ``n`` meaning ``(n, n)``).
    Each side grows or stays and each map has more tokens than the one before; the last is the latent grid,
    which may repeat at the end (more residual steps at full resolution, e.g. ``[1, 2, 4, 8, 8]``)."""
    require(isinstance(scales, (list, tuple)) and len(scales) >= 1, name,
            f"must be a non-empty list of ints or (h, w) pairs, got {scales!r}")
    shapes = []
    for entry in scales:
        if isinstance(entry, (list, tuple)):
            require(len(entry) == 2, name, f"a pair must be (h, w), got {entry!r}")
            shapes.append(tuple(check_int(side, name, 1, MAX_SCALE) for side in entry))
        else:
            n = check_int(entry, name, 1, MAX_SCALE)
            shapes.append((n, n))
    for (h0, w0), (h1, w1) in zip(shapes, shapes[1:]):
        repeat = (h0, w0) == (h1, w1) == shapes[-1]
        require(repeat or (h0 <= h1 and w0 <= w1 and h0 * w0 < h1 * w1), name,
                f"must grow coarse to fine (no side shrinking, more tokens each scale; only the last map may "
                f"repeat), got {list(scales)}")
    if all(not isinstance(entry, (list, tuple)) for entry in scales):
        return tuple(h for h, _ in shapes)
    return tuple(shapes)


def scale_shapes(scales: Scales) -> tuple[tuple[int, int], ...]:
    """``(h, w)`` of every code map of a (canonical) schedule."""
    return tuple((s, s) if isinstance(s, int) else tuple(s) for s in scales)


def scale_names(scales: Scales, side_for_square: bool = False) -> tuple[str, ...]:
    """A name per scale: ``"hxw"`` (``side_for_square``: the side alone for a square map), with ``"+k"`` on the
    k-th repeat of the latent grid, so that every scale's name is distinct."""
    shapes, names = scale_shapes(scales), []
    for s, (h, w) in enumerate(shapes):
        name = str(h) if side_for_square and h == w else f"{h}x{w}"
        repeat = shapes[:s].count((h, w))
        names.append(f"{name}+{repeat}" if repeat else name)
    return tuple(names)


def tokens_per_frame(scales: Scales) -> int:
    """Tokens of one latent frame: the sum of ``h * w`` over the scales."""
    return sum(h * w for h, w in scale_shapes(scales))


class ScaleSchedule:
    """Mixin for whatever has a canonical ``scales`` schedule: the ``(h, w)`` and token count of its maps."""

    scales: Scales

    @property
    def scale_shapes(self) -> tuple[tuple[int, int], ...]:
        """``(h, w)`` of every scale's code map, coarse to fine."""
        return scale_shapes(self.scales)

    @property
    def scale_names(self) -> tuple[str, ...]:
        """A distinct ``"hxw"`` name per scale (``"+k"`` on the k-th repeat of the latent grid)."""
        return scale_names(self.scales)

    @property
    def tokens_per_frame(self) -> int:
        """Tokens of one latent frame: the sum of ``h * w`` over the scales."""
        return tokens_per_frame(self.scales)
