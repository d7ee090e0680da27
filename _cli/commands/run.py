"""``scalpel run EXPERIMENT.yaml``: a whole experiment in one file, run with one loaded model.

File format (every key but ``analyses``/``ablations``/``export`` is optional)::

    name: IOI name movers in SmolLM2          # report title
    model: default                            # or an HF directory, cached hub id, .gguf
    prompts: prompts_ioi.txt                  # file or a list of prompts
    metric: logit-diff                        # loss | logit-diff | prob, for ablations and sweeps
    answers: [" Mary", " John"]               # for prompts that name none
    analyses:                                 # any commands, in order, with their options as keys
      - heads: {top: 5}
      - lens: {prompt: "The Eiffel Tower is in the city of", target: " Paris"}
      - patch: {clean: "...", corrupt: "...", answers: [" Mary", " John"], components: attn_out}
      - sweep: {component: heads, layers: 19-23}
    ablations:                                # ablate steps; name them to export one
      - {name: name-movers, heads: "19.2,20.0"}
    export: {ablation: name-movers, out: edited-smollm2}   # or {plan: plan.yaml, out: DIR, format: hf}
    report: ioi-report.html

A step's options are its command's options, named by the flag without dashes (``seq_len`` or ``seq-len``
for ``--seq-len``) and given as YAML values: ``layers: 3``, ``layers: "18-23"`` and ``layers: [18, 19]``
are the same; lists stay lists (``heads: ["19.2", "20.0"]``, ``target: [" Paris", " Rome"]``). Each step
becomes the same arguments its command gets from the command line (the parser's defaults, the types and
choices of its flags), and runs the same code, which calls the same library functions. Every path in the
file (prompt files, plans, vectors, ``out``, ``csv``, ``report``) is relative to the experiment file.
Write head lists as quoted text (``heads: "19.2,20.10"``): a YAML number would drop the trailing 0.

Before step 1 runs, every step is checked: its options, every output of every step against the others and
against every input (``_core.writer.check_outputs``), then, with the model loaded, each step's inputs
(units in range, prompts and answers, plans). Errors name the file, the step and the option.

Example: ``scalpel run examples/ioi_heads.yaml --json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _cli import commands
from _cli.commands import NAMES
from _cli.context import DEFAULT_MODEL, model_meta
from _cli.inputs import CLIError
from _cli.options import common
from _cli.parser import ALIASES, build_parser, flag_spelling, subparser
from _cli.progress import track
from _cli.report import Output, write_report
from _core.errors import MISSING, ScalpelError, arg, spelled
from _core.readers import read_data, register_loader

if TYPE_CHECKING:
    from _cli.context import Context
    from _core.writer import Output as WriterOutput

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
RUN_LEVEL = ("model", "dtype", "device", "json", "report", "overwrite", "debug")  # set for the whole experiment
SHARED = {"prompts": ("ablate", "sweep"), "metric": ("ablate", "sweep"), "answers": ("ablate", "sweep")}
PATHS = ("prompts", "edits", "plan", "dir", "out", "csv")  # options naming files: relative to the experiment file
LISTS = ("heads", "neurons", "layers", "components", "positions", "stages")  # text "a,b" or a YAML list


@dataclasses.dataclass
class Step:
    """One step of an experiment: its command and options (paths resolved) and the arguments it runs with."""

    number: int
    section: str  # analyses | ablations | export
    command: str
    options: dict[str, Any]
    args: argparse.Namespace
    where: str  # "exp.yaml: step 2 (ablations: ablate)", for errors

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.number, "section": self.section, "command": self.command, "options": self.options}

    def line(self) -> str:
        """``ablate heads=19.2,20.0 out=edited`` (for the dry run)."""
        shown = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in self.options.items()]
        return " ".join([self.command] + shown)


def load_experiment(path: str | Path) -> dict[str, Any]:
    """The experiment mapping of a YAML file (read by the one YAML reader), with its keys checked."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"no such experiment file: {path}", param="experiment")
    data = read_data(path, CLIError, "experiment file", yaml_format=True, param="experiment")
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


register_loader(  # the fuzz test feeds every registered loader malformed input
    "experiment",
    load_experiment,
    kind="file",
    files=(".yaml",),
    sample=lambda: {"exp.yaml": b"analyses:\n  - heads: {}\n"},
)


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
            raise CLIError(f"{path}: {key} #{i} ({command}): options must be a mapping of options to values")
        out.append((command, {str(k).replace("-", "_"): v for k, v in options.items()}))
    return out


def _sections(data: dict, path: Path) -> list[tuple[str, str, dict]]:
    """(section, command, options) of every step, in order: analyses, ablations, export."""
    steps = [("analyses", c, o) for c, o in _step_list(data, "analyses", path)]
    named: dict[str, dict] = {}
    for c, o in _step_list(data, "ablations", path):
        name = o.pop("name", None)
        steps.append(("ablations", c, o))
        if name is not None:
            named[str(name)] = o
    export = data.get("export")
    if export is None:
        return steps
    if not isinstance(export, dict) or "out" not in export:
        raise CLIError(f"{path}: export needs 'out' (and 'ablation: NAME' or 'plan: FILE')")
    export = dict(export)
    if "plan" in export:
        steps.append(("export", "edit", export))
        return steps
    name = export.pop("ablation", None)
    ablations = [o for _, c, o in steps if c == "ablate"]
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
    return steps


def plan_steps(data: dict, path: Path, parser: argparse.ArgumentParser | None = None) -> list[Step]:
    """Every step of the experiment ``data`` (read from ``path``) with the arguments it runs with."""
    parser = parser or build_parser()
    base = path.parent
    out = []
    for i, (section, command, options) in enumerate(_sections(data, path), start=1):
        where = f"{path}: step {i} ({section}: {command})"
        options = dict(options)
        for key, users in SHARED.items():
            taken = key in options or (key == "prompts" and "prompt" in options)
            if command in users and key in data and not taken:
                options[key] = data[key]
        if command in ("ablate", "sweep") and isinstance(options.get("prompts"), list):  # prompts given inline
            options["prompt"] = _as_list(options.get("prompt")) + [str(p) for p in options.pop("prompts")]
        for key in PATHS:
            if key in options:
                options[key] = _relative(base, options[key], where, key)
        if command == "generate" and options.get("steer") is not None:
            options["steer"] = [_relative_steer(base, s) for s in _as_list(options["steer"])]
        args = step_arguments(subparser(parser, command), command, options, where)
        out.append(Step(i, section, command, options, args, where))
    return out


def step_arguments(sub: argparse.ArgumentParser, command: str, options: dict, where: str) -> argparse.Namespace:
    """The arguments of one step: the command's defaults, then the step's YAML values, each checked
    against its flag (its type and choices; a switch takes true/false; a repeatable flag a value or a list)."""
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", argparse.SUPPRESS)}
    args = argparse.Namespace(command=command, **{dest: a.default for dest, a in actions.items()})
    for key, value in options.items():
        if key in RUN_LEVEL:
            raise CLIError(f"{where}: {key!r} is set for the whole experiment, not per step")
        action = actions.get(key)
        if action is None:
            known = [d for d in actions if d not in RUN_LEVEL]
            close = difflib.get_close_matches(key, known, n=1)
            raise CLIError(
                f"{where}: unknown option {key!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; {command} takes {', '.join(known)}"
            )
        setattr(args, key, _typed(action, value, f"{where}: {key}"))
    for action in actions.values():
        if action.required and getattr(args, action.dest) is None:
            raise CLIError(f"{where}: missing {action.dest!r} (the {command} command's {action.dest.upper()})")
    return args


def _typed(action: argparse.Action, value: Any, where: str) -> Any:
    if action.nargs == 0:  # a switch: --mean, --chat
        if not isinstance(value, bool):
            raise CLIError(f"{where} is a switch; write true or false, got {value!r}")
        return value if value else action.default
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
        return [_one(action, v, where) for v in _as_list(value)]
    if isinstance(value, list) and action.dest in LISTS:
        return [_one(action, v, where, in_list=True) for v in value]
    return _one(action, value, where)


def _one(action: argparse.Action, value: Any, where: str, in_list: bool = False) -> Any:
    if action.dest == "heads" and isinstance(value, float):
        raise CLIError(f'{where}: write heads as quoted text, e.g. heads: "19.2,20.10" (a YAML number drops zeros)')
    if value is None or isinstance(value, (bool, dict, list)):
        raise CLIError(f"{where}: expected {'an item' if in_list else 'a value'}, got {value!r}")
    if action.type is not None:  # the flag's own type: positive integers, numbers, 'off' or a number …
        try:
            value = action.type(str(value))  # type: ignore[operator]  # argparse types are callables
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise CLIError(f"{where}: {exc or f'bad value {value!r}'}") from None
    elif action.dest not in LISTS:
        value = str(value)  # text options: a YAML number is its text
    if action.choices is not None and value not in action.choices:
        raise CLIError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _as_list(value: Any) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _relative(base: Path, value: Any, where: str, key: str) -> Any:
    if isinstance(value, list):
        return [_relative(base, v, where, key) for v in value]
    if not isinstance(value, str) or not value.strip():
        raise CLIError(f"{where}: {key} names a file; write its path, got {value!r}")
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def _relative_steer(base: Path, spec: Any) -> str:
    layer, sep, rest = str(spec).partition(":")
    return f"{layer}{sep}{_relative(base, rest, 'steer', 'steer')}" if sep and rest else str(spec)


def yaml_spelling(run_parser: argparse.ArgumentParser, command: str | None = None):
    """How a step's messages name an argument: by its key in the experiment file (``heads 19.9``; the
    library's name for it mapped as on the command line, e.g. ``out_dir`` is ``out``); the experiment's own
    flags (``--overwrite``) as the command line writes them."""
    flags = flag_spelling(run_parser)
    names = {**ALIASES, **(getattr(commands.load(command), "PARAMS", {}) if command else {})}

    def spell(name: str, value: object) -> str:
        if name in RUN_LEVEL:
            return flags(name, value)
        name = names.get(name, name)
        if value is MISSING:
            return name
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        return f"{name} {shown}"

    return spell


def outputs(args) -> list:
    """Checked in ``run`` with every step's outputs (the experiment file must be read first)."""
    return []


def _outputs(steps: list[Step], report: str | Path | None, shown: str, overwrite: bool) -> list[WriterOutput]:
    from _core.writer import Output as WriterOutput

    found = []
    for step in steps:
        for o in commands.outputs(step.args):
            found.append(dataclasses.replace(o, shown=f"step {step.number} {arg(o.param, o.path)}"))
    if report is not None:
        found.append(WriterOutput(report, kind="report", overwrite=overwrite, param="report", shown=shown))
    return found


def run(args, ctx: Context) -> Output:
    """Run every step of an experiment file with one model; one JSON document and one report."""
    from _core.writer import check_outputs

    path = Path(args.experiment)
    data = load_experiment(path)
    parser = build_parser()
    with spelled(yaml_spelling(subparser(parser, "run"))):
        steps = plan_steps(data, path, parser)
        for step in steps:
            step.args.overwrite, step.args.json, step.args.debug = args.overwrite, args.json, args.debug
        report = None  # the experiment's report (relative to it), unless --report names one (written by main)
        if data.get("report") is not None and not args.report:
            report = Path(_relative(path.parent, data["report"], f"{path}", "report"))
        spec = args.model or str(data.get("model") or DEFAULT_MODEL)
        if not args.model and spec != DEFAULT_MODEL and (path.parent / spec).exists():
            spec = str(path.parent / spec)  # a checkpoint beside the experiment file
        inputs = [path] + [f for step in steps for f in commands.inputs(step.args)]
        inputs += [spec] if spec != DEFAULT_MODEL and Path(spec).expanduser().exists() else []
        shown = f"report {report}" if report is not None else arg("report", args.report)
        check_outputs(_outputs(steps, report or args.report, shown, args.overwrite), inputs=inputs)
    title = str(data.get("name") or f"experiment {path.name}")
    doc: dict[str, Any] = {"command": "run", "experiment": str(path), "name": title, "definition": data, "steps": []}
    out = Output("run", doc, title=title)
    if args.dry_run:
        out.table(
            f"{title}: {len(steps)} steps (dry run)",
            ["#", "step"],
            [[s.number, s.line()] for s in steps],
            max_width=0,
        )
        doc["steps"] = [s.to_dict() for s in steps]
        return out
    ctx.model_spec = spec
    ctx.dtype = args.dtype or data.get("dtype")
    ctx.device = args.device or data.get("device")
    doc["model"] = model_meta(ctx.model())
    doc["environment"] = _environment()
    for step in steps:  # every step's inputs against the model, before step 1 writes anything
        with spelled(yaml_spelling(subparser(parser, "run"), step.command)), _named(step):
            commands.check(step.args, ctx)
    for step in track(steps, "experiment steps"):
        with spelled(yaml_spelling(subparser(parser, "run"), step.command)), _named(step, usage_only=True):
            result = commands.execute(step.args, ctx)
        result.command = f"step {step.number}: {step.line()}"
        doc["steps"].append({**step.to_dict(), "result": result.data})
        out.sections.append(result)
        out.blocks += [
            dataclasses.replace(
                b, title=f"[{step.number}] {step.command}: {b.title}" if b.title else f"[{step.number}]"
            )
            for b in result.blocks
        ]
        out.files += result.files
    if report is not None:
        meta = {"experiment": str(path), "model": ctx.model().source}
        write_report(report, out.sections, title=title, meta=meta, overwrite=args.overwrite)
        out.files.append(str(report))
        doc.setdefault("files", []).append(str(report))
    return out


class _named:
    """Inside, a bad-input error of the step is re-raised as one ``CLIError`` prefixed with where it stands
    (``usage_only``: only ``CLIError``s; other errors keep their class, so a full disk still exits 1)."""

    def __init__(self, step: Step, usage_only: bool = False) -> None:
        self.step, self.usage_only = step, usage_only

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> None:
        wanted = CLIError if self.usage_only else ScalpelError
        if exc is not None and isinstance(exc, wanted) and not isinstance(exc, OSError):
            raise CLIError(f"{self.step.where}: {exc}", param=getattr(exc, "param", None)) from None


def _environment() -> dict[str, str]:
    import importlib.metadata as md

    env = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "llama-scalpel"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = "dev" if dist == "llama-scalpel" else "missing"
    return env
