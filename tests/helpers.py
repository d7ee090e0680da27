"""What the tests share: tiny random configs of every supported variant and family (Llama, Mistral,
Qwen2, Qwen3), a tiny saved checkpoint with a BPE tokenizer for the CLI, edit builders, snapshots of a
model's state, the in-process CLI runner, random SAEs and the interrupted-export harness.

Test modules import from here (never from each other); fixtures live in ``conftest.py``."""

from __future__ import annotations

import copy
import functools
import json
import os
import select
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

import cli
import surgery as S
from analyses import refusal as R
from analyses.saes import SAE, SAEConfig
from hooks import config as hooks_config

REPO = Path(__file__).resolve().parents[2]


# name -> config overrides on top of TINY; "family" picks the transformers class (default llama)
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=128,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


VARIANTS = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    "mqa": {"num_key_value_heads": 1},
    "tied": {"tie_word_embeddings": True, "num_key_value_heads": 2},
    "bias": {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 2},
    "head_dim": {"head_dim": 24, "num_key_value_heads": 2},
    "rope_linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    "rope_dynamic": {
        "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        "max_position_embeddings": 8,
    },
    "rope_llama3": {
        "rope_parameters": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        }
    },
    "rope_yarn": {
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 10000.0,
        }
    },
    # other families: the sliding windows (4 keys) are shorter than every test prompt
    "mistral": {"family": "mistral", "num_key_value_heads": 2, "sliding_window": 4},
    "qwen2": {
        "family": "qwen2",
        "num_key_value_heads": 2,
        "use_sliding_window": True,
        "sliding_window": 4,
        "max_window_layers": 1,
    },  # layer 0 full, layers 1-2 windowed; q/k/v biases, no o bias
    "qwen2_tied": {
        "family": "qwen2",
        "num_key_value_heads": 1,
        "tie_word_embeddings": True,
        "use_sliding_window": True,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    "qwen3": {"family": "qwen3", "num_key_value_heads": 2, "head_dim": 24},  # q/k norms, head_dim != 64 / 4
    "qwen3_window": {
        "family": "qwen3",
        "head_dim": 8,
        "attention_bias": True,
        "use_sliding_window": True,
        "sliding_window": 4,
        "layer_types": ["full_attention", "sliding_attention", "full_attention"],
    },
}


FAMILY_VARIANTS = [v for v in VARIANTS if "family" in VARIANTS[v]]


def tiny_config(variant: str = "gqa", **overrides) -> LlamaConfig:
    """The variant's config, of its family's own config class (``LlamaConfig``, ``Qwen2Config`` …)."""
    fields = {**TINY, **VARIANTS[variant], **overrides}
    return hooks_config.config_class(fields.pop("family", "llama"))(**fields)


def tiny_hf(variant: str = "gqa", seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random HF model of the variant's own class whose biases and norm weights are non-trivial
    (so they are really tested)."""
    torch.manual_seed(seed)
    config = tiny_config(variant, **overrides)
    model = hooks_config.causal_lm_class(config)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"


IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


NAMES = ["Mary", "John", "Tom", "Sarah"]


CLEAN = "When Mary and John went to the store, John gave a drink to"


CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


IOI = [
    ("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
    ("When John and Mary went to the store, Mary gave a drink to", " John", " Mary"),
    ("When Tom and Sarah went to the store, Sarah gave a drink to", " Tom", " Sarah"),
    ("When Sarah and Tom went to the store, Tom gave a drink to", " Sarah", " Tom"),
    ("The capital of France is", " Sarah", " Tom"),
]


# other families the info / ablate / edit commands run unchanged: Mistral and Qwen2 with 4-token
# sliding windows (shorter than the prompts), Qwen3 with q/k norms (head_dim 128, which GGUF can carry)
FAMILY_DIRS = {"mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 128}}


def build_tiny(directory: Path, variant: str = "gqa") -> Path:
    """A tiny GQA Llama (3 layers, 4 heads / 2 kv, vocab 320) -- or the tiny ``variant`` of another family --
    plus a byte-level BPE tokenizer trained on a few sentences, saved with ``save_pretrained`` (names like
    " Mary" are single tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"When {a} and {b} went to the store, {b} gave a drink to {a}." for a in NAMES for b in NAMES if a != b]
    corpus += ["The quick brown fox jumps over the lazy dog.", "The capital of France is Paris."] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )
    hf = tiny_hf(
        variant,
        0,
        vocab_size=tok.get_vocab_size(),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        max_position_embeddings=128,
        initializer_range=0.1,
        **FAMILY_DIRS.get(variant, {}),
    )
    hf.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def run(argv, capsys) -> tuple[int, str, str]:
    """``cli.main(argv)`` in-process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(argv, capsys) -> dict:
    code, out, err = run(list(argv) + ["--json"], capsys)
    assert code == 0, err
    return json.loads(out)


@torch.no_grad()
def hf_metric(model, tok, prompt: str, correct: str | None, incorrect: str | None, metric: str) -> float:
    """One prompt, unpadded, through a transformers model."""
    x = torch.tensor([tok(prompt)["input_ids"]])
    if metric == "loss":
        return float(model(x, labels=x).loss)
    last = model(x).logits[0, -1].double()
    c = tok(correct, add_special_tokens=False)["input_ids"][0]
    if metric == "prob":
        return float(last.softmax(-1)[c])
    i = tok(incorrect, add_special_tokens=False)["input_ids"][0]
    return float(last[c] - last[i])


def zero_heads(model: LlamaForCausalLM, layer: int, heads) -> LlamaForCausalLM:
    """A copy with the heads' o_proj input columns zeroed, by hand."""
    model = copy.deepcopy(model)
    d = model.model.layers[layer].self_attn.head_dim
    with torch.no_grad():
        for h in heads:
            model.model.layers[layer].self_attn.o_proj.weight[:, h * d : (h + 1) * d] = 0
    return model


def zero_neurons(model: LlamaForCausalLM, layer: int, neurons) -> LlamaForCausalLM:
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight[:, list(neurons)] = 0
    return model


def skip_layer(model: LlamaForCausalLM, layer: int) -> LlamaForCausalLM:
    """A copy whose decoder layer ``layer`` returns its input unchanged."""
    model = copy.deepcopy(model)
    model.model.layers[layer].register_forward_hook(
        lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True
    )
    return model


EDIT_NAMES = [
    "ZeroHeads",
    "ScaleHeads",
    "ZeroKVGroups",
    "MeanAblateHeads",
    "ZeroNeurons",
    "ScaleNeurons",
    "RemoveLayers",
    "Orthogonalize",
    "OrthogonalizeSomeLayers",
    "AddSteering",
    "RankOneEdit",
    "MergeLora",
    "Abliterate",
    "AbliterateNormPreserving",
]


TOL = 1e-5


def random_ids(vocab: int = 128, batch: int = 2, seq: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def write_adapter(
    path,
    model,
    *,
    r: int = 4,
    alpha: float = 8.0,
    targets=("q_proj", "v_proj", "o_proj", "down_proj", "gate_proj"),
    layers=None,
    base: str | None = None,
    rslora: bool = False,
    seed: int = 0,
    shape_override: dict | None = None,
):
    """A PEFT-format LoRA adapter directory with random A and B (B non-zero, unlike a fresh PEFT init)."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    layers = range(model.n_layers) if layers is None else layers
    for i in layers:
        for t in targets:
            part = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            w = getattr(getattr(model.model.layers[i], part), t).weight
            out_f, in_f = (shape_override or {}).get(t, tuple(w.shape))
            key = f"base_model.model.model.layers.{i}.{part}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "use_rslora": rslora,
        "base_model_name_or_path": base,
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def make_edit(name: str, model, tmp_path) -> S.Edit:
    g = torch.Generator().manual_seed(7)
    d, last = model.d_model, model.n_layers - 1
    if name == "ZeroHeads":
        return S.ZeroHeads(1, [0, 2])
    if name == "ScaleHeads":
        return S.ScaleHeads(0, [1, 3], 0.25)
    if name == "ZeroKVGroups":
        return S.ZeroKVGroups(2, [model.n_kv_heads - 1])
    if name == "MeanAblateHeads":
        return S.MeanAblateHeads.compute(
            model, 1, [1, 3], [random_ids(seq=12, batch=1, seed=5)[0], random_ids(seq=7, batch=1)[0]]
        )
    if name == "ZeroNeurons":
        return S.ZeroNeurons(0, [1, 5, 7, 60])
    if name == "ScaleNeurons":
        return S.ScaleNeurons(2, [3, 4], 3.0)
    if name == "RemoveLayers":
        return S.RemoveLayers([1])
    if name == "Orthogonalize":
        return S.Orthogonalize(torch.randn(d, generator=g))
    if name == "OrthogonalizeSomeLayers":
        return S.Orthogonalize(torch.randn(d, generator=g), layers=[0, last], embeddings=False)
    if name == "AddSteering":
        return S.AddSteering(1, torch.randn(d, generator=g), scale=2.0)
    if name == "RankOneEdit":
        cov = S.key_covariance(model, 1, [random_ids(seq=30, batch=1, seed=s)[0] for s in range(3)])
        return S.RankOneEdit.compute(
            model, 1, [random_ids(batch=1, seed=9)[0]], torch.randn(d, generator=g), covariance=cov
        )
    if name == "MergeLora":
        return S.MergeLora(str(write_adapter(tmp_path / "adapter", model)), scale=0.7)
    if name == "Abliterate":  # a stack of per-layer directions, interpolated; separate attention/MLP weights
        return S.Abliterate(
            torch.randn(model.n_layers, d, generator=g),
            direction_index=0.6,
            attn_weights={0: 0.8, last: 1.3},
            mlp_weights={1: 0.5},
            strength=1.1,
        )
    if name == "AbliterateNormPreserving":  # peaked profile, row norms kept, embeddings too
        return S.Abliterate.peaked(
            torch.randn(d, generator=g),
            model.n_layers,
            attn=(1.4, 1, 0.2, 1.5),
            mlp=(0.9, last, 0.5, 1),
            norm_preserve=True,
            embeddings=True,
        )
    raise KeyError(name)


def snapshot(model) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "hooks": model.hook_names(),
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "history": list(model.edit_history),
    }


def assert_same(model, snap) -> None:
    state = model.state_dict()
    assert list(state) == list(snap["state"])
    for k, v in snap["state"].items():
        assert torch.equal(state[k], v), k
    assert model.config.to_dict() == snap["config"]
    assert model.hook_names() == snap["hooks"]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == snap["tied"]
    assert list(model.edit_history) == snap["history"]


CHILD = textwrap.dedent("""
    import signal, sys
    # a child owns its signal handling: under a non-interactive shell's background job SIGINT arrives
    # ignored, and Python then installs no KeyboardInterrupt handler of its own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.path.insert(0, {repo!r})
    import surgery
""")


API_EXPORT = CHILD + textwrap.dedent("""
    from hooks import HookedLlama
    from tests.helpers import tiny_hf
    surgery.export(HookedLlama.from_hf(tiny_hf("gqa")), {out!r}, edits=[surgery.ZeroHeads(0, [1])],
                   max_shard_size="20KB")
""")


BARRIER = textwrap.dedent("""
    import os as _os, time as _time
    from surgery.export.hf import HFExport as _HFExport
    _write_shard = _HFExport.write_shard
    def _barrier(self, path, entries):
        sha = _write_shard(self, path, entries)
        if path.name.startswith("model-00001-of-"):  # the first of several shards is on disk: signal, then wait
            _os.write({fd}, f"wrote {{path.name}}\\n".encode())
            _time.sleep(60)
        return sha
    _HFExport.write_shard = _barrier
""")


def interrupt_mid_write(script: str, parent: Path, sig: int) -> subprocess.CompletedProcess:
    """Run ``script`` (which starts with ``CHILD``), send ``sig`` while its export waits after its first shard,
    and wait for it to end. The child patches the write stage (``HFExport.write_shard``) to report on a pipe
    and pause there: the fault is injected by the test, never by production code."""
    read_end, write_end = os.pipe()
    script = script.replace("import surgery\n", "import surgery\n" + BARRIER.format(fd=write_end), 1)
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        pass_fds=(write_end,),
    )
    os.close(write_end)  # the child holds the only write end: EOF here means it ended before the barrier
    try:
        with os.fdopen(read_end, "rb") as barrier:
            ready, _, _ = select.select([barrier], [], [], 300)
            line = barrier.readline() if ready else b""
        if not line.startswith(b"wrote model-00001-of-"):
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(
                f"the export did not reach the barrier after its first shard (exit {proc.returncode}): {err[-2000:]}"
            )
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    done.pid = proc.pid  # temp dirs of a killed export carry it
    return done


def random_sae(arch: str, seed: int = 0, d_in: int = 64, d_sae: int = 192, **kw) -> SAE:
    base = "standard" if "transcoder" in arch else arch
    sae = SAE(SAEConfig(base, d_in, d_sae, "blocks.1.hook_resid_post", **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(
                torch.rand(p.shape, generator=g) * 0.3
                if name == "threshold"
                else torch.randn(p.shape, generator=g) * 0.3
            )
    return sae


def small_search_replays(model, tmp_path):
    """A 3-trial search on a few shipped prompts, checked: the front holds the chosen trial, the recorded KL
    is the chosen edit's first-token KL recomputed independently, and the plan file replays the chosen
    weights bit-exactly. Returns the result (also used by the GPU test)."""
    harmful, harmless = R.load_prompts("harmful:train")[:4], R.load_prompts("harmless:train")[:4]
    eval_harmless = R.load_prompts("harmless:eval")[:3]
    res = S.abliterate(
        model,
        harmful,
        harmless,
        eval_harmful=R.load_prompts("harmful:eval")[:2],
        eval_harmless=eval_harmless,
        trials=3,
        max_new_tokens=4,
        sampler="sobol",
    )
    assert len(res.trials) == 3 and res.chosen in res.front and res.trials[res.chosen]["refusals"] == res.after.count
    kl = R.prompt_kl(model, eval_harmless, fwd_hooks=res.edit.as_hooks(model))
    assert kl.mean == pytest.approx(res.kl, rel=1e-3, abs=1e-6)
    path = res.plan.save(tmp_path / "plan.yaml")
    with res.edit.applied(model):
        want = {k: v.clone() for k, v in model.state_dict().items()}
    with S.load_plan(path).applied(model):
        for k, v in model.state_dict().items():
            assert torch.equal(v, want[k]), k
    assert res.provenance["prompts_sha256"]["harmful"] == R.prompts_sha256(harmful)
    return res


def small_sentencepiece_tokenizer() -> LlamaTokenizer:
    """A ~300-token Llama-2-style tokenizer (BPE, byte fallback, metaspace) trained in memory."""
    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!", "GGUF files hold tensors."]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(corpus * 10, trainer)
    spec = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return LlamaTokenizer(vocab=spec["vocab"], merges=merges)


def apply_interop_skips(items, folder: Path, skips: dict[str, str], failing: dict[str, str] | None = None) -> None:
    """Mark every test collected under ``folder`` (an adapted TransformerLens / nnsight suite) ``interop``;
    skip those ``skips`` names (``"file.py::test"``, a class, or one parametrisation) with the reason given
    there, the one list of skips of that suite; and, on HookedLlama (``SCALPEL_INTEROP_TARGET`` unset or
    "scalpel"), mark those ``failing`` names as strict expected failures with their reason (a test that starts
    to pass fails the run, so the list stays true)."""
    folder = folder.resolve()
    on_scalpel = os.environ.get("SCALPEL_INTEROP_TARGET", "scalpel") == "scalpel"
    marks = [(skips, lambda reason: pytest.mark.skip(reason=reason))]
    if failing and on_scalpel:
        marks.append((failing, lambda reason: pytest.mark.xfail(reason=reason, strict=True)))
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if folder not in path.parents:
            continue
        item.add_marker(pytest.mark.interop)
        local = path.name + "::" + item.nodeid.split("::", 1)[1]
        for table, mark in marks:
            key = next((k for k in table if local == k or local.startswith((k + "[", k + "::"))), None)
            if key is not None:
                item.add_marker(mark(table[key]))
                break


@functools.lru_cache(maxsize=1)
def _smol_tokenizer():
    from transformers import AutoTokenizer

    from hooks.loading import DEFAULT_NAME, cache_root, default_gguf_path, sha256_file

    gguf = default_gguf_path()
    cached = cache_root() / f"{DEFAULT_NAME.lower()}-{sha256_file(gguf)[:16]}"
    if (cached / "tokenizer.json").is_file():  # the default model's cache (written by its first load)
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def smol_tokenizer():
    """The default model's (SmolLM2's) tokenizer, read once; a fresh copy each call (models and tests may
    change its settings, e.g. nnsight sets its padding side)."""
    return copy.deepcopy(_smol_tokenizer())


# --------------------------------------------------------------------------- headless Chromium
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=15000",
)


def chromium() -> str:
    """The chromium binary, or a skip (a failure under CI, whose .ci/run installs it)."""
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get install -y chromium")
        pytest.skip("chromium is not installed; install it with: apt-get install -y chromium")
    return found


def browse(page: Path, profile: Path, *, screenshot: Path | None = None, width: int = 1280, height: int = 900) -> str:
    """The DOM of ``page`` after headless Chromium ran its scripts (``--dump-dom``), or, with ``screenshot``,
    a PNG of the first ``width`` × ``height`` pixels written there (returns "")."""
    what = [f"--screenshot={screenshot}"] if screenshot is not None else ["--dump-dom"]
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", *what]
    proc = subprocess.run(cmd + [page.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
