"""Every example notebook runs top to bottom through nbclient on the Parallax kernel."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ARTIFACTS, ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.ipynb"))


def run_notebook(path: Path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name="parallax", timeout=600, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    nbformat.write(nb, ARTIFACTS / f"{path.stem}.out.ipynb")
    return nb


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.extend(str(v) for v in out["data"].values())
    return "".join(parts)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_without_errors(path):
    nb = run_notebook(path)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"{path.name}: {out}"


def test_quickstart_outputs():
    nb = run_notebook(ROOT / "examples" / "quickstart.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "%magic" in outputs_text(code[0])
    assert "longest Collatz chain below 10 000 starts at 6171" in outputs_text(code[2])
    assert code[2].outputs[-1]["data"]["text/plain"] == "261"
    assert code[3].outputs[-1]["data"]["text/plain"] == '"6171"'
    html = [o for o in code[4].outputs if "text/html" in o.get("data", {})]
    assert html and "<b>261</b> steps" in html[0]["data"]["text/html"]
    # The engine pool part.
    assert "Started 2 engines" in outputs_text(code[5])
    engines_said = outputs_text(code[6])
    assert "[stdout:0] engine 0 of 2" in engines_said and "[stdout:1] engine 1 of 2" in engines_said
    found = sorted(o["data"]["text/plain"].split(": ")[1] for o in code[7].outputs if "engine" in o.get("metadata", {}))
    assert found == ["820022", "837799"]
    # %pmap, then data movement.
    assert "steps: Vec<u32> with 99999 results of `collatz_steps`" in outputs_text(code[8])
    assert code[9].outputs[-1]["data"]["text/plain"] == '"77031 takes 350 steps"'
    assert code[10].outputs[-1]["data"]["text/plain"] == "500500"
    assert "idle" in outputs_text(code[11])
    assert "Stopped 2 engines" in outputs_text(code[12])
