"""Finite groups acting exactly on square pixel grids: C1, C2, C4 (rotations by 90°) and D1, D2, D4 (with reflections).

An element is a pair (flip, k): first mirror the image left-right if `flip`, then rotate it by
k·90° counter-clockwise about its centre. Images are arrays (..., H, W, C) with H == W; the
action `act(x, g)` is a permutation of pixels, so it is exact in every dtype.

Rotations by angles other than multiples of 90° move pixels off the grid; they cannot act exactly
on images and are not offered here (for SO(3) see `eqkernels.so3`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

Element = tuple[int, int]  # (flip, k)


def _act_numpy(x, flip: int, k: int, xp=np):
    if flip:
        x = xp.flip(x, axis=-2)
    return xp.rot90(x, k=k, axes=(-3, -2))


@dataclass(frozen=True)
class PlanarGroup:
    """A point group of the square pixel grid, as a list of (flip, k) elements with their table."""

    name: str
    elements: tuple[Element, ...]

    @property
    def order(self) -> int:
        return len(self.elements)

    def act(self, x, g: Element | int):
        """Apply element `g` (an element or its index) to images `x` of shape (..., H, W, C)."""
        flip, k = self.elements[g] if isinstance(g, (int, np.integer)) else g
        if x.shape[-3] != x.shape[-2] and k % 2:
            raise ValueError(f"rotations by 90° need square images, got {x.shape[-3]}x{x.shape[-2]}")
        xp = np if isinstance(x, np.ndarray) else _jnp()
        return _act_numpy(x, flip, k, xp)

    def orbit(self, x):
        """All transformed copies of `x`: array (|G|, ...) in the order of `elements`."""
        xp = np if isinstance(x, np.ndarray) else _jnp()
        return xp.stack([self.act(x, g) for g in self.elements])

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        # Derive the multiplication table from the action itself, so it cannot disagree with it.
        probe = np.arange(5 * 5).reshape(5, 5, 1)
        images = {g: self.act(probe, g).tobytes() for g in self.elements}
        lookup = {v: i for i, v in enumerate(images[g] for g in self.elements)}
        n = self.order
        mul = np.empty((n, n), dtype=np.int64)
        for i, g in enumerate(self.elements):
            for j, h in enumerate(self.elements):
                key = self.act(self.act(probe, h), g).tobytes()
                if key not in lookup:
                    raise ValueError(f"{self.name} is not closed under composition")
                mul[i, j] = lookup[key]
        identity = self.elements.index((0, 0))
        inv = np.array([int(np.nonzero(mul[i] == identity)[0][0]) for i in range(n)])
        return mul, inv

    @property
    def multiplication_table(self) -> np.ndarray:
        """`table[i, j]` is the index of g_i ∘ g_j (apply g_j first)."""
        return self._tables[0]

    @property
    def inverse(self) -> np.ndarray:
        """`inverse[i]` is the index of g_i⁻¹."""
        return self._tables[1]

    def element_names(self) -> list[str]:
        return [("flip·" if f else "") + f"rot{90 * k}" for f, k in self.elements]


def _jnp():
    import jax.numpy as jnp

    return jnp


GROUPS: dict[str, PlanarGroup] = {
    "C1": PlanarGroup("C1", ((0, 0),)),
    "C2": PlanarGroup("C2", ((0, 0), (0, 2))),
    "C4": PlanarGroup("C4", tuple((0, k) for k in range(4))),
    "D1": PlanarGroup("D1", ((0, 0), (1, 0))),
    "D2": PlanarGroup("D2", ((0, 0), (0, 2), (1, 0), (1, 2))),
    "D4": PlanarGroup("D4", tuple((f, k) for f in (0, 1) for k in range(4))),
}


def get_group(name: str) -> PlanarGroup:
    """The planar group called `name` (C1, C2, C4, D1, D2, D4; case-insensitive)."""
    try:
        return GROUPS[name.upper()]
    except KeyError:
        raise ValueError(f"unknown group {name!r}; choose one of {', '.join(GROUPS)}") from None
