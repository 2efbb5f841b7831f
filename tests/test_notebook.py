"""docs/notebooks/training.ipynb runs top to bottom on a fresh kernel, and is stored clean."""

import os

import nbformat
from binaries import REPO
from nbclient import NotebookClient

NOTEBOOK = os.path.join(REPO, 'docs', 'notebooks', 'training.ipynb')


def test_the_notebook_is_stored_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert code
  assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_the_notebook_runs_offline_on_the_cpu(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': REPO}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
  printed = ''.join(output.get('text', '') for cell in notebook.cells if cell.cell_type == 'code'
                    for output in cell.outputs)
  assert 'current step: 34' in printed  # 11 + 20 + 2 + 1 steps
