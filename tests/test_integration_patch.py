"""``patches/vllm-0.26.0-model-impl-mpk.patch``: it applies to the installed vLLM, and vLLM's
registry with the patch applied routes ``model_impl="mpk"`` to vllm_mpk without the plugin."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

vllm = pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[1]
PATCH = REPO / "patches" / "vllm-0.26.0-model-impl-mpk.patch"
SITE = Path(vllm.__file__).resolve().parents[1]
FILES = ("vllm/config/model.py", "vllm/model_executor/models/registry.py")


def run_patch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("patch") is None:
        pytest.skip("the patch tool is not installed")
    return subprocess.run(["patch", *args, "-p1", "-d", str(cwd)], input=PATCH.read_text(), capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def patched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of the two patched files with the patch applied."""
    if vllm.__version__ != "0.26.0":
        pytest.skip(f"the patch is made for vLLM 0.26.0, installed is {vllm.__version__}")
    root = tmp_path_factory.mktemp("site")
    for f in FILES:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SITE / f, root / f)
    out = run_patch("--forward", cwd=root)
    if out.returncode != 0 and "previously applied" in out.stdout:
        pytest.skip("the installed vLLM already carries the patch")
    assert out.returncode == 0, out.stdout + out.stderr
    return root


def test_patch_applies_to_the_installed_vllm() -> None:
    if vllm.__version__ != "0.26.0":
        pytest.skip(f"the patch is made for vLLM 0.26.0, installed is {vllm.__version__}")
    out = run_patch("--dry-run", "--forward", cwd=SITE)
    if out.returncode != 0 and run_patch("--dry-run", "--reverse", cwd=SITE).returncode == 0:
        return  # already applied to this installation
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAILED" not in out.stdout and "fuzz" not in out.stdout.lower()


def test_patched_model_impl_literal_has_mpk(patched: Path) -> None:
    tree = ast.parse((patched / FILES[0]).read_text())
    literal = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "ModelImpl" for t in node.targets))
    assert [e.value for e in literal.slice.elts] == ["auto", "vllm", "transformers", "terratorch", "mpk"]


def load_patched_registry(patched: Path) -> ModuleType:
    """The patched registry module, imported beside vLLM's own (its relative imports resolve in
    ``vllm.model_executor.models``); its classes are not the ones the plugin wraps."""
    name = "vllm.model_executor.models._registry_with_mpk_patch"
    spec = importlib.util.spec_from_file_location(name, patched / FILES[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_patched_registry_routes_mpk_to_vllm_mpk(patched: Path, tmp_path: Path) -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.registry import ModelRegistry

    from vllm_mpk.integration.model import is_mpk_class

    # The patched _ModelRegistry over vLLM's own registered models (inspected in vLLM's module).
    registry = load_patched_registry(patched)._ModelRegistry(dict(ModelRegistry.models))
    assert not getattr(type(registry).resolve_model_cls, "_vllm_mpk_wrapped", False)
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 64, "vocab_size": 1000, "max_position_embeddings": 512, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for impl, mpk in (("mpk", True), ("vllm", False)):
        mc = EngineArgs(model=str(tmp_path), model_impl=impl, skip_tokenizer_init=True).create_model_config()
        cls, arch = registry.resolve_model_cls(mc.architectures, mc)
        assert arch == "Qwen3ForCausalLM" and is_mpk_class(cls) == mpk
        info, _ = registry.inspect_model_cls(mc.architectures, mc)
        assert info.is_text_generation_model
