"""Runs a notebook on the Parallax kernel with nbclient and prints each cell's outputs."""

import sys

import nbformat
from nbclient import NotebookClient


def main(path: str) -> int:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="parallax", timeout=600).execute()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        print(f"In [{cell.execution_count}]: " + cell.source.replace("\n", "\n    ...: "))
        for out in cell.outputs:
            if out.output_type == "stream":
                print(out.text, end="" if out.text.endswith("\n") else "\n")
            elif out.output_type == "error":
                print("\n".join(out.traceback))
            elif "data" in out:
                data = out.data
                text = data.get("text/plain") or next(iter(data.values()), "")
                prefix = f"Out[{cell.execution_count}]: " if out.output_type == "execute_result" else ""
                print(prefix + str(text))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
