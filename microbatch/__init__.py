"""The generation engine behind the scripts: loading, micro-batched sampling with per-image seeds, images out,
metrics. `ldm/` holds the models and `samplers/` the sampling math; this package wires them together."""
