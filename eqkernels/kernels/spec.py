"""Architecture and kernel specifications for image kernels.

A `ConvNetSpec` describes the plain CNN: `depth` q×q convolutions (stride 1), each followed by
ReLU, then global average pooling and a readout (`linear`: one Dense layer; `mlp`: Dense →
ReLU → Dense). Everything is in the NTK parametrisation.

A `KernelSpec` names one kernel family built on that CNN:
- `cnn`: the CNN's NTK / NNGP kernel;
- `cnn-c4avg`, `cnn-d4avg`: the kernel averaged over the group acting on one argument,
  K_avg(x, x') = 1/|G| Σ_g K(x, g·x'), i.e. an infinite ensemble trained with full augmentation;
- `p4cnn`, `d4cnn`: the group-convolutional twin (lifting conv, group convs, group pooling,
  same readout). With a linear readout it equals the averaged kernel exactly;
- `cnn-c8avg`, `cnn-c16avg`, `cnn-d8avg`, `cnn-d16avg`: rotations off the grid (P_g: bilinear on
  the disk-masked tile, `eqkernels.groups.rotation_group`). Because P_g does not invert by a
  transpose and interpolations do not compose, the one-sided average is neither symmetric nor
  invariant; these are the symmetric double average
      K_G(x, x') = 1/|G|² Σ_{g,h} K(P_g x, P_h x'),
  the exact NNGP/NTK of the symmetrised network f̄(x) = 1/|G| Σ_g f(P_g x), symmetric PSD. It is
  exactly invariant under the grid rotations (and mirrorings) in G and approximately under the
  others: K_G(P_a x, ·) − K_G(x, ·) is bounded by the interpolation's composition defect
  ‖P_g P_a x − P_{ga} x‖ (see `eqkernels.kernels.families.invariance_bound`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

Padding = Literal["VALID", "SAME", "CIRCULAR"]
Readout = Literal["linear", "mlp"]


@dataclass(frozen=True)
class ConvNetSpec:
    """The plain CNN behind every image kernel (infinite-width limits ignore the widths)."""

    depth: int = 2
    filter_size: int = 3
    padding: Padding = "VALID"
    weight_std: float = math.sqrt(2.0)
    bias_std: float = 0.0
    readout: Readout = "linear"
    readout_weight_std: float = 1.0
    readout_bias_std: float = 0.0
    channels: int = 64          # finite-width conv channels (ensembles, Monte Carlo)
    readout_hidden: int = 64    # finite width of the hidden Dense layer of the `mlp` readout

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.filter_size < 1 or self.filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd (a centred filter rotates onto itself), got {self.filter_size}")
        if self.padding not in ("VALID", "SAME", "CIRCULAR"):
            raise ValueError(f"padding must be VALID, SAME or CIRCULAR, got {self.padding!r}")
        if self.readout not in ("linear", "mlp"):
            raise ValueError(f"readout must be 'linear' or 'mlp', got {self.readout!r}")

    def output_size(self, size: int) -> int:
        """Spatial size after the last convolution for an input of `size` pixels."""
        if self.padding == "VALID":
            return size - self.depth * (self.filter_size - 1)
        return size

    def check_input_size(self, size: int) -> None:
        if self.output_size(size) < 1:
            raise ValueError(
                f"{size}px tiles are too small for {self.depth} VALID {self.filter_size}x{self.filter_size} convolutions")


KERNEL_FAMILIES: dict[str, tuple[str, str | None]] = {
    # name: (kind, group)
    "cnn": ("plain", None),
    "cnn-c4avg": ("averaged", "C4"),
    "cnn-d4avg": ("averaged", "D4"),
    "p4cnn": ("gcnn", "C4"),
    "d4cnn": ("gcnn", "D4"),
    "cnn-c8avg": ("averaged", "C8"),
    "cnn-c16avg": ("averaged", "C16"),
    "cnn-d8avg": ("averaged", "D8"),
    "cnn-d16avg": ("averaged", "D16"),
}


@dataclass(frozen=True)
class KernelSpec:
    """A named image kernel: family (see module docstring) and its CNN."""

    name: str = "cnn"
    net: ConvNetSpec = field(default_factory=ConvNetSpec)

    def __post_init__(self):
        if self.name not in KERNEL_FAMILIES:
            raise ValueError(f"unknown kernel {self.name!r}; choose one of {', '.join(KERNEL_FAMILIES)}")

    @property
    def kind(self) -> str:
        return KERNEL_FAMILIES[self.name][0]

    @property
    def group(self) -> str | None:
        return KERNEL_FAMILIES[self.name][1]

    @property
    def invariant_group(self) -> str | None:
        """The group under which the kernel is exactly invariant in each argument (None for `cnn`);
        for an interpolated group its exact grid subgroup (C4 for C8/C16, D4 for D8/D16)."""
        if self.group is None:
            return None
        from eqkernels.groups import resolve_group

        group = resolve_group(self.group)
        return group.name if not hasattr(group, "fine_angles") else group.exact.name

    @property
    def interpolated(self) -> bool:
        """True for families over rotations off the pixel grid (disk-masked, interpolated)."""
        return self.group is not None and self.invariant_group != self.group

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "net": asdict(self.net)}, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelSpec":
        known = set(ConvNetSpec.__dataclass_fields__)
        unknown = set(d.get("net", {})) - known
        if unknown:
            raise ValueError(f"unknown network options {sorted(unknown)}")
        return cls(name=d["name"], net=ConvNetSpec(**d.get("net", {})))

    def with_net(self, **changes) -> "KernelSpec":
        return replace(self, net=replace(self.net, **changes))
