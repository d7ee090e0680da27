"""llama.cpp-ready outputs, run in llama.cpp itself (llama-cpp-py-sync's prebuilt library, installed once under
$SCALPEL_CACHE by _llamacpp_env when the extra is missing): quantised GGUFs of the default model (Q8_0, Q4_K_M) whose recorded top-1 agreement and KL
are llama.cpp's own numbers against the in-memory model, tensors checked independently with gguf-py's
dequantiser; control vectors that llama.cpp applies as our hooks do (the file read by llama.cpp's own GGUF
parser), with the same greedy text, and by ``llama-completion --control-vector`` where a llama.cpp build is at
hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _llamacpp_env import completion_binary, ensure  # noqa: E402

import surgery  # noqa: E402
from _core.writer import sha256_file  # noqa: E402
from analyses import steering_direction  # noqa: E402
from analyses.refusal import load_prompts, refusal_directions  # noqa: E402
from surgery import ControlVector, EditError, ExportError, ParityError  # noqa: E402

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]
TOPICS = ["the ocean", "my new job", "the weekend", "winter"]


@pytest.fixture(scope="module")
def llamacpp():
    ensure()  # the installed extra, or the cached install (~10 s, once)


@pytest.fixture(scope="module")
def f16(smol, llamacpp, tmp_path_factory):
    torch.set_num_threads(2)
    path = tmp_path_factory.mktemp("gguf") / "smol.f16.gguf"
    surgery.export_gguf(smol, path, dtype="f16")
    return path


@pytest.fixture(scope="module")
def quants(smol, f16):
    out = f16.parent / "smol-gguf"
    return surgery.quantize_gguf(f16, out, ["Q8_0", "Q4_K_M"], model=smol), out


def test_prebuilt_library_loads_here_untouched(llamacpp):
    """The wheel's library is used as installed on glibc >= 2.38; on an older glibc from a copy under
    $SCALPEL_CACHE that differs from it only in the few bytes that rebind the C23 imports."""
    import llama_cpp_py_sync

    from surgery.llamacpp import C23_GLIBC, _glibc, require_llamacpp

    lc = require_llamacpp()
    package = Path(llama_cpp_py_sync.__file__).parent
    glibc = _glibc()
    if glibc is None or glibc >= C23_GLIBC:
        assert lc.directory == package
        return
    assert lc.directory != package and json.loads((lc.directory / "scalpel_manifest.json").read_text())["llamacpp"]
    for name in ("libllama.so", "libggml-base.so.0", "libggml-cpu.so.0"):
        ours, theirs = (lc.directory / name).read_bytes(), (package / name).read_bytes()
        assert len(ours) == len(theirs) and 0 < sum(a != b for a, b in zip(ours, theirs)) <= 64
    assert lc.lib.llama_max_devices() >= 1  # a call into the loaded library


def test_quantised_files_agree_with_the_model_in_llamacpp(smol, quants):
    q, out = quants
    assert sorted(p.name for p in out.iterdir()) == ["scalpel_manifest.json", "smol-Q4_K_M.gguf", "smol-Q8_0.gguf"]
    assert q.source_check.top1_agreement == 1.0 and q.source_check.kl_mean < 1e-4  # llama.cpp reads our f16
    q8, q4 = q.files["Q8_0"], q.files["Q4_K_M"]
    assert q8.top1_agreement >= 0.95 and q8.kl_mean < 0.02
    assert q4.top1_agreement >= 0.7 and q4.kl_mean < 0.2 and q4.kl_mean > q8.kl_mean
    assert q4.bytes < q8.bytes < 0.6 * (out.parent / "smol.f16.gguf").stat().st_size
    manifest = json.loads((out / "scalpel_manifest.json").read_text())["llamacpp"]
    assert manifest["tokenizer_match"] is True and manifest["reference"] == "model"
    assert manifest["quantized"]["Q4_K_M"]["kl_mean"] == q4.kl_mean
    assert manifest["quantized"]["Q8_0"]["sha256"] == sha256_file(q8.path)
    # recomputed here: llama.cpp's logits on a prompt of our own against the model's
    from surgery.llamacpp import LlamaCppModel, agreement

    ids = smol.to_tokens("Paris is the capital of")[0].tolist()
    with torch.no_grad():
        ours = smol(torch.tensor([ids]))[0]
    with LlamaCppModel(q8.path) as lm:
        own = agreement([ours], [lm.logits(ids)])
    assert own.top1_agreement >= 0.6 and own.kl_mean < 0.05  # 5 positions, Q8_0's recorded KL ~0.005


def test_q8_tensors_dequantise_to_the_weights(smol, quants):
    """gguf-py's own dequantiser: the Q8_0 file holds the model's weights to Q8_0 precision (a block of 32
    values shares one scale: error ≤ half a step of absmax/127)."""
    import gguf

    reader = gguf.GGUFReader(quants[0].files["Q8_0"].path)
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(smol.d_model, -1)
    ref = smol.model.layers[3].mlp.down_proj.weight.detach().half().float()
    step = ref.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
    assert ((w.reshape(-1, 32) - ref.reshape(-1, 32)).abs() <= 0.51 * step + 1e-3).all()


def test_refusals_before_any_work(smol, quants, f16, tmp_path):
    q, _ = quants
    with pytest.raises(ExportError, match="already quantised"):
        surgery.quantize_gguf(q.files["Q8_0"].path, tmp_path / "x", "Q4_K_M")
    with pytest.raises(ExportError, match="unknown quantisation type 'Q4_K_Z'.*Q4_K_M"):
        surgery.quantize_gguf(f16, tmp_path / "x", "q4_k_z")
    with pytest.raises(ParityError, match="nothing was written"):
        surgery.quantize_gguf(f16, tmp_path / "strict", "Q4_K_M", model=smol, min_top1=1.0)
    assert not (tmp_path / "strict").exists()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError):
        surgery.quantize_gguf(f16, tmp_path / "theirs", "Q8_0", overwrite=True)
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"


def test_control_vector_steers_llamacpp_as_our_hooks(smol, f16, tmp_path):
    joy = [[{"role": "user", "content": f"Write one sentence about {t}. Make it joyful."}] for t in TOPICS]
    gloom = [[{"role": "user", "content": f"Write one sentence about {t}. Make it sad and gloomy."}] for t in TOPICS]
    d = steering_direction(smol, joy, gloom, layer=10)
    cv = ControlVector.from_steering(d, strength=0.15)
    path = cv.save(tmp_path / "joy.cvec.gguf", model=smol)
    import gguf

    reader = gguf.GGUFReader(path)  # llama.cpp's layout, read by another reader
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert [t.name for t in reader.tensors] == ["direction.10"]
    torch.testing.assert_close(
        torch.from_numpy(reader.tensors[0].data.copy()), 0.15 * d.resid_norm * d.unit, rtol=0, atol=1e-5
    )
    res = surgery.check_control_vector(path, f16, smol)
    # llama.cpp with the file = our hooks, to the f16 file's own precision; and the push is real
    assert res["steered"].top1_agreement == 1.0 and res["steered"].kl_mean < 3 * res["unsteered"].kl_mean + 1e-5
    assert res["shift"] == pytest.approx(res["ours_shift"], rel=0.05) and res["shift"] > 100 * res["steered"].kl_mean
    # greedy text: llama.cpp with the file's vectors (as its GGUF parser reads them) = the hooked model
    from surgery.llamacpp import LlamaCppModel, read_gguf_f32

    prompt = "Write one sentence about the park. It was"
    with smol.hooks(fwd_hooks=cv.hooks()):
        ours = smol.generate(prompt, max_new_tokens=12, return_type="completion")
    plain = smol.generate(prompt, max_new_tokens=12, return_type="completion")
    _, tensors = read_gguf_f32(path)
    with LlamaCppModel(f16) as lm:
        ids = lm.tokenize(prompt)
        assert ids == smol.to_tokens(prompt)[0].tolist()
        lm.set_control_vector({10: tensors["direction.10"]})
        steered_text = smol.tokenizer.decode(lm.greedy(ids, 12))
    assert steered_text == ours and ours != plain
    # llama.cpp's own --control-vector loader (llama-completion), where a llama.cpp build is at hand
    binary = completion_binary()
    if binary is None:
        return
    run = subprocess.run(
        [binary, "-m", f16, "-p", prompt, "-n", "12", "--temp", "0", "-no-cnv", "--no-display-prompt"]
        + ["-t", "2", "--no-warmup", "--control-vector", path],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(ours.strip()) and ours != plain


def test_refusal_direction_as_a_control_vector(smol, f16, tmp_path):
    dirs = refusal_directions(smol, load_prompts("harmful:train")[:8], load_prompts("harmless:train")[:8])
    cv = ControlVector.from_refusal(dirs, 14)
    r = dirs.directions[14].double()
    gap = float((dirs.harmful_mean[14].double() - dirs.harmless_mean[14].double()) @ r)
    torch.testing.assert_close(cv.vectors[14].double(), -gap * r, rtol=0, atol=1e-5)
    path = cv.save(tmp_path / "refusal.cvec.gguf", model=smol)
    res = surgery.check_control_vector(path, f16, smol)
    assert res["steered"].top1_agreement >= 0.97 and res["shift"] == pytest.approx(res["ours_shift"], rel=0.05)
    with pytest.raises(EditError, match="no control-vector slot for layer 0"):
        ControlVector.from_refusal(dirs, 0)


def test_cli_edit_writes_quantised_files(llamacpp, tmp_path, monkeypatch, capsys):
    """``scalpel edit --format gguf --gguf-quant``: the GGUF and, beside it, the quantised set with its manifest;
    a bad type or the flag without --format gguf is one line and exit 2, before any work."""
    from tests.helpers import build_tiny, run

    tiny = build_tiny(tmp_path / "tiny")
    surgery.save_plan(surgery.EditPlan([surgery.ZeroHeads(1, [0])]), tmp_path / "plan.yaml")
    monkeypatch.chdir(tmp_path)
    base = ["edit", "plan.yaml", "--model", str(tiny), "--format", "gguf", "--out", "t.f16.gguf", "--gguf-dtype", "f16"]
    code, out, err = run(base + ["--gguf-quant", "Q8_0,q4_k_m", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["quantized"]["out_dir"] == "t-gguf" and doc["quantized"]["reference"] == "model"
    assert sorted(p.name for p in Path("t-gguf").iterdir()) == ["scalpel_manifest.json", "t-Q4_K_M.gguf", "t-Q8_0.gguf"]
    rows = {r["file"]: r for r in doc["quantized"]["rows"]}
    assert rows["t-Q8_0.gguf"]["top1_agreement"] >= 0.9 and rows["source (llama.cpp)"]["top1_agreement"] == 1.0
    code, _, err = run(base[:-4] + ["--out", "u.gguf", "--gguf-quant", "Q9_K"], capsys)
    assert code == 2 and "--gguf-quant Q9_K" in err and "Q4_K_M" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(base[:4] + ["--out", "v", "--gguf-quant", "Q8_0"], capsys)
    assert code == 2 and "--gguf-quant" in err and "--format gguf" in err
    assert not any(Path(n).exists() for n in ("u.gguf", "u-gguf", "v"))
