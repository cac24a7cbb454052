"""SDXL's conditioning: `GeneralConditioner` and its embedders, under sgm's names.

The text towers are ours (`ldm.modules.encoders.modules`): `FrozenCLIPEmbedder` is CLIP ViT-L/14 (SDXL reads its
penultimate hidden state, `layer: hidden, layer_idx: 11`), `FrozenOpenCLIPEmbedder2` is OpenCLIP's text tower sized
as ViT-bigG/14 with the pooled, projected output SDXL adds to its conditioning vector. `ConcatTimestepEmbedderND`
embeds the size micro-conditioning (original size, crop, target size; the refiner's aesthetic score). Nothing is
downloaded: weights come from the checkpoint, the tokenizer is the bundled BPE.

Shapes for SDXL base: batch["txt"] (B prompts) -> crossattn [B, 77, 768 + 1280]; vector [B, 1280 + 3 * 512].

The web UI's prompt language: with batch["txt"] a `WeightedPrompts` (parsed prompts) instead of strings, each text
embedder encodes the prompts with the SD 1.x long-prompt rules of `LongPromptEncoder` (75-token chunks wrapped in
bos/eos, comma back-tracking, BREAK, emphasis rescaled to the original mean, each encoder on its own), so crossattn
is [B, 77 k, 768 + 1280], and the pooled vector comes from each prompt's first chunk, as the AUTOMATIC1111 web UI
encodes SDXL prompts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import AbstractEncoder, VIT_H14_TEXT_CONFIG, check_clip_skip, check_emphasis
from ldm.modules.encoders.modules import FrozenCLIPEmbedder as _LdmFrozenCLIPEmbedder
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder as _LdmFrozenOpenCLIPEmbedder
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

# The text tower of OpenCLIP ViT-bigG/14 (laion2b_s39b_b160k), in CLIPTextConfig field names.
VIT_BIGG14_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1280,
)
SDXL_OPENCLIP_TEXT_CONFIGS: dict[str, dict[str, Any]] = {"ViT-bigG-14": VIT_BIGG14_TEXT_CONFIG, "ViT-H-14": VIT_H14_TEXT_CONFIG}

Embedding = Union[torch.Tensor, tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class WeightedPrompts:
    """B prompts in the web UI's prompt language, parsed, for batch["txt"]: the text embedders then encode them the
    web UI's way (see the module docstring) instead of cutting plain text at 77 tokens.

    Attributes:
        fragments: per prompt its [(text, weight), ...] (`microbatch.prompts.parse_prompt_attention`'s output,
            ("BREAK", -1) included). The prompts are encoded together, as one web UI call: a prompt with fewer
            chunks is padded with the empty prompt's chunk, and emphasis keeps the mean over the batch.
        clip_skip: validated and ignored: SDXL's encoders keep their configured layers, as in the web UI with its
            default settings ("Clip skip SDXL" off; even on, it only touches CLIP ViT-L).
        emphasis: one of ldm.modules.encoders.modules.EMPHASIS_MODES ("Original", the web UI's default).
    """

    fragments: tuple[tuple[tuple[str, float], ...], ...]
    clip_skip: int = 1
    emphasis: str = "Original"

    def __post_init__(self) -> None:
        if not self.fragments:
            raise ValueError("WeightedPrompts needs at least one prompt")
        check_emphasis(self.emphasis)

    def __len__(self) -> int:
        return len(self.fragments)


class _PromptLanguage:
    """encode_prompt_language for SDXL's text embedders (LongPromptEncoders with sgm's `return_pooled`)."""

    return_pooled: bool

    def encode_prompt_language(self, prompts: WeightedPrompts) -> Embedding:
        """-> z [B, 77 k, C] (each chunk's hidden states, weighted, concatenated), or (z, pooled [B, P]) with
        `return_pooled`, pooled from each prompt's first chunk before emphasis (the web UI's `zs[0].pooled`)."""
        z, group, encoded = self.encode_weighted_chunks(prompts.fragments, prompts.clip_skip, prompts.emphasis)
        if not self.return_pooled:
            return z
        first = [chunks.tokens[0] for chunks in group]
        tokens = torch.tensor(first, dtype=torch.long, device=self.device)
        return z, self.pooled_from_hidden(torch.stack([encoded[row] for row in first]), tokens)

    def pooled_from_hidden(self, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _first_eos(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """[B, N] ids -> [B] index of each row's first eos (every row the tokenizer or the chunker makes has one)."""
    return (tokens == eos).int().argmax(dim=-1)


class FrozenCLIPEmbedder(_PromptLanguage, _LdmFrozenCLIPEmbedder):
    """CLIP ViT-L/14 text transformer (ours), with sgm's `always_return_pooled`: prompts -> z, or (z, pooled
    [B, hidden]) where z is [B, 77, hidden] from `layer` ("hidden" with `layer_idx`: hidden_states[layer_idx],
    before the final LayerNorm; SDXL uses layer_idx 11, the penultimate layer). Given `WeightedPrompts`, z is
    [B, 77 k, hidden] (`encode_prompt_language`)."""

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: Optional[str] = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: Literal["last", "pooled", "hidden"] = "last",
        layer_idx: Optional[int] = None,
        always_return_pooled: bool = False,
        text_config: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__(
            version=version, device=device, max_length=max_length, freeze=freeze, layer=layer, layer_idx=layer_idx,
            text_config=text_config,
        )
        layers = self.transformer.text_model.config.num_hidden_layers if hasattr(self.transformer.text_model, "config") else None
        if layer == "hidden" and layers is not None and not -layers - 1 <= layer_idx <= layers:
            raise ValueError(f"layer_idx {layer_idx} is out of range for a {layers}-layer text transformer")
        self.return_pooled = always_return_pooled

    def forward(self, text: Union[list[str], WeightedPrompts]) -> Embedding:
        if isinstance(text, WeightedPrompts):
            return self.encode_prompt_language(text)
        if not self.return_pooled:
            return super().forward(text)
        tokens = self.tokenize(text).to(self.device)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            z = outputs.last_hidden_state
        elif self.layer == "pooled":
            z = outputs.pooler_output[:, None, :]
        else:
            z = outputs.hidden_states[self.layer_idx]
        return z, outputs.pooler_output

    def encode_chunk_tokens(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """tokens [N, L] -> z [N, L, hidden] of `layer` (the chunks of the prompt language). clip_skip is validated
        and ignored: the web UI leaves SDXL's CLIP ViT-L at its configured layer unless its "Clip skip SDXL" option
        (off by default) is set."""
        check_clip_skip(clip_skip, self.num_layers)
        return super().encode_chunk_tokens(tokens, 1)

    def pooled_from_hidden(self, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """pooler_output [N, hidden] of chunk rows tokens [N, 77]. With layer "last" it is z (the final LayerNorm's
        output) at the eos; otherwise the rows go through the transformer again (no published config pools ViT-L)."""
        if self.layer == "last":
            return z[torch.arange(z.shape[0], device=z.device), _first_eos(tokens, self.tokenizer.eos_token_id)]
        return self.transformer(input_ids=tokens).pooler_output


class FrozenOpenCLIPEmbedder2(_PromptLanguage, _LdmFrozenOpenCLIPEmbedder):
    """OpenCLIP's text tower (ours) with sgm's outputs; SDXL uses arch ViT-bigG-14, layer penultimate,
    `legacy: False`, `always_return_pooled: True`.

    legacy=False: z is the hidden state after the chosen block ("penultimate": all blocks but the last) WITHOUT
    ln_final, [B, 77, width]; pooled is ln_final(output of every block) at each prompt's eos token (the largest id)
    times `text_projection`, [B, projection_dim]. With `always_return_pooled` the output is (z, pooled).
    legacy=True is SD 2.x's output: ln_final of the chosen layer (our FrozenOpenCLIPEmbedder), without pooling.
    `text_config` (CLIPTextConfig field names) overrides the architecture's fields, for small test models.
    Given `WeightedPrompts`, z is [B, 77 k, width] and pooled comes from each prompt's first chunk
    (`encode_prompt_language`).
    """

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: Optional[str] = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: Literal["last", "penultimate"] = "last",
        always_return_pooled: bool = False,
        legacy: bool = True,
        text_config: Optional[Mapping[str, Any]] = None,
    ):
        if arch not in SDXL_OPENCLIP_TEXT_CONFIGS and not text_config:
            raise ValueError(f"unknown OpenCLIP arch {arch!r}: known {sorted(SDXL_OPENCLIP_TEXT_CONFIGS)}, or give text_config")
        if always_return_pooled and legacy:
            raise ValueError("always_return_pooled needs legacy: False (the legacy output has no pooled embedding)")
        fields = dict(SDXL_OPENCLIP_TEXT_CONFIGS.get(arch, VIT_H14_TEXT_CONFIG))
        fields.update(dict(text_config or {}))
        super().__init__(arch=arch, version=version, device=device, max_length=max_length, freeze=freeze, layer=layer, text_config=fields)
        self.return_pooled = always_return_pooled
        self.legacy = legacy

    def forward(self, text: Union[list[str], WeightedPrompts]) -> Embedding:
        if isinstance(text, WeightedPrompts):
            return self.encode_prompt_language(text)
        if self.legacy:
            return super().forward(text)
        tokens = self.tokenize(text).to(self.device)
        z, pooled = self.encode_with_transformer(tokens)
        return (z, pooled) if self.return_pooled else z

    def encode_with_transformer(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, N] -> (hidden state of `layer` without ln_final [B, N, W], pooled [B, projection_dim])."""
        z = self.encode_chunk_tokens(tokens)
        return z, self.pooled_from_hidden(z, tokens)

    def encode_chunk_tokens(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """tokens [N, L] -> z [N, L, W]: legacy, SD 2.x's output; else the hidden state after all blocks but the
        last ("penultimate") or after all ("last"), without ln_final. clip_skip is validated and ignored, as the
        web UI ignores it for OpenCLIP bigG."""
        if self.legacy:
            return super().encode_chunk_tokens(tokens, clip_skip)
        check_clip_skip(clip_skip, self.num_layers)
        tower = self.model
        x = tower.token_embedding(tokens) + tower.positional_embedding[: tokens.shape[1]]
        for block in tower.transformer.resblocks[: self.num_layers - self.layer_idx]:
            x = block(x)
        return x

    def pooled_from_hidden(self, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """z [N, L, W] from encode_chunk_tokens (non-legacy) and its tokens [N, L] -> pooled [N, projection_dim]:
        ln_final of the last block's output at each row's eos, times text_projection."""
        tower = self.model
        last = tower.transformer.resblocks[-1](z) if self.layer == "penultimate" else z
        final = tower.ln_final(last)
        eos = _first_eos(tokens, self.tokenizer.eos_token_id)
        return final[torch.arange(final.shape[0], device=final.device), eos] @ tower.text_projection


class ConcatTimestepEmbedderND(AbstractEncoder):
    """Sinusoidal embedding (cosine half first, as the UNet's timestep embedding) of each of the d numbers per row,
    concatenated: x [B, d] (or [B]) -> [B, d * outdim]. SDXL embeds (height, width) pairs and the aesthetic score."""

    def __init__(self, outdim: int):
        super().__init__()
        if outdim < 1:
            raise ValueError(f"outdim must be positive, got {outdim}")
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            x = x[:, None]
        if x.dim() != 2:
            raise ValueError(f"ConcatTimestepEmbedderND expects [B, d] or [B], got {tuple(x.shape)}")
        b, d = x.shape
        return timestep_embedding(x.reshape(b * d), self.outdim).reshape(b, d * self.outdim)


class GeneralConditioner(nn.Module):
    """Runs each embedder on its batch entry and gathers the outputs by rank: 3-D tensors are concatenated along
    the features into "crossattn" [B, 77, sum of widths], 2-D ones into "vector" [B, sum], 4-D into "concat".

    `emb_models` are the yaml's embedder configs (target, params, input_key or input_keys, is_trainable, ucg_rate,
    legacy_ucg_value). Inference only: `ucg_rate` (random prompt dropping in training) and `legacy_ucg_value` are
    accepted and ignored. Parameters are frozen.
    """

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, emb_models: Sequence[Mapping[str, Any]]):
        super().__init__()
        embedders = []
        for n, config in enumerate(emb_models):
            embedder = instantiate_from_config(config)
            if not isinstance(embedder, nn.Module):
                raise ValueError(f"embedder {n} ({config.get('target')}) is not a torch module")
            embedder.is_trainable = bool(config.get("is_trainable", False))
            embedder.ucg_rate = float(config.get("ucg_rate", 0.0))
            embedder.legacy_ucg_val = config.get("legacy_ucg_value", None)
            if "input_key" in config:
                embedder.input_key = config["input_key"]
            elif "input_keys" in config:
                embedder.input_keys = list(config["input_keys"])
            else:
                raise ValueError(f"embedder {n} ({config.get('target')}) needs input_key or input_keys")
            if embedder.ucg_rate > 0 or embedder.legacy_ucg_val is not None:
                logger.debug("embedder %d: ucg_rate / legacy_ucg_value are training settings, ignored", n)
            embedder.requires_grad_(False).eval()
            embedders.append(embedder)
        self.embedders = nn.ModuleList(embedders)

    @property
    def input_keys(self) -> list[str]:
        """The batch keys the embedders read, in order, without repeats."""
        keys: list[str] = []
        for embedder in self.embedders:
            for key in ([embedder.input_key] if hasattr(embedder, "input_key") else embedder.input_keys):
                if key not in keys:
                    keys.append(key)
        return keys

    @property
    def num_layers(self) -> Optional[int]:
        """The fewest layers among the text encoders (the largest clip skip they accept, and ignore), or None."""
        layers = [e.num_layers for e in self.embedders if getattr(e, "input_key", None) == "txt" and hasattr(e, "num_layers")]
        return min(layers) if layers else None

    def forward(self, batch: Mapping[str, Any], force_zero_embeddings: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """batch: the original keys ("txt": B prompts, or WeightedPrompts, "original_size_as_tuple" [B, 2] (height,
        width), "crop_coords_top_left" [B, 2] (top, left), "target_size_as_tuple" [B, 2], "aesthetic_score" [B, 1]).
        Outputs of embedders whose input_key is in `force_zero_embeddings` are zeros (the published sampling's
        negative branch passes ["txt"])."""
        missing = [k for k in self.input_keys if k not in batch]
        if missing:
            raise ValueError(f"the conditioning batch lacks {missing}; it has {sorted(batch)}")
        force_zero = set(force_zero_embeddings or ())
        output: dict[str, torch.Tensor] = {}
        for embedder in self.embedders:
            if hasattr(embedder, "input_key"):
                emb_out = embedder(batch[embedder.input_key])
            else:
                emb_out = embedder(*[batch[k] for k in embedder.input_keys])
            for emb in emb_out if isinstance(emb_out, (tuple, list)) else (emb_out,):
                key = self.OUTPUT_DIM2KEYS.get(emb.dim())
                if key is None:
                    raise ValueError(f"{type(embedder).__name__} returned a {emb.dim()}-D tensor; expected 2 to 5 dimensions")
                if getattr(embedder, "input_key", None) in force_zero:
                    emb = torch.zeros_like(emb)
                output[key] = torch.cat((output[key], emb), self.KEY2CATDIM[key]) if key in output else emb
        return output

    def get_unconditional_conditioning(
        self,
        batch_c: Mapping[str, Any],
        batch_uc: Optional[Mapping[str, Any]] = None,
        force_uc_zero_embeddings: Optional[Sequence[str]] = None,
        force_cond_zero_embeddings: Optional[Sequence[str]] = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(cond, uncond) as the published sampling computes them; uncond from `batch_uc` (default `batch_c`)."""
        c = self(batch_c, force_cond_zero_embeddings)
        uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings)
        return c, uc
