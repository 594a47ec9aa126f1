"""`eqk demo` (work in progress)."""


def demo():
    """Run the main job on the bundled data."""
