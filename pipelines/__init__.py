"""Domain pipelines (installed as `eqkernels.pipelines`): load, featurise, fit and evaluate."""
