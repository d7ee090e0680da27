"""llama.cpp control vectors without llama.cpp: the file layout (read back by gguf-py's reader), the vectors
each builder gives (from a steering direction, a steer(), an AddSteering edit, a refusal direction), the
hook form, and the refusals; and quantize_gguf's checks that come before llama.cpp is needed."""

import sys

import pytest
import torch

import surgery
from analyses import steer, steering_direction
from hooks import HookedLlama
from surgery import ControlVector, EditError, ExportError, load_control_vector
from surgery.llamacpp import check_quant_types
from tests.helpers import tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return HookedLlama.from_hf(tiny_hf("gqa", initializer_range=0.1))


@pytest.fixture(scope="module")
def direction(model):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 128, (3, 6), generator=g), torch.randint(3, 128, (3, 6), generator=g)
    return steering_direction(model, a, b, layer=1)


def test_file_layout_is_llamacpps(model, direction, tmp_path):
    import gguf

    cv = ControlVector.from_steering(direction, strength=0.2)
    path = cv.save(tmp_path / "cv.gguf", model=model)
    reader = gguf.GGUFReader(path)
    field = reader.fields
    assert bytes(field["general.architecture"].parts[-1]).decode() == "controlvector"
    assert bytes(field["controlvector.model_hint"].parts[-1]).decode() == "llama"
    assert int(field["controlvector.layer_count"].parts[-1][0]) == 1
    (t,) = reader.tensors
    assert t.name == "direction.1" and t.tensor_type == gguf.GGMLQuantizationType.F32
    vec = torch.from_numpy(t.data.copy())
    torch.testing.assert_close(vec, 0.2 * direction.resid_norm * direction.unit, rtol=0, atol=1e-6)
    back = load_control_vector(path)
    assert list(back.vectors) == [1] and torch.equal(back.vectors[1], cv.vectors[1])
    with pytest.raises(ExportError):  # an existing file is not replaced without overwrite
        cv.save(path, model=model)
    cv.save(path, model=model, overwrite=True)  # ours and unchanged: replaced


def test_builders_and_the_hook_form(model, direction):
    x = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    s = steer(model, direction, scale=2.5)
    cv = ControlVector.from_steering(s)
    torch.testing.assert_close(cv.vectors[1], 2.5 * direction.unit)
    with torch.no_grad():
        a = model.run_with_hooks(x, fwd_hooks=s.fwd_hooks)
        b = model.run_with_hooks(x, fwd_hooks=cv.hooks())
        c = model.run_with_hooks(x, fwd_hooks=ControlVector.from_steering(direction, scale=1.25).hooks(2.0))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
    edit = surgery.AddSteering(2, direction.unit, 3.0)
    assert torch.equal(ControlVector.from_steering(edit).vectors[2], 3.0 * direction.unit)
    with torch.no_grad(), edit.applied(model):  # the bias after layer 2's MLP = the control vector's addition
        baked = model(x)
    with torch.no_grad():
        cv_run = model.run_with_hooks(x, fwd_hooks=ControlVector.from_steering(edit).hooks())
    torch.testing.assert_close(cv_run, baked, rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(2)
    a2, b2 = torch.randint(3, 128, (3, 6), generator=g), torch.randint(3, 128, (3, 6), generator=g)
    pre = steering_direction(model, a2, b2, layer=2, at="resid_pre")
    assert list(ControlVector.from_steering(pre, scale=1.0).vectors) == [1]  # resid_pre 2 = resid_post 1


def test_refusal_activation_subtraction(model):
    from analyses.refusal import RefusalDirections

    g = torch.Generator().manual_seed(3)
    L, M = model.n_layers, model.d_model
    dirs = torch.nn.functional.normalize(torch.randn(L, M, generator=g), dim=-1)
    hm, hl = torch.randn(L, M, generator=g), torch.randn(L, M, generator=g)
    rd = RefusalDirections(dirs, torch.ones(L), torch.ones(L), hm, hl, [-1], False, None)
    cv = ControlVector.from_refusal(rd, 2, scale=0.5)
    gap = float((hm[2] - hl[2]) @ dirs[2])
    torch.testing.assert_close(cv.vectors[2], -0.5 * gap * dirs[2], rtol=0, atol=1e-6)
    # the harmful mean's projection moves onto the harmless mean's
    moved = hm[2] + ControlVector.from_refusal(rd, 2).vectors[2]
    assert float(moved @ dirs[2]) == pytest.approx(float(hl[2] @ dirs[2]), abs=1e-5)


def test_refusals(model, direction):
    with pytest.raises(EditError, match="no control-vector slot for layer 0"):
        ControlVector({0: torch.ones(model.d_model)})
    with pytest.raises(EditError, match="every position"):
        ControlVector.from_steering(steer(model, direction, scale=1.0, positions=[0]))
    with pytest.raises(EditError, match="differ in size"):
        ControlVector({1: torch.ones(4), 2: torch.ones(5)})
    with pytest.raises(EditError, match="NaN"):
        ControlVector({1: torch.tensor([float("nan")] * 4)})
    with pytest.raises(EditError, match="d_model"):
        ControlVector({1: torch.ones(5)}).check_fits(model)
    assert check_quant_types("q4_k_m,Q8_0".split(",")) == ["Q4_K_M", "Q8_0"]
    with pytest.raises(ExportError, match="unknown quantisation type 'IQ2_XS'"):
        check_quant_types(["IQ2_XS"])


def test_quantize_without_llamacpp_names_the_install(tmp_path, monkeypatch):
    import surgery.llamacpp as lcpp
    from surgery.llamacpp import require_llamacpp

    monkeypatch.setattr(lcpp, "_LOADED", None)
    monkeypatch.setitem(sys.modules, "llama_cpp_py_sync", None)  # import llama_cpp_py_sync raises ImportError
    with pytest.raises(ExportError, match=r"llama.cpp is not installed; pip install 'llama-scalpel\[llamacpp\]'"):
        require_llamacpp()
    with pytest.raises(ExportError, match="does not exist"):
        surgery.quantize_gguf(tmp_path / "missing.gguf", tmp_path / "q", "Q8_0")
