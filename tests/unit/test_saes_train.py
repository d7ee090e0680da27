"""train_sae on a tiny model: packing (no padding) and harvesting against transformers, every kind of text
source giving the same run, resumption bit-identical mid-window, transcoders written and read back, the
scale folding exact, the autocast path, and the one-line refusals."""

from __future__ import annotations

import json
import re

import pytest
import torch

from analyses.saes import load_sae, train_sae, train_saes, transcoder_hooks
from analyses.saes.sae import SAE, SAEConfig
from analyses.saes.train import _fold, _Run
from hooks import HookedLlama, InputError
from hooks.harvest import PackStats, harvest, pack_rows
from tests.helpers import build_tiny, tiny_hf

HOOK = "blocks.1.hook_resid_post"
SMALL = dict(d_sae=96, k=8, steps=12, batch_size=32, lr=1e-2, max_tokens=16, text_batch=4, progress=False)


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    """The tiny checkpoint with its BPE tokenizer."""
    torch.set_num_threads(1)
    return HookedLlama.from_pretrained(str(build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama"))).eval()


def docs(n: int = 60, seed: int = 0, vocab: int = 128) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, vocab, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


TEXTS = [f"When {a} and {b} went to the store, {b} gave a drink to {a}." for a in "ABCDEFG" for b in "HIJKL"]


def params(sae) -> dict:
    return {n: p.detach().clone() for n, p in sae.named_parameters()}


def test_packed_rows_hold_every_token_once_and_no_padding(tok_model):
    stats = PackStats()
    rows = list(pack_rows(tok_model, TEXTS, 16, stats=stats))
    assert all(r.numel() == 16 for r in rows[:-1]) and 0 < rows[-1].numel() <= 16
    eos = tok_model.tokenizer.eos_token_id
    want = [t for text in TEXTS for t in tok_model.tokenizer(text)["input_ids"] + [eos]]
    assert torch.cat(rows).tolist() == want  # every token once, documents joined by EOS, in order
    assert (stats.docs, stats.rows) == (len(TEXTS), len(rows))
    kept = sum(a[HOOK].shape[0] for a in harvest(tok_model, [HOOK], iter(rows), batch_rows=5, stats=stats))
    assert stats.positions == stats.tokens == len(want) and stats.padding == 0
    assert stats.kept == kept == len(want) - len(rows)  # each row's first position left out


def test_harvest_equals_transformers_on_the_packed_rows():
    hf = tiny_hf("gqa")
    model = HookedLlama.from_hf(hf)
    rows = list(pack_rows(model, docs(), 12))
    names = ["blocks.0.hook_mlp_out", HOOK]
    got = list(harvest(model, names, rows, batch_rows=4, skip_first=False))
    with torch.no_grad():
        want = [hf(torch.stack(rows[i : i + 4]), output_hidden_states=True).hidden_states[2] for i in range(0, 12, 4)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g[HOOK], w.reshape(-1, model.d_model), atol=1e-5, rtol=0)
    assert got[0]["blocks.0.hook_mlp_out"].shape == (48, model.d_model)


def test_every_text_source_gives_the_same_sae(tok_model, tmp_path):
    import datasets

    base = train_sae(tok_model, HOOK, TEXTS, tmp_path / "list", **SMALL)
    (tmp_path / "c.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    sources = {
        "txt": tmp_path / "c.txt",
        "jsonl": str(tmp_path / "c.jsonl"),
        "dataset": datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))}),
        "records": [{"text": t} for t in TEXTS],
        "token ids": [tok_model.tokenizer(t)["input_ids"] for t in TEXTS],
        "generator": (t for t in TEXTS),
    }
    for name, src in sources.items():
        kw = dict(SMALL, steps=None) if name == "generator" else SMALL  # a one-shot iterator: one epoch
        res = train_sae(tok_model, HOOK, src, tmp_path / name.replace(" ", "_"), **kw)
        if name == "generator":  # one pass, whole batches
            kept = sum(r.numel() - 1 for r in pack_rows(tok_model, TEXTS, 16))
            assert res.steps == kept // 32
            continue
        for n, p in params(base.sae).items():
            assert torch.equal(p, params(res.sae)[n]), (name, n)
    assert base.stats["padding"] == 0 and base.stats["kept"] >= base.tokens


def test_resume_mid_window_is_bit_identical(tmp_path):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    kw = dict(SMALL, steps=14, checkpoint_every=3, buffer_tokens=96)  # windows of 3 batches
    whole = train_sae(model, HOOK, docs(), tmp_path / "whole", **kw)
    part = train_sae(model, HOOK, docs(), tmp_path / "part", stop_after=7, **kw)
    assert part.steps == 7 and (tmp_path / "part" / "checkpoint.pt").is_file()
    rest = train_sae(model, HOOK, docs(), tmp_path / "part", **kw)
    assert rest.resumed_from == 7 and rest.steps == 14 and rest.losses == whole.losses
    assert not (tmp_path / "part" / "checkpoint.pt").exists()
    for n, p in params(whole.sae).items():
        assert torch.equal(p, params(rest.sae)[n]), n
    back = load_sae(tmp_path / "part", model)
    assert torch.equal(back.W_dec, rest.sae.W_dec)


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    train_sae(model, HOOK, docs(), tmp_path / "sae", stop_after=2, checkpoint_every=1, **SMALL)
    with pytest.raises(InputError) as err:
        train_sae(model, HOOK, docs(), tmp_path / "sae", **dict(SMALL, lr=5e-3))
    assert str(err.value) == (
        f"{tmp_path / 'sae' / 'checkpoint.pt'} was written by a run with other settings (or another version); "
        "delete it or use another out path"
    )


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
@pytest.mark.parametrize("skip", [False, True])
def test_transcoders_are_written_and_read_back(tmp_path, arch, skip):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    read, write = transcoder_hooks(model, [1])[0]
    res = train_sae(
        model, read, docs(), tmp_path / "tc", hook_name_out=write, architecture=arch, skip_connection=skip, **SMALL
    )
    sae = res.sae
    assert sae.cfg.is_transcoder and (sae.hook_name, sae.hook_name_out) == (read, write)
    assert res.path == (tmp_path / "tc" / "layers.1.mlp" if arch == "topk" else tmp_path / "tc")
    back = load_sae(res.path, model)
    assert back.cfg.architecture == arch and back.cfg.skip_connection == skip
    _, cache = model.run_with_cache(torch.tensor(docs(2, seed=5)[0])[None], names_filter=[read, write])
    with torch.no_grad():
        assert torch.equal(back.reconstruct(cache[read]), sae.reconstruct(cache[read]))
        # spliced, the transcoder replaces the MLP output (error term on: the model's output is unchanged)
        with model.saes([back]):
            logits = model(torch.tensor(docs(2, seed=5)[0])[None])
    torch.testing.assert_close(logits, model(torch.tensor(docs(2, seed=5)[0])[None]), atol=1e-5, rtol=0)
    if arch == "jumprelu":
        assert json.loads((tmp_path / "tc" / "cfg.json").read_text())["architecture"] == (
            "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder"
        )
        assert bool((back.threshold > 0).all())
    else:
        assert torch.equal(back.input_scale, model.model.layers[1].post_attention_layernorm.weight.detach())


def test_folding_the_scales_is_exact():
    """The saved SAE on raw activations equals the trained one on scaled activations, divided back."""
    g = torch.Generator().manual_seed(0)
    for arch, write in (("topk", None), ("jumprelu", "blocks.0.hook_mlp_out")):
        cfg = SAEConfig(
            arch,
            16,
            40,
            "blocks.0.hook_resid_mid",
            hook_name_out=write,
            k=5 if arch == "topk" else None,
            skip_connection=write is not None,
        )
        sae = SAE(cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        run = _Run(cfg.hook_name, write, sae, None)
        run.s_in, run.s_out = 3.5, (0.25 if write else 3.5)
        run.log_threshold = torch.full((40,), -1.5) if arch == "jumprelu" else None
        if arch == "jumprelu":
            sae.threshold.data.fill_(float(torch.tensor(-1.5).exp()))
        x = torch.randn(50, 16, generator=g)
        with torch.no_grad():
            trained = sae.reconstruct(x * run.s_in) / run.s_out
            _fold(run)
            torch.testing.assert_close(sae.reconstruct(x), trained, atol=1e-5, rtol=1e-5)


def test_train_saes_shares_the_forwards_and_equals_alone(tmp_path):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    hooks = ["blocks.0.hook_resid_post", *transcoder_hooks(model, [2])]
    both = train_saes(model, hooks, docs(), tmp_path / "many", architecture="jumprelu", **SMALL)
    alone = train_sae(model, "blocks.0.hook_resid_post", docs(), tmp_path / "alone", architecture="jumprelu", **SMALL)
    for n, p in params(alone.sae).items():
        assert torch.equal(p, params(both["blocks.0.hook_resid_post"].sae)[n]), n
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == sorted(
        ["blocks.0.hook_resid_post", "blocks.2.ln2.hook_normalized"]
    )
    assert both["blocks.2.ln2.hook_normalized"].sae.cfg.is_transcoder


def test_autocast_path_trains(tmp_path):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    res = train_sae(model, HOOK, docs(), tmp_path / "amp", amp=True, **dict(SMALL, steps=30))
    plain = train_sae(model, HOOK, docs(), tmp_path / "fp32", amp=False, **dict(SMALL, steps=30))
    assert res.sae.W_enc.dtype == torch.float32 and not torch.equal(res.sae.W_enc, plain.sae.W_enc)
    assert res.losses[-1] < 0.8 * res.losses[0]
    assert res.losses[-1] == pytest.approx(plain.losses[-1], rel=0.15)


@pytest.mark.parametrize(
    "kwargs, message, param",
    [
        (
            dict(hook_name="blocks.1.hook_resid_post", hook_name_out="blocks.1.hook_mlp_out"),
            "a TopK transcoder is written in sparsify's layout, which holds MLP transcoders only "
            "(blocks.{i}.ln2.hook_normalized -> blocks.{i}.hook_mlp_out); pass architecture='jumprelu' "
            "for this pair (SAELens's layout)",
            "architecture",
        ),
        (
            dict(architecture="gated"),
            "train_sae trains topk or jumprelu SAEs, got architecture='gated'",
            "architecture",
        ),
        (
            dict(skip_connection=True),
            "a skip connection is for transcoders; pass hook_name_out= or skip_connection=False",
            "skip_connection",
        ),
        (
            dict(texts=iter([[5, 6, 7]]), epochs=2),
            "a one-shot iterator gives one epoch; pass the texts as a list, a file or a dataset for epochs > 1",
            "epochs",
        ),
        (
            dict(texts=[{"body": "x"}]),
            "a corpus record has none of the keys text, content, prompt or input_ids (it has body); put the text "
            "under 'text'",
            "texts",
        ),
        (
            dict(texts="missing.txt"),
            "corpus file missing.txt does not exist; pass a list of strings, a text file (one document a line), "
            "a .jsonl file or a datasets.Dataset",
            "texts",
        ),
        (
            dict(texts=[[5, 6, 7]] * 3),
            "the texts give fewer than batch_size=32 tokens; pass more texts or a smaller batch_size",
            "batch_size",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, kwargs, message, param):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    kw = dict(SMALL, hook_name=HOOK, texts=docs())
    kw.update(kwargs)
    with pytest.raises(InputError) as err:
        train_sae(model, kw.pop("hook_name"), kw.pop("texts"), tmp_path / "sae", **kw)
    assert str(err.value) == message and err.value.param == param
    assert not (tmp_path / "sae").exists() or not any((tmp_path / "sae").iterdir())
    assert re.fullmatch(r"[^\n]+", str(err.value))


def test_disk_cache_is_keyed_and_trains_as_on_the_fly(tmp_path):
    from _core.writer import our_manifest
    from hooks.harvest import PackedCache, harvest_to_disk

    model = HookedLlama.from_hf(tiny_hf("gqa"))
    fly = train_sae(model, HOOK, docs(), tmp_path / "fly", **SMALL)
    disk = train_sae(model, HOOK, docs(), tmp_path / "disk", cache_to_disk=True, **SMALL)
    cache = PackedCache(tmp_path / "disk.acts")
    assert cache.names == [HOOK] and cache.stats.padding == 0 and disk.stats["padding"] == 0
    assert cache.total == sum(r.numel() - 1 for r in pack_rows(model, docs(), 16))
    for n, p in params(fly.sae).items():  # the same tokens in the same order (forwards grouped differently)
        torch.testing.assert_close(p, params(disk.sae)[n], atol=1e-5, rtol=1e-5)
    # the cache holds the stream in order: token 40 is row 2's kept position 10 (15 kept per row)
    rows = list(pack_rows(model, docs(), 16))
    want = next(harvest(model, [HOOK], rows[2:3]))[HOOK][10]
    torch.testing.assert_close(cache.read(40, 41)[HOOK][0], want, atol=1e-6, rtol=0)
    # reused when nothing changed; other texts or another model make another key, and the stale one is replaced
    before = our_manifest(tmp_path / "disk.acts")
    again = harvest_to_disk(model, [HOOK], docs(), tmp_path / "disk.acts", max_tokens=16, text_batch=4)
    assert again.key == cache.key and our_manifest(tmp_path / "disk.acts") == before
    other = harvest_to_disk(model, [HOOK], docs(seed=1), tmp_path / "disk.acts", max_tokens=16, text_batch=4)
    assert other.key != cache.key
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert harvest_to_disk(model, [HOOK], docs(seed=1), tmp_path / "disk.acts", max_tokens=16).key != other.key


def test_disk_cache_never_replaces_a_directory_of_the_user(tmp_path):
    from _core.errors import OutputError

    model = HookedLlama.from_hf(tiny_hf("gqa"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError) as err:
        train_sae(model, HOOK, docs(), tmp_path / "sae", cache_to_disk=tmp_path / "mine", **SMALL)
    assert err.value.param == "cache_to_disk" and "notes.txt" in str(err.value)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and not (tmp_path / "sae").exists()


def test_retraining_over_an_sae_of_ours_with_checkpoints(tmp_path):
    """overwrite=True replaces an SAE this toolkit wrote, also when checkpoints were written beside it."""
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    first = train_sae(model, HOOK, docs(), tmp_path / "sae", **SMALL)
    second = train_sae(model, HOOK, docs(), tmp_path / "sae", overwrite=True, checkpoint_every=4, seed=1, **SMALL)
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
        "scalpel_manifest.json",
    ]
    back = load_sae(tmp_path / "sae", model)
    assert torch.equal(back.W_enc, second.sae.W_enc) and not torch.equal(back.W_enc, first.sae.W_enc)
    with pytest.raises(InputError):  # without overwrite=True an existing SAE stays
        train_sae(model, HOOK, docs(), tmp_path / "sae", **SMALL)


def test_an_epoch_that_fits_the_buffer_is_harvested_once(tmp_path):
    """Later epochs reuse the kept window (no model run), and a run resumed in epoch 1 still ends the same."""
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    few = docs(10)
    kept = sum(r.numel() - 1 for r in pack_rows(model, few, 16))
    one = train_sae(model, HOOK, few, tmp_path / "one", **dict(SMALL, steps=None))  # one epoch
    assert one.steps == kept // 32
    whole = train_sae(model, HOOK, few, tmp_path / "whole", **SMALL)  # 12 steps: about three epochs
    assert whole.stats["positions"] == one.stats["positions"] and whole.tokens > 2 * kept
    part = train_sae(model, HOOK, few, tmp_path / "part", stop_after=7, **SMALL)
    rest = train_sae(model, HOOK, few, tmp_path / "part", **SMALL)
    assert part.steps == 7 and rest.resumed_from == 7
    for n, p in params(whole.sae).items():
        assert torch.equal(p, params(rest.sae)[n]), n


def test_checkpoints_and_the_sae_go_through_the_writer(tmp_path, monkeypatch):
    """A stopped run leaves a sealed directory of ours holding its checkpoint; the SAE replaces it; a
    directory of the user's is refused before any work, even with overwrite=True."""
    from _core.errors import OutputError
    from _core.writer import our_manifest

    model = HookedLlama.from_hf(tiny_hf("gqa"))
    train_sae(model, HOOK, docs(), tmp_path / "sae", stop_after=2, checkpoint_every=1, **SMALL)
    manifest = our_manifest(tmp_path / "sae")
    assert manifest["kind"] == "sae" and manifest["training_checkpoint"] == {"step": 2}
    assert sorted(manifest["files"]) == ["checkpoint.pt"]
    train_sae(model, HOOK, docs(), tmp_path / "sae", checkpoint_every=1, **SMALL)  # resumed, no overwrite=True
    assert sorted(our_manifest(tmp_path / "sae")["files"]) == ["cfg.json", "sae_weights.safetensors"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "checkpoint.pt").write_bytes(b"not ours")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError) as err:
        train_sae(model, HOOK, docs(), "mine", overwrite=True, **SMALL)
    assert err.value.param == "out" and str(err.value) == (
        "mine is not an output of llama-scalpel (it holds 'checkpoint.pt' and no valid scalpel_manifest.json); "
        "overwriting replaces only a previous output or an empty directory, pick another out"
    )
    assert (tmp_path / "mine" / "checkpoint.pt").read_bytes() == b"not ours"
