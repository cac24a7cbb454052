"""Text encoders. `FrozenCLIPEmbedder` (SD v1) builds CLIP's text transformer locally; nothing is downloaded:
its weights come from the checkpoint and its tokenizer from the BPE merges file shipped in this package."""
from __future__ import annotations

import logging
from typing import Any, Literal, Mapping, Optional

import torch
from torch import nn

from ldm.modules.encoders.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

# The text tower of OpenAI CLIP ViT-L/14, as used by Stable Diffusion v1.
VIT_L14_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


class CLIPTextHolder(nn.Module):
    """Holds transformers' CLIP text transformer as `text_model`, so that parameter names are the checkpoint's
    (`text_model.embeddings...`) whatever the transformers version: 4.x nests the transformer under `text_model`
    itself, 5.x puts embeddings/encoder/final_layer_norm at the top of CLIPTextModel."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.text_model(*args, **kwargs)


def build_clip_text_model(text_config: Optional[Mapping[str, Any]]) -> nn.Module:
    """transformers' CLIP text model from the ViT-L/14 text configuration, updated with `text_config` fields; its
    parameters are named `text_model.*` as in the original checkpoints."""
    from transformers import CLIPTextConfig, CLIPTextModel

    fields = dict(VIT_L14_TEXT_CONFIG)
    if text_config:
        unknown = set(text_config) - set(CLIPTextConfig().to_dict())
        if unknown:
            raise ValueError(f"text_config has fields that CLIPTextConfig does not know: {sorted(unknown)}")
        fields.update({k: (v if not hasattr(v, "items") else dict(v)) for k, v in dict(text_config).items()})
    model = CLIPTextModel(CLIPTextConfig(**fields))
    return model if hasattr(model, "text_model") else CLIPTextHolder(model)


class FrozenCLIPEmbedder(AbstractEncoder):
    """CLIP text transformer: list of B prompts -> context [B, max_length, hidden_size] (last hidden state, after
    the final LayerNorm). `version` and `device` of the published yaml are accepted and ignored: no hub download,
    and the device is decided when the model is moved."""

    LAYERS = ("last", "pooled", "hidden")

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: Optional[str] = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: Literal["last", "pooled", "hidden"] = "last",
        layer_idx: Optional[int] = None,
        text_config: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if layer == "hidden" and layer_idx is None:
            raise ValueError("layer 'hidden' needs layer_idx")
        self.tokenizer = CLIPTokenizer()
        self.transformer = build_clip_text_model(text_config)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.transformer.eval()
        for p in self.parameters():
            p.requires_grad = False

    @property
    def device(self) -> torch.device:
        return self.transformer.get_input_embeddings().weight.device

    def tokenize(self, text: list[str]) -> torch.Tensor:
        return self.tokenizer(list(text), max_length=self.max_length).input_ids

    def forward(self, text: list[str]) -> torch.Tensor:
        tokens = self.tokenize(text).to(self.device)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]

    def encode(self, text: list[str]) -> torch.Tensor:
        return self(text)
