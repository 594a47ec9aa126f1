"""neural-tangents layers `(init_fn, apply_fn, kernel_fn)` for group-equivariant networks."""
