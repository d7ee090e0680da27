"""hooks.indices: the one range check of each kind of index and the one parser of head / neuron / layer lists,
checked against the sizes of a tiny model's config."""

from __future__ import annotations

import re

import pytest
import torch

from _core.errors import spelled
from hooks.errors import InputError, RangeError
from hooks.indices import (
    check_index,
    check_indices,
    check_pairs,
    check_positions,
    parse_heads,
    parse_layers,
    parse_neurons,
    size_of,
)
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def config():
    return tiny_config()  # 3 layers, 4 query heads / 2 key-value groups, 96 neurons


def test_sizes_come_from_a_model_or_a_config(config):
    sizes = {kind: size_of(config, kind) for kind in ("layer", "head", "kv_group", "neuron")}
    assert sizes == {
        "layer": config.num_hidden_layers,
        "head": config.num_attention_heads,
        "kv_group": config.num_key_value_heads,
        "neuron": config.intermediate_size,
    }


@pytest.mark.parametrize(
    "kind, value, negative, message",
    [
        ("layer", 3, False, "layer 3 is out of range; the model has 3 layers (0..2)"),
        ("layer", -1, False, "layer -1 is out of range; the model has 3 layers (0..2)"),
        ("layer", -4, True, "layer -4 is out of range; the model has 3 layers (0..2, or -3..-1)"),
        ("head", 4, False, "head 4 is out of range; the layer has 4 heads (0..3)"),
        ("kv_group", 2, False, "key/value group 2 is out of range; the layer has 2 key/value groups (0..1)"),
        ("neuron", 96, False, "neuron 96 is out of range; the layer has 96 neurons (0..95)"),
        ("layer", 1.0, False, "layer must be an integer, got 1.0"),
        ("head", True, False, "head must be an integer, got True"),
    ],
)
def test_one_check_per_kind_names_the_valid_range(config, kind, value, negative, message):
    with pytest.raises(RangeError, match=f"^{re.escape(message)}$") as err:
        check_index(config, kind, value, param="x", negative=negative)
    assert err.value.param == "x"


def test_valid_indices_pass_and_negatives_count_from_the_end(config):
    assert check_indices(config, "layer", [0, 2, -1, -3], negative=True) == [0, 2, 2, 0]
    assert check_index(config, "neuron", torch.tensor(95)) == 95
    assert check_positions(5, [0, 4, -1, -5]) == [0, 4, 4, 0]
    with pytest.raises(
        RangeError, match=r"^position 5 is out of range; the prompt has 5 tokens \(0\.\.4, or -5\.\.-1\)$"
    ):
        check_positions(5, [5])


def test_pairs_are_named_as_written_in_the_callers_spelling(config):
    assert check_pairs(config, "head", [(2, 3), (-1, 0)], negative=True) == [(2, 3), (2, 0)]
    with pytest.raises(RangeError, match=r"^heads 1\.4: head 4 is out of range"):
        check_pairs(config, "head", [(1, 4)])
    with spelled(lambda name, value: "--" + name.replace("_", "-")):
        with pytest.raises(RangeError, match=r"^--neurons 7:1: layer 7 is out of range"):
            check_pairs(config, "neuron", [(7, 1)])


def test_one_parser_per_list_kind():
    assert parse_heads("19.2,20.0, L3H5") == [(19, 2), (20, 0), (3, 5)]
    assert parse_heads(["19.2", (4, 1), "19.2"]) == [(19, 2), (4, 1)]  # duplicates dropped, order kept
    assert parse_heads((4, 1)) == [(4, 1)]
    assert parse_neurons("12:4051,3:7") == [(12, 4051), (3, 7)]
    assert (
        parse_layers("3,10-12") == [3, 10, 11, 12] and parse_layers(4) == [4] and parse_layers([5, "1-2"]) == [5, 1, 2]
    )
    for call, message in [
        (lambda: parse_heads("5.x"), "bad head spec '5.x': write LAYER.HEAD, e.g. 3.5 or L3H5 (several: 3.5,9.1)"),
        (lambda: parse_heads(""), "heads is empty: write LAYER.HEAD, e.g. 5.3"),
        (lambda: parse_neurons("12"), "bad neuron spec '12': write LAYER:NEURON, e.g. 12:405 (several: 12:405,3:7)"),
        (lambda: parse_layers("5-3"), "bad layer spec '5-3': write layer numbers or ranges, e.g. 20 or 3,10-12"),
    ]:
        with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
            call()
