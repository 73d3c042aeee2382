"""The layout holds: no two Rust files import each other (even through others), the controller
imports nothing of the Jupyter side, and files and functions stay readable in one sitting.
Read from the sources, as text: no build needed."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRATES = [ROOT / "kernel" / "src"] + sorted(p / "src" for p in (ROOT / "engines").iterdir() if (p / "src").is_dir()) + [ROOT / "magics" / "src"]
# A source file longer than this (tests apart) needs a reason in its first lines.
FILE_LINES = 600
FUNCTION_LINES = 120
LONG_FILE_REASON = "one sitting:"


def module_path(root: Path, file: Path) -> tuple:
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts.pop()
    return tuple(parts)


def crate_modules(root: Path) -> dict:
    return {module_path(root, f): f for f in root.rglob("*.rs")}


def without_tests(text: str) -> str:
    at = re.search(r"^#\[cfg\(test\)\]\s*\nmod tests", text, re.M)
    return text[: at.start()] if at else text


def use_paths(text: str):
    """Every path a file names: the trees of its `use` items expanded, and inline paths."""
    text = re.sub(r"//.*", "", text)
    for match in re.finditer(r"\buse\s+([^;]+);", text):
        tree = re.sub(r"\s+as\s+", "@", match.group(1))
        yield from expand(re.sub(r"\s+", "", tree))
    code = re.sub(r"\buse\s+[^;]+;", "", text)
    for match in re.finditer(r"\b((?:crate|super)(?:::\w+)+)", code):
        yield match.group(1)


def expand(tree: str):
    """`a::{b, c::{d, e}}` -> a::b, a::c::d, a::c::e."""
    brace = tree.find("{")
    if brace < 0:
        yield tree.split("@")[0]
        return
    prefix, inner = tree[:brace], tree[brace + 1 : tree.rfind("}")]
    depth, start = 0, 0
    for i, ch in enumerate(inner + ","):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            item = inner[start:i]
            start = i + 1
            if item:
                yield from expand(prefix + item)


def resolve(path: str, here: tuple, modules: dict):
    """The module file a path lands in (its longest prefix that is a module), if any."""
    parts = path.split("::")
    if parts[0] == "crate":
        base, rest = (), parts[1:]
    else:
        base = here
        while parts and parts[0] == "super":
            base = base[:-1]
            parts = parts[1:]
        rest = parts
    for end in range(len(rest), -1, -1):
        candidate = base + tuple(rest[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path) -> dict:
    """module -> modules it takes names from, leaving out its own submodules (a parent
    declaring or re-exporting its children contains them, it does not depend on them)."""
    modules = crate_modules(root)
    graph = {}
    for module, file in modules.items():
        edges = set()
        for path in use_paths(without_tests(file.read_text())):
            if not path.startswith(("crate::", "super::")):
                continue
            target = resolve(path, module, modules)
            if target is None or target == module or target[: len(module)] == module:
                continue
            edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted("::".join(m) or "crate" for m in component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_two_files_import_each_other():
    for root in CRATES:
        found = cycles(import_graph(root))
        assert not found, f"{root.relative_to(ROOT)}: import loops {found}"


def test_the_loop_finder_finds_loops():
    graph = {("a",): {("b",)}, ("b",): {("c",)}, ("c",): {("a",)}, ("d",): {("a",)}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert list(expand("a::{b,c::{d,e@f}}")) == ["a::b", "a::c::d", "a::c::e"]


def test_the_controller_imports_nothing_of_the_jupyter_side():
    root = ROOT / "kernel" / "src"
    modules = crate_modules(root)
    jupyter_side = {("jupyter",), ("cell",), ("magic",), ("dashboard",)}
    graph = import_graph(root)
    for module, targets in graph.items():
        if module[:1] != ("controller",):
            continue
        for target in targets:
            assert target[:1] not in {m[:1] for m in jupyter_side}, (
                f"{modules[module].relative_to(ROOT)} imports {'::'.join(target)}"
            )


def function_lengths(text: str):
    """(name, lines) of each `fn` body, by matching braces from its opening line."""
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?(?:unsafe\s+)?fn\s+(\w+)", line)
        if not match:
            continue
        depth, opened = 0, False
        for end in range(number, len(lines)):
            stripped = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)\'|//.*', "", lines[end])
            depth += stripped.count("{") - stripped.count("}")
            opened = opened or "{" in stripped
            if opened and depth <= 0:
                yield match.group(1), end - number + 1
                break
            if not opened and stripped.rstrip().endswith(";"):
                break


def test_files_and_functions_stay_readable_in_one_sitting():
    long = []
    for root in CRATES:
        for file in root.rglob("*.rs"):
            text = file.read_text()
            code = without_tests(text)
            head = "\n".join(text.splitlines()[:12])
            if len(code.splitlines()) > FILE_LINES and LONG_FILE_REASON not in head:
                long.append(f"{file.relative_to(ROOT)}: {len(code.splitlines())} lines")
            for name, count in function_lengths(code):
                if count > FUNCTION_LINES:
                    long.append(f"{file.relative_to(ROOT)}: fn {name} has {count} lines")
    assert not long, "\n".join(long)


def test_the_architecture_walk_names_functions_that_exist():
    """Every `path: function` step of ARCHITECTURE.md is a file with that function in it."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    steps = re.findall(r"`([\w/]+\.rs):\s+([\w:]+)`", re.sub(r"\n\s+", " ", text))
    assert len(steps) > 20, steps
    missing = []
    for path, name in steps:
        file = ROOT / path
        function = name.split("::")[-1]
        if not file.exists() or not re.search(rf"\bfn\s+{function}\b", file.read_text()):
            missing.append(f"{path}: {name}")
    assert not missing, missing
