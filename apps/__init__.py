"""The `eqk` command line (installed as `eqkernels.apps`)."""
