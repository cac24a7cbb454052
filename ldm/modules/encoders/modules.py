"""Text encoders. `FrozenCLIPEmbedder` (SD v1) builds CLIP's text transformer locally; `FrozenOpenCLIPEmbedder`
(SD 2.x) builds OpenCLIP's text tower. Nothing is downloaded: weights come from the checkpoint and the tokenizer
from the BPE merges file shipped in this package.

Both also encode prompts of any length the AUTOMATIC1111 web UI's way (`LongPromptEncoder`): weighted text fragments
are tokenized, split into chunks of 75 tokens (breaking after a nearby comma, and wherever a BREAK fragment stands),
each chunk wrapped in bos/eos and padded to 77, encoded separately, weighted, and concatenated to [B, 77 k, C]. The
prompt language itself (parsing `(word:1.2)`, BREAK, scheduling) lives in `microbatch.prompts`. Textual-inversion
embeddings (`ldm.modules.encoders.embeddings`) replace their names in a prompt by their vectors, never split across
two chunks.
"""
from __future__ import annotations

import importlib
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.embeddings import EmbeddingTable, TokenItem
from ldm.modules.encoders.tokenizer import CLIPTokenizer
from ldm.util import weight_init_skipped

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


# ----------------------------------------------------------------------------------------------------------------
# Long prompts: 75-token chunks, comma back-tracking, BREAK, emphasis (the web UI's defaults).

CHUNK_LENGTH = 75  # prompt tokens per chunk; with bos and eos each chunk fills CLIP's 77 positions
COMMA_BACKTRACK = 20  # the web UI's default "comma_padding_backtrack" (its "prompt word wrap length limit")
BREAK = ("BREAK", -1.0)  # the fragment microbatch.prompts.parse_prompt_attention emits for the BREAK keyword
ChunkRow = tuple[int, ...]  # the 77 token ids of one chunk


@dataclass(frozen=True)
class PromptChunks:
    """One prompt as chunks of 77 tokens.

    Attributes:
        tokens: k rows of 77 ids: bos, up to 75 prompt ids, eos, then padding (the encoder's pad id).
        multipliers: k rows of 77 emphasis weights (1.0 at bos, eos and padding).
        token_count: prompt tokens as the web UI counts them: 75 per chunk before the last, plus the last chunk's.
    """

    tokens: tuple[ChunkRow, ...]
    multipliers: tuple[tuple[float, ...], ...]
    token_count: int


def split_into_chunks(
    pieces: Sequence[Optional[tuple[Sequence[TokenItem], float]]],
    bos: int,
    eos: int,
    pad: int,
    comma: int,
    backtrack: int = COMMA_BACKTRACK,
) -> PromptChunks:
    """Token ids of weighted fragments -> 77-token chunks, the web UI's rules.

    Args:
        pieces: per fragment its BPE ids and weight, or None for BREAK (which closes the chunk in progress, even an
            empty one). An item may be a tuple of an embedding's placeholder ids: they stay in one chunk (when they
            would cross the chunk's end, the chunk is closed, padded, and they start the next one, as in the web UI).
        bos, eos, pad: the start, end and padding ids (SD 1.x pads with eos, SD 2.x OpenCLIP with 0).
        comma: the id of ',' ; when a chunk is full and the last comma in it is at most `backtrack` tokens from its
            end, the tokens after that comma move to the next chunk (0 disables this).
    """
    chunks: list[ChunkRow] = []
    weights: list[tuple[float, ...]] = []
    tokens: list[int] = []
    mults: list[float] = []
    last_comma = -1
    token_count = 0

    def close(is_last: bool = False) -> None:
        nonlocal tokens, mults, last_comma, token_count
        token_count += len(tokens) if is_last else CHUNK_LENGTH
        padding = CHUNK_LENGTH - len(tokens)
        chunks.append((bos, *tokens, eos, *[pad] * padding))
        weights.append((1.0, *mults, 1.0, *[1.0] * padding))
        tokens, mults, last_comma = [], [], -1

    for piece in pieces:
        if piece is None:
            close()
            continue
        ids, weight = piece
        for token in ids:
            run = token if isinstance(token, tuple) else None
            if run is None and token == comma:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == CHUNK_LENGTH and last_comma != -1 and len(tokens) - last_comma <= backtrack:
                # a full chunk with a comma near its end: the words after the comma start the next chunk
                cut = last_comma + 1
                moved, moved_mults = tokens[cut:], mults[cut:]
                tokens, mults = tokens[:cut], mults[:cut]
                close()
                tokens, mults = moved, moved_mults
            if len(tokens) == CHUNK_LENGTH:
                close()
            if run is None:
                tokens.append(token)
                mults.append(weight)
                continue
            if len(tokens) + len(run) > CHUNK_LENGTH:
                close()
            tokens.extend(run)
            mults.extend([weight] * len(run))
    if tokens or not chunks:
        close(is_last=True)
    return PromptChunks(tuple(chunks), tuple(weights), token_count)


# The web UI's "Emphasis" setting: "Original" (its default) weights and restores the mean, "No norm" only weights,
# "Ignore" parses the syntax but applies no weights, "None" does not parse it at all (microbatch.prompts's concern).
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


def check_emphasis(emphasis: Any) -> str:
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {emphasis!r}")
    return emphasis


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, emphasis: str = "Original") -> torch.Tensor:
    """The web UI's emphasis on one chunk position of a batch.

    z [N, 77, C] hidden states of the chunks encoded together, multipliers [N, 77]. "Original": z is multiplied by
    each token's weight, then rescaled so that its mean over the whole [N, 77, C] tensor equals the mean before
    weighting; "No norm": only multiplied; "Ignore" / "None": z unchanged. All-1.0 weights return z itself
    (bit-identical to no emphasis). Computed in float32, returned in z's dtype.
    """
    if check_emphasis(emphasis) in ("Ignore", "None") or bool((multipliers == 1.0).all()):
        return z
    zf = z.float()
    original_mean = zf.mean()
    zf = zf * multipliers.to(device=z.device, dtype=torch.float32).unsqueeze(-1)
    if emphasis == "Original":
        zf = zf * (original_mean / zf.mean())
    return zf.to(z.dtype)


def check_clip_skip(clip_skip: Any, layers: int) -> int:
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip must be an int from 1 (no skip) to {layers} (the text encoder's layers), got {clip_skip!r}")
    return clip_skip


class LongPromptEncoder:
    """Mixin for the CLIP text encoders: prompts of any length, weights and BREAK, as the web UI encodes them.

    A subclass provides `tokenizer` (CLIPTokenizer), `pad_id`, `token_embedding_module()` (the nn.Embedding that
    turns ids into the transformer's input) and `encode_chunk_tokens(tokens [N, 77], clip_skip)`.

    `embedding_table` (None until `embeddings()` creates it) holds the textual-inversion embeddings prompts may use.
    """

    tokenizer: Any
    pad_id: int
    embedding_table: Optional[EmbeddingTable] = None

    def encode_chunk_tokens(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        raise NotImplementedError

    def token_embedding_module(self) -> nn.Embedding:
        raise NotImplementedError

    def embeddings(self) -> EmbeddingTable:
        """This encoder's textual-inversion table, created empty on first use."""
        if self.embedding_table is None:
            module = self.token_embedding_module()
            self.embedding_table = EmbeddingTable(module.num_embeddings, module.embedding_dim)
        return self.embedding_table

    @property
    def embeddings_version(self) -> int:
        """Changes whenever the embeddings prompts can use change (0: none ever loaded)."""
        return 0 if self.embedding_table is None else self.embedding_table.version

    @property
    def comma_id(self) -> int:
        return self.tokenizer.encode(",")[0]

    def empty_chunk(self) -> ChunkRow:
        """The chunk of the empty prompt: bos, eos, padding. Shorter prompts of a batch are padded with it."""
        return split_into_chunks([], self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.pad_id, self.comma_id).tokens[0]

    def tokenize_weighted(self, fragments: Sequence[Sequence[Any]], backtrack: int = COMMA_BACKTRACK) -> PromptChunks:
        """[(text, weight), ...] (microbatch.prompts.parse_prompt_attention's output, ("BREAK", -1) included) ->
        the prompt's 77-token chunks. Each fragment is tokenized on its own, as in the web UI."""
        pieces: list[Optional[tuple[list[TokenItem], float]]] = []
        table = self.embedding_table
        for fragment in fragments:
            text, weight = fragment
            if text == BREAK[0] and weight == BREAK[1]:
                pieces.append(None)
            else:
                ids = self.tokenizer.encode(text)
                # embedding names are matched within a fragment, as the web UI does
                pieces.append((table.substitute(ids) if table else ids, float(weight)))
        tok = self.tokenizer
        return split_into_chunks(pieces, tok.bos_token_id, tok.eos_token_id, self.pad_id, self.comma_id, backtrack)

    def encode_chunk_rows(self, rows: Iterable[ChunkRow], clip_skip: int = 1, batch_size: int = 16) -> dict[ChunkRow, torch.Tensor]:
        """Distinct chunks -> {chunk: hidden states [77, C]}, each encoded once, `batch_size` chunks per call."""
        distinct = list(dict.fromkeys(rows))
        encoded: dict[ChunkRow, torch.Tensor] = {}
        for start in range(0, len(distinct), batch_size):
            part = distinct[start : start + batch_size]
            tokens = torch.tensor(part, dtype=torch.long, device=self.device)
            for row, z in zip(part, self.encode_tokens_with_embeddings(tokens, clip_skip)):
                encoded[row] = z
        return encoded

    def encode_tokens_with_embeddings(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """encode_chunk_tokens for rows that may hold embedding placeholder ids: those positions get id 0 for the
        transformer's lookup (the web UI's placeholder), then the embedding's vectors replace their rows of the
        token-embedding output, in its dtype. Rows without placeholders are encoded exactly as before."""
        table = self.embedding_table
        if table is None or not bool((tokens >= table.vocab_size).any()):
            return self.encode_chunk_tokens(tokens, clip_skip)
        placeholders = tokens >= table.vocab_size
        vectors = table.vectors_for(tokens[placeholders].tolist())

        def put_vectors(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if output.shape[:2] != tokens.shape:
                raise AssertionError(f"token embedding output {tuple(output.shape)} does not match tokens {tuple(tokens.shape)}")
            output = output.clone()
            output[placeholders] = vectors.to(device=output.device, dtype=output.dtype)
            return output

        handle = self.token_embedding_module().register_forward_hook(put_vectors)
        try:
            return self.encode_chunk_tokens(tokens.masked_fill(placeholders, 0), clip_skip)
        finally:
            handle.remove()

    def assemble(self, group: Sequence[PromptChunks], encoded: Mapping[ChunkRow, torch.Tensor], emphasis: str = "Original") -> torch.Tensor:
        """Prompts encoded together (one web UI forward call) -> [n, 77 k, C], k the group's largest chunk count.

        Prompts with fewer chunks are padded with the empty-prompt chunk; emphasis is applied per chunk position
        with the mean taken over the whole group at that position, as the web UI does. `encoded` holds every chunk
        of the group (and the empty chunk when padding is needed), from `encode_chunk_rows`. `emphasis`: one of
        EMPHASIS_MODES (see apply_emphasis).
        """
        check_emphasis(emphasis)
        if not group:
            raise ValueError("assemble needs at least one prompt")
        count = max(len(p.tokens) for p in group)
        empty = self.empty_chunk() if any(len(p.tokens) < count for p in group) else None
        parts = []
        for i in range(count):
            rows = [p.tokens[i] if i < len(p.tokens) else empty for p in group]
            ones = (1.0,) * len(rows[0])
            mults = torch.tensor([p.multipliers[i] if i < len(p.tokens) else ones for p in group], dtype=torch.float32)
            parts.append(apply_emphasis(torch.stack([encoded[row] for row in rows]), mults, emphasis))
        return parts[0] if count == 1 else torch.cat(parts, dim=1)

    def encode_weighted(self, prompts: Sequence[Sequence[Sequence[Any]]], clip_skip: int = 1, emphasis: str = "Original") -> torch.Tensor:
        """Batch of weighted prompts (each a list of (text, weight) fragments) -> context [B, 77 k, C], encoded
        together as the web UI encodes one batch: chunks, empty-chunk padding, emphasis over the batch."""
        return self.encode_weighted_chunks(prompts, clip_skip, emphasis)[0]

    def encode_weighted_chunks(
        self, prompts: Sequence[Sequence[Sequence[Any]]], clip_skip: int = 1, emphasis: str = "Original"
    ) -> tuple[torch.Tensor, list[PromptChunks], dict[ChunkRow, torch.Tensor]]:
        """encode_weighted, also returning each prompt's chunks and every chunk's hidden states before emphasis
        (SDXL's pooled output comes from the first chunk's)."""
        check_emphasis(emphasis)
        group = [self.tokenize_weighted(fragments) for fragments in prompts]
        rows = [row for p in group for row in p.tokens]
        if any(len(p.tokens) < max(len(q.tokens) for q in group) for p in group):
            rows.append(self.empty_chunk())
        encoded = self.encode_chunk_rows(rows, clip_skip)
        return self.assemble(group, encoded, emphasis), group, encoded


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
    config = CLIPTextConfig(**fields)
    skip = _transformers_no_init() if weight_init_skipped() else None
    if skip is None:
        model = CLIPTextModel(config)
    else:  # the weights come from a checkpoint: transformers' own init (~1.6 s for ViT-L) would be thrown away
        with skip():
            model = CLIPTextModel(config)
        for module in model.modules():
            ids = getattr(module, "position_ids", None)
            if isinstance(ids, torch.Tensor):
                ids.copy_(torch.arange(ids.shape[-1]).expand_as(ids))
    return model if hasattr(model, "text_model") else CLIPTextHolder(model)


def _transformers_no_init() -> Optional[Any]:
    """transformers' context manager that skips its models' weight initialisation (5.x or 4.x), or None."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return getattr(importlib.import_module(module), "no_init_weights")
        except (ImportError, AttributeError):
            continue
    return None


class FrozenCLIPEmbedder(LongPromptEncoder, AbstractEncoder):
    """CLIP text transformer: list of B prompts -> context [B, max_length, hidden_size] (last hidden state, after
    the final LayerNorm). `version` and `device` of the published yaml are accepted and ignored: no hub download,
    and the device is decided when the model is moved.

    `forward` encodes prompts literally and cuts them at `max_length` (the original behaviour); `encode_weighted`
    (from LongPromptEncoder) takes prompts of any length with weights, and clip skip.
    """

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

    def token_embedding_module(self) -> nn.Embedding:
        return self.transformer.get_input_embeddings()

    @property
    def num_layers(self) -> int:
        """Transformer layers: the largest clip skip."""
        return len(self.transformer.text_model.encoder.layers)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tokenize(self, text: list[str]) -> torch.Tensor:
        return self.tokenizer(list(text), max_length=self.max_length).input_ids

    def forward(self, text: list[str]) -> torch.Tensor:
        tokens = self.tokenize(text).to(self.device)
        return self.encode_chunk_tokens(tokens)

    def encode_chunk_tokens(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """tokens [N, L] -> [N, L, C] per `layer`. clip_skip N > 1 (layer "last" only): the final LayerNorm applied
        to the N-th hidden state from the end, as the web UI's "Clip skip"; 1 is the last hidden state itself."""
        text_model = self.transformer.text_model
        check_clip_skip(clip_skip, len(text_model.encoder.layers))
        if clip_skip != 1:
            if self.layer != "last":
                raise ValueError(f"clip_skip {clip_skip!r} needs the text encoder's layer 'last', this one uses {self.layer!r}")
            outputs = self.transformer(input_ids=tokens, output_hidden_states=True)
            return text_model.final_layer_norm(outputs.hidden_states[-clip_skip])
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]

    def encode(self, text: list[str]) -> torch.Tensor:
        return self(text)


# ----------------------------------------------------------------------------------------------------------------
# SD 2.x: the OpenCLIP text tower, with OpenCLIP's module names so that `cond_stage_model.model.*` loads strictly.

# The text tower of OpenCLIP ViT-H/14 (laion2b_s32b_b79k), in CLIPTextConfig field names.
VIT_H14_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1024,
)
OPENCLIP_TEXT_CONFIGS: dict[str, dict[str, Any]] = {"ViT-H-14": VIT_H14_TEXT_CONFIG}
_OPENCLIP_ACTIVATIONS = ("gelu", "quick_gelu")


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class OpenCLIPAttention(nn.Module):
    """Causal multi-head self-attention with torch.nn.MultiheadAttention's parameter names (`in_proj_weight`
    [3W, W], `in_proj_bias` [3W], `out_proj`), as OpenCLIP checkpoints store them. x [B, N, W] -> [B, N, W]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # [B, N, 3W] -> 3 x [B, heads, N, W / heads]
        q, k, v = qkv.reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class OpenCLIPResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with mlp = c_fc, GELU, c_proj."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = OpenCLIPAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        # exact (erf) GELU, as OpenCLIP's nn.GELU(); quick_gelu only for OpenAI-trained towers
        activation = nn.GELU() if act == "gelu" else QuickGELU()
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, mlp_width)), ("gelu", activation), ("c_proj", nn.Linear(mlp_width, width))])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str, eps: float):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(OpenCLIPResidualBlock(width, heads, mlp_width, act, eps) for _ in range(layers))


class OpenCLIPTextTower(nn.Module):
    """OpenCLIP's text model without the image tower: `token_embedding`, `positional_embedding`, `transformer`,
    `ln_final`, `text_projection`, `logit_scale` (the checkpoint's `cond_stage_model.model.*` names).

    `text_projection` and `logit_scale` only matter for CLIP's joint embedding space, not for SD conditioning; they
    are persistent buffers, so they load strictly when a checkpoint has them and may be absent from pruned files.
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        width, length = config["hidden_size"], config["max_position_embeddings"]
        self.context_length = length
        self.token_embedding = nn.Embedding(config["vocab_size"], width)
        self.positional_embedding = nn.Parameter(torch.empty(length, width))
        self.transformer = OpenCLIPTransformer(
            width, config["num_hidden_layers"], config["num_attention_heads"], config["intermediate_size"],
            config["hidden_act"], config["layer_norm_eps"],
        )
        self.ln_final = nn.LayerNorm(width, eps=config["layer_norm_eps"])
        # filled directly, not by nn.init (which loaders may skip): a file without them leaves defined values
        self.register_buffer("text_projection", torch.randn(width, config["projection_dim"]) * width**-0.5)
        self.register_buffer("logit_scale", torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def encode_tokens(self, tokens: torch.Tensor, stop_before: int = 0) -> torch.Tensor:
        """tokens [B, N] -> hidden states [B, N, W] after all but the last `stop_before` blocks, then ln_final."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.transformer.resblocks[: len(self.transformer.resblocks) - stop_before]:
            x = block(x)
        return self.ln_final(x)


class FrozenOpenCLIPEmbedder(LongPromptEncoder, AbstractEncoder):
    """SD 2.x text encoder: OpenCLIP ViT-H/14's text tower, list of B prompts -> context [B, 77, 1024].

    layer="penultimate" (the SD 2.x configs) stops before the last residual block and applies ln_final; "last"
    runs every block. Tokens are bos, BPE ids, eos, then zeros up to `max_length` (OpenCLIP's padding). `version`
    and `device` of the published yaml are accepted and ignored: weights come from the checkpoint, nothing is
    downloaded. `text_config` (CLIPTextConfig field names: hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, max_position_embeddings, vocab_size, hidden_act, layer_norm_eps, projection_dim)
    overrides the architecture's fields, for small test models.

    `encode_weighted` (from LongPromptEncoder) takes prompts of any length with weights. Clip skip has no effect
    here: the layer is fixed by the config, as in the web UI (which ignores its clip skip setting for OpenCLIP).
    """

    LAYERS = ("last", "penultimate")
    pad_id = 0  # OpenCLIP pads with 0 after eos

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: Optional[str] = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: Literal["last", "penultimate"] = "last",
        text_config: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if arch not in OPENCLIP_TEXT_CONFIGS and not text_config:
            raise ValueError(f"unknown OpenCLIP arch {arch!r}: known {sorted(OPENCLIP_TEXT_CONFIGS)}, or give text_config")
        fields = dict(OPENCLIP_TEXT_CONFIGS.get(arch, VIT_H14_TEXT_CONFIG))
        if text_config:
            unknown = set(text_config) - set(VIT_H14_TEXT_CONFIG)
            if unknown:
                raise ValueError(f"text_config fields not used by the OpenCLIP text tower: {sorted(unknown)}; known: {sorted(VIT_H14_TEXT_CONFIG)}")
            fields.update(dict(text_config))
        if fields["hidden_act"] not in _OPENCLIP_ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(_OPENCLIP_ACTIVATIONS)}, got {fields['hidden_act']!r}")
        if max_length > fields["max_position_embeddings"]:
            raise ValueError(f"max_length {max_length} exceeds the {fields['max_position_embeddings']} positions of the text tower")
        self.tokenizer = CLIPTokenizer()
        self.model = OpenCLIPTextTower(fields)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = 0 if layer == "last" else 1
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.model.eval()
        for p in self.parameters():
            p.requires_grad = False

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    def token_embedding_module(self) -> nn.Embedding:
        return self.model.token_embedding

    @property
    def num_layers(self) -> int:
        """Residual blocks: the largest clip skip accepted (and ignored)."""
        return len(self.model.transformer.resblocks)

    def tokenize(self, text: list[str]) -> torch.Tensor:
        """[B, max_length] ids: bos, BPE ids, eos, zero padding."""
        return self.tokenizer(list(text), max_length=self.max_length, pad_id=0).input_ids

    def forward(self, text: list[str]) -> torch.Tensor:
        tokens = self.tokenize(text).to(self.device)
        return self.encode_chunk_tokens(tokens)

    def encode_chunk_tokens(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """tokens [N, L] -> [N, L, W]. clip_skip is validated, then ignored (logged once per encoder)."""
        check_clip_skip(clip_skip, len(self.model.transformer.resblocks))
        if clip_skip != 1 and not getattr(self, "_clip_skip_noted", False):
            logger.warning("clip skip %d has no effect on the SD 2.x OpenCLIP text encoder (as in the web UI); ignored", clip_skip)
            self._clip_skip_noted = True
        return self.model.encode_tokens(tokens, stop_before=self.layer_idx)

    def encode(self, text: list[str]) -> torch.Tensor:
        return self(text)
