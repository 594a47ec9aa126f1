"""neural-tangents layers `(init_fn, apply_fn, kernel_fn)` for group-equivariant networks."""
from eqkernels.layers.planar import (GroupConv, GroupPool, LiftingConv, act_on_group_features, cnn_stax,
                                     cross_kernel_via_union, gcnn_stax, offset_matrices)

__all__ = ["LiftingConv", "GroupConv", "GroupPool", "gcnn_stax", "cnn_stax", "cross_kernel_via_union",
           "offset_matrices", "act_on_group_features"]
