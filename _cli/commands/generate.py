"""``scalpel generate``: complete a prompt, with or without edits or steering."""

from __future__ import annotations

import textwrap
from itertools import zip_longest
from typing import TYPE_CHECKING

from _cli.context import model_meta
from _cli.inputs import CLIError, load_vector, parse_steer
from _cli.options import common, positive_int
from _cli.report import Output
from _core.errors import arg
from hooks.indices import check_index

if TYPE_CHECKING:
    from hooks.model import HookedLlama

PARAMS = {"path": "edits"}  # surgery.load_plan(path) reads --edits
HELP = "complete a prompt, with or without edits or steering"
EXAMPLE = "scalpel generate 'The Eiffel Tower is in the city of' --max-new-tokens 10"


def add_arguments(p) -> None:
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--edits", metavar="PLAN", help="edit plan file (.yaml/.json) applied before generating")
    p.add_argument(
        "--steer",
        action="append",
        metavar="LAYER:VECTOR:SCALE",
        help="add SCALE x the vector in VECTOR (.pt/.npy/.safetensors/.json) after layer LAYER (repeatable)",
    )
    p.add_argument("--compare", action="store_true", help="print the base and the edited completion side by side")
    p.add_argument("--max-new-tokens", type=positive_int, default=40)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message of the chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    common(p)


def _plan_from(args, model: HookedLlama):
    """The edit plan of ``--edits`` plus one ``AddSteering`` per ``--steer`` (checked when applied)."""
    import surgery

    plan = surgery.load_plan(args.edits) if args.edits else surgery.EditPlan()
    for spec in args.steer or []:
        steer = parse_steer(spec)
        who = f"{arg('steer')} {spec}"
        check_index(model, "layer", steer.layer, param="steer", who=who)
        vector = load_vector(steer.path)
        if vector.shape[0] != model.d_model:
            raise CLIError(
                f"{who}: the vector has {vector.shape[0]} entries, the model's d_model is {model.d_model}",
                param="steer",
            )
        try:
            plan.append(surgery.AddSteering(steer.layer, vector, steer.scale))
        except surgery.EditError as exc:  # NaN/inf in the vector: name the flag and file
            raise CLIError(f"{who}: {exc}", param="steer") from None
    return plan


def inputs(args) -> list:
    """The files read: the plan, the steering vectors (and a local model)."""
    from _cli.commands import default_inputs

    return default_inputs(args) + [str(parse_steer(spec).path) for spec in args.steer or []]


def _check_flags(args, model: HookedLlama) -> None:
    if args.compare and not (args.edits or args.steer):
        raise CLIError("--compare needs --edits PLAN or --steer LAYER:VECTOR:SCALE (something to compare with)")
    if model.tokenizer is None:
        raise CLIError("this model has no tokenizer; generate needs one (load a checkpoint with tokenizer files)")


def check(args, ctx) -> None:
    """A tokenizer, and the plan and steering vectors against the model (applied and undone)."""
    model = ctx.model()
    _check_flags(args, model)
    _plan_from(args, model).validate(model)


def _complete(model: HookedLlama, args) -> tuple[str, list[int]]:
    """(completion text, new token ids) of the prompt."""
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    tokens, mask = model.tokenize(prompt)
    out = model.generate(
        tokens.to(model.device),
        args.max_new_tokens,
        attention_mask=mask.to(model.device),
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        return_type="tokens",
    )
    new = out[0, tokens.shape[1] :].tolist()
    return model.tokenizer.decode(new, skip_special_tokens=True), new


def run(args, ctx) -> Output:
    """Complete a prompt; with ``--edits``/``--steer`` the edited model, with ``--compare`` both."""
    model = ctx.model()
    _check_flags(args, model)
    plan = _plan_from(args, model)
    data = {
        "command": "generate",
        "model": model_meta(model),
        "prompt": args.prompt,
        "chat": args.chat,
        "max_new_tokens": args.max_new_tokens,
        "sampling": {"sample": args.sample, "seed": args.seed, "temperature": args.temperature, "top_p": args.top_p},
    }
    out = Output("generate", data)
    edited = edited_ids = None
    if len(plan):
        with plan.applied(model):  # checks every edit before it changes anything
            edited, edited_ids = _complete(model, args)
        data["edits"] = plan.to_dict()
    base, base_ids = _complete(model, args) if (args.compare or not len(plan)) else (None, None)
    data.update(base=base, edited=edited, base_tokens=base_ids, edited_tokens=edited_ids)
    if base is not None and edited is not None:
        left, right = textwrap.wrap(base, 48) or [""], textwrap.wrap(edited, 48) or [""]
        out.table(
            f"prompt: {args.prompt}", ["base", "edited"], [[a or "", b or ""] for a, b in zip_longest(left, right)]
        )
    else:
        out.text("", args.prompt + (base if base is not None else edited))
    return out
