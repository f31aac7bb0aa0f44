"""Every task on the default model's tokenizer: the registry contract, exact lengths, needle depths,
determinism, needles that can be told apart, the two haystacks, scorers and argument checks."""

from __future__ import annotations

import re

import pytest

from longattn.bench.tasks import TASKS, Example, haystack, niah
from longattn.bench.tasks import (
    niah_followup,
    niah_multikey,
    niah_multiquery,
    niah_multivalue,
    niah_phrased,
    niah_single,
    perplexity,
    variable_tracking,
)

from .checks import n_tokens, relative_depth

RULER = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "niah_followup", "variable_tracking"]
GENERATING = [(name, h) for name in RULER for h in haystack.HAYSTACKS] + [("passkey", "repeat"), ("niah_phrased", "natural")]
SHAPES = [(1024, 0.0), (1024, 0.7), (4096, 0.35), (4096, 1.0)]


def haystack_text(ex: Example) -> str:
    """The haystack with its needles taken out."""
    start, end = ex.meta["haystack_span"]
    text = ex.prompt[start:end]
    for needle in ex.meta["needles"]:
        text = text.replace(needle + " ", "").replace(needle, "")
    return text


def test_registry_follows_the_runner_contract():
    assert set(TASKS) == {"passkey", *RULER, "niah_phrased", "perplexity"}
    for name, task in TASKS.items():
        assert task.KIND in ("generate", "followup", "nll"), name
        assert isinstance(task.MAX_NEW_TOKENS, int) and (task.MAX_NEW_TOKENS > 0) == (task.KIND != "nll"), name
        assert callable(task.make) and callable(task.score), name
    assert TASKS["niah_followup"].KIND == "followup" and callable(niah_followup.score_followup)
    assert TASKS["perplexity"].KIND == "nll"


@pytest.mark.parametrize("length,depth", SHAPES, ids=[f"L{n}-d{d}" for n, d in SHAPES])
@pytest.mark.parametrize("name,hay", GENERATING, ids=[f"{n}-{h}" for n, h in GENERATING])
def test_prompt_hits_length_and_needles_sit_at_their_depth(tokenizer, name, hay, length, depth):
    ex = TASKS[name].make(tokenizer, length, depth, 5, haystack=hay)
    n = n_tokens(tokenizer, ex.prompt)
    assert abs(n - length) <= 0.01 * length and ex.meta["tokens"] == n
    assert {k: ex.meta[k] for k in ("task", "length", "depth", "seed", "haystack")} == {
        "task": name, "length": length, "depth": depth, "seed": 5, "haystack": hay,
    }
    start, end = ex.meta["haystack_span"]
    for needle, pos in zip(ex.meta["needles"], ex.meta["needle_positions"], strict=True):
        assert ex.prompt[pos : pos + len(needle)] == needle and start <= pos < end
    assert abs(relative_depth(ex) - depth) < 0.03


@pytest.mark.parametrize("name,hay", GENERATING, ids=[f"{n}-{h}" for n, h in GENERATING])
def test_same_arguments_same_example_and_seeds_differ(tokenizer, name, hay):
    task = TASKS[name]
    first = task.make(tokenizer, 700, 0.4, 1, haystack=hay)
    assert task.make(tokenizer, 700, 0.4, 1, haystack=hay) == first
    other = task.make(tokenizer, 700, 0.4, 2, haystack=hay)
    assert other.answer != first.answer and other.prompt != first.prompt
    if hay == "natural":
        assert haystack_text(other)[:200] != haystack_text(first)[:200]


@pytest.mark.parametrize("name", ["niah_single", "niah_multikey", "niah_followup", "niah_phrased"])
def test_the_answer_appears_once(tokenizer, name):
    ex = TASKS[name].make(tokenizer, 1024, 0.5, 7)
    assert ex.prompt.count(ex.answer) == 1
    assert TASKS[name].score(ex, " " + ex.answer + ".") == 1.0


def test_multikey_distractors_differ_in_key_and_value(tokenizer):
    ex = niah_multikey.make(tokenizer, 1024, 0.5, 7, haystack="natural")
    pairs = [re.fullmatch(r"One of the special magic numbers for (\S+) is: (\d+)\.", n).groups()
             for n in ex.meta["needles"]]
    (key, value), distractors = pairs[0], pairs[1:]
    assert value == ex.answer and len(distractors) == niah_multikey.DISTRACTORS
    assert len({k for k, _ in pairs}) == len({v for _, v in pairs}) == len(pairs)
    assert ex.prompt.endswith(niah.question(key))
    for k, v in distractors:
        assert ex.prompt.count(v) == 1
        assert niah_multikey.score(ex, f" {v}.") == 0.0


def test_keys_are_never_part_of_another_key():
    assert not any(a != b and a.endswith(b) for a in niah.ADJECTIVES for b in niah.ADJECTIVES)
    assert not any(a != b and a.startswith(b) for a in niah.NOUNS for b in niah.NOUNS)


@pytest.mark.parametrize("task", [niah_multivalue, niah_multiquery], ids=lambda t: t.__name__.split(".")[-1])
def test_every_value_appears_once_and_partial_answers_score_a_share(tokenizer, task):
    ex = task.make(tokenizer, 1024, 0.2, 3, haystack="natural")
    values = ex.meta["answers"]
    assert len(set(values)) == 4 and ex.answer == ", ".join(values)
    assert all(ex.prompt.count(v) == 1 for v in values)
    assert task.score(ex, " " + ", ".join(reversed(values)) + ".") == 1.0
    assert task.score(ex, f" {values[0]} and {values[2]}, then 1234567") == 0.5
    assert task.score(ex, " I do not know.") == 0.0
    if task is niah_multiquery:
        assert all(k in ex.prompt.rsplit("\n", 1)[1] for k in ex.meta["keys"])


def test_followup_asks_about_a_second_needle_far_from_the_first(tokenizer):
    for seed, depth in [(0, 0.0), (1, 0.5), (2, 1.0), (3, 0.15)]:
        ex = niah_followup.make(tokenizer, 1024, depth, seed)
        followup = ex.meta["followup"]
        assert followup["answer"] != ex.answer and ex.prompt.count(followup["answer"]) == 1
        key_b = re.search(r"for (\S+) is: " + followup["answer"], ex.prompt).group(1)
        assert followup["prompt"] == "\n\n" + niah.question(key_b) and key_b not in ex.prompt.rsplit("\n", 1)[1]
        assert abs(relative_depth(ex, 1) - relative_depth(ex, 0)) > 0.17
        assert niah_followup.score_followup(ex, f" {followup['answer']}.") == 1.0
        assert niah_followup.score_followup(ex, f" {ex.answer}.") == 0.0
        assert niah_followup.score(ex, f" {ex.answer}.") == 1.0


def test_variable_tracking_chains_read_in_order(tokenizer):
    ex = variable_tracking.make(tokenizer, 1024, 0.3, 4, haystack="natural")
    names = ex.meta["answers"]
    assert len(names) == variable_tracking.HOPS + 1 == len(set(names)) and ex.answer == ", ".join(names)
    chain = ex.meta["needle_positions"][: len(names)]
    assert chain == sorted(chain)
    value = re.fullmatch(rf"VAR {names[0]} = (\d+)\.", ex.meta["needles"][0]).group(1)
    other = re.fullmatch(r"VAR [A-Z]{5} = (\d+)\.", ex.meta["needles"][len(names)]).group(1)
    question = ex.prompt.rsplit("\n", 1)[1]
    assert value != other and f"value {value}" in question and "5 variables" in question
    assert ex.prompt.count(value) == 3 and ex.prompt.count(other) == 1  # two of them in the question
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}." in ex.meta["needles"]


def test_variable_tracking_scores_names_as_words():
    ex = Example(prompt="", answer="", meta={"answers": ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"]})
    assert variable_tracking.score(ex, " ABCDE, FGHIJ, KLMNO, PQRST, UVWXY") == 1.0
    assert variable_tracking.score(ex, " VAR abcde, VAR FGHIJ") == 0.4
    assert variable_tracking.score(ex, " ABCDEFGHIJ") == 0.0


def test_single_scorer_looks_among_the_numbers():
    ex = Example(prompt="", answer="1234567")
    assert niah_single.score(ex, " 1234567.") == 1.0
    assert niah_single.score(ex, " 42, no wait, 1234567") == 1.0
    assert niah_single.score(ex, " 12345678") == 0.0
    assert niah_single.score(ex, " 7654321") == 0.0


@pytest.mark.parametrize("hay", haystack.HAYSTACKS)
@pytest.mark.parametrize("length", [1024, 4096])
def test_perplexity_text_hits_length(tokenizer, hay, length):
    ex = perplexity.make(tokenizer, length, 0.5, 2, haystack=hay)
    n = n_tokens(tokenizer, ex.prompt)
    assert abs(n - length) <= 0.01 * length and ex.meta["tokens"] == n
    assert ex.answer == "" and ex.meta["eval_tokens"] == min(512, length // 4)
    assert perplexity.make(tokenizer, length, 0.5, 2).meta["haystack"] == "natural"
    with pytest.raises(NotImplementedError, match="NLL"):
        perplexity.score(ex, "")


def test_natural_haystack_is_prose_and_repeat_is_the_filler(tokenizer):
    natural = haystack_text(niah_single.make(tokenizer, 1024, 0.5, 0, haystack="natural"))
    assert natural.count(" the ") > 20 and not any(s in natural for s in haystack.REPEAT_SENTENCES)
    assert len(set(re.findall(r"[a-z]+", natural))) > 150
    repeat = haystack_text(niah_single.make(tokenizer, 1024, 0.5, 0, haystack="repeat"))
    assert set(re.split(r"(?<=\.) ", repeat.strip())) == set(haystack.REPEAT_SENTENCES)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_bad_arguments_name_the_argument(tokenizer, name):
    task = TASKS[name]
    allowed = getattr(task, "HAYSTACKS", haystack.HAYSTACKS)
    with pytest.raises(ValueError, match=f"haystack.*'{allowed[0]}'"):
        task.make(tokenizer, 1024, 0.5, 0, haystack="x")
    with pytest.raises(ValueError, match="depth"):
        task.make(tokenizer, 1024, 1.5, 0)
    with pytest.raises(ValueError, match="length"):
        task.make(tokenizer, 10, 0.5, 0)


def test_a_length_too_short_for_the_task_says_so(tokenizer):
    with pytest.raises(ValueError, match="length 128 is too short"):
        variable_tracking.make(tokenizer, 128, 0.5, 0)


def test_needles_go_to_the_nearest_sentence_boundary_and_ties_keep_their_order():
    sentences = ["a" * 9, "b" * 9, "c" * 9, "d" * 9]  # boundaries at characters 0, 10, 20, 30, 39
    text, offsets = haystack.insert_needles(sentences, [(0.55, "X1"), (1.0, "Z"), (0.5, "X2"), (0.0, "A")])
    assert text == "A aaaaaaaaa bbbbbbbbb X1 X2 ccccccccc ddddddddd Z"
    assert [text[o : o + 2] for o in offsets] == ["X1", "Z", "X2", "A "]
    assert haystack.insert_needles([], [(0.3, "N")]) == ("N", [0])


def test_natural_filler_is_cut_to_the_word_and_cycles_past_the_end():
    words = sum(len(s.split(" ")) for s in haystack.natural_sentences())
    text = haystack.filler("natural", 3, words + 10)
    assert sum(len(s.split(" ")) for s in text) == words + 10
    assert " ".join(haystack.filler("natural", 3, 7)).split(" ") == " ".join(text).split(" ")[:7]


def test_phrased_needles_use_four_wordings_and_none_of_rulers(tokenizer):
    seen = set()
    for seed in range(8):
        ex = niah_phrased.make(tokenizer, 512, 0.5, seed)
        needle, question = niah_phrased.PHRASINGS[ex.meta["phrasing"]]
        assert ex.meta["phrasing"] == seed % 4 and "magic" not in ex.prompt.lower()
        assert ex.meta["needles"][0] in ex.prompt and ex.prompt.rstrip().endswith(question.split("?")[-1].strip().split("{s}")[-1].strip())
        seen.add(ex.meta["phrasing"])
    assert seen == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="haystack"):
        niah_phrased.make(tokenizer, 512, 0.5, 0, haystack="repeat")
