"""The generation engine behind the scripts: loading, micro-batched sampling with per-image seeds, images out,
metrics. `ldm/` holds the models and `samplers/` the sampling math; this package wires them together.

    from microbatch import Pipeline
    images = Pipeline.from_checkpoint("model.safetensors").txt2img("a photograph of a cat", n=2)
"""
from typing import Any

__all__ = ["Pipeline", "GenerationRequest", "ModelOptions", "UsageError"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import microbatch.x` stays light and builds nothing.
    if name == "Pipeline":
        from microbatch.pipeline import Pipeline

        return Pipeline
    if name in ("GenerationRequest", "ModelOptions", "UsageError"):
        from microbatch import request

        return getattr(request, name)
    raise AttributeError(f"module 'microbatch' has no attribute {name!r}")
