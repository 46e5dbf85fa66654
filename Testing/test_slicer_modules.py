"""Static checks of the Slicer GUI files (no Slicer application here): the module files
compile, every `self.ui.<name>` exists in the .ui, every SlicerParameterName is a field of
the module's parameter node, and the CMake lists name files that exist."""

import ast
import py_compile
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["USDespeckle", "USRegistration"]


def _ui(module: str) -> ElementTree.Element:
    return ElementTree.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui").getroot()


def _parameter_fields(module: str) -> set[str]:
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError(f"{module}.py has no @parameterNodeWrapper class")


@pytest.mark.parametrize("module", MODULES)
def test_module_file_compiles(module, tmp_path):
    py_compile.compile(str(ROOT / module / f"{module}.py"), cfile=str(tmp_path / "m.pyc"), doraise=True)


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_widget_used_exists(module):
    names = {widget.get("name") for widget in _ui(module).iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (ROOT / module / f"{module}.py").read_text()))
    assert used and used <= names, f"missing in the .ui: {sorted(used - names)}"


@pytest.mark.parametrize("module", MODULES)
def test_every_slicer_parameter_name_is_a_parameter_node_field(module):
    bound = {prop.find("string").text for prop in _ui(module).iter("property")
             if prop.get("name") == "SlicerParameterName"}
    fields = _parameter_fields(module)
    assert bound and bound <= fields, f"not parameter-node fields: {sorted(bound - fields)}"


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_name_existing_files(module):
    text = (ROOT / module / "CMakeLists.txt").read_text()
    assert f"set(MODULE_NAME {module})" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    for listed in re.findall(r"Resources/\S+", text):
        assert (ROOT / module / listed.replace("${MODULE_NAME}", module)).exists(), listed
    top = (ROOT / "CMakeLists.txt").read_text()
    assert f"add_subdirectory({module})" in top and 'set(EXTENSION_DEPENDS "PyTorch")' in top


def test_module_file_imports_no_torch_at_import_time():
    """torch may be missing in Slicer until the user installs it: the module must still load."""
    for module in MODULES:
        tree = ast.parse((ROOT / module / f"{module}.py").read_text())
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = {alias.name for node in top_level if isinstance(node, ast.Import) for alias in node.names} | \
                {node.module for node in top_level if isinstance(node, ast.ImportFrom)}
        assert not any(name and (name.startswith("torch") or name.startswith("us3d.models") or
                                 name in ("us3d.despeckling", "us3dmrml.despeckle")) for name in names)


def test_slicer_requirements_are_the_lower_bounds_of_the_package():
    """What the modules pip-install into Slicer's Python equals pyproject's lower bounds, no pins."""
    import tomllib

    from us3d.dependencies import PIP_REQUIREMENTS

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(PIP_REQUIREMENTS.values()) <= set(declared)
    assert all(">=" in requirement and "==" not in requirement for requirement in PIP_REQUIREMENTS.values())


def test_too_old_torch_is_reported_without_importing_it(monkeypatch):
    """The modules refuse a PyTorch older than the bundled TorchScript files need, with one sentence
    that says what to do (issue 13, defect 8); the version comes from the package metadata."""
    import importlib.metadata

    from us3d import dependencies

    assert dependencies.torch_version_problem("2.4.1+cu121") is None
    assert dependencies.torch_version_problem("2.13.0") is None
    message = dependencies.torch_version_problem("2.2.2+cpu")
    assert message and "2.2.2+cpu" in message and dependencies.TORCH_REQUIREMENT in message
    assert dependencies.torch_version_problem() is None  # the torch this suite runs on
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.13.1")
    monkeypatch.setattr(dependencies, "missing_packages", lambda: [])
    assert "1.13.1" in dependencies.dependency_problem()
    monkeypatch.setattr(dependencies, "missing_packages", lambda: ["numba"])
    assert "numba" in dependencies.dependency_problem()


def test_cuda_probe_does_not_import_torch(monkeypatch):
    """The panels grey out "cuda" without importing torch on Slicer's GUI thread (seconds of freeze)."""
    import importlib.metadata
    import subprocess
    import sys

    code = ("import sys; from us3d.dependencies import cuda_may_be_available; cuda_may_be_available(); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    from us3d import dependencies

    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.13.0+cpu")
    assert dependencies.cuda_may_be_available() is False
