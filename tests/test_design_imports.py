"""docs/design.md against the code: each module imports exactly the project modules the page names,
and no module is missing from the page."""

import ast
import re

from conftest import ROOT

OURS = {p.stem for p in (ROOT / "keras").glob("*.py")} | {"infinite_generator_3D"}


def _is_main_guard(node: ast.AST) -> bool:
    # `if __name__ == "__main__":` blocks run only as a script; docs/design.md names that case.
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _imported_modules(path) -> set[str]:
    """Every project module `path` imports, at top level or inside functions."""
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.add(child.module.split(".")[0])
            visit(child)

    visit(ast.parse(path.read_text()))
    return found & OURS


def _design_table() -> dict[str, set[str]]:
    rows = {}
    text = (ROOT / "docs" / "design.md").read_text()
    for line in text.splitlines():
        m = re.match(r"^\| `((?:keras/)?\w+)\.py` \|[^|]*\|([^|]*)\|$", line)
        if m:
            named = set(re.findall(r"`(\w+)`", m.group(2)))
            rows[m.group(1)] = named & OURS
    return rows


def test_every_module_is_on_the_design_page():
    table = _design_table()
    on_page = {name.split("/")[-1] for name in table}
    assert on_page == OURS, f"missing: {OURS - on_page}, not in the code: {on_page - OURS}"


def test_the_design_page_names_each_module_s_imports():
    for name, named in _design_table().items():
        actual = _imported_modules(ROOT / f"{name}.py")
        assert actual == named, f"{name}.py imports {sorted(actual)}; the page says {sorted(named)}"


def test_extraction_and_transforms_stay_free_of_keras_and_the_model_of_our_modules():
    def imports(path):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        return names

    for path in (
        ROOT / "infinite_generator_3D.py",
        *sorted((ROOT / "keras").glob("extraction_*.py")),
        ROOT / "keras" / "volume_io.py",
        ROOT / "keras" / "finetune_cases.py",
        ROOT / "keras" / "transforms.py",
        ROOT / "keras" / "genesis_kernels.py",
        ROOT / "keras" / "config.py",
        ROOT / "keras" / "genesis_files.py",
        ROOT / "keras" / "finetune_augment.py",
    ):
        assert not imports(path) & {"keras", "tensorflow", "jax", "torch"}, path
    assert not imports(ROOT / "keras" / "unet3d.py") & OURS
