"""`eqk kernel` (work in progress)."""


def kernel():
    """Compute a kernel matrix."""
