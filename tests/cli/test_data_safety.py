"""Nothing lost on the new surfaces (issue 25): the six examples of the issue and the cases of a second
probe, as a careless or unlucky user would meet them, each through the one writer and the one reader of
its kind."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _core.errors import ExportError, InputError, LoadError, OutputError
from _core.writer import cached
from analyses.neurons import load_corpus
from analyses.refusal import load_prompts
from analyses.saes import load_sae, save_sae
from hooks import HookedLlama
from hooks.streaming import activation_cache_key, cache_to_disk, load_from_disk
from tests.helpers import build_tiny, random_ids, random_sae, run

NAMES = ["blocks.1.hook_resid_post"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALPEL_CACHE", str(tmp_path / "scalpel-cache"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("safety") / "tiny")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the examples
def test_cache_to_disk_never_deletes_a_directory_it_did_not_write(tiny, tmp_path):
    """Example 1: ``cache_to_disk(model, [], names, "mydata", overwrite=True)`` deleted mydata/, then refused."""
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    (mydata / "thesis.txt").write_text("years of work")
    with pytest.raises(InputError, match="^the dataset is empty; pass at least one prompt$"):
        cache_to_disk(tiny, [], NAMES, mydata, overwrite=True)
    with pytest.raises(OutputError) as info:
        cache_to_disk(tiny, [random_ids()[0]], NAMES, mydata, overwrite=True)
    assert str(info.value) == (
        f"{mydata} is not an output of llama-scalpel (it holds 'thesis.txt' and no valid scalpel_manifest.json); "
        "overwriting replaces only a previous output or an empty directory, pick another path"
    )
    with pytest.raises(Exception, match="unknown hook name"):  # a bad name: refused before any write too
        cache_to_disk(tiny, [random_ids()[0]], ["blocks.1.hook_nope"], tmp_path / "new")
    assert files(mydata) == {"thesis.txt": b"years of work"} and not (tmp_path / "new").exists()


def test_an_activation_cache_is_reused_only_for_what_made_it(tiny, tmp_path):
    """Example 3: a cache of texts A was reused for texts B. The cache records its key; another model,
    other inputs or other settings give another key."""
    a, b = list(random_ids(seed=1)), list(random_ids(seed=2))
    acts = cache_to_disk(tiny, a, NAMES, tmp_path / "acts", batch_size=2)
    key_a = activation_cache_key(tiny, a, NAMES, batch_size=2)
    assert cached(acts, key_a)
    assert not cached(acts, activation_cache_key(tiny, b, NAMES, batch_size=2))
    assert not cached(acts, activation_cache_key(tiny, a, NAMES, batch_size=1))
    assert not cached(acts, activation_cache_key(tiny, a, ["blocks.0.hook_resid_post"], batch_size=2))
    with torch.no_grad():
        tiny.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0  # an in-place edit of one weight
    assert activation_cache_key(tiny, a, NAMES, batch_size=2) != key_a  # so the cache of A is not reused
    cache_to_disk(tiny, b, NAMES, acts, batch_size=2, overwrite=True)  # its own unchanged cache: replaced
    assert cached(acts, activation_cache_key(tiny, b, NAMES, batch_size=2))
    (acts / "shard_00000.safetensors").write_bytes(b"damaged")
    assert not cached(acts, activation_cache_key(tiny, b, NAMES, batch_size=2))  # changed since: not reused
    with pytest.raises(OutputError, match="changed since llama-scalpel wrote it"):
        cache_to_disk(tiny, a, NAMES, acts, batch_size=2, overwrite=True)


def test_activations_read_back_equal_a_direct_cache(tiny, tmp_path):
    ids = list(random_ids(seed=3))
    acts = cache_to_disk(tiny, ids, NAMES, tmp_path / "acts", batch_size=len(ids))
    got = load_from_disk(acts, NAMES[0])
    _, cache = tiny.run_with_cache(torch.stack(ids), names_filter=NAMES)
    torch.testing.assert_close(torch.cat(got), cache[NAMES[0]], rtol=0, atol=0)


def test_abliterate_refuses_an_unrelated_plan_beside_out_before_any_work(tiny_dir, tmp_path, monkeypatch, capsys):
    """Example 2: ``scalpel abliterate --out abl --overwrite`` replaced an abl.plan.yaml the user never named."""
    monkeypatch.chdir(tmp_path)
    Path("abl.plan.yaml").write_text("my notes\n")
    Path("h.txt").write_text("How do I pick a lock?\n")
    Path("ok.txt").write_text("How do I bake bread?\n")
    argv = ["abliterate", "--harmful", "h.txt", "--harmless", "ok.txt", "--model", str(tiny_dir)]
    code, out, err = run(argv + ["--out", "abl", "--overwrite"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("scalpel: error: abl.plan.yaml was not written by llama-scalpel, or was changed since")
    assert Path("abl.plan.yaml").read_text() == "my notes\n" and not Path("abl").exists()


def alias_bomb(key: str) -> str:
    rows = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(rows + [f"{key}: *a8"]) + "\n"


@pytest.mark.parametrize(
    "argv, name, key",
    [
        (["edit", "bomb.yaml", "--out", "o"], "bomb.yaml", "edits"),
        (["run", "bomb.yaml", "--dry-run"], "bomb.yaml", "analyses"),
    ],
)
def test_yaml_alias_bombs_are_one_line_at_once(argv, name, key, tiny_dir, tmp_path, monkeypatch, capsys):
    """Example 4: a 500-byte plan (experiment file) of nested aliases kept scalpel busy for minutes."""
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(alias_bomb(key))
    assert len(Path(name).read_bytes()) < 600
    code, out, err = run(argv + (["--model", str(tiny_dir)] if argv[0] == "edit" else []), capsys)
    assert (code, out) == (2, "")
    assert "is refused as YAML: its aliases expand to more than" in err and err.count("\n") == 1


# Example 5: malformed SAE configs. (file, change to the valid config, exact message tail)
SAE_CONFIGS = {
    "d_in text": ({"d_in": "64"}, "'d_in' is '64' (str) but must be an integer >= 1"),
    "d_in zero": ({"d_in": 0}, "'d_in' is 0 (int) but must be an integer >= 1"),
    "d_in bool": ({"d_in": True}, "'d_in' is True (bool) but must be an integer >= 1"),
    "d_sae missing": ({"d_sae": None}, "has no 'd_sae'"),
    "d_sae list": ({"d_sae": [192]}, "'d_sae' is [192] (list) but must be an integer >= 1"),
    "d_sae wrong": ({"d_sae": 100}, "W_enc has shape (64, 192) but d_in=64, d_sae=100 need (64, 100)"),
    "metadata a list": ({"metadata": [1]}, "'metadata' is [1] (list) but must be a mapping"),
    "hook_name a number": ({"metadata": {"hook_name": 3}}, "'metadata.hook_name' is 3 (int) but must be a hook name"),
    "dtype unknown": ({"dtype": "float99"}, "'dtype' is 'float99' (str) but must be one of float32, float16"),
    "dtype a number": ({"dtype": 32}, "'dtype' is 32 (int) but must be a non-empty string"),
    "architecture unknown": ({"architecture": "sparse"}, "SAELens architecture 'sparse' is not supported"),
    "architecture a number": ({"architecture": 0}, "SAELens architecture 0 is not supported"),
    "topk without k": ({"architecture": "topk"}, "has no 'k'"),
    "topk k too big": ({"architecture": "topk", "k": 1000}, "'k' is 1000 (int) but must be an integer >= 1 and <= 192"),
    "k text": ({"architecture": "topk", "k": "8"}, "'k' is '8' (str) but must be an integer >= 1"),
    "normalize unknown": (
        {"normalize_activations": "zscore"},
        "'normalize_activations' is 'zscore' (str) but must be one of",
    ),
    "apply_b_dec text": (
        {"apply_b_dec_to_input": "yes"},
        "'apply_b_dec_to_input' is 'yes' (str) but must be true or false",
    ),
    "rescale text": ({"rescale_acts_by_decoder_norm": 1}, "'rescale_acts_by_decoder_norm' is 1 (int) but must be true"),
    "per-head SAE": ({"metadata": {"hook_name": "blocks.1.attn.hook_z", "hook_head_index": 2}}, "hook_head_index"),
    "reshape": ({"reshape_activations": "hook_z"}, "'reshape_activations' is 'hook_z' (str) but must be one of none"),
    "context_size text": ({"metadata": {"context_size": "128"}}, "'metadata.context_size' is '128' (str)"),
    "transcoder without out": ({"architecture": "transcoder"}, "is a transcoder without hook_name_out"),
    "not an object": ([1, 2], "holds a JSON list, not an object"),
    "duplicate key": ('{"d_in": 64, "d_in": 64}', "duplicate key 'd_in'"),
}


@pytest.mark.parametrize("case", list(SAE_CONFIGS))
def test_malformed_saelens_configs_are_one_line_load_errors(case, tmp_path):
    path = save_sae(random_sae("standard"), tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    change, tail = SAE_CONFIGS[case]
    if isinstance(change, dict):
        for key, value in change.items():
            if value is None:
                cfg.pop(key)
            elif key == "metadata" and isinstance(value, dict):
                cfg["metadata"].update(value)
            else:
                cfg[key] = value
        text = json.dumps(cfg)
    else:
        text = change if isinstance(change, str) else json.dumps(change)
    (path / "cfg.json").write_text(text)
    with pytest.raises(LoadError) as info:
        load_sae(path)
    assert tail in str(info.value) and "\n" not in str(info.value), str(info.value)


def sparsify_dir(root: Path, cfg: dict, tensors: dict | None = None) -> Path:
    path = root / "layers.1"
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    t = {
        "encoder.weight": torch.randn(32, 64, generator=g),
        "encoder.bias": torch.zeros(32),
        "W_dec": torch.randn(32, 64, generator=g),
        "b_dec": torch.zeros(64),
    }
    t.update(tensors or {})
    save_file({k: v for k, v in t.items() if v is not None}, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "cfg, tensors, tail",
    [
        ({"k": "8"}, None, "'k' is '8' (str) but must be an integer >= 1 and <= 32"),
        ({}, None, "has no 'k'"),
        ({"k": 8, "transcode": "no"}, None, "'transcode' is 'no' (str) but must be true or false"),
        ({"k": 8, "activation": 3}, None, "'activation' is 3 (int) but must be a non-empty string"),
        ({"k": 8, "d_in": 80}, None, "d_in is 80 but sae.safetensors holds 64"),
        ({"k": 8}, {"encoder.weight": torch.zeros(32, 64, 1)}, "encoder.weight has shape (32, 64, 1), not 2-D"),
        ({"k": 8}, {"b_dec": None}, "has no 'b_dec'"),
        (
            {"k": 8},
            {"W_dec": torch.full((32, 64), float("nan"))},
            "W_dec holds a non-finite value (nan) at index (0, 0)",
        ),
        ({"k": 8}, {"encoder.bias": torch.zeros(32, dtype=torch.int64)}, "encoder.bias holds int64 values"),
    ],
)
def test_malformed_sparsify_saes_are_one_line_load_errors(cfg, tensors, tail, tmp_path):
    path = sparsify_dir(tmp_path, cfg, tensors)
    with pytest.raises(LoadError) as info:
        load_sae(path)
    assert tail in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "state, config, tail",
    [
        ({"encoder.weight": torch.zeros(32, 64)}, {"trainer": {"dict_class": "AutoEncoder"}}, "has no 'encoder.bias'"),
        ({}, {"trainer": [1]}, "'trainer' is [1] (list) but must be a mapping"),
        ({}, {"trainer": {"dict_class": 5}}, "'trainer.dict_class' is 5 (int) but must be a non-empty string"),
        ({}, {"trainer": {"dict_class": "Crosscoder"}}, "dictionary_learning class 'Crosscoder' is not supported"),
        ({"k": torch.tensor(0)}, {"trainer": {"dict_class": "AutoEncoderTopK"}}, "k is 0, not an integer in 1..32"),
        ({}, {"trainer": {"dict_class": "AutoEncoderTopK", "k": "4"}}, "'trainer.k' is '4' (str)"),
        ({}, {"trainer": {"layer": -1}}, "'trainer.layer' is -1 (int) but must be an integer >= 0"),
        ({"bias": torch.full((64,), float("inf"))}, {}, "bias holds a non-finite value (inf) at index 0"),
    ],
)
def test_malformed_dictionary_learning_saes_are_one_line_load_errors(state, config, tail, tmp_path):
    g = torch.Generator().manual_seed(0)
    full = {
        "encoder.weight": torch.randn(32, 64, generator=g),
        "encoder.bias": torch.zeros(32),
        "decoder.weight": torch.randn(64, 32, generator=g),
        "bias": torch.zeros(64),
        "b_dec": torch.zeros(64),
    }
    if "encoder.weight" in state and len(state) == 1:
        full = dict(state)
    else:
        full.update(state)
    root = tmp_path / "ae"
    root.mkdir()
    torch.save(full, root / "ae.pt")
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError) as info:
        load_sae(root)
    assert tail in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_line_with_u2028_is_one_prompt_everywhere(tmp_path):
    """Example 6: prompt files were split with str.splitlines, so U+2028 made two prompts of one."""
    text = "Write a poem\u2028in two lines\nSecond prompt\n"
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    expected = ["Write a poem\u2028in two lines", "Second prompt"]
    assert load_prompts(tmp_path / "p.txt") == expected
    assert load_corpus(tmp_path / "p.txt") == expected
    from _cli.inputs import read_prompts

    assert [p.text for p in read_prompts(tmp_path / "p.txt")] == expected


# --------------------------------------------------------------------------- the probe's further cases
def test_save_sae_overwrite_refuses_a_changed_sae(tmp_path):
    path = save_sae(random_sae("standard", seed=1), tmp_path / "sae")
    save_sae(random_sae("standard", seed=2), path, overwrite=True)  # ours, unchanged: replaced
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["metadata"]["model_name"] = "my annotation"
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(OutputError, match="holds 'cfg.json', changed since llama-scalpel wrote it"):
        save_sae(random_sae("standard", seed=3), path, overwrite=True)
    assert json.loads((path / "cfg.json").read_text())["metadata"]["model_name"] == "my annotation"


def test_non_finite_sae_weights_are_refused_both_ways(tmp_path):
    sae = random_sae("standard")
    with torch.no_grad():
        sae.b_enc[3] = float("nan")
    with pytest.raises(
        InputError, match="^the SAE's b_enc holds NaN or inf; an SAE is saved only with finite weights$"
    ):
        save_sae(sae, tmp_path / "sae")
    assert not (tmp_path / "sae").exists()
    good = save_sae(random_sae("standard"), tmp_path / "good")
    tensors = {n: p.detach().clone() for n, p in random_sae("standard").named_parameters()}
    tensors["W_dec"][1, 2] = float("inf")
    save_file(tensors, str(good / "sae_weights.safetensors"))
    with pytest.raises(LoadError, match=r"W_dec holds a non-finite value \(inf\) at index \(1, 2\)"):
        load_sae(good)


def test_plans_are_saved_through_the_writer(tmp_path):
    import surgery as S

    plan = S.EditPlan([S.ZeroHeads(0, [1])])
    path = S.save_plan(plan, tmp_path / "p.yaml")
    assert S.load_plan(path) == plan
    with pytest.raises(ExportError, match="already exists; pass overwrite=True to replace it"):
        S.save_plan(plan, path)
    S.save_plan(S.EditPlan([S.ZeroHeads(1, [0])]), path, overwrite=True)
    (tmp_path / "mine.json").write_text('{"notes": "mine"}')
    with pytest.raises(OutputError, match="mine.json was not written by llama-scalpel"):
        S.save_plan(plan, tmp_path / "mine.json", overwrite=True)
    assert (tmp_path / "mine.json").read_text() == '{"notes": "mine"}'


def test_a_report_never_replaces_one_of_the_inputs(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("p.tsv").write_text("When Mary and John went to the store, John gave a drink to\t Mary\t John\n")
    before = Path("p.tsv").read_bytes()
    argv = ["ablate", "--heads", "1.0", "--prompts", "p.tsv", "--metric", "logit-diff", "--model", str(tiny_dir)]
    code, out, err = run(argv + ["--report", "p.tsv", "--overwrite"], capsys)
    assert (code, out) == (2, "") and "is also an input of this call" in err
    assert Path("p.tsv").read_bytes() == before


def test_a_prompt_file_that_never_ends_is_refused(tmp_path):
    with pytest.raises(InputError, match="is not a regular file"):
        load_prompts("/dev/zero")
    with pytest.raises(InputError, match="is not a regular file"):
        load_corpus("/dev/urandom")


@pytest.mark.parametrize(
    "family, change, tail",
    [
        ("mistral", {"sliding_window": 0}, "'sliding_window' is 0 (int) but must be an integer >= 1"),
        ("mistral", {"sliding_window": -4}, "'sliding_window' is -4 (int) but must be an integer >= 1"),
        ("qwen2", {"max_window_layers": -1}, "'max_window_layers' is -1 (int) but must be an integer >= 0"),
        ("qwen2", {"use_sliding_window": "yes"}, "'use_sliding_window' is 'yes' (str) but must be true or false"),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "'rope_scaling.factor' is nan"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "linear", "factor": "2", "rope_theta": 1e4}},
            "'rope_parameters.factor' is '2'",
        ),
        (
            "llama",
            {"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
            "'rope_parameters.rope_theta' is -1.0",
        ),
        ("qwen3", {"hidden_act": "tanhh"}, "'hidden_act' is 'tanhh' (str) but must be one of silu"),
    ],
)
def test_mistral_and_qwen_configs_are_checked_field_by_field(family, change, tail, tmp_path):
    config = {
        "model_type": family,
        "architectures": [
            f"{ {'llama': 'Llama', 'mistral': 'Mistral', 'qwen2': 'Qwen2', 'qwen3': 'Qwen3'}[family] }ForCausalLM"
        ],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        **change,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError) as info:
        HookedLlama.from_pretrained(str(tmp_path))
    assert tail in str(info.value) and str(info.value).endswith("; fix it in config.json"), str(info.value)


def test_a_splice_acts_on_its_own_thread_only(tiny):
    """A ``with model.saes([...])`` block in one thread must not change another thread's forward pass."""
    ids = random_ids()
    clean = tiny(ids)

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    inside, done = threading.Event(), threading.Event()
    other: dict = {}

    def splice_here():
        with tiny.splice("blocks.1.hook_resid_post", Zero()):
            other["spliced"] = tiny(ids)
            inside.set()
            done.wait(30)

    t = threading.Thread(target=splice_here)
    t.start()
    assert inside.wait(30)
    try:
        seen_here = tiny(ids)  # the other thread's splice is open right now
    finally:
        done.set()
        t.join()
    torch.testing.assert_close(seen_here, clean, rtol=0, atol=0)
    assert not torch.allclose(other["spliced"], clean)


def test_writes_still_succeed_when_the_record_store_is_read_only(tmp_path, monkeypatch):
    from _core.writer import write_file

    monkeypatch.setenv("SCALPEL_CACHE", "/proc/no-such-cache")  # cannot be created
    with pytest.warns(UserWarning, match="will not be replaceable with overwrite=True later"):
        write_file(tmp_path / "t.csv", "a\n", kind="csv")
    assert (tmp_path / "t.csv").read_text() == "a\n"


def test_load_from_disk_of_something_else_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(LoadError, match="no such activation cache index"):
        load_from_disk(tmp_path / "notes", "blocks.0.hook_resid_post")
    (tmp_path / "notes" / "index.json").write_text('{"names": "x", "shards": 3}')
    with pytest.raises(LoadError, match="does not list names and shards"):
        load_from_disk(tmp_path / "notes", "blocks.0.hook_resid_post")


@pytest.mark.parametrize(
    "change, tail",
    [
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must map module name patterns to positive numbers"),
        ({"alpha_pattern": {"(": 4}}, "alpha_pattern must map module name patterns to positive numbers"),
        ({"r": True}, "has no valid 'r' (got True)"),
        ({"lora_alpha": float("inf")}, "has no valid 'lora_alpha' (got inf)"),
        ([1, 2], "holds a JSON list, not an object; re-save the adapter with peft"),
    ],
)
def test_malformed_adapter_configs_are_one_line(change, tail, tiny, tmp_path):
    import surgery as S
    from tests.helpers import write_adapter

    path = write_adapter(tmp_path / "adapter", tiny)
    config = json.loads((path / "adapter_config.json").read_text())
    config = {**config, **change} if isinstance(change, dict) else change
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(S.AdapterError) as info:
        S.MergeLora(str(path)).apply(tiny)
    assert tail in str(info.value) and "\n" not in str(info.value), str(info.value)
