"""``scalpel``: the llama-scalpel command line (the helpers live in the private package ``_cli``).

Every command takes ``--model`` (default: the embedded SmolLM2-135M-Instruct; or an HF directory, a
hub id in the local cache, or a ``.gguf`` file), prints aligned tables (``--json``: one JSON
document instead) and with ``--report FILE.html`` writes a self-contained HTML page with the plots.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input. Errors are one line
(``--debug`` shows the traceback). Existing outputs are never replaced without ``--overwrite``.

Example::

    scalpel info
    scalpel ablate --heads 19.2,20.0,22.5,23.3 --prompts examples/prompts_ioi.txt --metric logit-diff \\
        --report ablation.html --out edited-smollm2

In Python: ``cli.main(["info", "--json"])`` returns the exit code.
"""

from __future__ import annotations

import sys

from _cli.app import main
from _cli.commands import execute, help_texts
from _cli.context import DEFAULT_MODEL, Context, model_meta
from _cli.parser import PROG, HelpShown, UsageError, build_parser
from _cli.parser import version as parser_version

COMMAND_HELP = help_texts()

__all__ = [
    "main",
    "build_parser",
    "execute",
    "Context",
    "model_meta",
    "COMMAND_HELP",
    "DEFAULT_MODEL",
    "PROG",
    "HelpShown",
    "UsageError",
    "parser_version",
]

if __name__ == "__main__":
    sys.exit(main())
