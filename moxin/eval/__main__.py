"""lm-eval's own command line with the `moxin` model type registered:

    python -m moxin.eval run --model moxin --model_args ckpt=PATH --tasks arc_easy --batch_size 16
    moxin-lm-eval run --model moxin --model_args ckpt=PATH --tasks arc_easy     # the same, installed

takes every argument `lm_eval` takes (lm-eval cannot discover third-party model types itself),
and knows moxin's own tasks (PopQA, MATH on math-verify, sandboxed HumanEval) unless you give
--include_path yourself.
"""

import sys

from lm_eval.__main__ import cli_evaluate

import moxin.eval  # noqa: F401  (registers model type "moxin")
from moxin.eval.suites import OWN_TASKS_DIR


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("run", "ls", "validate") and "--include_path" not in sys.argv:
        sys.argv[2:2] = ["--include_path", str(OWN_TASKS_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
