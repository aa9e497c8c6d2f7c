"""Every notebook's code runs top to bottom (so the walkthroughs never rot)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(notebook, capsys):
    cells = json.loads(notebook.read_text())["cells"]
    source = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    exec(compile(source, str(notebook), "exec"), {"__name__": "__notebook__"})
    printed = capsys.readouterr().out
    diffs = [float(line.rsplit(":", 1)[1].split()[0]) for line in printed.splitlines() if "max |diff|" in line]
    assert len(diffs) >= 4 and max(diffs) < 1e-4, printed
