"""lm-eval's own command line with the `moxin` model type registered:

    python -m moxin.eval run --model moxin --model_args ckpt=PATH --tasks arc_easy --batch_size 16

takes every argument `lm_eval` takes (lm-eval cannot discover third-party model types itself).
"""

from lm_eval.__main__ import cli_evaluate

import moxin.eval  # noqa: F401  (registers model type "moxin")

if __name__ == "__main__":
    cli_evaluate()
