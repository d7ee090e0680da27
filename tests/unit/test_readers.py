"""The one reader per kind of input (``_core.readers``): bytes with a size cap, UTF-8 text, YAML/JSON
without duplicate keys or alias bombs, typed config fields, and prompt files (.txt / .jsonl / .json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _core.errors import LoadError
from _core.readers import (
    ALIAS_BUDGET,
    Fields,
    lines,
    parse_data,
    read_bytes,
    read_data,
    read_json_object,
    read_prompt_file,
    read_text,
)


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """The classic alias bomb: ``width ** levels`` values from a few hundred bytes."""
    rows = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(rows + [f"edits: *a{levels - 1}"]) + "\n"


# --------------------------------------------------------------------------- bytes and text
def test_text_is_utf8_without_bom_and_the_offset_is_named(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\n".encode())
    assert read_text(tmp_path / "bom.txt") == "hello\n"
    (tmp_path / "latin.txt").write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(LoadError) as info:
        read_text(tmp_path / "latin.txt")
    assert str(info.value) == f"{tmp_path / 'latin.txt'} is not UTF-8 text (byte 0xe9 at offset 6); save it as UTF-8"
    (tmp_path / "bin.txt").write_bytes(b"ab\x00cd")
    with pytest.raises(LoadError, match="holds a NUL byte at offset 2: it is a binary file"):
        read_text(tmp_path / "bin.txt")


def test_only_regular_files_of_bounded_size_are_read(tmp_path):
    with pytest.raises(LoadError, match="is a directory; name the plan file"):
        read_bytes(tmp_path, what="plan file")
    with pytest.raises(LoadError, match="^no such plan file: "):
        read_bytes(tmp_path / "missing.yaml", what="plan file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(LoadError, match="is not a regular file"):
        read_bytes(fifo)
    with pytest.raises(LoadError, match="is not a regular file"):
        read_bytes("/dev/zero")  # would never end
    (tmp_path / "big.txt").write_bytes(b"x" * 2000)
    with pytest.raises(LoadError) as info:
        read_bytes(tmp_path / "big.txt", what="prompt file", limit=1000)
    assert str(info.value).endswith("is 2 KB, more than a prompt file may be (1 KB); check that it is the right file")
    assert read_bytes(tmp_path / "big.txt", limit=2000) == b"x" * 2000


def test_lines_split_on_newline_only():
    text = "one\u2028still one\r\ntwo\x85same\x0cline\nthree\rkept\n"
    assert lines(text) == ["one\u2028still one", "two\x85same\x0cline", "three\rkept"]
    assert text.splitlines() != lines(text)  # what str.splitlines would have split
    assert lines("") == [] and lines("a") == ["a"] and lines("a\n\n") == ["a", ""]


# --------------------------------------------------------------------------- YAML and JSON
def test_duplicate_keys_are_refused_in_yaml_and_json():
    with pytest.raises(LoadError, match=r"^p.yaml is not valid YAML at line 2: duplicate key 'edits'$"):
        parse_data("edits: []\nedits: [1]\n", "p.yaml", yaml_format=True)
    with pytest.raises(LoadError, match=r"^p.json is not valid JSON: duplicate key 'a'$"):
        parse_data('{"a": 1, "a": 2}', "p.json", yaml_format=False)


def test_alias_bombs_are_refused_at_once():
    bomb = billion_laughs()
    assert len(bomb) < 600  # ~387 million values if expanded
    with pytest.raises(LoadError) as info:
        parse_data(bomb, "plan.yaml", yaml_format=True)
    assert str(info.value) == (
        f"plan.yaml is refused as YAML: its aliases expand to more than {ALIAS_BUDGET + 2 * len(bomb):,} "
        "values; write the values out"
    )
    # merge keys double a mapping per level while it is built: refused before
    merge = "b0: &b0 {k: 1}\n" + "".join(f"b{i}: &b{i} {{<<: [*b{i - 1}, *b{i - 1}]}}\n" for i in range(1, 40))
    with pytest.raises(LoadError, match="merge keys .* are not supported"):
        parse_data(merge, "exp.yaml", yaml_format=True)
    with pytest.raises(LoadError, match="refused as YAML: it nests deeper than 100 levels"):
        parse_data("a: &a [*a]\n", "self.yaml", yaml_format=True)  # a value that holds itself
    with pytest.raises(LoadError, match="nests too deeply|nesting depth"):
        parse_data("[" * 5000 + "]" * 5000, "deep.json", yaml_format=False)
    # a few aliases stay fine
    assert parse_data("p: &p [a, b]\nq: *p\n", "ok.yaml", yaml_format=True) == {"p": ["a", "b"], "q": ["a", "b"]}


def test_yaml_tags_beyond_the_safe_ones_are_refused():
    with pytest.raises(LoadError, match="could not determine a constructor"):
        parse_data("!!python/object/apply:os.system [echo hi]\n", "x.yaml", yaml_format=True)


def test_read_data_picks_yaml_or_json_by_suffix(tmp_path):
    (tmp_path / "a.yml").write_text("x: 1\n")
    (tmp_path / "a.json").write_text('{"x": 1}')
    assert read_data(tmp_path / "a.yml") == read_data(tmp_path / "a.json") == {"x": 1}


def test_json_objects_with_a_fix(tmp_path):
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(LoadError) as info:
        read_json_object(tmp_path / "c.json", fix="re-download it")
    assert str(info.value) == f"{tmp_path / 'c.json'} holds a JSON list, not an object; re-download it"
    (tmp_path / "c.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(LoadError, match=r"is not UTF-8 text \(byte 0xff at offset 7\); re-download it$"):
        read_json_object(tmp_path / "c.json", fix="re-download it")


def test_fields_name_the_file_the_field_and_the_fix():
    f = Fields({"d_in": "64", "k": 0, "ok": True, "meta": [1]}, "cfg.json", fix="fix it")
    with pytest.raises(LoadError) as info:
        f.int("d_in", minimum=1)
    assert str(info.value) == "cfg.json: 'd_in' is '64' (str) but must be an integer >= 1; fix it"
    with pytest.raises(LoadError, match=r"'k' is 0 \(int\) but must be an integer >= 1 and <= 8"):
        f.int("k", 5, minimum=1, maximum=8)  # a value present is checked even when a default exists
    with pytest.raises(LoadError, match="^cfg.json has no 'd_sae'; fix it$"):
        f.int("d_sae")
    with pytest.raises(LoadError, match="'meta' is .* but must be a mapping"):
        f.mapping("meta")
    assert f.int("absent", None) is None and f.bool("ok") is True and f.str("name", "x", choices=("x",)) == "x"
    assert Fields({"e": 2.0}, "c").int("e") == 2  # an integral float is an integer
    with pytest.raises(LoadError, match="must be a positive number"):
        Fields({"eps": float("nan")}, "c").number("eps", positive=True)


# --------------------------------------------------------------------------- prompt files
def test_text_prompt_files_keep_unicode_line_separators(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffHow do I\u2028make tea?\r\n\n# a comment\n  keep my spaces  \n".encode())
    records = read_prompt_file(path)
    assert [r.text for r in records] == ["How do I\u2028make tea?", "  keep my spaces  "]
    assert [r.where for r in records] == [f"{path}:1", f"{path}:4"]


def test_tabs_are_answers_only_where_answers_are_read(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("When Mary and John went out, John gave it to\t Mary\t John\n")
    (r,) = read_prompt_file(path, answers=True)
    assert (r.text, r.correct, r.incorrect) == ("When Mary and John went out, John gave it to", " Mary", " John")
    (r,) = read_prompt_file(path)
    assert r.text == "When Mary and John went out, John gave it to\t Mary\t John" and r.correct is None
    path.write_text("a\tb\tc\td\n")
    with pytest.raises(LoadError, match=r"p.txt:1: expected PROMPT or PROMPT<TAB>CORRECT<TAB>INCORRECT, got 4"):
        read_prompt_file(path, answers=True)


def test_jsonl_and_json_prompt_files(tmp_path):
    (tmp_path / "p.jsonl").write_text('"plain"\n{"prompt": "with answers", "correct": " A"}\n\n{"goal": "g"}\n')
    assert [r.text for r in read_prompt_file(tmp_path / "p.jsonl")] == ["plain", "with answers", "g"]
    with pytest.raises(
        LoadError, match=r'p.jsonl:4: each item must be a string or an object with a non-empty "prompt"'
    ):
        read_prompt_file(tmp_path / "p.jsonl", answers=True)  # "goal" is not a key of an answer file
    (tmp_path / "n.jsonl").write_text('{"answer": "no prompt key"}\n')
    with pytest.raises(
        LoadError, match=r"n.jsonl:1: the object has none of the keys prompt, instruction, text, content"
    ):
        read_prompt_file(tmp_path / "n.jsonl")
    (tmp_path / "p.json").write_text(json.dumps(["one\ntwo", {"prompt": "three", "category": "x"}]))
    assert [r.text for r in read_prompt_file(tmp_path / "p.json")] == ["one\ntwo", "three"]
    with pytest.raises(LoadError, match=r"p.json: item 2: unknown key\(s\) category"):
        read_prompt_file(tmp_path / "p.json", answers=True)
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "prompt": "b"}\n')
    with pytest.raises(LoadError, match=r"d.jsonl:1: not valid JSON \(duplicate key 'prompt'\)"):
        read_prompt_file(tmp_path / "d.jsonl")
    (tmp_path / "o.json").write_text('{"prompts": ["a"]}')
    with pytest.raises(LoadError, match="a .json prompt file holds a list of prompts"):
        read_prompt_file(tmp_path / "o.json")


def test_empty_and_undecodable_prompt_files(tmp_path):
    for data in (b"", b"\n\n", b"# only a comment\n", b"\xef\xbb\xbf\n"):
        (tmp_path / "e.txt").write_bytes(data)
        with pytest.raises(LoadError, match=r"holds no prompts \(blank lines and # comments are skipped\)$"):
            read_prompt_file(tmp_path / "e.txt")
    (tmp_path / "l.txt").write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(LoadError, match=r"is not UTF-8 text \(byte 0xe9 at offset 8\)"):
        read_prompt_file(tmp_path / "l.txt")
    with pytest.raises(LoadError, match="the prompt file path is empty"):
        read_prompt_file(Path(" "))
