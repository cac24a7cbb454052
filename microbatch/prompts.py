"""The AUTOMATIC1111 web UI's prompt language, with its public names so that code written against it ports.

- `parse_prompt_attention`: emphasis `(x)`, `[x]`, `(x:w)`, escapes and `BREAK` -> [[text, weight], ...].
- `get_learned_conditioning_prompt_schedules`: prompt editing `[from:to:when]` and alternation `[a|b]` -> for each
  prompt the texts to use and the step at which each one ends.
- `get_learned_conditioning`: prompts -> per prompt [(end_at_step, cond [77 k, C])], long prompts in 75-token
  chunks, emphasis and clip skip applied by the text encoder (`ldm.modules.encoders.modules.LongPromptEncoder`).
  SDXL: cond is {"crossattn": [77 k, C], "vector": [adm]}, both text encoders following the same rules
  (`sgm.modules.encoders.modules.WeightedPrompts`).
- `reconstruct_cond_batch`: per-image schedules and a step index -> the batch conditioning for that step.
- Composable prompts, `a cat AND a dog:0.5` (Liu et al. 2022, "Compositional Visual Generation with Composable
  Diffusion Models"): `get_multicond_learned_conditioning`, `reconstruct_multicond_batch`, `combine_denoised`.

Steps are counted as the web UI counts them: `steps` is the number of denoiser calls of the run, and the step index
given to `reconstruct_*` is the 0-based denoiser call; an entry with end_at_step e is used while index <= e.
Everything here is written from the web UI's documented behaviour (docstring examples and option descriptions); its
schedule grammar is a lark grammar, parsed here by a small recursive-descent parser of our own.
"""
from __future__ import annotations

import logging
import math
import re
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch

from ldm.modules.encoders.modules import EMPHASIS_MODES, LongPromptEncoder, check_emphasis
from samplers.guidance import combine_parts
from sgm.modules.encoders.modules import WeightedPrompts

__all__ = [
    "EMPHASIS_MODES",
    "ComposableScheduledPromptConditioning",
    "MulticondLearnedConditioning",
    "ScheduledPromptConditioning",
    "combine_denoised",
    "cond_at",
    "get_learned_conditioning",
    "get_learned_conditioning_prompt_schedules",
    "get_learned_conditioning_sdxl",
    "get_multicond_learned_conditioning",
    "get_multicond_prompt_list",
    "pad_cond_uncond",
    "pad_cond_uncond_v0",
    "parse_prompt_attention",
    "reconstruct_cond_batch",
    "reconstruct_multicond_batch",
    "stack_conds",
]

logger = logging.getLogger(__name__)

ROUND_MULTIPLIER = 1.1  # (text)
SQUARE_MULTIPLIER = 1 / 1.1  # [text]

# ----------------------------------------------------------------------------------------------------------------
# Emphasis

# One token of the emphasis syntax; the first alternative that matches wins, in this order.
_ATTENTION_TOKEN = re.compile(
    r"""
    \\(?P<escaped>[()\[\]\\])        # \( \) \[ \] \\ : the character itself
    | (?P<backslash>\\)              # any other backslash: dropped
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)  # (text:1.2) closes with a weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """Prompt -> [[text, weight], ...], the web UI's emphasis rules.

    `(x)` multiplies x's weight by 1.1, `[x]` divides it by 1.1, `(x:w)` multiplies it by w; nesting multiplies.
    `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters (another backslash is dropped); a closing bracket
    with nothing open is literal text, and brackets still open at the end apply their multiplier to everything after
    them. The word BREAK (with the whitespace around it) becomes ["BREAK", -1] (inside brackets its -1 is
    multiplied like any weight, and it is then no longer a chunk break: the web UI's behaviour). Adjacent runs of
    equal weight are merged; an empty prompt gives [["", 1.0]].

    >>> parse_prompt_attention("an (important) word")
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]

    Raises:
        ValueError: a weight that is not a number, such as `(x:1.2.3)`.
    """
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a str, got {type(text).__name__}: {text!r:.80}")
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for entry in res[start:]:
            entry[1] *= multiplier

    for m in _ATTENTION_TOKEN.finditer(text):
        kind = m.lastgroup
        if kind == "escaped":
            res.append([m.group("escaped"), 1.0])
        elif kind == "backslash":
            res.append(["", 1.0])
        elif kind == "open":
            (round_open if m.group("open") == "(" else square_open).append(len(res))
        elif kind == "weight" and round_open:
            try:
                weight = float(m.group("weight"))
            except ValueError:
                raise ValueError(f"emphasis weight {m.group('weight')!r} is not a number in prompt {text!r:.200}") from None
            multiply_from(round_open.pop(), weight)
        elif kind == "close" and m.group("close") == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif kind == "close" and m.group("close") == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:  # text, a lone ':', an unmatched closer, or a weighted closer with no '(' open
            for i, part in enumerate(_BREAK.split(m.group(0))):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    if not res:
        return [["", 1.0]]
    merged = [res[0]]
    for entry in res[1:]:
        if entry[1] == merged[-1][1]:
            merged[-1][0] += entry[0]
        else:
            merged.append(entry)
    return merged


# ----------------------------------------------------------------------------------------------------------------
# Prompt editing and alternation

# lark's SIGNED_NUMBER: an optional sign, then an int with an exponent, a decimal (with an optional exponent) or an int
_NUMBER = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*")


@dataclass
class _Scheduled:
    before: list  # nodes shown while step <= when ([] when the prompt has no "from" part)
    after: list
    number: str  # the `when` as written


@dataclass
class _Alternate:
    options: list  # a list of node lists, one per option


Node = Union[str, _Scheduled, _Alternate]


class _ScheduleParser:
    """Recursive descent over the web UI's schedule grammar. A prompt is plain text, whitespace and bracketed
    constructs; `(..)`, `(..:..)` and `[..]` are kept as text (emphasis is parsed later), `[a:b:N]` / `[b:N]` is a
    scheduled edit, `[a|b|...]` an alternation. At the top level a bracket or colon that starts no complete construct
    is literal text; a `|` outside an alternation, or a backslash at the end or before a newline, makes the whole
    prompt unparsable (then it is used literally)."""

    def __init__(self, text: str):
        self.text = text
        self._constructs: dict[int, Optional[tuple[list, int]]] = {}  # a construct at i parses the same everywhere

    def parse(self) -> Optional[list]:
        text, nodes, i = self.text, [], 0
        while i < len(text):
            c = text[i]
            if c in "[(":
                found = self._construct(i)
                if found is not None:
                    nodes.extend(found[0])
                    i = found[1]
                    continue
                nodes.append(c)
                i += 1
            elif c in "]):":
                nodes.append(c)
                i += 1
            else:
                items, j = self._prompt(i)
                if j == i:  # '|' or a bad backslash: no parse
                    return None
                nodes.extend(items)
                i = j
        return nodes

    def _prompt(self, i: int) -> tuple[list, int]:
        """Plain text, whitespace and complete constructs from i; stops before ] ) : | , at the end, or before
        anything that cannot continue a prompt (a bracket that starts no construct, a backslash with nothing
        escapable after it)."""
        text, nodes = self.text, []
        while i < len(text):
            c = text[i]
            if c in "])|:":
                break
            if c in "[(":
                found = self._construct(i)
                if found is None:
                    break
                nodes.extend(found[0])
                i = found[1]
            elif c == "\\":
                if i + 1 >= len(text) or text[i + 1] == "\n":
                    break
                nodes.append(text[i : i + 2])
                i += 2
            else:
                j = i
                while j < len(text) and text[j] not in "[]()|:\\":
                    j += 1
                nodes.append(text[i:j])
                i = j
        return nodes, i

    def _construct(self, i: int) -> Optional[tuple[list, int]]:
        if i not in self._constructs:
            self._constructs[i] = self._parse_construct(i)
        return self._constructs[i]

    def _parse_construct(self, i: int) -> Optional[tuple[list, int]]:
        text = self.text
        if text[i] == "(":
            first, j = self._prompt(i + 1)
            if j < len(text) and text[j] == ")":
                return ["(", *first, ")"], j + 1
            if j < len(text) and text[j] == ":":
                second, k = self._prompt(j + 1)
                if k < len(text) and text[k] == ")":
                    return ["(", *first, ":", *second, ")"], k + 1
            return None
        segments: list[tuple[list, int, int]] = []
        separators: list[str] = []
        j = i + 1
        while True:
            items, end = self._prompt(j)
            segments.append((items, j, end))
            if end >= len(text):
                return None
            if text[end] == "]":
                break
            if text[end] not in ":|":
                return None
            separators.append(text[end])
            j = end + 1
        close = end + 1
        if not separators:
            return ["[", *segments[0][0], "]"], close
        if all(s == "|" for s in separators):
            return [_Alternate([items for items, _, _ in segments])], close
        if all(s == ":" for s in separators) and len(separators) <= 2:
            _, start, stop = segments[-1]
            number = _NUMBER.fullmatch(text, start, stop)
            if number is not None:
                before = segments[0][0] if len(separators) == 2 else []
                return [_Scheduled(before, segments[-2][0], number.group(1))], close
        return None


@dataclass(frozen=True)
class _StepRule:
    """How a `when` number becomes a step (the web UI's rules, new and old)."""

    steps: int
    int_offset: int
    float_offset: float
    old: bool

    def when(self, number: str) -> int:
        v = float(number)
        if self.old:
            v = v * self.steps if v < 1 else v
        elif "." in number:
            v = (v - self.float_offset) * self.steps
        else:
            v = v - self.int_offset
        if not math.isfinite(v):
            raise ValueError(f"prompt-editing step {number!r} is not a finite number")
        return min(self.steps, int(v))


def _collect_steps(nodes: list, rule: _StepRule, out: set) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = rule.when(node.number)
            if when >= 1:
                out.add(when)
            _collect_steps(node.before, rule, out)
            _collect_steps(node.after, rule, out)
        elif isinstance(node, _Alternate):
            out.update(range(1, rule.steps + 1))
            for option in node.options:
                _collect_steps(option, rule, out)


def _render(nodes: list, step: int, rule: _StepRule) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            parts.append(_render(node.before if step <= rule.when(node.number) else node.after, step, rule))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, rule))
    return "".join(parts)


def _check_steps(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def get_learned_conditioning_prompt_schedules(
    prompts: Sequence[str], base_steps: int, hires_steps: Optional[int] = None, use_old_scheduling: bool = False
) -> list[list[list]]:
    """Prompts -> for each, [[end_step, text], ...]: the text to use up to and including each end step.

    `[from:to:when]` uses `from` up to step `when`, then `to`; `[to:when]` adds `to` after `when`; `[from::when]`
    removes `from` after `when`. A `when` written with a decimal point is a fraction of the steps (`0.25`, `1.0`),
    otherwise a step number (the web UI's rule since 1.6; `use_old_scheduling=True` gives its earlier rule: below 1
    a fraction, else a step). Constructs nest. `[a|b|c]` alternates every step. For the hires pass
    (`hires_steps`), integers count from the end of the first pass's `base_steps` and fractions from 1.0, so that
    `[a:b:15]` with 10 + 10 steps switches at hires step 5. Text that does not parse is used as it is.

    >>> get_learned_conditioning_prompt_schedules(["a [b:c:0.5] d"], 10)
    [[[5, 'a b d'], [10, 'a c d']]]
    """
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of str, got the str {prompts!r:.80}")
    _check_steps("steps", base_steps)
    if hires_steps is None or use_old_scheduling:
        rule = _StepRule(base_steps, 0, 0.0, use_old_scheduling)
    else:
        rule = _StepRule(_check_steps("hires_steps", hires_steps), base_steps, 1.0, False)

    def schedule(prompt: str) -> list[list]:
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a str, got {type(prompt).__name__}: {prompt!r:.80}")
        try:
            nodes = _ScheduleParser(prompt).parse()
        except RecursionError:
            logger.warning("brackets nested too deeply to parse prompt editing; using the prompt as written: %.80r", prompt)
            nodes = None
        if nodes is None:
            return [[rule.steps, prompt]]
        ends = {rule.steps}
        try:
            _collect_steps(nodes, rule, ends)
        except ValueError as e:
            raise ValueError(f"{e} in prompt {prompt!r:.200}") from None
        return [[end, _render(nodes, end, rule)] for end in sorted(ends)]

    by_prompt = {p: schedule(p) for p in dict.fromkeys(prompts)}
    return [[list(entry) for entry in by_prompt[p]] for p in prompts]


# ----------------------------------------------------------------------------------------------------------------
# Conditioning

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
ScheduledPromptConditioning.__doc__ = (
    "cond [77 k, C] (SDXL: {'crossattn': [77 k, C], 'vector': [adm]}), used while the step index is <= end_at_step."
)
# a cond row: a context tensor [77 k, C], or SDXL's dict of them
Cond = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def _text_encoder(model: Any) -> LongPromptEncoder:
    encoder = getattr(model, "cond_stage_model", model)
    if not isinstance(encoder, LongPromptEncoder):
        raise ValueError(f"the model's text encoder {type(encoder).__name__} does not support the prompt language (needs a CLIP/OpenCLIP encoder)")
    return encoder


def _fragments(text: str, emphasis: str) -> list[list]:
    """`text` as [fragment, weight] pairs under the "Emphasis" setting ("None": brackets and BREAK are plain text)."""
    return [[text, 1.0]] if emphasis == "None" else parse_prompt_attention(text)


def get_learned_conditioning(
    model: Any,
    prompts: Sequence[str],
    steps: int,
    clip_skip: int = 1,
    hires_steps: Optional[int] = None,
    use_old_scheduling: bool = False,
    emphasis: str = "Original",
) -> list[list[ScheduledPromptConditioning]]:
    """Prompts -> for each, its schedule [ScheduledPromptConditioning(end_at_step, cond [77 k, C]), ...].

    Each distinct prompt's scheduled texts are encoded together as the web UI does (texts with fewer chunks padded
    with the empty-prompt chunk, emphasis normalised over the prompt's texts), while each distinct 77-token chunk
    goes through the text encoder once for the whole call. A plain prompt of at most 75 tokens gives exactly
    `model.get_learned_conditioning([prompt])[0]`. An SDXL model: see get_learned_conditioning_sdxl.

    Args:
        model: a LatentDiffusion model (or its text encoder) whose encoder is a LongPromptEncoder.
        prompts: B prompts in the web UI's prompt language.
        steps: denoiser calls of the run (for `[a:b:when]` and `[a|b]`).
        clip_skip: 1 = the last layer; N = the N-th layer from the end (SD 1.x; no effect on SD 2.x).
        hires_steps, use_old_scheduling: see get_learned_conditioning_prompt_schedules.
        emphasis: the web UI's "Emphasis" setting, one of EMPHASIS_MODES: "Original" (default), "No norm" (weights
            without restoring the mean), "Ignore" (syntax parsed, weights not applied), "None" (brackets and BREAK
            are plain text).
    """
    check_emphasis(emphasis)
    if is_sdxl(model):
        return get_learned_conditioning_sdxl(model, prompts, steps, clip_skip, hires_steps, use_old_scheduling, emphasis)
    encoder = _text_encoder(model)
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    by_prompt = dict(zip(prompts, schedules))
    chunked = {}
    for schedule in by_prompt.values():
        for _, text in schedule:
            if text not in chunked:
                chunked[text] = encoder.tokenize_weighted(_fragments(text, emphasis))
    rows = [row for chunks in chunked.values() for row in chunks.tokens]
    if len({len(c.tokens) for c in chunked.values()}) > 1:
        rows.append(encoder.empty_chunk())
    with torch.no_grad():
        encoded = encoder.encode_chunk_rows(rows, clip_skip)
        results = {}
        for prompt, schedule in by_prompt.items():
            conds = encoder.assemble([chunked[text] for _, text in schedule], encoded, emphasis)
            results[prompt] = [ScheduledPromptConditioning(end, cond) for (end, _), cond in zip(schedule, conds)]
    return [list(results[p]) for p in prompts]


def is_sdxl(model: Any) -> bool:
    """Whether `model` is an SDXL DiffusionEngine (dict conditioning from a GeneralConditioner)."""
    return hasattr(model, "conditioner") and hasattr(model, "conditioning_batch")


def get_learned_conditioning_sdxl(
    model: Any,
    prompts: Sequence[str],
    steps: int,
    clip_skip: int = 1,
    hires_steps: Optional[int] = None,
    use_old_scheduling: bool = False,
    emphasis: str = "Original",
    conditioning_batch: Optional[Callable[[list[str]], dict[str, Any]]] = None,
    is_negative_prompt: bool = False,
) -> list[list[ScheduledPromptConditioning]]:
    """get_learned_conditioning for an SDXL DiffusionEngine: cond = {"crossattn": [77 k, C], "vector": [adm]}.

    As the web UI: each distinct prompt's scheduled texts go through the conditioner together, and each text
    encoder (CLIP ViT-L, OpenCLIP bigG; the refiner has bigG only) chunks, weights and encodes them by the SD 1.x
    rules; crossattn concatenates the encoders' hidden states per token, the pooled part of vector comes from each
    text's first chunk. A negative prompt whose texts are all empty gets zero text embeddings (the published
    sampling's force_zero_embeddings=["txt"], applied by the web UI to an empty negative prompt only). A plain prompt
    of at most 75 tokens gives exactly `model.get_learned_conditioning(model.conditioning_batch([prompt]))`.

    Args:
        model: an sgm.models.diffusion.DiffusionEngine.
        prompts, steps, hires_steps, use_old_scheduling, emphasis: see get_learned_conditioning.
        clip_skip: validated and ignored, as the web UI does for SDXL by default.
        conditioning_batch: texts -> the conditioner's batch (its micro-conditioning); default
            `model.conditioning_batch` (the native size).
        is_negative_prompt: these are negative prompts (an empty one is zeroed).
    """
    check_emphasis(emphasis)
    text_embedders = [e for e in model.conditioner.embedders if getattr(e, "input_key", None) == "txt"]
    unable = [type(e).__name__ for e in text_embedders if not hasattr(e, "encode_prompt_language")]
    if unable:
        raise ValueError(f"the SDXL text encoders {unable} do not support the prompt language")
    make_batch = conditioning_batch or model.conditioning_batch
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    results = {}
    for prompt, schedule in zip(prompts, schedules):
        if prompt in results:
            continue
        texts = [text for _, text in schedule]
        parsed = [tuple(map(tuple, _fragments(text, emphasis))) for text in texts]
        batch = dict(make_batch(texts))
        batch["txt"] = WeightedPrompts(tuple(parsed), clip_skip, emphasis)
        zero = is_negative_prompt and all(text == "" for text in texts)
        with torch.no_grad():
            cond = model.get_learned_conditioning(batch, ["txt"] if zero else None)
        results[prompt] = [ScheduledPromptConditioning(end, {k: v[i] for k, v in cond.items()}) for i, (end, _) in enumerate(schedule)]
    return [list(results[p]) for p in prompts]


def stack_conds(conds: Sequence[Cond]) -> Any:
    """Rows [77 k_i, C] -> [B, 77 max k, C]; a shorter row is extended by repeating its last vector (what the web UI
    does for the prompts of one batch). SDXL rows (dicts) -> a dict of each key's rows stacked that way."""
    if not conds:
        raise ValueError("stack_conds needs at least one tensor")
    if isinstance(conds[0], Mapping):
        return {k: stack_conds([c[k] for c in conds]) for k in conds[0]}
    length = max(c.shape[0] for c in conds)
    return torch.stack([c if c.shape[0] == length else torch.cat([c, c[-1:].expand(length - c.shape[0], -1)]) for c in conds])


def cond_at(schedule: Sequence[ScheduledPromptConditioning], step: int) -> torch.Tensor:
    """One prompt's cond [77 k, C] at 0-based denoiser call `step`: its first entry with step <= end_at_step, or its
    first entry when none is (the web UI's fallback, reached only by calls beyond the counted steps)."""
    return _entry_at(schedule, step).cond


def _entry_at(schedule: Sequence[ScheduledPromptConditioning], step: int) -> ScheduledPromptConditioning:
    for entry in schedule:
        if step <= entry.end_at_step:
            return entry
    return schedule[0]  # past the last end: the web UI falls back to the first entry


def reconstruct_cond_batch(c: Sequence[Sequence[ScheduledPromptConditioning]], current_step: int) -> torch.Tensor:
    """Per-image schedules -> the batch conditioning [B, 77 k, C] at 0-based denoiser call `current_step`.

    Each image uses its first entry with current_step <= end_at_step (its first entry when none is); rows of
    different lengths are stacked by `stack_conds` (SDXL: a dict of stacked rows).
    """
    if not c:
        raise ValueError("reconstruct_cond_batch needs at least one schedule")
    return stack_conds([_entry_at(schedule, current_step).cond for schedule in c])


def pad_cond_uncond(cond: Any, uncond: Any, empty: torch.Tensor) -> tuple[Any, Any]:
    """The web UI's optional "Pad prompt/negative prompt" (off by default): the shorter of cond [B, 77 k1, C] and
    uncond [B, 77 k2, C] gets copies of the empty prompt's chunk `empty` [77, C] until both have max(k1, k2).
    SDXL dicts: their "crossattn" is padded (`empty` is the empty prompt's crossattn), "vector" kept."""
    if isinstance(cond, Mapping):
        c, u = pad_cond_uncond(cond["crossattn"], uncond["crossattn"], empty)
        return {**cond, "crossattn": c}, {**uncond, "crossattn": u}
    empty = empty.reshape(1, -1, empty.shape[-1]).to(cond)
    repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if repeats < 0:
        cond = torch.cat([cond, empty.repeat(cond.shape[0], -repeats, 1)], dim=1)
    elif repeats > 0:
        uncond = torch.cat([uncond, empty.repeat(uncond.shape[0], repeats, 1)], dim=1)
    return cond, uncond


def pad_cond_uncond_v0(cond: Any, uncond: Any) -> tuple[Any, Any]:
    """The web UI's optional "Pad prompt/negative prompt (v0)" (its DDIM behaviour before 1.6): a shorter uncond
    repeats its last vector up to cond's length, a longer one is cut to it. SDXL dicts: on their "crossattn"."""
    if isinstance(cond, Mapping):
        c, u = pad_cond_uncond_v0(cond["crossattn"], uncond["crossattn"])
        return {**cond, "crossattn": c}, {**uncond, "crossattn": u}
    if uncond.shape[1] < cond.shape[1]:
        uncond = torch.cat([uncond, uncond[:, -1:].expand(-1, cond.shape[1] - uncond.shape[1], -1)], dim=1)
    elif uncond.shape[1] > cond.shape[1]:
        uncond = uncond[:, : cond.shape[1]]
    return cond, uncond


# ----------------------------------------------------------------------------------------------------------------
# Composable prompts: AND

_AND = re.compile(r"\bAND\b")
# a part's text, then optionally ':' and a weight (digits with an optional trailing point, or a point and digits)
_SUBPROMPT_WEIGHT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.S)


def get_multicond_prompt_list(prompts: Sequence[str]) -> tuple[list[list[tuple[int, float]]], list[str], dict[str, int]]:
    """Split prompts at the word AND, each part with an optional trailing `:weight` (default 1).

    Returns (per prompt [(index into texts, weight), ...], the distinct texts, text -> index). As in the web UI the
    positive prompt always goes through this, so a prompt ending in `:1.5` is weighted even without AND.
    """
    indexes: list[list[tuple[int, float]]] = []
    texts: list[str] = []
    index_of: dict[str, int] = {}
    for prompt in prompts:
        parts = []
        for subprompt in _AND.split(prompt):
            m = _SUBPROMPT_WEIGHT.fullmatch(subprompt)
            text, weight = (m.group(1), m.group(2)) if m is not None else (subprompt, None)
            if text not in index_of:
                index_of[text] = len(texts)
                texts.append(text)
            parts.append((index_of[text], float(weight) if weight is not None else 1.0))
        indexes.append(parts)
    return indexes, texts, index_of


@dataclass
class ComposableScheduledPromptConditioning:
    schedules: list[ScheduledPromptConditioning]
    weight: float = 1.0


@dataclass
class MulticondLearnedConditioning:
    """batch: per image, its AND-parts, each a schedule and a weight."""

    shape: tuple
    batch: list[list[ComposableScheduledPromptConditioning]]


def get_multicond_learned_conditioning(
    model: Any,
    prompts: Sequence[str],
    steps: int,
    clip_skip: int = 1,
    hires_steps: Optional[int] = None,
    use_old_scheduling: bool = False,
    emphasis: str = "Original",
) -> MulticondLearnedConditioning:
    """get_learned_conditioning for positive prompts with AND: each part is scheduled and encoded on its own."""
    indexes, texts, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, texts, steps, clip_skip, hires_steps, use_old_scheduling, emphasis)
    batch = [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in parts] for parts in indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def reconstruct_multicond_batch(c: MulticondLearnedConditioning, current_step: int) -> tuple[list[list[tuple[int, float]]], torch.Tensor]:
    """-> (per image [(row of the tensor, weight), ...], conds [R, 77 k, C]) at denoiser call `current_step`, R the
    total number of AND-parts in the batch (rows of different lengths stacked by `stack_conds`; SDXL: a dict)."""
    tensors: list[torch.Tensor] = []
    conds_list: list[list[tuple[int, float]]] = []
    for parts in c.batch:
        rows = []
        for part in parts:
            rows.append((len(tensors), part.weight))
            tensors.append(_entry_at(part.schedules, current_step).cond)
        conds_list.append(rows)
    return conds_list, stack_conds(tensors)


def combine_denoised(out_cond: torch.Tensor, conds_list: Sequence[Sequence[tuple[int, float]]], out_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Composable guidance: out_uncond[i] + sum over image i's parts of weight * guidance_scale * (out_cond[row] -
    out_uncond[i]). out_cond [R, ...] (rows as from reconstruct_multicond_batch), out_uncond [B, ...]. One part of
    weight 1 per image is ordinary classifier-free guidance. (The formula lives in samplers.guidance, the one
    wrapper that owns guidance.)"""
    return combine_parts(out_cond, conds_list, out_uncond, guidance_scale)
