"""``scalpel run EXPERIMENT.yaml``: a whole experiment in one file, run with one loaded model.

File format (every key but ``analyses``/``ablations``/``export`` is optional)::

    name: IOI name movers in SmolLM2          # report title
    model: default                            # or an HF directory, cached hub id, .gguf
    prompts: prompts_ioi.txt                  # file (relative to this YAML) or a list of prompts
    metric: logit-diff                        # loss | logit-diff | prob, for ablations and sweeps
    answers: [" Mary", " John"]               # for prompts that name none
    analyses:                                 # any commands, in order, with their flags as keys
      - heads: {top: 5}
      - lens: {prompt: "The Eiffel Tower is in the city of", target: " Paris"}
      - patch: {clean: "...", corrupt: "...", answers: [" Mary", " John"], components: attn_out}
      - sweep: {component: heads, layers: 19-23}
    ablations:                                # ablate steps; name them to export one
      - {name: name-movers, heads: "19.2,20.0"}
    export: {ablation: name-movers, out: edited-smollm2}   # or {plan: plan.yaml, out: DIR, format: hf}
    report: ioi-report.html

Each step is parsed by the same argument parser as the command line (``sweep: {layers: 3}`` is
``scalpel sweep --layers 3``), so a step accepts exactly the flags of its command. Input paths are
relative to the experiment file; outputs (``out``, ``report``, ``csv``) to the current directory.
Write head lists as quoted text (``heads: "19.2,20.10"``): a YAML number would drop the trailing 0.

Example: ``scalpel run examples/ioi_heads.yaml --json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import platform
import shlex
from pathlib import Path
from typing import Any

from _cli.commands import NAMES, execute
from _cli.context import DEFAULT_MODEL, check_outputs, model_meta
from _cli.inputs import CLIError
from _cli.options import common
from _cli.parser import HelpShown, build_parser
from _cli.progress import track
from _cli.report import Output, write_report

HELP = "run a whole experiment described in one YAML file"
EXAMPLE = "scalpel run examples/ioi_heads.yaml --report ioi.html"


def add_arguments(p) -> None:
    p.add_argument("experiment", metavar="EXPERIMENT.yaml")
    p.add_argument("--dry-run", action="store_true", help="check the experiment file and print its steps only")
    p.add_argument("--model", default=None, metavar="MODEL", help="override the experiment's model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None)
    common(p, model=False)


TOP_KEYS = (
    "name",
    "description",
    "model",
    "dtype",
    "device",
    "prompts",
    "metric",
    "answers",
    "analyses",
    "ablations",
    "export",
    "report",
)
STEP_COMMANDS = tuple(n for n in NAMES if n != "run")
POSITIONAL = {"generate": ["prompt"], "lens": ["prompt"], "edit": ["plan"], "verify": ["dir"]}
RUN_LEVEL = ("model", "dtype", "device", "json", "report", "overwrite", "debug")
REPEATED = ("prompts", "prompt", "target", "steer")  # flags given once per value
COMMA_LISTS = ("heads", "neurons", "layers", "components", "positions", "stages")
INPUT_PATHS = {"prompts": ("ablate", "sweep"), "edits": ("generate",), "plan": ("edit",), "dir": ("verify",)}
SHARED = {"prompts": ("ablate", "sweep"), "metric": ("ablate", "sweep"), "answers": ("ablate", "sweep")}


def load_experiment(path: str | Path) -> dict[str, Any]:
    """The experiment mapping of a YAML file, with its keys checked."""

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"no such experiment file: {path}")
    from surgery._files import parse, read_text

    data = parse(read_text(path, CLIError, "experiment file"), path, CLIError, yaml_format=True)
    if not isinstance(data, dict):
        raise CLIError(f"{path}: an experiment is a mapping with keys such as model, prompts, analyses, ablations")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), TOP_KEYS, n=1)
        raise CLIError(
            f"{path}: unknown key {unknown[0]!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; keys: {', '.join(TOP_KEYS)}"
        )
    if not (data.get("analyses") or data.get("ablations") or data.get("export")):
        raise CLIError(f"{path}: nothing to run; add analyses, ablations or export")
    return data


def _step_list(data: dict, key: str, path: Path) -> list[tuple[str, dict]]:
    out = []
    for i, item in enumerate(data.get(key) or [], start=1):
        if key == "ablations":
            item = {"ablate": item}
        if not (isinstance(item, dict) and len(item) == 1):
            raise CLIError(
                f"{path}: {key} #{i} must be a mapping of one command to its options, e.g. - sweep: "
                "{component: heads}"
            )
        ((command, options),) = item.items()
        options = {} if options is None else options
        if command not in STEP_COMMANDS:
            close = difflib.get_close_matches(str(command), STEP_COMMANDS, n=1)
            raise CLIError(
                f"{path}: {key} #{i}: unknown command {command!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; commands: {', '.join(STEP_COMMANDS)}"
            )
        if not isinstance(options, dict):
            raise CLIError(f"{path}: {key} #{i} ({command}): options must be a mapping of flags to values")
        out.append((command, dict(options)))
    return out


def _value(key: str, value: Any, where: str) -> list[str]:
    if key == "heads" and (
        isinstance(value, float) or (isinstance(value, list) and any(isinstance(v, float) for v in value))
    ):
        raise CLIError(
            f'{where}: write heads as quoted text, e.g. heads: "19.2,20.10" (a YAML number drops trailing zeros)'
        )
    if isinstance(value, list):
        return [",".join(str(v) for v in value)] if key in COMMA_LISTS else [str(v) for v in value]
    return [str(value)]


def step_argv(command: str, options: dict, where: str) -> list[str]:
    """The command line of one step: ``("sweep", {"layers": 3})`` → ``["sweep", "--layers", "3"]``."""
    argv = [command]
    options = dict(options)
    for name in POSITIONAL.get(command, []):
        if name not in options:
            raise CLIError(f"{where}: missing {name!r} (the {command} command's {name.upper()} argument)")
        argv.append(str(options.pop(name)))
    for key, value in options.items():
        if key in RUN_LEVEL:
            raise CLIError(f"{where}: {key!r} is set for the whole experiment, not per step")
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif key in REPEATED and isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag] + _value(key, value, where)
    return argv


def plan_steps(data: dict, path: Path) -> list[tuple[str, list[str]]]:
    """(label, argv) of every step, in order: analyses, ablations, export."""
    base = path.parent
    steps = [("analyses", c, o) for c, o in _step_list(data, "analyses", path)]
    named: dict[str, dict] = {}
    for c, o in _step_list(data, "ablations", path):
        name = o.pop("name", None)
        steps.append(("ablations", c, o))
        if name is not None:
            named[str(name)] = o
    export = data.get("export")
    if export is not None:
        if not isinstance(export, dict) or "out" not in export:
            raise CLIError(f"{path}: export needs 'out' (and 'ablation: NAME' or 'plan: FILE')")
        export = dict(export)
        if "plan" in export:
            steps.append(("export", "edit", export))
        else:
            name = export.pop("ablation", None)
            ablations = [o for section, c, o in steps if c == "ablate"]
            if name is None and len(ablations) == 1:
                target = ablations[0]
            elif name is None or str(name) not in named:
                raise CLIError(
                    f"{path}: export: name the ablation to export (ablation: NAME); named ablations: "
                    f"{', '.join(named) or 'none'}"
                )
            else:
                target = named[str(name)]
            extra = sorted(set(export) - {"out"})
            if extra:
                raise CLIError(f"{path}: export of an ablation takes only 'ablation' and 'out', not {extra[0]!r}")
            target["out"] = export["out"]
    out = []
    for i, (section, command, options) in enumerate(steps, start=1):
        where = f"{path}: step {i} ({section}: {command})"
        for key, commands in SHARED.items():
            if (
                command in commands
                and key not in options
                and key in data
                and not (key == "prompts" and "prompt" in options)
            ):
                options[key] = data[key]
        if command in ("ablate", "sweep") and isinstance(options.get("prompts"), list):
            options.setdefault("prompt", [])
            options["prompt"] = list(options["prompt"]) + [str(p) for p in options.pop("prompts")]
        for key, commands in INPUT_PATHS.items():
            if command in commands and isinstance(options.get(key), str):
                options[key] = _relative(base, options[key])
        if command == "generate" and options.get("steer"):
            steers = options["steer"] if isinstance(options["steer"], list) else [options["steer"]]
            options["steer"] = [_relative_steer(base, s) for s in steers]
        out.append((where, step_argv(command, options, where)))
    return out


def _relative(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def _relative_steer(base: Path, spec: str) -> str:
    layer, sep, rest = str(spec).partition(":")
    return f"{layer}{sep}{_relative(base, rest)}" if sep else str(spec)


def run(args, ctx) -> Output:
    """Run every step of an experiment file with one model; one JSON document and one report."""
    path = Path(args.experiment)
    data = load_experiment(path)
    steps = plan_steps(data, path)
    parser = build_parser()
    parsed = []
    for where, argv in steps:
        try:
            step_args = parser.parse_args(argv)
        except HelpShown:
            raise CLIError(f"{where}: 'help' is not a step option") from None
        except CLIError as exc:
            raise CLIError(f"{where}: {exc}") from None
        step_args.overwrite = args.overwrite
        parsed.append((where, argv, step_args))
    report = args.report or data.get("report")
    outputs = [
        (f"step {i} --{k}", getattr(a, k, None)) for i, (_, _, a) in enumerate(parsed, 1) for k in ("out", "csv")
    ]
    if not args.report and report:
        outputs.append(("report", report))
    check_outputs(outputs, args.overwrite)
    title = str(data.get("name") or f"experiment {path.name}")
    doc: dict[str, Any] = {"command": "run", "experiment": str(path), "name": title, "definition": data, "steps": []}
    out = Output("run", doc, title=title)
    if args.dry_run:
        out.table(
            f"{title}: {len(parsed)} steps (dry run)",
            ["#", "command line"],
            [[i, "scalpel " + " ".join(shlex.quote(a) for a in argv)] for i, (_, argv, _) in enumerate(parsed, 1)],
            max_width=0,
        )
        doc["steps"] = [{"argv": argv} for _, argv, _ in parsed]
        return out
    spec = str(data.get("model") or DEFAULT_MODEL)
    if spec != DEFAULT_MODEL and (path.parent / spec).exists():
        spec = _relative(path.parent, spec)  # a checkpoint beside the experiment file
    ctx.model_spec = args.model or spec
    ctx.dtype = args.dtype or data.get("dtype")
    ctx.device = args.device or data.get("device")
    doc["model"] = model_meta(ctx.model())
    doc["environment"] = _environment()
    from hooks.errors import ScalpelError

    for where, _, step_args in parsed:  # every step's input, before step 1 writes anything
        try:
            check_step(step_args, ctx)
        except ScalpelError as exc:
            raise CLIError(f"{where}: {exc}") from None

    for i, (where, argv, step_args) in enumerate(track(parsed, "experiment steps"), start=1):
        try:
            result = execute(step_args, ctx)
        except CLIError as exc:
            raise CLIError(f"{where}: {exc}") from None
        result.command = f"step {i}: scalpel " + " ".join(shlex.quote(a) for a in argv)
        doc["steps"].append({"argv": argv, "result": result.data})
        out.sections.append(result)
        out.blocks += [
            dataclasses.replace(b, title=f"[{i}] {argv[0]}: {b.title}" if b.title else f"[{i}] {argv[0]}")
            for b in result.blocks
        ]
        out.files += result.files
    if report and not args.report:
        write_report(report, out.sections, title=title, meta={"experiment": str(path), "model": ctx.model().source})
        out.files.append(str(report))
        doc.setdefault("files", []).append(str(report))
    return out


def _environment() -> dict[str, str]:
    import importlib.metadata as md

    env = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "llama-scalpel"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = "dev" if dist == "llama-scalpel" else "missing"
    return env


def check_step(args, ctx) -> None:
    """The input checks of one step's command against the loaded model, without running it (every
    step is checked this way before the first one writes anything)."""
    import surgery
    from _cli.inputs import check_answers, check_layers, gather_prompts, parse_layers
    from analyses import Scorer

    model = ctx.model()
    if args.command in ("ablate", "sweep"):
        if args.command == "ablate":
            from _cli.commands.ablate import _units

            _units(args, model)
        elif args.layers:
            check_layers(model, parse_layers(args.layers))
        Scorer.build(model, args.metric, gather_prompts(args.prompt, args.prompts, check_answers(args.answers)))
    elif args.command == "edit":
        surgery.load_plan(args.plan).validate(model)
    elif args.command == "generate":
        from _cli.commands.generate import _plan_from

        _plan_from(args, model)
