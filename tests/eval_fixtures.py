"""A few items of real evaluation datasets, in their hub schemas, for offline tests.

`FIXTURES[(dataset_path, dataset_name)]` maps split -> rows, as `datasets.load_dataset` would
return them; `fake_load_dataset` serves them to moxin.eval.commands.make_local_copies.
"""

from __future__ import annotations

import json


def _arc(i: int, question: str, choices: list[str], answer: int) -> dict:
    labels = ["A", "B", "C", "D"][:len(choices)]
    return {"id": f"arc-{i}", "question": question, "choices": {"text": choices, "label": labels},
            "answerKey": labels[answer]}


ARC_EASY = [
    _arc(0, "Which of these is a liquid at room temperature?", ["rock", "water", "wood", "iron"], 1),
    _arc(1, "What does a plant need to make food?", ["sunlight", "sand", "noise", "plastic"], 0),
    _arc(2, "Which animal lays eggs?", ["dog", "cow", "chicken", "horse"], 2),
    _arc(3, "What force pulls objects toward the Earth?", ["friction", "magnetism", "wind", "gravity"], 3),
    _arc(4, "Which tool measures temperature?", ["ruler", "thermometer", "scale"], 1),
]

WIKITEXT_PAGES = [
    " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing "
    "video game developed by Sega and Media.Vision for the PlayStation Portable . Released in January 2011 in "
    "Japan , it is the third game in the Valkyria series . Employing the same fusion of tactical and real @-@ "
    "time gameplay as its predecessors , the story runs parallel to the first game and follows the \" Nameless \" "
    ", a penal military unit serving the nation of Gallia during the Second Europan War . \n",
    " = Tower Building of the Little Rock Arsenal = \n\n The Tower Building of the Little Rock Arsenal , also known "
    "as U.S. Arsenal Building , is a building located in MacArthur Park in downtown Little Rock , Arkansas . Built "
    "in 1840 , it was part of Little Rock 's first military installation . Since its decommissioning , The Tower "
    "Building has housed two museums . \n",
]

GSM8K = {
    "train": [
        {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?",
         "answer": "Tom has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"},
        {"question": "A box holds 4 pens. How many pens are in 3 boxes?",
         "answer": "3 boxes hold 3 * 4 = <<3*4=12>>12 pens.\n#### 12"},
    ],
    "test": [
        {"question": "Sara reads 10 pages a day. How many pages does she read in 6 days?",
         "answer": "She reads 10 * 6 = <<10*6=60>>60 pages.\n#### 60"},
        {"question": "A farmer has 9 cows and sells 4. How many cows are left?",
         "answer": "9 - 4 = <<9-4=5>>5 cows are left.\n#### 5"},
    ],
}

HUMANEVAL = [{
    "task_id": "HumanEval/0",
    "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Return the sum of a and b.\"\"\"\n",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}]

def _popqa(i: int, subject: str, prop: str, question: str, answers: list[str]) -> dict:
    return {"id": i, "subj": subject, "prop": prop, "obj": answers[0], "subj_id": i, "prop_id": 7, "obj_id": 100 + i,
            "s_aliases": "[]", "o_aliases": json.dumps(answers[1:]), "s_uri": "", "o_uri": "",
            "s_wiki_title": subject, "o_wiki_title": answers[0], "s_pop": 100, "o_pop": 1000,
            "question": question, "possible_answers": json.dumps(answers)}


POPQA = [
    _popqa(0, "Cheyenne", "country", "In what country is Cheyenne?", ["United States", "USA"]),
    _popqa(1, "Lyon", "country", "In what country is Lyon?", ["France", "French Republic"]),
]

MATH_ALGEBRA = {
    "train": [{"problem": "What is $2+3$?", "level": "Level 1", "type": "Algebra",
               "solution": "We add: $2+3=\\boxed{5}$."}],
    "test": [{"problem": "Solve $2x=1$ for $x$.", "level": "Level 1", "type": "Algebra",
              "solution": "Dividing by 2, $x=\\boxed{\\frac{1}{2}}$."}],
}


def _mmlu(subject: str) -> dict:
    """One dev and one test question for any MMLU subject (cais/mmlu's schema)."""
    def item(n: int) -> dict:
        return {"question": f"Question {n} about {subject.replace('_', ' ')}?", "subject": subject,
                "choices": ["first", "second", "third", "fourth"], "answer": n % 4}

    return {"dev": [item(0)], "test": [item(1)]}

# The reasoning benchmarks, each in its dataset's own schema (answers as the datasets give them).
REASONING = {
    ("HuggingFaceH4/MATH-500", "default"): {"test": [{"problem": "What is $1/2 + 1/4$?", "answer": "\\frac{3}{4}",
                                                      "solution": "...", "subject": "Algebra", "level": 1,
                                                      "unique_id": "a"}]},
    ("AI-MO/aimo-validation-amc", "default"): {"train": [{"id": 0, "problem": "What is $0.5 + 0.25$?",
                                                          "answer": 0.75, "url": "u"}]},
    ("math-ai/minervamath", "default"): {"test": [{"question": "Compute three quarters.", "answer": "0.75"}]},
    ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP"): {"train": [{"id": 1, "question": "Find $3/4$.",
                                                                  "final_answer": ["$\\frac{3}{4}$"]}]},
}

FIXTURES = {
    **REASONING,
    ("allenai/ai2_arc", "ARC-Easy"): {"train": ARC_EASY[:2], "validation": ARC_EASY[2:3], "test": ARC_EASY},
    ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1"): {
        split: [{"page": page} for page in WIKITEXT_PAGES] for split in ("train", "validation", "test")},
    ("openai/gsm8k", "main"): GSM8K,
    ("openai/openai_humaneval", None): {"test": HUMANEVAL},
    ("akariasai/PopQA", None): {"test": POPQA},
    ("EleutherAI/hendrycks_math", "algebra"): MATH_ALGEBRA,
}


def fake_load_dataset(path: str, name: str | None = None, **kwargs):
    """`datasets.load_dataset` for the fixtures above (what a machine with internet would fetch)."""
    from datasets import Dataset, DatasetDict

    splits = _mmlu(name) if path == "cais/mmlu" else FIXTURES[(path, name)]
    return DatasetDict({split: Dataset.from_list(rows) for split, rows in splits.items()})
