"""AUTOMATIC1111's prompt schedules and composable prompts, as text.

- Prompt editing `[from:to:when]`, `[to:when]`, `[from::when]`: `when` is a step (>= 1) or a
  fraction of the steps (< 1, times steps, truncated), capped at the steps; the first text is
  used while the denoiser call number (0-based) is <= when. Nested brackets work.
- Alternation `[a|b|c]`: the text at step t (1-based) is option (t - 1) mod n.
- Composable diffusion `a AND b :1.2 AND c :-0.5`: sub-prompts with weights (default 1).

`prompt_schedule(prompt, steps)` -> [(end_at_step, text)], the texts that emphasis, BREAK and
embeddings are then read from; a prompt without schedules is [(steps, prompt)] unchanged. Brackets
that do not form one of these constructs (emphasis `[x]`, `(x:1.2)`, unbalanced ones) stay text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*$")
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^(\s*.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)
_SPECIAL = set("[]():|")


@dataclass(frozen=True)
class Scheduled:
    before: list | None  # None: `[to:when]` (nothing before)
    after: list
    when: float


@dataclass(frozen=True)
class Alternate:
    options: list


@dataclass(frozen=True)
class Group:  # emphasis: kept as text, its content may hold schedules
    open: str
    parts: list  # one list of nodes, or two around a ":" ("(text:1.2)")
    close: str


class _Parser:
    def __init__(self, text: str):
        self.s = text

    def sequence(self, i: int, stops: str) -> tuple[list, int]:
        """Nodes from i up to an unescaped character of `stops` (or the end)."""
        nodes: list = []
        buf: list[str] = []
        s = self.s
        while i < len(s):
            c = s[i]
            if c == "\\" and i + 1 < len(s):
                buf.append(s[i : i + 2])
                i += 2
                continue
            if c in stops:
                break
            if c in "[(":
                node, j = self.bracket(i)
                if node is not None:
                    if buf:
                        nodes.append("".join(buf))
                        buf = []
                    nodes.append(node)
                    i = j
                    continue
            buf.append(c)
            i += 1
        if buf:
            nodes.append("".join(buf))
        return nodes, i

    def bracket(self, i: int):
        """A construct starting at s[i] in "[(" -> (node, index after it), or (None, i)."""
        s, inner_stops = self.s, ":|])"
        if s[i] == "(":
            a, j = self.sequence(i + 1, inner_stops)
            if j < len(s) and s[j] == ")":
                return Group("(", [a], ")"), j + 1
            if j < len(s) and s[j] == ":":
                b, k = self.sequence(j + 1, inner_stops)
                if k < len(s) and s[k] == ")":
                    return Group("(", [a, b], ")"), k + 1
            return None, i
        a, j = self.sequence(i + 1, inner_stops)
        if j >= len(s):
            return None, i
        if s[j] == "]":
            return Group("[", [a], "]"), j + 1
        if s[j] == "|":
            options, k = [a], j
            while k < len(s) and s[k] == "|":
                opt, k = self.sequence(k + 1, inner_stops)
                options.append(opt)
            if k < len(s) and s[k] == "]":
                return Alternate(options), k + 1
            return None, i
        if s[j] == ":":
            b, k = self.sequence(j + 1, inner_stops)
            if k < len(s) and s[k] == "]" and _number(b) is not None:
                return Scheduled(None, a, _number(b)), k + 1
            if k < len(s) and s[k] == ":":
                c, m = self.sequence(k + 1, inner_stops)
                if m < len(s) and s[m] == "]" and _number(c) is not None:
                    return Scheduled(a, b, _number(c)), m + 1
        return None, i


def _number(nodes: list) -> float | None:
    if len(nodes) != 1 or not isinstance(nodes[0], str):
        return None
    m = _NUMBER.fullmatch(nodes[0])
    return float(m.group(1)) if m else None


def _steps_of(nodes: list, steps: int, out: set[int]) -> None:
    for node in nodes:
        if isinstance(node, Scheduled):
            when = node.when * steps if node.when < 1 else node.when
            out.add(min(steps, int(when)))
            for part in (node.before or [], node.after):
                _steps_of(part, steps, out)
        elif isinstance(node, Alternate):
            out.update(range(1, steps + 1))
            for option in node.options:
                _steps_of(option, steps, out)
        elif isinstance(node, Group):
            for part in node.parts:
                _steps_of(part, steps, out)


def _text_at(nodes: list, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Scheduled):
            when = min(steps, int(node.when * steps if node.when < 1 else node.when))
            part = (node.before or []) if step <= when else node.after
            out.append(_text_at(part, step, steps))
        elif isinstance(node, Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append(node.open + ":".join(_text_at(p, step, steps) for p in node.parts) + node.close)
    return "".join(out)


def parse(prompt: str) -> list:
    """The prompt's nodes: text, `Scheduled`, `Alternate`, `Group`."""
    nodes, i = _Parser(prompt).sequence(0, "")
    assert i == len(prompt)
    return nodes


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(end_at_step, text)]: `text` conditions the denoiser calls up to `end_at_step`."""
    nodes = parse(prompt)
    found: set[int] = set()
    _steps_of(nodes, steps, found)
    if not found:  # no schedule: the prompt as written
        return [(steps, prompt)]
    return [(t, _text_at(nodes, t, steps)) for t in sorted(found | {steps})]


def at_step(schedule: list[tuple[int, object]], step: int):
    """The entry of a schedule that conditions denoiser call `step` (0-based)."""
    for end, value in schedule:
        if step <= end:
            return value
    return schedule[-1][1]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """`a AND b :1.2` -> [("a", 1.0), ("b", 1.2)] (A1111's composable prompts)."""
    parts = []
    for sub in _AND.split(prompt):
        m = _WEIGHT.search(sub)
        text, weight = (m.group(1), m.group(2)) if m else (sub, None)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts




@dataclass(frozen=True)
class ParsedPrompt:
    """A request's prompt and negative prompt read once: the LoRA tags taken out, the AND parts
    with their weights, and each part's (and the negative prompt's) schedule of texts."""

    loras: tuple[tuple[str, float], ...]
    parts: tuple[tuple[float, tuple[tuple[int, str], ...]], ...]
    negative: tuple[tuple[int, str], ...]

    @property
    def plain(self) -> bool:
        """One condition and one negative condition for every step (no AND, no schedule)."""
        return len(self.parts) == 1 and self.parts[0][0] == 1.0 and len(self.parts[0][1]) == 1 and len(self.negative) == 1

    @property
    def texts(self) -> list[str]:
        """Every distinct text to encode, in order of appearance."""
        return list(dict.fromkeys([t for _, s in self.parts for _, t in s] + [t for _, t in self.negative]))


def parse_prompt(prompt: str, negative: str, steps: int) -> ParsedPrompt:
    """A1111's order: extra networks (`<lora:...>`) out first, then AND, then the schedules. The
    negative prompt's LoRA tags are removed and ignored."""
    from sdtorch.conditioning.prompts import extract_loras

    text, loras = extract_loras(prompt)
    parts = tuple((w, tuple(prompt_schedule(t, steps))) for t, w in split_and(text))
    if len(parts) == 1 and parts[0][0] == 1.0 and len(parts[0][1]) == 1:
        parts = ((1.0, ((steps, text),)),)  # exactly the text (AND's split strips its ends)
    return ParsedPrompt(tuple(loras), parts, tuple(prompt_schedule(extract_loras(negative)[0], steps)))
