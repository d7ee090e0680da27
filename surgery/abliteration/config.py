"""Every setting of the refusal-removal search, declared once: its type, default and description.

``AbliterationConfig`` is what ``surgery.abliterate(model, …, config=…, **overrides)`` runs with, what
``scalpel abliterate`` turns into flags (one per setting, help text and default from here), and what the
result's provenance (and so an export's manifest) records (``config.to_dict()``).

Example::

    cfg = AbliterationConfig(trials=12, whiten=None)       # checked at once: one-line InputError
    cfg.replace(seed=1).to_dict()["seed"]                  # 1
    [s.name for s in settings()]                           # trials, seed, contrast, …
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from _core.errors import InputError, arg
from analyses.refusal import DEFAULT_SYSTEM_PROMPT, REFUSAL_MARKERS, check_whiten

from .refine import REFINE_STEPS, check_refine

SAMPLERS = ("auto", "optuna", "sobol")
CONTRAST_CHOICES = ("auto", "sets", "behaviour")
# The directions' default shrinkage (refusal_directions(whiten=…)): measured on SmolLM2-135M, where 10–100
# all beat the plain difference of means and 30 gave the lowest KL at a given refusal count.
WHITEN = 30.0


# --------------------------------------------------------------------------- checks (each: value -> value, or InputError)
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{arg(name)} must be a positive integer, got {value!r}", param=name)
    return value


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{arg(name)} must be an integer >= 0, got {value!r}", param=name)
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{arg(name)} must be an integer, got {value!r}", param=name)
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{arg(name)} must be true or false, got {value!r}", param=name)
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise InputError(f"{arg(name)} must be one of {', '.join(choices)}, got {value!r}", param=name)
        return value

    return check


def _shrinkage(name: str, value: Any) -> float | None:
    check_whiten(value)  # the one check of a shrinkage (analyses.refusal)
    return None if value is None else float(value)


def _refine(name: str, value: Any) -> int:
    return check_refine(value)  # the one check of a step count (refine_direction's)


def _threads(name: str, value: Any) -> int | None:
    return None if value is None else _positive_int(name, value)


def _system_prompt(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InputError(f"{arg(name)} must be a text or None (no system message), got {value!r}", param=name)
    return value


def _markers(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InputError(f"{arg(name)} must be a list of non-empty strings, got {value!r}", param=name)
    if not value or not all(isinstance(m, str) and m for m in value):
        raise InputError(f"{arg(name)} must be a non-empty list of non-empty strings", param=name)
    return tuple(value)


def _positions(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if (
        not isinstance(value, (list, tuple))
        or not value
        or any(isinstance(p, bool) or not isinstance(p, int) for p in value)
    ):
        raise InputError(
            f"{arg(name)} must be a non-empty list of token positions (e.g. [-1]), got {value!r}", param=name
        )
    if any(p >= 0 for p in value):
        raise InputError(
            f"{arg(name)} count from each prompt's end: give negative positions (-1: the last token)", param=name
        )
    return tuple(value)


# --------------------------------------------------------------------------- text forms (the command line)
def _off_or(kind: Callable[[str], Any], off: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return off if text.strip().lower() == "off" else kind(text)

    return parse


def _none_text(text: str) -> str | None:
    return None if text.strip().lower() in ("none", "off") else text


def setting(
    default: Any,
    help: str,
    check: Callable[[str, Any], Any],
    *,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
) -> Any:
    """A config field: ``default``, one-line ``help`` (the docs and ``--help``), ``check(name, value)``,
    and how the command line reads it (``parse`` from text, ``metavar``, ``choices``; ``cli=False``: no flag)."""
    meta = {"help": help, "check": check, "parse": parse, "metavar": metavar, "choices": choices, "cli": cli}
    return field(default=default, metadata=meta)  # defaults are immutable (numbers, text, tuples)


@dataclass(frozen=True)
class AbliterationConfig:
    """The settings of ``surgery.abliterate`` (module docstring); each is checked at construction."""

    trials: int = setting(24, "parameter sets scored (short-answer refusals and first-token KL)", _positive_int)
    seed: int = setting(0, "the sampler's seed", _integer)
    contrast: str = setting(
        "auto",
        "direction from harmful − harmless means (sets), from refused − answered prompts (behaviour), "
        "or both with the search choosing (auto)",
        _choice(CONTRAST_CHOICES),
        choices=CONTRAST_CHOICES,
    )
    whiten: float | None = setting(
        WHITEN,
        "whiten the direction against the covariance of the prompts to leave alone with this shrinkage "
        "(None / 'off': the plain difference of means)",
        _shrinkage,
        parse=_off_or(float, None),
        metavar="LAMBDA",
    )
    refine: int = setting(
        REFINE_STEPS,
        "gradient steps refining the best edit's direction on the training prompts (less KL on harmless "
        "prompts, the same answers to harmful ones; 0 / 'off': none)",
        _refine,
        parse=_off_or(int, 0),
        metavar="STEPS",
    )
    target_refusals: int = setting(
        0, "the refusal count wanted: the lowest-KL confirmed point meeting it is chosen", _count, metavar="N"
    )
    max_new_tokens: int = setting(100, "greedy tokens per confirmed response (the refusal scorer)", _positive_int)
    proxy_tokens: int = setting(16, "greedy tokens per held-out harmful prompt when a trial is scored", _positive_int)
    classify_tokens: int = setting(
        24, "greedy tokens classifying each training prompt as refused or answered (behaviour contrast)", _positive_int
    )
    max_confirm: int = setting(6, "at most this many Pareto points confirmed by generation", _positive_int)
    sampler: str = setting(
        "auto", "optuna (TPE), sobol, or auto (optuna when installed, else sobol)", _choice(SAMPLERS), choices=SAMPLERS
    )
    system_prompt: str | None = setting(
        DEFAULT_SYSTEM_PROMPT,
        "system message of every prompt (None / 'none': no system message)",
        _system_prompt,
        parse=_none_text,
        metavar="TEXT",
    )
    batch_size: int = setting(32, "prompts per forward pass", _positive_int)
    threads: int | None = setting(
        None, "CPU threads torch uses during the search (None: torch's default); restored after", _threads
    )
    norm_preserve: bool = setting(True, "edited rows keep their norms (heretic's)", _flag, cli=False)
    project_harmless: bool = setting(
        True, "remove from each direction its component along the harmless mean (heretic's)", _flag, cli=False
    )
    positions: tuple[int, ...] = setting(
        (-1,), "token positions the directions are read at, counted from each prompt's end", _positions, cli=False
    )
    markers: tuple[str, ...] = setting(
        tuple(REFUSAL_MARKERS), "substrings marking a refusal (heretic's list)", _markers, cli=False
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))

    @classmethod
    def build(cls, config: AbliterationConfig | dict | None = None, **overrides: Any) -> AbliterationConfig:
        """``config`` (a config, a dict of settings, or None for the defaults) with ``overrides``; an unknown
        name is a one-line ``InputError`` naming the closest setting."""
        if config is not None and not isinstance(config, (AbliterationConfig, dict)):
            raise InputError(
                f"config must be an AbliterationConfig or a dict, got {type(config).__name__}", param="config"
            )
        base = dict(config) if isinstance(config, dict) else ({} if config is None else config.to_dict())
        values = {**base, **overrides}
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                raise InputError(
                    f"abliterate has no setting {key!r}{f'; did you mean {close[0]!r}' if close else ''} "
                    f"(settings: {', '.join(names)})",
                    param=key,
                )
        return cls(**values)

    def replace(self, **overrides: Any) -> AbliterationConfig:
        return AbliterationConfig.build(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (tuples as lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)
        }


def settings() -> list[dataclasses.Field]:
    """The declared settings, in order (name, type, default, ``metadata["help"]`` …)."""
    return list(dataclasses.fields(AbliterationConfig))
