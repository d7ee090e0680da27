"""The one way llama-scalpel reads what a user hands it: one reader per kind of input.

- **Bytes** (``read_bytes``): a regular file (never a directory, FIFO or device), at most ``limit`` bytes
  (read with a cap, so a file that grows or never ends cannot run away).
- **Text** (``read_text``): UTF-8 only (the error names the byte offset), a leading BOM
  dropped, no NUL byte (a binary file). ``lines`` splits on ``\\n`` (a ``\\r`` before it is dropped): a
  line holding U+2028, U+0085 or a form feed stays one line.
- **YAML / JSON data** (``parse_data``, ``read_data``): no duplicate keys, no YAML merge keys, no tags
  beyond YAML's safe ones, and a budget on what aliases expand to (a 500-byte "billion laughs" is one
  line, not minutes and gigabytes); nesting deeper than ``MAX_DEPTH`` refused.
- **JSON configs** (``read_json_object``): a JSON object with unique keys, size-capped.
- **Prompt files** (``read_prompt_file``): ``.txt`` (one prompt per line; ``#`` comments and blank
  lines skipped; with answers, ``PROMPT<TAB>CORRECT<TAB>INCORRECT``), ``.jsonl`` (one JSON string or
  object a line) and ``.json`` (a list of the same), each on purpose; any other suffix is read as
  ``.txt``. Prompts are kept as written (leading and trailing spaces included) unless ``strip=True``.

Every failure is one line naming the file and the fix, raised as the ``error`` class the caller names
(``LoadError`` by default) with ``param=`` the argument that named the file.

``LOADERS`` lists every public loader of the package (SAEs, plans, experiment files, prompt files,
configs, adapters …): each registers itself with ``register_loader`` where it is defined, so the fuzz
test feeds every loader, including one added later, malformed, oversized, non-UTF-8 and aliased input.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import LoadError

MiB = 1 << 20
DATA_LIMIT = 64 * MiB  # plans, experiment files, prompt files
CONFIG_LIMIT = 16 * MiB  # config.json, cfg.json, adapter_config.json, manifests
MAX_DEPTH = 100  # nesting of YAML/JSON data
ALIAS_BUDGET = 100_000  # values an aliased YAML document may expand to, beyond two per byte of its text
PROMPT_KEYS = ("prompt", "instruction", "text", "content", "goal")  # where a JSON object holds its prompt
ANSWER_KEYS = ("correct", "incorrect")


def human_size(n: int) -> str:
    """``1234567`` → ``"1.23 MB"``."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


# --------------------------------------------------------------------------- bytes and text
def read_bytes(
    path: str | os.PathLike,
    *,
    what: str = "file",
    error: type[Exception] = LoadError,
    limit: int = DATA_LIMIT,
    param: str | None = None,
) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``); ``error`` naming the problem otherwise."""
    path = Path(path)

    def fail(text: str) -> Exception:
        return _error(error, text, param)

    try:
        info = path.stat()
    except FileNotFoundError:
        raise fail(f"no such {what}: {path}") from None
    except OSError as exc:
        raise fail(f"cannot read {path}: {_reason(exc)}; check the file and its permissions") from None
    if stat.S_ISDIR(info.st_mode):
        raise fail(f"{path} is a directory; name the {what}")
    if not stat.S_ISREG(info.st_mode):
        raise fail(f"{path} is not a regular file (a pipe, socket or device); name the {what}")
    if info.st_size > limit:
        raise fail(
            f"{path} is {human_size(info.st_size)}, more than a {what} may be ({human_size(limit)}); "
            "check that it is the right file"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise fail(f"cannot read {path}: {_reason(exc)}; check the file and its permissions") from None
    if len(raw) > limit:
        raise fail(f"{path} grew past {human_size(limit)} while it was read; check that it is the right file")
    return raw


def decode(
    raw: bytes,
    path: str | os.PathLike,
    *,
    what: str = "file",
    error: type[Exception] = LoadError,
    param: str | None = None,
    fix: str | None = None,
) -> str:
    """``raw`` as UTF-8 text without a leading BOM; ``error`` naming the byte offset otherwise (then
    ``fix``, default: save it as UTF-8)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = f"byte 0x{raw[exc.start]:02x} at offset {exc.start}"
        raise _error(error, f"{path} is not UTF-8 text ({at}); {fix or 'save it as UTF-8'}", param) from None
    if "\x00" in text:
        at = raw.index(b"\x00")
        raise _error(
            error, f"{path} holds a NUL byte at offset {at}: it is a binary file, not a {what}; name a text file", param
        )
    return text[1:] if text.startswith("\ufeff") else text


def read_text(
    path: str | os.PathLike,
    error: type[Exception] = LoadError,
    what: str = "file",
    *,
    limit: int = DATA_LIMIT,
    param: str | None = None,
) -> str:
    """The UTF-8 text of ``path`` (see ``read_bytes`` and ``decode``)."""
    raw = read_bytes(path, what=what, error=error, limit=limit, param=param)
    return decode(raw, path, what=what, error=error, param=param)


def lines(text: str) -> list[str]:
    """The lines of ``text``: split on ``\\n`` only (a ``\\r`` before it dropped), no final empty line.

    Unlike ``str.splitlines``, U+2028, U+2029, U+0085, form feeds and lone ``\\r`` stay inside a line.
    """
    out = text.split("\n")
    if out and out[-1] == "":
        out.pop()
    return [line[:-1] if line.endswith("\r") else line for line in out]


# --------------------------------------------------------------------------- YAML and JSON
def _unique_pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


@functools.lru_cache(maxsize=1)
def _yaml_loader():
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class UniqueKeyLoader(base):  # type: ignore[misc, valid-type]
        """YAML's safe loader without duplicate keys and without merge keys (``<<``)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise yaml.constructor.ConstructorError(
                        None, None, "merge keys (<<) are not supported; write the keys out", key_node.start_mark
                    )
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base class says so
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


class _TooBig(Exception):
    pass


def _expanded_size(data: Any, budget: int) -> int:
    """How many values ``data`` holds with every shared (aliased) value counted each time it appears;
    ``_TooBig`` past ``budget`` (a cycle counts forever) or deeper than ``MAX_DEPTH``."""
    count = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        obj, depth = stack.pop()
        count += 1
        if count > budget:
            raise _TooBig(f"its aliases expand to more than {budget:,} values")
        if depth > MAX_DEPTH:
            raise _TooBig(f"it nests deeper than {MAX_DEPTH} levels")
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
            count += len(obj)  # the keys
        elif isinstance(obj, list):
            stack.extend((v, depth + 1) for v in obj)
    return count


def parse_data(
    text: str,
    path: str | os.PathLike,
    error: type[Exception] = LoadError,
    *,
    yaml_format: bool,
    param: str | None = None,
    fix: str | None = None,
) -> Any:
    """YAML (``yaml_format``) or JSON data of ``text``; ``error`` naming the line and the problem (then
    ``fix``, when given)."""
    kind = "YAML" if yaml_format else "JSON"
    then = f"; {fix}" if fix else ""
    try:
        if yaml_format:
            import yaml

            data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
        else:
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        _expanded_size(data, ALIAS_BUDGET + 2 * len(text))
    except _TooBig as exc:
        raise _error(error, f"{path} is refused as {kind}: {exc}; {fix or 'write the values out'}", param) from None
    except RecursionError:
        raise _error(
            error, f"{path} is refused as {kind}: it nests too deeply; {fix or 'write it flatter'}", param
        ) from None
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError, duplicate keys: say where
        mark = getattr(exc, "problem_mark", None)
        line = getattr(exc, "lineno", None) or (mark.line + 1 if mark is not None else None)
        problem = getattr(exc, "problem", None) or getattr(exc, "msg", None) or _first(exc)
        at = f" at line {line}" if line else ""
        raise _error(error, f"{path} is not valid {kind}{at}: {problem}{then}", param) from None
    return data


def is_yaml(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def read_data(
    path: str | os.PathLike,
    error: type[Exception] = LoadError,
    what: str = "file",
    *,
    yaml_format: bool | None = None,
    limit: int = DATA_LIMIT,
    param: str | None = None,
) -> Any:
    """YAML or JSON data of the file ``path`` (YAML for ``.yaml``/``.yml`` unless ``yaml_format`` says)."""
    text = read_text(path, error, what, limit=limit, param=param)
    return parse_data(text, path, error, yaml_format=is_yaml(path) if yaml_format is None else yaml_format, param=param)


def read_json_object(
    path: str | os.PathLike,
    error: type[Exception] = LoadError,
    what: str = "config",
    *,
    limit: int = CONFIG_LIMIT,
    fix: str = "fix the file",
    param: str | None = None,
) -> dict:
    """A JSON object (unique keys) from ``path``; ``error`` otherwise, ending with ``fix``."""
    raw = read_bytes(path, what=what, error=error, limit=limit, param=param)
    text = decode(raw, path, what=what, error=error, param=param, fix=fix)
    try:
        data = json.loads(text, object_pairs_hook=_unique_pairs)
        _expanded_size(data, ALIAS_BUDGET + 2 * len(text))
    except json.JSONDecodeError as exc:
        raise _error(error, f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); {fix}", param) from None
    except (ValueError, _TooBig, RecursionError) as exc:
        raise _error(error, f"{path} is not valid JSON ({_first(exc) or 'too deeply nested'}); {fix}", param) from None
    if not isinstance(data, dict):
        raise _error(error, f"{path} holds a JSON {type(data).__name__}, not an object; {fix}", param)
    return data


# --------------------------------------------------------------------------- typed fields of a config
_MISSING = object()


class Fields:
    """Typed reads of one config mapping: each names the file and the field when the value has the wrong
    type or range, as one line ending with ``fix``. ``Fields(data, "sae/cfg.json").int("d_in", minimum=1)``."""

    def __init__(
        self, data: Any, where: str, error: type[Exception] = LoadError, fix: str = "fix the config", prefix: str = ""
    ) -> None:
        if not isinstance(data, dict):
            raise _error(
                error,
                f"{where}: {prefix.rstrip('.') or 'the config'} is a {type(data).__name__}, not a mapping; {fix}",
                None,
            )
        self.data, self.where, self.error, self.fix, self.prefix = data, where, error, fix, prefix

    def bad(self, key: str, must: str) -> Exception:
        value = self.data.get(key)
        return _error(
            self.error,
            f"{self.where}: {self.prefix + key!r} is {_shown(value)} ({type(value).__name__}) but must be {must}; {self.fix}",
            None,
        )

    def missing(self, key: str) -> Exception:
        return _error(self.error, f"{self.where} has no {self.prefix + key!r}; {self.fix}", None)

    def _get(self, key: str, default: Any) -> tuple[Any, bool]:
        """(value, whether it is the default: the key is absent or null)."""
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise self.missing(key)
            return default, True
        return self.data[key], False

    def int(self, key: str, default: Any = _MISSING, *, minimum: int | None = None, maximum: int | None = None):
        value, defaulted = self._get(key, default)
        if defaulted:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
            return value
        lo = "" if minimum is None else f" >= {minimum}"
        hi = "" if maximum is None else f" <= {maximum}"
        raise self.bad(key, f"an integer{lo}{' and' if lo and hi else ''}{hi}")

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = False) -> Any:
        value, defaulted = self._get(key, default)
        if defaulted:
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        ok = ok and abs(value) != float("inf") and (not positive or value > 0)
        if ok:
            return value
        raise self.bad(key, "a positive number" if positive else "a finite number")

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        value, defaulted = self._get(key, default)
        if defaulted or isinstance(value, bool):
            return value
        raise self.bad(key, "true or false")

    def str(self, key: str, default: Any = _MISSING, *, choices: Sequence[str] | None = None) -> Any:
        value, defaulted = self._get(key, default)
        if defaulted:
            return value
        if isinstance(value, str) and value and (choices is None or value in choices):
            return value
        raise self.bad(key, f"one of {', '.join(choices)}" if choices is not None else "a non-empty string")

    def mapping(self, key: str) -> "Fields":
        """The nested mapping ``key`` (absent or null: an empty one)."""
        value = self.data.get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.bad(key, "a mapping")
        return Fields(value, self.where, self.error, self.fix, f"{self.prefix}{key}.")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- prompt files
@dataclass
class Prompt:
    """A prompt and its single-token answers, when given (``where`` names it in errors, e.g. ``prompts.txt:3``):
    what a prompt file holds, and what ``analyses.ablation`` scores."""

    text: str
    correct: str | None = None
    incorrect: str | None = None
    where: str = "prompt"


def read_prompt_file(
    path: str | os.PathLike,
    *,
    answers: bool = False,
    error: type[Exception] = LoadError,
    what: str = "prompt file",
    param: str | None = "prompts",
    limit: int = DATA_LIMIT,
    strip: bool = False,
) -> list[Prompt]:
    """The prompts of a ``.txt``, ``.jsonl`` or ``.json`` file (see the module docstring).

    ``answers``: the file may give answers (``correct``/``incorrect`` keys, or tab-separated fields in
    text); without it, tabs are part of a text prompt and objects may hold other keys (a dataset's
    ``category``), which are ignored. With it, an object's keys must be ``prompt``, ``correct`` and
    ``incorrect`` (a misspelt key is refused, not ignored). ``strip``: a text line's surrounding spaces
    are not part of its prompt (lists of chat prompts and corpora; answers files keep them: `` Mary``).
    """
    path = Path(path)
    if not str(path).strip():
        raise _error(error, f"the {what} path is empty; name a {what}", param)
    text = read_text(path, error, what, limit=limit, param=param)
    suffix = path.suffix.lower()
    if suffix == ".json":
        items = parse_data(text, path, error, yaml_format=False, param=param)
        if not isinstance(items, list):
            raise _error(
                error, f"{path}: a .json {what} holds a list of prompts (strings or objects with a prompt)", param
            )
        out = [_item(obj, f"{path}: item {i}", answers, error, param) for i, obj in enumerate(items, 1)]
    elif suffix in (".jsonl", ".ndjson"):
        out = []
        for n, line in enumerate(lines(text), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line, object_pairs_hook=_unique_pairs)
            except ValueError as exc:
                msg = getattr(exc, "msg", None) or _first(exc)
                raise _error(
                    error, f"{where}: not valid JSON ({msg}); write one JSON string or object a line", param
                ) from None
            out.append(_item(obj, where, answers, error, param))
    else:
        out = []
        for n, line in enumerate(lines(text), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path}:{n}"
            fields = line.split("\t") if answers else [line]
            if len(fields) > 3 or not fields[0].strip():
                raise _error(
                    error,
                    f"{where}: expected PROMPT or PROMPT<TAB>CORRECT<TAB>INCORRECT, got {len(fields)} "
                    "tab-separated fields"
                    if fields[0].strip()
                    else f"{where}: the prompt before the first tab is empty; write PROMPT<TAB>CORRECT<TAB>INCORRECT",
                    param,
                )
            fields += [""] * (3 - len(fields))
            text = fields[0].strip() if strip else fields[0]
            out.append(Prompt(text, fields[1] or None, fields[2] or None, where))
    if not out:
        raise _error(error, f"{path} holds no prompts (blank lines and # comments are skipped)", param)
    return out


def _item(obj: Any, where: str, answers: bool, error: type[Exception], param) -> Prompt:
    if isinstance(obj, str):
        if not obj.strip():
            raise _error(error, f"{where}: the prompt is empty; write a non-empty string", param)
        return Prompt(obj, where=where)
    if not isinstance(obj, dict):
        raise _error(
            error, f"{where}: expected a string or an object with a prompt, got a JSON {type(obj).__name__}", param
        )
    keys = ("prompt",) if answers else PROMPT_KEYS
    key = next((k for k in keys if k in obj), None)
    if key is None and not answers:
        raise _error(
            error,
            f"{where}: the object has none of the keys {', '.join(keys)}; put the prompt under one of them",
            param,
        )
    if key is None or not isinstance(obj[key], str) or not obj[key].strip():
        raise _error(
            error, f'{where}: each item must be a string or an object with a non-empty "{key or keys[0]}" string', param
        )
    if answers:
        unknown = sorted(set(obj) - {"prompt", *ANSWER_KEYS})
        if unknown:
            raise _error(
                error, f"{where}: unknown key(s) {', '.join(unknown)}; keys: prompt, correct, incorrect", param
            )
        for k in ANSWER_KEYS:
            if obj.get(k) is not None and not isinstance(obj[k], str):
                raise _error(error, f'{where}: "{k}" must be a string', param)
    return Prompt(obj[key], obj.get("correct") if answers else None, obj.get("incorrect") if answers else None, where)


# --------------------------------------------------------------------------- the loader registry
@dataclass(frozen=True)
class Loader:
    """A public loader: ``load(path)`` reads a user's file or directory and raises a one-line
    ``ScalpelError`` on bad input. ``kind``: ``"file"`` or ``"dir"``. ``files``: for a file loader the
    suffixes it reads; for a directory loader the names of the user-written text files inside it.
    ``sample()`` gives a valid input as ``{file name: bytes}`` (one entry for a file loader, the
    directory's files for a directory loader); the fuzz test writes it and corrupts it one way at a time."""

    name: str
    load: Callable[[Path], Any]
    kind: str
    files: tuple[str, ...]
    sample: Callable[[], dict[str, bytes]] | None = None


LOADERS: dict[str, Loader] = {}


def register_loader(
    name: str,
    load: Callable[[Path], Any],
    *,
    kind: str,
    files: Sequence[str],
    sample: Callable[[], dict[str, bytes]] | None = None,
) -> Loader:
    """Add a public loader to ``LOADERS`` (the fuzz test feeds every one); returns it."""
    if kind not in ("file", "dir"):
        raise ValueError(f"loader kind must be 'file' or 'dir', got {kind!r}")
    loader = Loader(name, load, kind, tuple(files), sample)
    LOADERS[name] = loader
    return loader


# --------------------------------------------------------------------------- helpers
def _error(cls: type[Exception], text: str, param: str | None) -> Exception:
    try:
        return cls(text, param=param) if param is not None else cls(text)
    except TypeError:  # an error class that takes no param=
        return cls(text)


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
