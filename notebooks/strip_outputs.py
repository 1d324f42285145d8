"""Remove outputs and execution counts from notebooks, so they are committed clean:
python notebooks/strip_outputs.py notebooks/*.ipynb   (make strip-notebooks)"""

import sys

import nbformat

for path in sys.argv[1:]:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(notebook, path)
