"""`Mesh`: named axes and their sizes (`tp=2,ep=2`), rank <-> coordinates. Pure arithmetic."""

from __future__ import annotations

import math
from dataclasses import dataclass

AXES = ("dp", "ep", "tp")  # canonical order: tp varies fastest (neighbouring ranks share a node)


@dataclass(frozen=True)
class Mesh:
    """Axis name -> size, in canonical order `dp, ep, tp`; world size = the product.

    Rank r's coordinate along an axis follows row-major order over (dp, ep, tp), so the `tp`
    groups are runs of consecutive ranks (one NVLink domain when tp <= 8)."""

    axes: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        names = [a for a, _ in self.axes]
        for name, size in self.axes:
            if name not in AXES:
                raise ValueError(f"mesh axis {name!r} unknown; expected some of {AXES}")
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"mesh axis {name}={size!r}: the size must be an integer >= 1")
        if len(set(names)) != len(names):
            raise ValueError(f"mesh axes repeat: {names}")
        ordered = tuple(sorted(self.axes, key=lambda a: AXES.index(a[0])))
        object.__setattr__(self, "axes", ordered)

    @staticmethod
    def parse(text: str) -> "Mesh":
        """`"tp=2,ep=2"` -> Mesh. Errors name the bad part and the expected form."""
        axes = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, size = part.partition("=")
            if not eq or not size.strip().isdigit():
                raise ValueError(
                    f"--mesh {text!r}: bad part {part!r}; expected axis=size pairs such as "
                    "'tp=8,ep=8' (axes: dp, ep, tp)"
                )
            axes.append((name.strip(), int(size)))
        if not axes:
            raise ValueError("--mesh is empty; expected axis=size pairs such as 'tp=2,ep=2'")
        return Mesh(tuple(axes))

    def size(self, axis: str) -> int:
        return dict(self.axes).get(axis, 1)

    @property
    def world_size(self) -> int:
        return math.prod(s for _, s in self.axes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.axes)

    def coords(self, rank: int) -> dict[str, int]:
        """Rank -> {axis: index}."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside the mesh's {self.world_size} ranks")
        out: dict[str, int] = {}
        for name, size in reversed(self.axes):
            out[name] = rank % size
            rank //= size
        return {a: out[a] for a in self.names}

    def to_json(self) -> dict[str, int]:
        return dict(self.axes)

    def __str__(self) -> str:
        return ",".join(f"{a}={s}" for a, s in self.axes)
