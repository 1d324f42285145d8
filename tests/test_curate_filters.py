"""Curation: text normalisation and the prose/code quality filters (CPU, offline, no files)."""

from __future__ import annotations

import base64
import re
import time
from collections import Counter

import pytest

from moxin.curate.filters import (
    CODE_RULES,
    PROSE_RULES,
    STOP_WORDS,
    CodeFilterConfig,
    ProseFilterConfig,
    QualityFilter,
)
from moxin.curate.normalize import normalize_document, normalize_for_dedup, words

# --- normalisation ---


def test_normalize_document_composes_to_nfc():
    decomposed = "Cafe\u0301 cre\u0300me bru\u0302le\u0301e"  # e + combining acute, etc.
    out = normalize_document(decomposed)
    assert out == "Café crème brûlée"
    assert "\u0301" not in out and len(out) == len("Café crème brûlée")
    assert normalize_document("Café") == "Café"  # already composed: unchanged


def test_normalize_document_unix_newlines():
    assert normalize_document("one\r\ntwo\rthree\nfour") == "one\ntwo\nthree\nfour"
    assert normalize_document("a\r\n\r\nb") == "a\n\nb"  # CRLF pairs become one newline each, not two
    assert "\r" not in normalize_document("x\r\r\ny")


def test_normalize_document_removes_control_characters_but_keeps_tabs_and_newlines():
    text = "name:\tAda\x00 Love\x07lace\nborn\x0b 1815\x0c\x1b[0m\x7f done"
    assert normalize_document(text) == "name:\tAda Lovelace\nborn 1815[0m done"


def test_normalize_document_removes_c1_control_characters():
    # U+0080-U+009F are control characters (Unicode category Cc) just like U+0000-U+001F; they turn
    # up in text decoded with the wrong code page. The docstring promises "no control characters".
    text = "price\x80 list\x9b and\x9f more"
    assert normalize_document(text) == "price list and more"


def test_normalize_document_strips_both_ends_only():
    assert normalize_document("  \n\t Title\n\n  body  text \t\n \r\n") == "Title\n\n  body  text"
    assert normalize_document("\x00 \x01") == ""


def test_normalize_for_dedup_lowercases_and_drops_ascii_punctuation():
    assert normalize_for_dedup("Hello, World! (It's a TEST.)") == "hello world its a test"
    assert normalize_for_dedup("state-of-the-art: yes; no?") == "stateoftheart yes no"


def test_normalize_for_dedup_drops_unicode_punctuation():
    text = "“Quoted” — text… «guillemets» ¿Qué? ¡Sí! 「日本」 It’s"
    assert normalize_for_dedup(text) == "quoted text guillemets qué sí 日本 its"


def test_normalize_for_dedup_collapses_whitespace_and_composes():
    assert normalize_for_dedup("  a \t\n b\u00a0\u2003c\r\n\r\nd  ") == "a b c d"
    assert normalize_for_dedup("CAFE\u0301") == normalize_for_dedup("café") == "café"
    # Punctuation between spaces leaves no double space behind.
    assert normalize_for_dedup("one — two - three") == "one two three"


def test_words():
    assert words("Hello,  World!\nIt’s  fine…") == ["hello", "world", "its", "fine"]
    assert words("") == [] and words(" — … ") == []


# --- prose rules: one realistic document each side of every threshold ---

PROSE = ProseFilterConfig()
CODE = CodeFilterConfig()


def prose_failures(text: str, cfg: ProseFilterConfig = PROSE) -> list[str]:
    return [name for name, rule in PROSE_RULES.items() if rule(text, cfg)]


def code_failures(text: str, cfg: CodeFilterConfig = CODE) -> list[str]:
    return [name for name, rule in CODE_RULES.items() if rule(text, cfg)]


def mean_word_length(text: str) -> float:
    found = text.split()
    return sum(map(len, found)) / len(found)


RIVER = (
    "The river that runs through the old town has shaped its history for centuries.\n"
    "Merchants once moved grain, timber and wool along its banks, and the stone bridges that still\n"
    "stand were built with money from that trade.\n"
    "\n"
    "Today the water is quieter. Families walk beside it on summer evenings, anglers wait patiently\n"
    "for trout, and a small museum near the market explains how the mills once worked.\n"
    "\n"
    "Local historians have gathered letters, maps and photographs showing how closely the fortunes\n"
    "of the town followed the river, through floods, droughts and the long decline of the mills."
)

# 61 words of exactly three letters: mean word length 3.0, the lower bound.
THREE_LETTER_WORDS = (
    "the fox and the cat ran far but the owl saw you and did not cry out the old dog who sat low "
    "for one day got fed and ran off too the sun hid and the sky was dim now the boy ate his pie and "
    "had tea for his tum all day and the end was fun for him"
)
FIFTY_SHORT_WORDS = " ".join(THREE_LETTER_WORDS.split()[:50])  # 50 x 3 letters + 49 spaces = 199 characters

# 87 words whose mean length is exactly 10.0, the upper bound.
LONG_WORDS = (
    "Electrochemical characterisation of the heterogeneous photocatalysts demonstrated "
    "that nanostructured titanium semiconductors outperformed the conventional polycrystalline "
    "alternatives. Spectroscopic measurements, supplemented with computational simulations, "
    "established correlations between crystallographic orientation, interfacial recombination "
    "and photoelectrochemical efficiency. Subsequent investigations characterised the degradation "
    "mechanisms affecting longevity, particularly photocorrosion, agglomeration, delamination "
    "and contamination. Manufacturers increasingly emphasise reproducibility, scalability "
    "and environmental compatibility, encouraging standardised benchmarking methodologies "
    "throughout international laboratories. Collaborative consortia can now coordinate interlaboratory "
    "comparisons, disseminating harmonised protocols, reference materials and comprehensive "
    "documentation, so as to help all of the participating institutes in it."
)

# 60 words, 6 of them hashtags: '#' per word is exactly 0.1.
HIKE_POST = (
    "We spent the last week of summer walking the coastal path from the harbour to the lighthouse. "
    "The weather was kind, the cliffs were covered with wild flowers and every village along the way "
    "had a bakery that was worth the detour. If you have a free weekend in September, pack boots "
    "and go.\n#travel #hiking #coast #summer #september #lighthouse"
)

CAMPING_ITEMS = [
    "• Check that the tent, poles and pegs are all in the bag.",
    "• Pack a warm sleeping bag rated for the coldest night expected.",
    "- Bring a stove with enough fuel for two hot meals a day.",
    "- Carry a paper map of the area and know how to use it.",
    "* Fill every water bottle before leaving the last village.",
    "* Leave a copy of the route with a friend at home.",
    "– Wear boots that have been broken in on shorter walks.",
    "– Keep a head torch and spare batteries within easy reach.",
    "▪ Take the rubbish home and leave the campsite as you found it.",
    "▪ Check the forecast again on the morning you set off.",
]
CAMPING_INTRO = "Before a first night of wild camping, go through this list:"

# 10 lines, 3 of them ending in an ellipsis: a share of exactly 0.3.
NEWS = (
    "The council met on Tuesday evening to discuss the new cycle lanes.\n"
    "Residents of the north side said the plans ignored their streets.\n"
    "A spokesman for the council promised that the route would be reviewed.\n"
    "Shop owners on the high street are worried about losing parking spaces...\n"
    "The school has asked for a safe crossing near its main gate.\n"
    "Cyclists welcomed the plan but want the lanes to be separated from traffic…\n"
    "A public meeting will be held at the library next month.\n"
    "Council officers expect the first section to open in the spring...\n"
    "The full plans can be seen at the town hall during opening hours.\n"
    "Comments may be sent by post or by email until the end of May."
)

# 70 words, 14 of them without a letter: a share of words with letters of exactly 0.8.
ANNUAL_REPORT = (
    "Revenue for the year ended 31 December 2023 rose 12% to 4.8 billion, and operating profit "
    "grew 9% to 610 million. The board proposes a final dividend of 21 pence, payable on 14 June "
    "2024 to shareholders registered on 17 May. Net debt fell by 240 million to 1.1 billion, "
    "helped by strong cash conversion. Capital spending will be close to 900 million "
    "in 2024, mostly on forty new stores."
)

# Of the eight stop words only "the" and "with" (once): exactly the minimum of two.
RECIPE = (
    "Preheat the oven. Rub cold butter into flour until it looks like breadcrumbs, then stir in "
    "sugar, a little salt, grated lemon zest plus some raisins. Add milk slowly, mixing "
    "with a knife, until a soft dough forms. Pat it out on a floured board, cut rounds, brush "
    "each round in beaten egg. Bake for twelve minutes until golden. Serve warm, split open, "
    "topped generously by butter or clotted cream."
)

# 10 lines, the chorus 4 times: 3 of 10 lines repeat an earlier one, exactly 0.3.
CHORUS = "And the boats come home to the harbour wall"
SONG = (
    "The morning fog lies heavy on the bay\n"
    "The fishermen are leaving before the break of day\n"
    f"{CHORUS}\n"
    "Their wives stand watching from the cottage doors\n"
    "The gulls are crying high above the shores\n"
    f"{CHORUS}\n"
    "The nets are mended and the lamps are lit\n"
    "The old men in the tavern talk of it\n"
    f"{CHORUS}\n"
    f"{CHORUS}"
)

# 10 paragraphs, the subscription plea 4 times: 3 of 10 paragraphs repeat, exactly 0.3 (lines: 3 of 16).
SUBSCRIBE = "Enjoying this series? Subscribe to the newsletter."
BLOG_SECTIONS = [
    "Sourdough begins with a starter of flour and water.\nFeed it daily for a week before the first bake.",
    "Mix the dough the evening before you bake.\nA long, cool rise gives the bread its sour flavour.",
    "Shape the loaf gently so that the gas stays in.\nA tight skin on the surface helps it hold its shape.",
    "Bake it in a heavy pot with the lid on.\nThe trapped steam lets the crust expand before it sets.",
    "Let the bread cool for an hour before slicing.\nThe crumb is still cooking while it is warm.",
    "Keep the starter in the fridge between bakes.\nFeed it the day before you want to use it again.",
]
BLOG = "\n\n".join([*BLOG_SECTIONS[:2], SUBSCRIBE, *BLOG_SECTIONS[2:4], SUBSCRIBE, BLOG_SECTIONS[4], SUBSCRIBE,
                    BLOG_SECTIONS[5], SUBSCRIBE])

# rule: (a document that passes every rule, one just past this rule's threshold that fails only it)
PROSE_CASES = {
    "too_short": (FIFTY_SHORT_WORDS + ".", FIFTY_SHORT_WORDS),
    "word_count": (" ".join(RIVER.split()[:50]), " ".join(RIVER.split()[:49])),
    "mean_word_length": (THREE_LETTER_WORDS, THREE_LETTER_WORDS.replace("the boy", "to boy")),
    "symbol_ratio": (HIKE_POST, HIKE_POST + " #nofilter"),
    "bullet_lines": ("\n".join([CAMPING_INTRO, *CAMPING_ITEMS[:9]]), "\n".join([CAMPING_INTRO, *CAMPING_ITEMS])),
    "ellipsis_lines": (NEWS, NEWS.replace("end of May.", "end of May...")),
    "alpha_words": (ANNUAL_REPORT, ANNUAL_REPORT.replace("forty", "40")),
    "stop_words": (RECIPE, RECIPE.replace("mixing with", "mixing using")),
    "duplicate_lines": (SONG, SONG + "\n" + CHORUS),
    "duplicate_paragraphs": (BLOG, BLOG + "\n\n" + SUBSCRIBE),
}


def test_the_realistic_paragraph_passes_every_prose_rule():
    assert 80 <= len(RIVER.split()) <= 100
    assert prose_failures(RIVER) == []
    assert QualityFilter(ProseFilterConfig()).reason(RIVER) is None


def test_the_cases_sit_exactly_at_the_thresholds():
    """The passing side of each case is at the threshold itself, so the failing side is just past it."""
    assert len(PROSE_CASES["too_short"][0]) == PROSE.min_chars == len(PROSE_CASES["too_short"][1]) + 1
    assert len(PROSE_CASES["word_count"][0].split()) == PROSE.min_words
    assert mean_word_length(THREE_LETTER_WORDS) == PROSE.min_mean_word_length
    assert HIKE_POST.count("#") / len(HIKE_POST.split()) == PROSE.max_symbol_ratio
    lines = PROSE_CASES["bullet_lines"][0].split("\n")
    assert sum(line.startswith(("•", "-", "*", "–", "▪")) for line in lines) / len(lines) == PROSE.max_bullet_line_share
    lines = NEWS.split("\n")
    assert sum(line.endswith(("...", "…")) for line in lines) / len(lines) == PROSE.max_ellipsis_line_share
    lettered = [w for w in ANNUAL_REPORT.split() if re.search(r"[a-zA-Z]", w)]
    assert len(lettered) / len(ANNUAL_REPORT.split()) == PROSE.min_alpha_word_share
    present = {w.strip(".,").lower() for w in RECIPE.split()} & STOP_WORDS
    assert present == {"the", "with"} and len(present) == PROSE.min_stop_words
    assert SONG.count(CHORUS) == 4 and len(SONG.split("\n")) == 10
    assert BLOG.count(SUBSCRIBE) == 4 and len(BLOG.split("\n\n")) == 10


@pytest.mark.parametrize("rule", list(PROSE_CASES))
def test_prose_rule_threshold(rule):
    passing, failing = PROSE_CASES[rule]
    assert not PROSE_RULES[rule](passing, PROSE)
    assert PROSE_RULES[rule](failing, PROSE)
    assert prose_failures(passing) == []
    assert prose_failures(failing) == [rule]  # breaks exactly this rule
    quality = QualityFilter(ProseFilterConfig())
    assert quality.reason(passing) is None
    assert quality.reason(failing) == rule
    assert quality.removed == Counter({rule: 1})


def test_mean_word_length_upper_bound():
    assert mean_word_length(LONG_WORDS) == PROSE.max_mean_word_length
    assert prose_failures(LONG_WORDS) == []
    longer = LONG_WORDS.replace("orientation", "orientations")  # one more character: mean just over 10
    assert prose_failures(longer) == ["mean_word_length"]


def test_symbol_ratio_counts_ellipses_like_hashes():
    # 57 words: 3 hashtags, one '...' and one '…' are 5 symbols, under one per ten words; a sixth of
    # either kind of ellipsis tips it over.
    text = HIKE_POST.replace(" #summer #september #lighthouse", "")
    text = text.replace("lighthouse.", "lighthouse...").replace("detour.", "detour…")
    assert len(text.split()) == 57
    assert not PROSE_RULES["symbol_ratio"](text, PROSE)
    assert PROSE_RULES["symbol_ratio"](text.replace("kind,", "kind..."), PROSE)
    assert PROSE_RULES["symbol_ratio"](text.replace("kind,", "kind…"), PROSE)
    assert PROSE_RULES["symbol_ratio"](text.replace("kind,", "kind #sun"), PROSE)


def test_too_long_and_too_many_words():
    assert not PROSE_RULES["too_long"]("x" * PROSE.max_chars, PROSE)
    assert PROSE_RULES["too_long"]("x" * (PROSE.max_chars + 1), PROSE)
    assert not PROSE_RULES["word_count"]("word " * PROSE.max_words, PROSE)
    many = "word " * (PROSE.max_words + 1)
    assert PROSE_RULES["word_count"](many, PROSE)
    assert QualityFilter(ProseFilterConfig()).reason(many) == "word_count"


def test_a_50_mb_document_is_rejected_as_too_long_at_once():
    huge = RIVER * (50_000_000 // len(RIVER) + 1)
    assert len(huge) > 50_000_000
    quality = QualityFilter(ProseFilterConfig())
    start = time.perf_counter()
    reason = quality.reason(huge)
    elapsed = time.perf_counter() - start
    assert reason == "too_long" and quality.removed == Counter({"too_long": 1})
    assert elapsed < 1.0  # a length check, not a scan of 50 MB with every rule


# --- code rules ---

MOVING_AVERAGE = '''def moving_average(values, window):
    """Mean of each run of `window` consecutive values."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    averages = []
    total = sum(values[:window])
    averages.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages
'''
ROOT_MEAN_SQUARE = '''

def root_mean_square(values):
    """Square root of the mean of the squared values."""
    return math.sqrt(sum(v * v for v in values) / len(values))
'''
ICON_DATA = base64.b64encode(bytes(range(256)) * 8).decode()


def icon_line(length: int) -> str:
    """A base64 image constant, the kind of long line real modules carry, exactly `length` characters."""
    line = 'ICON_PNG = "' + ICON_DATA[:length - 13] + '"'
    assert len(line) == length
    return line


def module(icon_length: int) -> str:
    return ('"""Rolling statistics over a series of sensor readings."""\n\nimport math\n\n'
            + icon_line(icon_length) + "\n\n\n" + MOVING_AVERAGE + ROOT_MEAN_SQUARE)


def with_mean_line_length(code: str, mean: int, extra: int = 0) -> str:
    """`code` under an icon line sized to make the mean line length exactly `mean` (+ `extra` characters)."""
    lines = code.split("\n")
    return icon_line(mean * (len(lines) + 1) - sum(map(len, lines)) + extra) + "\n" + code


def comment_rules(n: int) -> str:
    """Exactly n characters, none alphanumeric: '#====...' separator lines of at most 80 characters."""
    out = ""
    while len(out) < n:
        take = min(n - len(out), 80)
        out += "\n#" + "=" * (take - 2) if take >= 2 else "\n"
    return out


def with_alnum_share_quarter(code: str, extra: int = 0) -> str:
    """`code` followed by separator comments that bring its alphanumeric share to exactly 0.25 (less with extra)."""
    alnum = sum(c.isalnum() for c in code)
    return code + comment_rules(4 * alnum - len(code) + extra)


PROTO_HEADER = '''# -*- coding: utf-8 -*-
#
# Copyright 2024 Example Corp.
#
# Generated by the protocol buffer compiler.  DO NOT EDIT!
# source: sensors.proto
'''
MINIFIED = ";".join(f"function f{i}(a,b){{return a*{i}+b}}" for i in range(70))[:2000]

CODE_CASES = {
    "too_short": ("x = compute(abc, cd)", "x = compute(ab, cd)"),
    "long_lines": (module(1000), module(1001)),
    "mean_line_length": (with_mean_line_length(MOVING_AVERAGE, 100), with_mean_line_length(MOVING_AVERAGE, 100, 1)),
    "alnum_share": (with_alnum_share_quarter(MOVING_AVERAGE), with_alnum_share_quarter(MOVING_AVERAGE, 1)),
    # The marker on line 6 is past the 5 header lines searched; on line 5 it is found.
    "generated": ("#!/usr/bin/env python3\n" + PROTO_HEADER + MOVING_AVERAGE, PROTO_HEADER + MOVING_AVERAGE),
}


def test_a_normal_python_function_passes_every_code_rule():
    assert code_failures(MOVING_AVERAGE) == []
    assert code_failures(MOVING_AVERAGE + ROOT_MEAN_SQUARE) == []
    assert QualityFilter(CodeFilterConfig()).reason(MOVING_AVERAGE) is None


def test_the_code_cases_sit_exactly_at_the_thresholds():
    def line_lengths(text):
        return [len(line) for line in text.split("\n")]

    assert len(CODE_CASES["too_short"][0]) == CODE.min_chars == len(CODE_CASES["too_short"][1]) + 1
    assert max(line_lengths(CODE_CASES["long_lines"][0])) == CODE.max_line_length
    passing = line_lengths(CODE_CASES["mean_line_length"][0])
    assert sum(passing) / len(passing) == CODE.max_mean_line_length and max(passing) < CODE.max_line_length
    passing = CODE_CASES["alnum_share"][0]
    assert sum(c.isalnum() for c in passing) / len(passing) == CODE.min_alnum_share


@pytest.mark.parametrize("rule", list(CODE_CASES))
def test_code_rule_threshold(rule):
    passing, failing = CODE_CASES[rule]
    assert not CODE_RULES[rule](passing, CODE)
    assert CODE_RULES[rule](failing, CODE)
    assert code_failures(passing) == []
    assert code_failures(failing) == [rule]
    quality = QualityFilter(CodeFilterConfig())
    assert quality.reason(passing) is None
    assert quality.reason(failing) == rule
    assert quality.removed == Counter({rule: 1})


def test_minified_line_is_rejected_for_its_length():
    assert len(MINIFIED) == 2000 and "\n" not in MINIFIED
    assert CODE_RULES["long_lines"](MINIFIED, CODE)
    assert QualityFilter(CodeFilterConfig()).reason(MINIFIED) == "long_lines"


def test_generated_markers_are_found_in_any_case():
    for header in ("// This file is AUTO-GENERATED; changes will be lost.", "# Automatically generated by tool x",
                   "/* Don't edit this file */", "# autogenerated"):
        assert CODE_RULES["generated"](header + "\n" + MOVING_AVERAGE, CODE), header
    # Prose that merely mentions generation further down is not a generated file.
    late = MOVING_AVERAGE + "\n# Results are generated by the caller; do not edit them in place.\n"
    assert not CODE_RULES["generated"](late, CODE)


def test_too_long_code():
    assert not CODE_RULES["too_long"]("x = 1\n" * (CODE.max_chars // 6), CODE)
    assert QualityFilter(CodeFilterConfig()).reason("x = 1\n" * (CODE.max_chars // 6 + 1)) == "too_long"


def test_every_rule_has_a_threshold_case():
    assert set(PROSE_CASES) | {"too_long"} == set(PROSE_RULES)
    assert set(CODE_CASES) | {"too_long"} == set(CODE_RULES)


# --- QualityFilter ---


def test_reason_is_the_first_failing_rule_and_is_counted():
    quality = QualityFilter(ProseFilterConfig())
    tiny = "Buy now!!!"  # too short, too few words, no stop words
    assert prose_failures(tiny)[:2] == ["too_short", "word_count"] and "stop_words" in prose_failures(tiny)
    assert quality.reason(tiny) == "too_short"
    # Too few words and all of them in one repeated line: word_count comes first.
    repeated = "\n".join(["The quick brown fox jumps over the lazy dog again and again."] * 4)
    assert prose_failures(repeated) == ["word_count", "duplicate_lines"]
    assert quality.reason(repeated) == "word_count"
    assert quality.reason(RIVER) is None
    assert quality.reason(tiny) == "too_short"
    assert quality.removed == Counter({"too_short": 2, "word_count": 1})


def test_disabled_rules_are_skipped():
    tiny = "Buy now!!!"
    quality = QualityFilter(ProseFilterConfig(disabled=["too_short"]))
    assert "too_short" not in quality.rules and len(quality.rules) == len(PROSE_RULES) - 1
    assert quality.reason(tiny) == "word_count"
    assert quality.reason(FIFTY_SHORT_WORDS) is None  # 199 characters, otherwise fine
    assert quality.removed == Counter({"word_count": 1})
    song = SONG + "\n" + CHORUS
    assert QualityFilter(ProseFilterConfig(disabled=["duplicate_lines"])).reason(song) is None
    generated = PROTO_HEADER + MOVING_AVERAGE
    assert QualityFilter(CodeFilterConfig(disabled=["generated"])).reason(generated) is None


def test_thresholds_come_from_the_config():
    assert QualityFilter(ProseFilterConfig(min_chars=len(RIVER) + 1)).reason(RIVER) == "too_short"
    assert QualityFilter(ProseFilterConfig(max_duplicate_line_share=0.2)).reason(SONG) == "duplicate_lines"
    assert QualityFilter(CodeFilterConfig(generated_marker_lines=6)).reason(CODE_CASES["generated"][0]) == "generated"


def test_unknown_disabled_rule_is_refused_by_name():
    with pytest.raises(ValueError, match="too_shrt"):
        QualityFilter(ProseFilterConfig(disabled=["too_shrt"]))
    # stop_words is a prose rule: the code profile does not have it.
    with pytest.raises(ValueError, match="stop_words"):
        QualityFilter(CodeFilterConfig(disabled=["stop_words"]))


@pytest.mark.parametrize("cfg, name", [
    (ProseFilterConfig(min_words=-1), "min_words"),
    (ProseFilterConfig(max_duplicate_line_share=-0.1), "max_duplicate_line_share"),
    (CodeFilterConfig(max_line_length=-5), "max_line_length"),
    (ProseFilterConfig(min_chars="200"), "min_chars"),
])
def test_bad_threshold_is_refused_by_name(cfg, name):
    with pytest.raises(ValueError, match=name):
        QualityFilter(cfg)
