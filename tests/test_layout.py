"""Design rules of DESIGN.md that the layout must keep: rooms import only what they may."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "jaxsd"

# room -> jaxsd sub-packages it must never import
FORBIDDEN = {
    "losses": ("models", "train", "algorithms", "rollout", "tasks"),
    "algorithms": ("models", "train"),
    "tasks": ("models", "train", "algorithms", "rollout"),
}


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            prefix = "." * node.level
            names.add(prefix + node.module)
    return names


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_imports_stay_inside_their_allowance(room):
    offenders = []
    for path in sorted((PKG / room).rglob("*.py")):
        for mod in _imported_modules(path):
            for other in FORBIDDEN[room]:
                relative_sibling = mod.startswith("..") and mod.lstrip(".").startswith(other)
                if mod.startswith(f"jaxsd.{other}") or relative_sibling:
                    offenders.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not offenders, "layout rule broken:\n" + "\n".join(offenders)
