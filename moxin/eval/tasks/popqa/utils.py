"""PopQA scoring: `possible_answers` is a JSON-encoded list of strings."""

import json


def answers(doc: dict) -> list[str]:
    value = doc["possible_answers"]
    return json.loads(value) if isinstance(value, str) else list(value)


def first_answer(doc: dict) -> str:
    return answers(doc)[0]  # lm-eval puts the target delimiter (a space) before it


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    generated = results[0].strip().lower()
    return {"exact_match": float(any(a.strip().lower() in generated for a in answers(doc) if a.strip()))}
