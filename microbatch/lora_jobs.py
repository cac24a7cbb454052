"""Which LoRAs each image of a run uses, and the run's images grouped by LoRA set.

An image's LoRA set is the request's `loras` (`--lora FILE[:WEIGHT]`) plus the `<lora:NAME:W>` /
`<lora:NAME:TE:UNET>` tags of its prompt and negative prompt (the web UI reads tags in both), each tag looked up
in `lora_dir`. Tags are removed from the text the encoder sees; the parameters text keeps them, as the web UI's.
A set is sorted (file, unet weight, te weight) tuples, entries whose two weights are 0 left out (they change
nothing), so two images with the same networks in another order share one set and one micro-batch.

The pipeline merges one set at a time (`microbatch.lora.set_loras`) and runs that set's images, so a micro-batch
never mixes sets; the sets run in the order of their first image, the set already applied first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from microbatch.engine import ImageJob
from microbatch.lora import extract_lora_tags, find_lora

LoraSpec = tuple[str, float, float]  # (file, unet weight, te weight)
LoraSet = tuple[LoraSpec, ...]


@dataclass(frozen=True)
class JobLoras:
    """One image's LoRAs: `job` with the tags removed from its prompts (what the encoder sees), its set, and the
    (name, file) pairs for the `Lora hashes` parameter (tags as written, `--lora` files by stem)."""

    job: ImageJob
    loras: LoraSet
    named: tuple[tuple[str, str], ...]


def weight_text(value: float) -> str:
    """A weight as a tag writes it: 0.8, 1, -0.25 (full precision when %g would round it)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def lora_tag(name: str, unet_weight: float, te_weight: float) -> str:
    """`<lora:name:w>`, or `<lora:name:te:unet>` when the weights differ (the web UI's order)."""
    if te_weight == unet_weight:
        return f"<lora:{name}:{weight_text(unet_weight)}>"
    return f"<lora:{name}:{weight_text(te_weight)}:{weight_text(unet_weight)}>"


def prompt_with_flag_loras(prompt: str, flag_loras: Sequence[LoraSpec]) -> str:
    """The prompt as the parameters text writes it: the `--lora` files appended as tags naming their stems, so a
    web UI (or `--from_png` with their folder as `--lora_dir`) applies them again."""
    tags = [lora_tag(Path(path).stem, unet, te) for path, unet, te in flag_loras]
    if not tags:
        return prompt
    return " ".join([prompt, *tags]) if prompt else " ".join(tags)


def resolve_jobs(jobs: Sequence[ImageJob], flag_loras: Sequence[LoraSpec], lora_dir: str) -> tuple[list[JobLoras], list[str]]:
    """Each job's LoRA set, and the names of tags with no file in `lora_dir` (skipped; each name once).

    flag_loras: (file, unet weight, te weight) from the request, already checked to exist. A tag whose weight
    is no number raises ValueError naming the tag."""
    missing: list[str] = []
    found: dict[str, Optional[Path]] = {}
    out = []
    for job in jobs:
        prompt, tags = extract_lora_tags(job.prompt)
        negative, negative_tags = extract_lora_tags(job.negative_prompt)
        specs: list[LoraSpec] = [(str(Path(p).resolve()), float(u), float(t)) for p, u, t in flag_loras]
        named = [(Path(p).stem, str(p)) for p, _, _ in flag_loras]
        for name, te, unet in tags + negative_tags:
            if name not in found:
                found[name] = find_lora(name, lora_dir)
                if found[name] is None:
                    missing.append(name)
            path = found[name]
            if path is None:
                continue
            if not (math.isfinite(te) and math.isfinite(unet)):
                raise ValueError(f"LoRA tag <lora:{name}:...> has a weight that is not finite ({te}, {unet})")
            specs.append((str(path.resolve()), unet, te))
            named.append((name, str(path)))
        loras = tuple(sorted(s for s in specs if s[1] != 0 or s[2] != 0))
        if tags or negative_tags:
            job = replace(job, prompt=prompt, negative_prompt=negative)
        out.append(JobLoras(job, loras, tuple(named)))
    return out, missing


def group_by_set(resolved: Sequence[JobLoras], current: LoraSet = ()) -> list[tuple[LoraSet, list[int]]]:
    """(set, positions in `resolved`) per distinct set: the `current` set first when some image uses it (no
    switch), then the others in the order of their first image. Positions keep their order within a group."""
    groups: dict[LoraSet, list[int]] = {}
    for i, item in enumerate(resolved):
        groups.setdefault(item.loras, []).append(i)
    order = sorted(groups, key=lambda s: (s != current, groups[s][0]))
    return [(s, groups[s]) for s in order]
