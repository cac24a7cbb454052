"""microbatch.prompts, the text side: the web UI's emphasis parser and prompt-editing schedules.

References: the web UI's documented examples (the docstrings of its modules/prompt_parser.py, used as expected
values), and references written here from its documented rules, run on randomized prompts with hypothesis: a
character-level emphasis scanner, and prompts generated from a random syntax tree whose schedule is computed from
the tree itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microbatch.prompts import (
    combine_denoised,
    get_learned_conditioning_prompt_schedules,
    get_multicond_prompt_list,
    parse_prompt_attention,
)

# ----------------------------------------------------------------------------------------------------------------
# Emphasis


@pytest.mark.parametrize(
    "prompt, expected",
    [  # the web UI's docstring examples
        ("normal text", [["normal text", 1.0]]),
        ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
        ("(unbalanced", [["unbalanced", 1.1]]),
        ("\\(literal\\]", [["(literal]", 1.0]]),
        ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ["a ", 1.0],
                ["house", 1.5730000000000004],
                [" ", 1.1],
                ["on", 1.0],
                [" a ", 1.1],
                ["hill", 0.55],
                [", sun, ", 1.1],
                ["sky", 1.4641000000000006],
                [".", 1.1],
            ],
        ),
        # documented rules
        ("", [["", 1.0]]),
        ("[x]", [["x", 1 / 1.1]]),
        ("(x:0.5)", [["x", 0.5]]),
        ("( x : 1.5 )", [[" x ", 1.5]]),
        ("a \\\\ b", [["a \\ b", 1.0]]),
        ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
        ("a, BREAK\nb", [["a,", 1.0], ["BREAK", -1], ["b", 1.0]]),
        ("BREAKfast", [["BREAKfast", 1.0]]),
        ("a) b] c", [["a) b] c", 1.0]]),
        ("x:1.2) y", [["x:1.2) y", 1.0]]),
        ("[a (b:2)", [["a ", 1 / 1.1], ["b", 2 / 1.1]]),
    ],
)
def test_parse_prompt_attention_examples(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


def test_bad_weight_is_a_clear_error():
    with pytest.raises(ValueError, match=r"emphasis weight '1\.2\.3' is not a number"):
        parse_prompt_attention("a (cat:1.2.3)")
    with pytest.raises(ValueError, match="must be a str"):
        parse_prompt_attention(None)


def reference_attention(text: str) -> list[list]:
    """The documented rules, written as a character scanner (no regex for the bracket syntax)."""
    entries: list[list] = []  # [text, weight]
    opened = {"(": [], "[": []}
    i, n = 0, len(text)

    def scale(start: int, factor: float) -> None:
        for e in entries[start:]:
            e[1] *= factor

    def add_text(s: str) -> None:
        # BREAK as a whole word, with the whitespace around it, separates parts
        pieces, cur, k = [], "", 0
        while k < len(s):
            word_start = k == 0 or not (s[k - 1].isalnum() or s[k - 1] == "_")
            end = k + 5
            word_end = end >= len(s) or not (s[end].isalnum() or s[end] == "_")
            if s.startswith("BREAK", k) and word_start and word_end:
                pieces.append(cur.rstrip())
                cur, k = "", end
                while k < len(s) and s[k].isspace():
                    k += 1
                continue
            cur += s[k]
            k += 1
        pieces.append(cur)
        for j, p in enumerate(pieces):
            if j:
                entries.append(["BREAK", -1])
            entries.append([p, 1.0])

    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 < n and text[i + 1] in "()[]\\":
                entries.append([text[i + 1], 1.0])
                i += 2
            else:
                entries.append(["", 1.0])
                i += 1
        elif c in "([":
            opened[c].append(len(entries))
            i += 1
        elif c == ":":
            # ':' spaces number spaces ')' closes a '(' with that weight
            j = i + 1
            while j < n and text[j].isspace():
                j += 1
            k = j + (1 if j < n and text[j] in "+-" else 0)
            m = k
            while m < n and (text[m].isdecimal() or text[m] == "."):
                m += 1
            e = m
            while e < n and text[e].isspace():
                e += 1
            if m > k and e < n and text[e] == ")":
                if opened["("]:
                    scale(opened["("].pop(), float(text[j:m]))
                else:
                    add_text(text[i : e + 1])
                i = e + 1
            else:
                add_text(":")
                i += 1
        elif c == ")" and opened["("]:
            scale(opened["("].pop(), 1.1)
            i += 1
        elif c == "]" and opened["["]:
            scale(opened["["].pop(), 1 / 1.1)
            i += 1
        elif c in ")]":
            add_text(c)
            i += 1
        else:
            j = i
            while j < n and text[j] not in "\\()[]:":
                j += 1
            add_text(text[i:j])
            i = j
    for start in opened["("]:
        scale(start, 1.1)
    for start in opened["["]:
        scale(start, 1 / 1.1)
    out: list[list] = []
    for e in entries:
        if out and out[-1][1] == e[1]:
            out[-1][0] += e[0]
        else:
            out.append(e)
    return out or [["", 1.0]]


PIECES = ["a", "cat", " ", ", ", "(", ")", "[", "]", ":", ":1.5)", ": 0.7 )", ":2", "\\(", "\\]", "\\\\", "\\x",
          " BREAK ", "BREAK", "BREAKS", "\n", "1.5", "é"]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=16))
def test_parse_prompt_attention_matches_a_reference_written_from_the_rules(pieces):
    prompt = "".join(pieces)
    assert parse_prompt_attention(prompt) == reference_attention(prompt)


# ----------------------------------------------------------------------------------------------------------------
# Prompt editing and alternation

def g(prompt: str, steps: int = 10, hires_steps=None):
    return get_learned_conditioning_prompt_schedules([prompt], steps, hires_steps)[0]


@pytest.mark.parametrize(
    "prompt, expected",
    [  # the web UI's docstring examples (steps 10)
        ("test", [[10, "test"]]),
        ("a [b:3]", [[3, "a "], [10, "a b"]]),
        ("a [b: 3]", [[3, "a "], [10, "a b"]]),
        ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
        ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
        ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
        ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
        ("a [unbalanced", [[10, "a [unbalanced"]]),
        ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
        ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
        ("[a|(b:1.1)]", [[s, "a" if s % 2 else "(b:1.1)"] for s in range(1, 11)]),
        ("[fe|]male", [[s, "female" if s % 2 else "male"] for s in range(1, 11)]),
        ("[fe|||]male", [[s, "female" if s % 4 == 1 else "male"] for s in range(1, 11)]),
        # The docstring also lists g("a [{b|d{:.5] c") -> [[5, 'a  c'], [10, 'a {b|d{ c']] under the comment "not
        # handling this right now"; the web UI itself returns the prompt literally for it ('|' cannot stand in the
        # text of an edit), and so do we.
        ("a [{b|d{:.5] c", [[10, "a [{b|d{:.5] c"]]),
        # Stray brackets after an edit make the web UI's grammar ambiguous (the edit, or all literal); its parser's
        # pick there is an artifact (with its pinned lark 1.1.2 it changes with Python's hash seed). We always
        # take the edit.
        ("[b:2]((", [[2, "(("], [10, "b(("]]),
        # the web UI's example prompt (steps 100), from its module comment
        (
            "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
            "[ in background:0.25] [shoddy:masterful:0.5]",
            None,
        ),
    ],
)
def test_schedule_examples(prompt, expected):
    if expected is None:
        assert get_learned_conditioning_prompt_schedules([prompt], 100)[0] == [
            [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
            [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
            [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
            [75, "fantasy landscape with a lake and an oak in background masterful"],
            [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
        ]
    else:
        assert g(prompt) == expected


def test_hires_schedule_examples():
    # the web UI's docstring: base 10 steps, hires 10 steps
    assert g("a [b:.5] c", 10, 10) == [[10, "a b c"]]
    assert g("a [b:1.5] c", 10, 10) == [[5, "a  c"], [10, "a b c"]]
    assert g("a [b:15] c", 10, 10) == [[5, "a  c"], [10, "a b c"]]


def test_decimal_point_means_a_fraction_and_old_rule():
    assert g("[a:b:1.0]") == [[10, "a"]]  # 1.0 of the steps: never switches
    assert g("[a:b:1]") == [[1, "a"], [10, "b"]]  # step 1
    assert g("[a:b:2.5]") == [[10, "a"]]  # 25 steps, clipped to 10
    assert get_learned_conditioning_prompt_schedules(["[a:b:2.5]"], 10, use_old_scheduling=True)[0] == [[2, "a"], [10, "b"]]
    assert g("[a:b:0]") == [[10, "b"]] and g("[a:b:-3]") == [[10, "b"]]


@pytest.mark.parametrize("prompt", ["a | b", "a [b|c", "trailing \\", "x\\\n[a:b:2]", ""])
def test_unparsable_or_plain_text_is_kept_literally(prompt):
    assert g(prompt) == [[10, prompt]]


def test_schedules_keep_order_and_duplicates():
    out = get_learned_conditioning_prompt_schedules(["b", "[x:y:2]", "b"], 4)
    assert out == [[[4, "b"]], [[2, "x"], [4, "y"]], [[4, "b"]]]
    out[0][0][1] = "changed"
    assert out[2] == [[4, "b"]]  # no shared lists between equal prompts


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_bad_steps_are_errors(bad):
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        get_learned_conditioning_prompt_schedules(["a"], bad)


def test_non_finite_step_is_an_error():
    with pytest.raises(ValueError, match="not a finite number"):
        g("[a:b:1e999]")


def test_deep_nesting_does_not_crash():
    prompt = "(" * 3000 + "a"
    assert g(prompt) == [[10, prompt]]


# Random syntax trees: render a prompt, and compute its schedule from the tree itself.

@dataclass
class Sched:
    before: list | None
    after: list
    when: str


@dataclass
class Alt:
    options: list


WORDS = st.sampled_from(["a", "cat", " ", "red dog", "(x:1.2)", "\\(", "1", "x y"])
WHENS = st.sampled_from(["1", "2", "3", " 4 ", "7", "12", ".5", "0.3", "0.75", "1.5", "0", "-2"])


def trees(depth: int = 2):
    leaf = st.lists(WORDS, min_size=0, max_size=3)
    if depth == 0:
        return leaf
    sub = trees(depth - 1)
    node = st.one_of(
        WORDS,
        st.builds(Sched, st.one_of(st.none(), sub), sub, WHENS),
        st.builds(Alt, st.lists(sub, min_size=2, max_size=3)),
        st.builds(lambda inner: ("emph", inner), sub),
    )
    return st.lists(node, min_size=0, max_size=3)


def render(tree) -> str:
    out = []
    for node in tree:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Sched):
            head = "" if node.before is None else render(node.before) + ":"
            out.append(f"[{head}{render(node.after)}:{node.when}]")
        elif isinstance(node, Alt):
            out.append("[" + "|".join(render(o) for o in node.options) + "]")
        else:
            out.append("(" + render(node[1]) + ")")
    return "".join(out)


def when_step(when: str, steps: int) -> int:
    v = float(when)
    return min(steps, int(v * steps if "." in when else v))


def text_at(tree, step: int, steps: int) -> str:
    out = []
    for node in tree:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Sched):
            chosen = (node.before or []) if step <= when_step(node.when, steps) else node.after
            out.append(text_at(chosen, step, steps))
        elif isinstance(node, Alt):
            out.append(text_at(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append("(" + text_at(node[1], step, steps) + ")")
    return "".join(out)


def change_steps(tree, steps: int, out: set) -> None:
    for node in tree:
        if isinstance(node, Sched):
            if when_step(node.when, steps) >= 1:
                out.add(when_step(node.when, steps))
            change_steps(node.before or [], steps, out)
            change_steps(node.after, steps, out)
        elif isinstance(node, Alt):
            out.update(range(1, steps + 1))
            for o in node.options:
                change_steps(o, steps, out)
        elif isinstance(node, tuple):
            change_steps(node[1], steps, out)


@settings(max_examples=400, deadline=None)
@given(trees(), st.integers(1, 12))
def test_schedules_of_random_syntax_trees(tree, steps):
    prompt = render(tree)
    ends = {steps}
    change_steps(tree, steps, ends)
    expected = [[end, text_at(tree, end, steps)] for end in sorted(ends)]
    assert get_learned_conditioning_prompt_schedules([prompt], steps)[0] == expected


# ----------------------------------------------------------------------------------------------------------------
# AND


def test_multicond_prompt_list():
    indexes, texts, index_of = get_multicond_prompt_list(["a cat AND a dog:0.5", "a dog: 2 AND a cat", "a photo:1.5", "(x:1.2)", "BRAND"])
    assert texts == ["a cat", " a dog", "a dog", " a cat", "a photo", "(x:1.2)", "BRAND"]  # trailing spaces go
    assert indexes == [[(0, 1.0), (1, 0.5)], [(2, 2.0), (3, 1.0)], [(4, 1.5)], [(5, 1.0)], [(6, 1.0)]]
    assert index_of["a photo"] == 4


def test_combine_denoised_is_cfg_for_one_part_and_sums_parts():
    import torch

    g_ = torch.Generator().manual_seed(0)
    out_cond, out_uncond = torch.randn(3, 4, generator=g_), torch.randn(2, 4, generator=g_)
    one = combine_denoised(out_cond, [[(0, 1.0)], [(1, 1.0)]], out_uncond, 7.5)
    assert torch.allclose(one, out_uncond + 7.5 * (out_cond[:2] - out_uncond))
    two = combine_denoised(out_cond, [[(0, 1.0)], [(1, 0.5), (2, -1.0)]], out_uncond, 2.0)
    expected1 = out_uncond[1] + 2.0 * 0.5 * (out_cond[1] - out_uncond[1]) + 2.0 * -1.0 * (out_cond[2] - out_uncond[1])
    assert torch.allclose(two[1], expected1) and torch.allclose(two[0], one[0] - 5.5 * (out_cond[0] - out_uncond[0]))
