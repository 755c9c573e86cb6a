"""Files stay short enough to read in one sitting: no module in jaxsd/ over 450 lines, no
function (method, nested function) over 80 lines, measured from `def` to its last line, and
the training loop itself at most 200 lines (the parts live in build / rollout_worker / learner)."""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "jaxsd"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
MAX_LOOP_LINES = 200


def function_lengths(source: str) -> dict[str, int]:
    """{qualified name: lines from `def` to the body's last line} for every function in
    `source`, methods and nested functions included ("Class.method", "outer.inner")."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


def _over_the_limits() -> tuple[set[str], set[str]]:
    modules, functions = set(), set()
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            modules.add(rel)
        for name, lines in function_lengths(source).items():
            if lines > MAX_FUNCTION_LINES:
                functions.add(f"{rel}:{name}")
    return modules, functions


def test_function_lengths_count_def_to_last_line_at_any_depth():
    statements = [f"x{i} = {i}" for i in range(79)]
    fits = ["def fits():"] + ["    " + line for line in statements]  # 80 lines
    over = ["class C:", "    @staticmethod", "    def over():"]
    over += ["        " + line for line in statements + ["return 0"]]  # def + 80: 81 lines
    nested = ["def outer():", "    def inner():", "        return 1", "    return inner"]
    lengths = function_lengths("\n".join(fits + over + nested) + "\n")
    assert lengths == {"fits": 80, "C.over": 81, "outer": 4, "outer.inner": 2}


def test_no_module_or_function_over_the_limits():
    modules, functions = _over_the_limits()
    assert not modules and not functions, (
        f"over {MAX_MODULE_LINES} lines: {sorted(modules)}; functions over "
        f"{MAX_FUNCTION_LINES} lines: {sorted(functions)}. Split them along a real seam (one "
        "job per module/function)"
    )
    loop_lines = len((PKG / "train" / "loop.py").read_text().splitlines())
    assert loop_lines <= MAX_LOOP_LINES, f"jaxsd/train/loop.py has {loop_lines} lines"
