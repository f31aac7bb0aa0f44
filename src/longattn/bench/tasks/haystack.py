"""Shared machinery of the retrieval tasks: filler text, needle insertion, and fitting a prompt to a length.

Two haystacks, as in RULER (https://arxiv.org/abs/2404.06654):

- ``"repeat"``: the same five short sentences over and over (RULER's "noise", Landmark Attention's filler).
- ``"natural"``: English prose from the Python documentation shipped in the standard library
  (``pydoc_data.topics``), cleaned of code, tables and headings, read from a seed-dependent sentence and
  cycled when a prompt needs more than the ~50k tokens it holds.

A prompt is ``prefix + haystack + suffix`` where the haystack is ``n`` filler units with the needles inserted
at sentence boundaries; :func:`fit_prompt` searches ``n`` until the prompt has the requested token count.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence

HAYSTACKS = ("repeat", "natural")
REPEAT_SENTENCES = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)
MIN_LENGTH = 128

# Sentences longer than this are dropped so that the sentence boundary nearest to a requested depth is never
# more than ~100 characters away from it (3% of a 1k-token haystack).
_MAX_SENTENCE_CHARS = 200
_MIN_SENTENCE_CHARS = 30


def check_args(length: int, depth: float, haystack: str, allowed: Sequence[str] = HAYSTACKS) -> None:
    """Raise ``ValueError`` naming the first bad argument: ``length`` an int >= 128, ``depth`` in [0, 1],
    ``haystack`` one of ``allowed``."""
    if isinstance(length, bool) or not isinstance(length, int) or length < MIN_LENGTH:
        raise ValueError(f"length must be an integer >= {MIN_LENGTH} tokens, got {length!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    if haystack not in allowed:
        raise ValueError(f"haystack must be one of {', '.join(map(repr, allowed))}, got {haystack!r}")


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens in ``text`` as the model sees it inside a prompt (no BOS/EOS added)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=1)
def natural_sentences() -> tuple[str, ...]:
    """English sentences of the Python documentation in ``pydoc_data.topics``, in a fixed order.

    Paragraphs that do not start with a capital letter (code, grammar rules, tables) and section headings are
    dropped, whitespace is collapsed, and sentences that are short, long or mostly punctuation are left out.
    """
    from pydoc_data.topics import topics

    sentences: list[str] = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = paragraph.strip("\n").splitlines()
            # Prose sits at most 3 columns in (list items); code blocks and grammar are indented further.
            if not lines or not re.match(r" {0,3}(?:\d+\. |\* )?[A-Z]", lines[0]):
                continue
            if len(lines) > 1 and re.fullmatch(r"[*=\-^~]+", lines[1].strip()):
                continue  # a heading underlined in reST style
            text = re.sub(r"\s+", " ", " ".join(lines)).strip()
            text = re.sub(r"^(?:\d+\.|\*) ", "", text)
            text = re.sub(r"\s*\[\d+\]", "", text)  # footnote marks
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                prose = sum(c.isalpha() or c == " " for c in sentence)
                if (
                    _MIN_SENTENCE_CHARS <= len(sentence) <= _MAX_SENTENCE_CHARS
                    and sentence[-1] in ".!?"
                    and prose >= 0.85 * len(sentence)
                ):
                    sentences.append(sentence)
    return tuple(sentences)


def filler(haystack: str, seed: int, n: int) -> list[str]:
    """``n`` units of filler as a list of sentences.

    For ``"repeat"`` a unit is a sentence (~5 tokens) and the text is the same for every seed. For
    ``"natural"`` a unit is a word (~1.3 tokens, fine enough to land within 1% of 1k tokens): the first ``n``
    words of the documentation read from a seed-dependent sentence, so the last sentence may be cut short, as
    RULER does with its essay haystack.
    """
    if haystack == "repeat":
        return [REPEAT_SENTENCES[i % len(REPEAT_SENTENCES)] for i in range(n)]
    if haystack != "natural":
        raise ValueError(f"haystack must be one of {', '.join(map(repr, HAYSTACKS))}, got {haystack!r}")
    source = natural_sentences()
    i = random.Random(seed).randrange(len(source))
    out: list[str] = []
    left = n
    while left > 0:
        words = source[i % len(source)].split(" ")
        out.append(" ".join(words[:left]))
        left -= len(words)
        i += 1
    return out


def insert_needles(sentences: Sequence[str], needles: Sequence[tuple[float, str]]) -> tuple[str, list[int]]:
    """Join ``sentences`` with spaces and insert each ``(depth, text)`` needle at the sentence boundary nearest
    to relative character position ``depth`` of the haystack.

    Needles that land on the same boundary keep their given order (so a chain of statements stays in order).

    Returns:
        the text and the character offset of each needle in it, in the order given.
    """
    starts = [0]
    for s in sentences:
        starts.append(starts[-1] + len(s) + 1)
    total = max(starts[-1] - 1, 0)
    starts[-1] = total  # the boundary after the last sentence is the end of the text
    slots = [min(range(len(starts)), key=lambda b: abs(starts[b] - depth * total)) for depth, _ in needles]
    order = sorted(range(len(needles)), key=lambda j: slots[j])  # stable: ties keep the given order
    parts: list[str] = []
    index_of: dict[int, int] = {}
    k = 0
    for b in range(len(sentences) + 1):
        while k < len(order) and slots[order[k]] == b:
            index_of[order[k]] = len(parts)
            parts.append(needles[order[k]][1])
            k += 1
        if b < len(sentences):
            parts.append(sentences[b])
    part_starts = [0]
    for p in parts:
        part_starts.append(part_starts[-1] + len(p) + 1)
    return " ".join(parts), [part_starts[index_of[j]] for j in range(len(needles))]


@dataclass(frozen=True)
class Fitted:
    """A prompt fitted to a token length.

    Attributes:
        prompt: the text.
        tokens: its token count.
        needle_positions: character offset of each needle in ``prompt``, in the order they were given.
        haystack_span: ``(start, end)`` character offsets of the haystack (needles included) in ``prompt``.
    """

    prompt: str
    tokens: int
    needle_positions: list[int]
    haystack_span: tuple[int, int]


def fit_prompt(
    tokenizer: Any,
    length: int,
    build: Callable[[int], str],
    *,
    start: int | None = None,
    what: str = "prompt",
    tries: int = 24,
) -> tuple[int, str, int]:
    """Search the number of filler units ``n`` so that ``build(n)`` has ``length`` tokens, within 1% (or 3
    tokens for short prompts).

    Tokenisation is not additive at the seams, so the count is measured, never summed: the search extrapolates
    from the tokens per unit seen so far, then interpolates inside the bracket it has found.

    Args:
        tokenizer: the model's tokenizer.
        length: target token count.
        build: the prompt with ``n`` filler units; its length should grow with ``n``.
        start: first ``n`` to try (default ``length // 4``: about a third of the prompt in natural words, a
            little over all of it in repeat sentences).
        what: names the prompt in error messages.
        tries: most prompts to tokenize after the empty one.

    Returns:
        ``(n, prompt, tokens)`` for the closest prompt.

    Raises:
        ValueError: when no ``n`` comes close enough, or ``length`` cannot hold the text around the filler.
    """
    tolerance = max(0.01 * length, 3.0)
    base = count_tokens(tokenizer, build(0))
    if base > length + tolerance:
        raise ValueError(f"length {length} is too short for a {what}: its text without filler takes {base} tokens")
    lo, hi = (0, base), None  # (units, tokens) below and above the target
    best = (abs(base - length), 0, base)
    n = max(1, length // 4 if start is None else start)
    for _ in range(tries):
        tokens = count_tokens(tokenizer, build(n))
        if abs(tokens - length) < best[0]:
            best = (abs(tokens - length), n, tokens)
        if abs(tokens - length) <= tolerance:
            break
        if tokens < length:
            lo = max(lo, (n, tokens))
        else:
            hi = min(hi, (n, tokens)) if hi else (n, tokens)
        if hi is None:
            rate = max((lo[1] - base) / lo[0], 1e-3) if lo[0] else 1.0
            n = lo[0] + max(1, round((length - lo[1]) / rate))
        elif hi[0] - lo[0] <= 1:
            break
        else:
            step = (length - lo[1]) * (hi[0] - lo[0]) / max(hi[1] - lo[1], 1)
            n = min(max(lo[0] + round(step), lo[0] + 1), hi[0] - 1)
    if best[0] > tolerance:
        raise ValueError(f"could not build a {what} of {length} tokens with this tokenizer (closest {best[2]})")
    return best[1], build(best[1]), best[2]


def build_prompt(
    tokenizer: Any,
    length: int,
    haystack: str,
    seed: int,
    prefix: str,
    needles: Sequence[tuple[float, str]],
    suffix: str,
    *,
    what: str = "prompt",
) -> Fitted:
    """``prefix + haystack + suffix`` of ``length`` tokens, the ``(depth, text)`` needles inside the haystack.

    Args:
        tokenizer: the model's tokenizer (only its ``__call__`` is used).
        length: target token count.
        haystack: ``"repeat"`` or ``"natural"`` (see :func:`filler`).
        seed: picks where the natural text starts.
        prefix: text before the haystack (the task's instruction, with its separator).
        needles: ``(relative depth in [0, 1], sentence)`` pairs.
        suffix: text after the haystack (separator and question, ending with the answer's lead-in).
        what: names the task in error messages.
    """

    def body(n: int) -> tuple[str, list[int]]:
        return insert_needles(filler(haystack, seed, n), needles)

    n, prompt, tokens = fit_prompt(tokenizer, length, lambda n: prefix + body(n)[0] + suffix, what=what)
    text, offsets = body(n)
    return Fitted(
        prompt=prompt,
        tokens=tokens,
        needle_positions=[len(prefix) + o for o in offsets],
        haystack_span=(len(prefix), len(prefix) + len(text)),
    )
