"""Bad input found before any work, as one line naming the fix: wrongly typed config values, broken
tokenizers, integer or non-finite weights, scales that overflow the dtype, a full disk under a report,
and wrong argument types at the public entry points."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import analyses as A
import surgery as S
from hooks import HookedLlama, InputError, LoadError
from tests.helpers import assert_same, build_tiny, run, snapshot, tiny_hf


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("bad-input") / "tiny")


@pytest.fixture
def ckpt(tiny_dir, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))


def set_config(d: Path, key, value) -> None:
    config = json.loads((d / "config.json").read_text())
    config[key] = value
    (d / "config.json").write_text(json.dumps(config))


def set_weights(d: Path, change) -> None:
    state = load_file(str(d / "model.safetensors"))
    change(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def load_error(d: Path) -> str:
    with pytest.raises(LoadError) as info:
        HookedLlama.from_pretrained(str(d))
    message = str(info.value)
    assert "\n" not in message
    return message


def cli_error(argv, capsys, code=2) -> str:
    got, out, err = run(argv, capsys)
    assert (got, out) == (code, ""), err
    assert err.startswith("scalpel: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err[len("scalpel: error: ") :].strip()


@pytest.mark.parametrize(
    "key, value, must",
    [
        ("hidden_size", "64", "'hidden_size' is '64' (str) but must be an integer >= 1"),
        ("num_hidden_layers", 2.5, "'num_hidden_layers' is 2.5 (float) but must be an integer >= 1"),
        ("num_key_value_heads", 0, "'num_key_value_heads' is 0 (int) but must be an integer >= 1"),
        ("vocab_size", -3, "'vocab_size' is -3 (int) but must be an integer >= 1"),
        ("rms_norm_eps", "x", "'rms_norm_eps' is 'x' (str) but must be a positive number"),
        ("rope_theta", "big", "'rope_theta' is 'big' (str) but must be a positive number"),
        ("tie_word_embeddings", "yes", "'tie_word_embeddings' is 'yes' (str) but must be true or false"),
        ("num_attention_heads", None, "'num_attention_heads' is None (NoneType) but must be an integer >= 1"),
    ],
)
def test_a_wrongly_typed_config_value_names_the_field(ckpt, key, value, must, capsys):
    set_config(ckpt, key, value)
    assert load_error(ckpt) == f"{ckpt}/config.json: {must}; fix it in config.json"
    assert cli_error(["info", "--model", "ckpt"], capsys) == f"ckpt/config.json: {must}; fix it in config.json"


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "{not json",
            "ckpt/tokenizer.json is not valid JSON (Expecting property name enclosed in double quotes at "
            "line 1); the tokenizer is corrupt: re-download it, or remove the tokenizer files to load the "
            "model without one",
        ),
        (
            "{}",
            "cannot load the tokenizer in ckpt (KeyError: 'added_tokens'); the tokenizer files are corrupt or "
            "incomplete: re-download them, or remove them to load the model without a tokenizer",
        ),
    ],
)
def test_a_broken_tokenizer_is_one_line(ckpt, content, message, capsys):
    (ckpt / "tokenizer.json").write_text(content)
    assert load_error(Path("ckpt")) == message
    assert cli_error(["info", "--model", "ckpt"], capsys) == message


def test_integer_weights_are_refused(ckpt, capsys):
    name = "model.layers.0.mlp.up_proj.weight"
    set_weights(ckpt, lambda s: s.__setitem__(name, s[name].to(torch.int32)))
    message = (
        f"ckpt: {name} holds int32 values, not floating point; llama-scalpel loads float32, bfloat16 or "
        "float16 weights (dequantise the checkpoint first)"
    )
    assert load_error(Path("ckpt")) == message
    assert cli_error(["info", "--model", "ckpt"], capsys) == message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_load(ckpt, value, capsys):
    name = "model.layers.1.self_attn.q_proj.weight"

    def poison(state):
        t = state[name].clone()
        t[3, 5] = value
        state[name] = t

    set_weights(ckpt, poison)
    message = (
        f"ckpt: {name} holds a non-finite value ({value}) at index (3, 5); the checkpoint is corrupt, "
        "re-download or re-export it"
    )
    assert load_error(Path("ckpt")) == message
    assert cli_error(["info", "--model", "ckpt"], capsys) == message
    hf = tiny_hf("gqa")
    with torch.no_grad():
        hf.model.norm.weight[7] = value
    with pytest.raises(LoadError, match=rf"model.norm.weight holds a non-finite value \({value}\) at index 7;"):
        HookedLlama.from_hf(hf)


def test_finite_weights_whose_sum_overflows_still_load():
    hf = tiny_hf("gqa")
    with torch.no_grad():
        hf.model.layers[0].mlp.up_proj.weight[:2] = 3e38  # the fp32 sum is inf, every value finite
    model = HookedLlama.from_hf(hf)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, hf.model.layers[0].mlp.up_proj.weight)


def big_down_proj(model):
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[5, 3] = 1e37


@pytest.mark.parametrize(
    "edit, dtype, prep, message",
    [
        (
            lambda: S.ScaleHeads(0, [1], 1e39),
            torch.float32,
            None,
            "ScaleHeads: factor 1e+39 overflows float32 (the largest float32 is 3.4e+38); use a smaller factor",
        ),
        (
            lambda: S.ScaleHeads(0, [1], 1e6),
            torch.float16,
            None,
            "ScaleHeads: factor 1e+06 overflows float16 (the largest float16 is 6.55e+04); use a smaller factor",
        ),
        (
            lambda: S.ScaleNeurons(1, [3], -100),
            torch.float32,
            big_down_proj,
            "ScaleNeurons: factor -100 overflows float32: the down_proj columns of neurons [3] would reach 1e+39, past "
            "the largest float32 3.4e+38; use a smaller factor",
        ),
        (
            lambda: S.AddSteering(0, torch.full((64,), 3e38), 2.0),
            torch.float32,
            None,
            "AddSteering: scale 2 overflows float32: the down_proj bias would reach 6e+38, past the largest float32 "
            "3.4e+38; use a smaller scale",
        ),
    ],
)
def test_scales_that_overflow_the_dtype_are_refused_and_change_nothing(edit, dtype, prep, message):
    model = HookedLlama.from_hf(tiny_hf("gqa")).to(dtype)
    if prep is not None:
        prep(model)
    before = snapshot(model)
    with pytest.raises(S.EditError) as info:
        edit().apply(model)
    assert str(info.value) == message
    assert_same(model, before)


def test_an_overflowing_scale_in_a_plan_exits_2_before_writing(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("huge.yaml").write_text("edits:\n  - {edit: ScaleHeads, layer: 0, heads: [1], factor: 1.0e+39}\n")
    assert cli_error(["edit", "huge.yaml", "--model", str(tiny_dir), "--out", "out"], capsys) == (
        "edit #1: ScaleHeads: factor 1e+39 overflows float32 (the largest float32 is 3.4e+38); use a smaller factor"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.yaml"]


def test_a_full_disk_while_writing_a_report_names_the_path(tiny_dir, tmp_path, monkeypatch, capsys):
    import _core.writer as writer

    def full(path, data):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(writer, "_stage_bytes", full)
    message = cli_error(["lens", "Hello there", "--model", str(tiny_dir), "--report", "r/lens.html"], capsys, code=1)
    assert message.startswith("no space left on the device of r (the report needs about ")
    assert message.endswith(" MB); free some space or pick a report on another disk; nothing was written")
    assert not (tmp_path / "r").exists()  # no half-written report, no temporary file, not even the new directory

    def read_only(path, data):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(writer, "_stage_bytes", read_only)
    assert cli_error(["lens", "Hello there", "--model", str(tiny_dir), "--report", "r/lens.html"], capsys) == (
        "cannot write in r: permission denied (read-only directory or file system); pick a report in a writable "
        "directory or fix its permissions; nothing was written"
    )


@pytest.fixture(scope="module")
def model():
    return HookedLlama.from_hf(tiny_hf("gqa"))


API_TYPE_ERRORS = {
    "logit_lens of a non-model": (
        lambda m: A.logit_lens(3, "Hello"),
        InputError,
        "logit_lens takes a HookedLlama as its model, got int",
    ),
    "patching of a transformers model": (
        lambda m: A.activation_patching(m.to_hf(), "a", "b", answers=(1, 2)),
        InputError,
        "activation_patching takes a HookedLlama as its model, got LlamaForCausalLM (wrap a transformers model "
        "with HookedLlama.from_hf)",
    ),
    "steering_direction of an int": (
        lambda m: A.steering_direction(m, 3, [[1, 2]], layer=1),
        InputError,
        "prompts_a must be a list of prompts (strings or chat messages) or token ids [batch, pos], got int",
    ),
    "steering_direction at a float layer": (
        lambda m: A.steering_direction(m, [[1, 2]], [[1, 2]], layer=1.5),
        InputError,
        "layer must be an integer, got 1.5",
    ),
    "export of a non-model": (
        lambda m: S.export("model", "out"),
        InputError,
        "export takes a HookedLlama as its model, got str",
    ),
    "export_gguf of a non-model": (
        lambda m: S.export_gguf(None, "out.gguf"),
        InputError,
        "export_gguf takes a HookedLlama as its model, got NoneType",
    ),
    "edits that are an int": (
        lambda m: S.export(m, "out", edits=3),
        S.PlanError,
        "edits must be an EditPlan, an edit, a list of edits, a plan dict or a plan file path, got int",
    ),
    "apply to a non-model": (
        lambda m: S.ZeroHeads(0, [0]).apply(3),
        InputError,
        "ZeroHeads.apply takes a HookedLlama as its model, got int",
    ),
    "plan applied to a non-model": (
        lambda m: S.EditPlan([S.ZeroHeads(0, [0])]).apply("m"),
        InputError,
        "EditPlan.apply takes a HookedLlama as its model, got str",
    ),
    "load_plan of an int": (
        lambda m: S.load_plan(3),
        S.PlanError,
        "load_plan takes the path of a plan file (str or pathlib.Path), got int",
    ),
}


@pytest.mark.parametrize("case", list(API_TYPE_ERRORS))
def test_api_type_errors_are_one_line(model, case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    call, error, message = API_TYPE_ERRORS[case]
    before = snapshot(model)
    with pytest.raises(error) as info:
        call(model)
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []
    assert_same(model, before)
