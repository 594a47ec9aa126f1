"""Image kernels: specifications, the fast engine, group averages and GCNN twins.

`ImageKernel(name)(x1, x2)` gives the NNGP and NTK matrices between tiles (N1, H, W, C) and
(N2, H, W, C); `ImageKernel(name)(x)` those of x with itself (see `ImageKernel` for an example).
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from eqkernels.groups import PlanarGroup, RotationGroup, resolve_group
from eqkernels.kernels.families import family_kernels, readout
from eqkernels.kernels.relative import RelativeKernels, group_relative_kernels, relative_kernels
from eqkernels.kernels.spec import KERNEL_FAMILIES, ConvNetSpec, KernelSpec

__all__ = ["ImageKernel", "KernelSpec", "ConvNetSpec", "KERNEL_FAMILIES", "RelativeKernels",
           "relative_kernels", "family_kernels", "readout"]


class ImageKernel:
    """The infinite-width NNGP and NTK of a named image kernel family, computed by the fast engine.

    A kernel on two tiles: the plain CNN kernel changes when one tile is turned by 90°, the
    C4-averaged one (`cnn-c4avg`, also the kernel of the C4-augmented network) does not.

        >>> import numpy as np
        >>> from eqkernels import ImageKernel
        >>> tiles = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)   # (N, H, W, C)
        >>> turned = np.stack([tiles[0], np.rot90(tiles[1])])
        >>> for name in ("cnn", "cnn-c4avg"):
        ...     k = ImageKernel(name, progress=False)
        ...     K, K_turned = k(tiles)["ntk"], k(turned)["ntk"]                 # (2, 2) each
        ...     print(name, K.shape, bool(abs(K_turned[0, 1] - K[0, 1]) < 1e-5 * K[0, 0]))
        cnn (2, 2) False
        cnn-c4avg (2, 2) True
    """

    def __init__(self, spec: KernelSpec | str = "cnn", *, dtype=jnp.float32, progress: bool | None = True,
                 block_size: int = 96, memory_budget_mb: float | None = None):
        self.spec = KernelSpec(spec) if isinstance(spec, str) else spec
        self.dtype = dtype
        self.progress = progress
        self.block_size = block_size
        self.memory_budget_mb = memory_budget_mb

    @property
    def group(self) -> PlanarGroup | RotationGroup:
        return resolve_group(self.spec.group)

    def relative(self, x1, x2=None, *, group: PlanarGroup | RotationGroup | str | None = None,
                 checkpoint: str | Path | None = None, keep_checkpoint: bool = True,
                 description: str | None = None, executor=None) -> RelativeKernels:
        """Relative pooled kernels over `group` (default: the family's group) — reusable across families.

        With `checkpoint`, finished blocks are kept there until the caller has stored the result
        (`keep_checkpoint=False` removes them as soon as the computation finishes). `executor`: where
        the blocks run (None: in-process; an `eqkernels.blocks.DaskExecutor`).
        """
        return group_relative_kernels(self.spec.net, np.asarray(x1), None if x2 is None else np.asarray(x2),
                                      group or self.group, need_self=self.spec.net.readout != "linear",
                                      dtype=self.dtype, block_size=self.block_size, checkpoint=checkpoint,
                                      keep_checkpoint=keep_checkpoint, memory_budget_mb=self.memory_budget_mb,
                                      progress=self.progress, description=description or f"{self.spec.name} kernel",
                                      executor=executor)

    def __call__(self, x1, x2=None, get: str | tuple = ("nngp", "ntk"), **kwargs):
        """Kernel matrices between images x1 (N1,H,W,C) and x2 (N2,H,W,C) (x2=None: x1 with itself)."""
        out = family_kernels(self.spec, self.relative(x1, x2, **kwargs))
        return out[get] if isinstance(get, str) else {k: out[k] for k in get}
