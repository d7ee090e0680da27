"""Option groups shared by several commands, and argument types.

Example::

    def add_arguments(p):
        p.add_argument("--top", type=positive_int, default=10)
        prompt_options(p)
        common(p)
"""

from __future__ import annotations

import argparse

from _cli.context import DEFAULT_MODEL


def positive_int(text: str) -> int:
    """``argparse`` type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def model_options(g) -> None:
    """``--model``, ``--dtype``, ``--device``."""
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help="'default' (SmolLM2-135M-Instruct), an HF checkpoint directory, a cached hub id or a .gguf",
    )
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="load the weights in this dtype (default: the checkpoint's; float32 for the default model)",
    )
    g.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")


def common(p: argparse.ArgumentParser, *, model: bool = True, report: bool = True) -> None:
    """The options every command has: model (unless ``model=False``), ``--json``, ``--report``
    (unless ``report=False``), ``--overwrite``, ``--debug``."""
    g = p.add_argument_group("common options")
    if model:
        model_options(g)
    g.add_argument("--json", action="store_true", help="print one machine-readable JSON document instead of tables")
    if report:
        g.add_argument("--report", metavar="FILE.html", help="write a self-contained HTML report with the figures")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files/directories")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")


def prompt_options(
    p: argparse.ArgumentParser,
    *,
    metric_default: str = "loss",
    batch_size: int = 16,
    batch_help: str = "prompts per forward pass",
) -> None:
    """``--prompts``, ``--prompt``, ``--metric``, ``--answers``, ``--batch-size`` (ablate, sweep)."""
    p.add_argument(
        "--prompts",
        action="append",
        metavar="FILE",
        help="prompt file: one prompt per line (PROMPT<TAB>CORRECT<TAB>INCORRECT for answers) or .jsonl",
    )
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt given inline (repeatable)")
    p.add_argument(
        "--metric",
        choices=["loss", "logit-diff", "prob"],
        default=metric_default,
        help=f"loss: mean next-token loss; logit-diff: correct - incorrect logit at the last token; "
        f"prob: probability of the correct answer (default {metric_default})",
    )
    p.add_argument(
        "--answers",
        nargs="+",
        metavar="ANSWER",
        help="CORRECT [INCORRECT] single-token answers for prompts that name none, e.g. ' Mary' ' John'",
    )
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"{batch_help} (default {batch_size})")
