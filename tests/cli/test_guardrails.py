"""The import contract (``.ci/check_imports.py``): layer order, no cycles, no private reach-ins, with imports
inside functions counted and ``if TYPE_CHECKING:`` imports left out; and the checkout keeps it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def checker():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / ".ci" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("_core", "hooks", "analyses", "surgery", "_cli"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_upward_imports_are_caught_even_inside_functions(tmp_path):
    root = tree(
        tmp_path,
        {
            "hooks/model.py": "def load():\n    from analyses import lens\n    return lens\n",
            "analyses/lens.py": "import hooks.model\n",
            "surgery/edit.py": "try:\n    import _cli.app\nexcept ImportError:\n    pass\n",
            "_cli/app.py": "",
        },
    )
    problems = checker().check(root)
    assert any(p.startswith("hooks/model.py:2: hooks.model imports analyses.lens, a higher layer") for p in problems)
    assert any(p.startswith("surgery/edit.py:2: surgery.edit imports _cli.app, a higher layer") for p in problems)
    assert not any(p.startswith("analyses/lens.py") for p in problems)  # downwards is fine


def test_cycles_and_private_reach_ins_are_caught_and_type_checking_imports_are_not(tmp_path):
    root = tree(
        tmp_path,
        {
            "hooks/a.py": "from . import b\n",
            "hooks/b.py": "def f():\n    from hooks.a import x\n",
            "hooks/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from analyses.x import Y\n",
            "hooks/d.py": "from hooks import e\n",
            "hooks/e.py": "import typing\nif typing.TYPE_CHECKING:\n    from hooks.d import D\n",
            "analyses/x.py": "",
            "surgery/_atomic.py": "",
            "_cli/app.py": "from surgery._atomic import replace\nfrom _core import errors\n",
            "_core/errors.py": "",
        },
    )
    problems = checker().check(root)
    cycles = [p for p in problems if p.startswith("import cycle")]
    assert len(cycles) == 1 and "hooks.a, hooks.b" in cycles[0] and "hooks/b.py:2" in cycles[0]
    assert [p for p in problems if "private module" in p] == [
        "_cli/app.py:1: _cli.app imports the private module surgery._atomic of another package; make what it "
        "needs public API or move it to _core"
    ]
    assert not any("hooks/c.py" in p or "hooks.d" in p for p in problems)


def test_the_checkout_keeps_the_contract():
    proc = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "check_imports.py")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("import contract kept:")


def test_the_architecture_page_lists_every_module_and_no_other():
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^- `([\w/]+\.py)`", text, re.M))
    layers = checker().LAYERS
    modules = {
        str(p.relative_to(ROOT))
        for top in layers
        for p in (ROOT / top).rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    } | {"cli.py"}
    assert sorted(modules - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - modules) == [], "docs/architecture.md lists modules that do not exist"
    for layer in layers[:-1]:
        assert f"\n{layer}" in text.split("```")[1], f"the layer diagram lacks {layer}"
