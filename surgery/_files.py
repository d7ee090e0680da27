"""Reading the text files a user hands us (edit plans, experiment files): UTF-8 only (a leading BOM is
dropped), YAML without duplicate keys, JSON without duplicate keys; every failure one line naming the
file and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_text(path: Path, error: type[Exception], what: str = "file") -> str:
    """The file's text as UTF-8 without a leading BOM; ``error`` when unreadable or not UTF-8."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise error(f"{path} is a directory; name the {what}") from None
    except OSError as exc:
        raise error(
            f"cannot read {path}: {(exc.strerror or str(exc)).lower()}; check the file and its permissions"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def _unique_yaml_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
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


def _json_pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse(text: str, path: Path, error: type[Exception], *, yaml_format: bool) -> Any:
    """YAML (``yaml_format``) or JSON data of ``text``; ``error`` naming the line and the problem."""
    try:
        if yaml_format:
            import yaml

            return yaml.load(text, Loader=_unique_yaml_loader())  # noqa: S506 - a SafeLoader subclass
        return json.loads(text, object_pairs_hook=_json_pairs)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError, duplicate keys: say where
        mark = getattr(exc, "problem_mark", None)
        line = getattr(exc, "lineno", None) or (mark.line + 1 if mark is not None else None)
        problem = (
            getattr(exc, "problem", None)
            or getattr(exc, "msg", None)
            or (str(exc).splitlines() or [type(exc).__name__])[0]
        )
        kind = "YAML" if yaml_format else "JSON"
        raise error(f"{path} is not valid {kind}{f' at line {line}' if line else ''}: {problem}") from None
