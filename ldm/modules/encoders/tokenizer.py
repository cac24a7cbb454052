"""CLIP's byte-level BPE tokenizer, written from the published algorithm (Radford et al. 2021).

The merges come from ``bpe_simple_vocab_16e6.txt.gz`` (shipped next to this file; MIT-licensed data from
open-clip-torch). The vocabulary has 49408 entries: the 256 byte characters, the same with ``</w>`` (end of word),
one entry per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Text is cleaned as CLIP does: ``ftfy.fix_text`` when ftfy happens to be installed (it is not a dependency), NFC
normalisation (part of what ``fix_text`` does, so results without ftfy stay close), HTML entities unescaped twice,
whitespace runs collapsed to one space, stripped, lowercased.
"""
from __future__ import annotations

import functools
import gzip
import html
import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import regex
import torch

logger = logging.getLogger(__name__)

DEFAULT_MERGES_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
# CLIP keeps merges [1 : 49152 - 256 - 2 + 1]: line 0 is a header; 48894 merges + 512 byte tokens + 2 specials.
NUM_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, other non-space runs.
# IGNORECASE as in CLIP (text is already lowercase; it only matters for a few case-folding marks such as U+0345).
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")

try:  # optional, as in CLIP's own cleaning; never required
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - depends on the environment
    _ftfy = None


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte 0..255 to a printable unicode character (GPT-2's reversible byte alphabet).

    Bytes that are already printable latin-1 characters map to themselves; the others are shifted to 256 + n so that
    no byte maps to whitespace or a control character. The dict's order (printable bytes first, then the shifted
    ones) is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def clean_text(text: str) -> str:
    """CLIP's text cleaning: (ftfy), NFC, HTML unescape twice, collapse whitespace, strip, lowercase."""
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip().lower()


class _Vocab:
    """The loaded merges, vocabulary and a cache of BPE results; one per merges file per process."""

    def __init__(self, merges_path: Path) -> None:
        with gzip.open(merges_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{merges_path} does not hold {NUM_MERGES} merges of two symbols each")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.decoder = tokens
        if len(self.encoder) != 49408:
            raise ValueError(f"{merges_path} gives {len(self.encoder)} distinct tokens, expected 49408")
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Token ids of one pre-tokenised word (already in the byte alphabet), merging lowest-rank pairs first."""
        if word in (BOS_TOKEN, EOS_TOKEN):
            return (self.encoder[word],)
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            first, second = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if (first, second) not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best-ranked pair, left to right
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.encoder[p] for p in parts)


@functools.lru_cache(maxsize=None)
def _load_vocab(merges_path: str) -> _Vocab:
    logger.debug("Loading CLIP BPE merges from %s", merges_path)
    return _Vocab(Path(merges_path))


# The warning quotes at most this many characters of the dropped text: a 1000-word prompt stays one short line.
MAX_QUOTED_CHARS = 240


def _truncation_message(rows: list[int], count: int, dropped_text: str, max_length: int) -> str:
    """One line of the truncation warning; identical prompts (a repeated batch) share a line."""
    who = f"Prompt {rows[0]} is" if len(rows) == 1 else f"Prompts {', '.join(map(str, rows))} are"
    more = ""
    if len(dropped_text) > MAX_QUOTED_CHARS:
        dropped_text, more = dropped_text[:MAX_QUOTED_CHARS] + "...", f" (and {len(dropped_text) - MAX_QUOTED_CHARS} more characters)"
    return f'{who} longer than {max_length} tokens; dropped {count} tokens: "{dropped_text}"{more}'


@dataclass
class TokenizedBatch:
    """Token ids of a batch of prompts.

    Attributes:
        input_ids: [B, max_length] int64: bos, BPE ids, eos, then padding.
        lengths: real tokens per prompt, bos and eos included (at most max_length).
        truncated: per prompt, the decoded text of the tokens dropped to fit max_length ('' when none).
    """

    input_ids: torch.LongTensor
    lengths: list[int]
    truncated: list[str]


class CLIPTokenizer:
    """CLIP's BPE tokenizer (the text encoder of SD 1.x FrozenCLIPEmbedder and SD 2.x OpenCLIP).

    Args:
        merges_path: the gzipped merges file; defaults to the one shipped with this package. Loaded lazily, once
            per process.
    """

    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __init__(self, merges_path: str | Path | None = None) -> None:
        self.merges_path = str(Path(merges_path if merges_path is not None else DEFAULT_MERGES_PATH).resolve())

    @property
    def _vocab(self) -> _Vocab:
        return _load_vocab(self.merges_path)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab.decoder)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without the start and end tokens."""
        if not isinstance(text, str):
            raise ValueError(f"expected a str to tokenize, got {type(text).__name__}: {text!r:.80}")
        vocab = self._vocab
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            # surrogatepass: lone surrogates (invalid in UTF-8) still become bytes instead of raising
            ids.extend(vocab.bpe("".join(vocab.byte_encoder[b] for b in word.encode("utf-8", "surrogatepass"))))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids: '</w>' becomes a space; special tokens are dropped (or kept as text); stripped."""
        vocab = self._vocab
        bad = [i for i in ids if not 0 <= int(i) < len(vocab.decoder)]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {len(vocab.decoder)}): {bad[:10]}")
        specials = {self.bos_token_id, self.eos_token_id}
        pieces = [vocab.decoder[int(i)] for i in ids if not (skip_special_tokens and int(i) in specials)]
        # Every character of a non-special piece is a byte symbol; '</w>' itself is plain ascii bytes.
        data = bytes(vocab.byte_decoder[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(
        self, texts: str | Sequence[str], max_length: int = 77, pad_id: int | None = None
    ) -> TokenizedBatch:
        """Tokenize a batch of prompts to [B, max_length] ids: bos + ids + eos, truncated, then padded.

        Truncation keeps the final eos (bos, the first max_length - 2 ids, eos), as HF's CLIPTokenizer with
        ``truncation=True, padding="max_length"``. One warning is logged per call naming what was dropped.

        Args:
            texts: prompts (a single str is a batch of one).
            max_length: sequence length, at least 2 (77 for every Stable Diffusion text encoder).
            pad_id: padding id; default eos (49407), the SD 1.x FrozenCLIPEmbedder convention. SD 2.x OpenCLIP uses 0.
        """
        if isinstance(texts, str):
            texts = [texts]
        not_str = [(i, type(t).__name__) for i, t in enumerate(texts) if not isinstance(t, str)]
        if not_str:
            raise ValueError(f"prompts must be str; got (index, type) {not_str[:10]}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for bos and eos), got {max_length!r}")
        pad_id = self.eos_token_id if pad_id is None else pad_id
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < self.vocab_size:
            raise ValueError(f"pad_id must be an int in [0, {self.vocab_size}), got {pad_id!r}")

        input_ids = torch.full((len(texts), max_length), pad_id, dtype=torch.long)
        lengths: list[int] = []
        truncated: list[str] = []
        dropped_rows: dict[tuple[int, str], list[int]] = {}  # (count, text) -> 1-based prompt numbers
        for row, text in enumerate(texts):
            ids = self.encode(text)
            kept, dropped = ids[: max_length - 2], ids[max_length - 2 :]
            seq = [self.bos_token_id, *kept, self.eos_token_id]
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            lengths.append(len(seq))
            truncated.append(self.decode(dropped) if dropped else "")
            if dropped:
                dropped_rows.setdefault((len(dropped), truncated[-1]), []).append(row + 1)
        if dropped_rows:
            lines = [_truncation_message(rows, count, text, max_length) for (count, text), rows in dropped_rows.items()]
            logger.warning("%s", "\n".join(lines))
        return TokenizedBatch(input_ids=input_ids, lengths=lengths, truncated=truncated)
