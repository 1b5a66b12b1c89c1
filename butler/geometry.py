"""Integer pixel boxes in a parent pixel frame.

Pixel ``(x, y)`` has its centre at integer coordinates ``(x, y)`` (LSST's convention, and astropy's
0-based one); a pixel covers ``[x - 0.5, x + 0.5)``.  Boxes are half-open: ``x0 <= x < x1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataModelError

__all__ = ["Box"]


@dataclass(frozen=True, slots=True)
class Box:
    """A half-open integer pixel box ``[x0, x0 + width) x [y0, y0 + height)``.

    Parameters
    ----------
    x0, y0 : int
        Lower-left corner pixel, in the parent frame (pixels).
    width, height : int
        Size in pixels; both must be >= 0.
    """

    x0: int
    y0: int
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("x0", "y0", "width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                try:
                    as_int = int(value)
                except (TypeError, ValueError):
                    raise DataModelError(f"Box.{name} must be an integer, got {value!r}") from None
                if as_int != value:
                    raise DataModelError(f"Box.{name} must be an integer, got {value!r}")
                object.__setattr__(self, name, as_int)
        if self.width < 0 or self.height < 0:
            raise DataModelError(
                f"Box size must be non-negative, got width={self.width}, height={self.height}"
            )

    @classmethod
    def from_corners(cls, x0: int, y0: int, x1: int, y1: int) -> Box:
        """Box from a lower-left corner and an exclusive upper-right corner (pixels)."""
        return cls(x0, y0, max(0, x1 - x0), max(0, y1 - y0))

    @classmethod
    def from_shape(cls, shape: tuple[int, int], x0: int = 0, y0: int = 0) -> Box:
        """Box of a numpy ``(height, width)`` shape placed at ``(x0, y0)``."""
        return cls(x0, y0, int(shape[1]), int(shape[0]))

    @property
    def x1(self) -> int:
        """Exclusive upper x bound (pixels)."""
        return self.x0 + self.width

    @property
    def y1(self) -> int:
        """Exclusive upper y bound (pixels)."""
        return self.y0 + self.height

    @property
    def shape(self) -> tuple[int, int]:
        """Numpy shape ``(height, width)``."""
        return (self.height, self.width)

    @property
    def area(self) -> int:
        """Number of pixels."""
        return self.width * self.height

    @property
    def is_empty(self) -> bool:
        """True when the box holds no pixel."""
        return self.width == 0 or self.height == 0

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(x, y)`` in pixel coordinates."""
        return (self.x0 + (self.width - 1) / 2.0, self.y0 + (self.height - 1) / 2.0)

    def corners(self) -> list[tuple[float, float]]:
        """The four outer pixel-edge corners, counter-clockwise from lower left (pixels)."""
        xa, ya = self.x0 - 0.5, self.y0 - 0.5
        xb, yb = self.x1 - 0.5, self.y1 - 0.5
        return [(xa, ya), (xb, ya), (xb, yb), (xa, yb)]

    def contains(self, other: Box) -> bool:
        """True when ``other`` lies entirely inside this box."""
        return (
            other.x0 >= self.x0 and other.y0 >= self.y0 and other.x1 <= self.x1 and other.y1 <= self.y1
        )

    def contains_point(self, x: float, y: float) -> bool:
        """True when the pixel whose centre is nearest to ``(x, y)`` is in the box."""
        return self.x0 - 0.5 <= x < self.x1 - 0.5 and self.y0 - 0.5 <= y < self.y1 - 0.5

    def intersection(self, other: Box) -> Box:
        """The overlap of two boxes (possibly empty)."""
        return Box.from_corners(
            max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1), min(self.y1, other.y1)
        )

    def overlaps(self, other: Box) -> bool:
        """True when the two boxes share at least one pixel."""
        return not self.intersection(other).is_empty

    def grow(self, border: int) -> Box:
        """The box grown by ``border`` pixels on every side (shrunk when negative)."""
        return Box.from_corners(self.x0 - border, self.y0 - border, self.x1 + border, self.y1 + border)

    def shift(self, dx: int, dy: int) -> Box:
        """The box moved by ``(dx, dy)`` pixels."""
        return Box(self.x0 + dx, self.y0 + dy, self.width, self.height)

    def slices(self, parent: Box | None = None) -> tuple[slice, slice]:
        """Numpy slices ``(rows, cols)`` selecting this box inside ``parent``.

        Raises
        ------
        DataModelError
            If this box is not contained in ``parent``.
        """
        if parent is None:
            return (slice(self.y0, self.y1), slice(self.x0, self.x1))
        if not parent.contains(self):
            raise DataModelError(f"{self} is not contained in {parent}")
        return (
            slice(self.y0 - parent.y0, self.y1 - parent.y0),
            slice(self.x0 - parent.x0, self.x1 - parent.x0),
        )

    def to_list(self) -> list[int]:
        """``[x0, y0, width, height]``, for serialization."""
        return [self.x0, self.y0, self.width, self.height]

    @classmethod
    def from_list(cls, values: list[int] | tuple[int, ...]) -> Box:
        """Inverse of :meth:`to_list`."""
        if len(values) != 4:
            raise DataModelError(f"a box needs [x0, y0, width, height], got {values!r}")
        return cls(*values)
