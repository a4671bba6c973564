"""The package's shape: imports point one way, and the documented paths still import."""

import importlib
import subprocess
import sys

import grimp
import pytest

import lorakit


def test_no_module_imports_one_that_imports_it_back() -> None:
    # every import counts: module level, inside functions, and under `if TYPE_CHECKING:`
    graph = grimp.build_graph("lorakit")
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                cycles.append(" -> ".join((importer, *back)))
    assert cycles == []


def test_a_planted_cycle_is_found(tmp_path, monkeypatch) -> None:
    # the check above can fail: two modules that import each other are reported
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic import b\n")
    (package / "b.py").write_text("def f():\n    from cyclic import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyclic")
    assert graph.find_shortest_chain(importer="cyclic.b", imported="cyclic.a") == ("cyclic.b", "cyclic.a")


def test_the_layers_contract_holds() -> None:
    done = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command(['--no-cache', '--config', 'pyproject.toml'])"],
                          capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert "0 broken" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("path", ["lorakit.serve.Engine", "lorakit.kernels.enable_fast_path",
                                  "lorakit.kernels.FastPathConfig", "lorakit.demo.make_data.main"])
def test_documented_deep_paths_still_import(path: str) -> None:
    module, name = path.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), name))


def test_the_public_names_stay() -> None:
    for name in ["LoraConfig", "LoraEmbedding", "LoraLinear", "active_adapters", "add_adapter", "delete_adapter",
                 "disable_adapters", "forward_mixed", "inject", "load_adapter", "load_model", "lora_mixed_delta",
                 "merge", "merge_and_unload", "mixed_batch", "read_adapter", "save_adapter", "set_adapter",
                 "trainable_parameters", "unload", "unmerge"]:
        assert name in lorakit.__all__ and callable(getattr(lorakit, name)), name
    from lorakit import kernels
    from lorakit.train import fastpath

    assert kernels.enable_fast_path is fastpath.enable_fast_path
