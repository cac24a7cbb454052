"""SDXL under its original module paths (Stability AI's generative-models, `sgm.*`), inference only.

The published `sd_xl_base.yaml` / `sd_xl_refiner.yaml` name these classes. Where SDXL's parts equal ours up to
options (UNet, attention, autoencoder, CLIP and OpenCLIP text towers), the `sgm` classes are thin subclasses of the
`ldm` implementation with sgm's defaults; what is new lives here: `DiffusionEngine`, `GeneralConditioner`,
`FrozenOpenCLIPEmbedder2`'s pooled output and `ConcatTimestepEmbedderND`.
"""
