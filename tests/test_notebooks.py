"""Every notebook's code runs top to bottom (so the walkthroughs never rot)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def run_notebook(path) -> None:
    cells = json.loads(path.read_text())["cells"]
    source = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    exec(compile(source, str(path), "exec"), {"__name__": "__notebook__"})


@pytest.fixture(autouse=True)
def no_windows(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # plt.show() draws off-screen


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"01_qwen2_port_vs_hf.ipynb", "loss_math.ipynb"}


def test_the_port_walkthrough_shows_parity(capsys):
    run_notebook(NOTEBOOKS[[p.name for p in NOTEBOOKS].index("01_qwen2_port_vs_hf.ipynb")])
    printed = capsys.readouterr().out
    diffs = [float(line.rsplit(":", 1)[1].split()[0]) for line in printed.splitlines() if "max |diff|" in line]
    assert len(diffs) >= 4 and max(diffs) < 1e-4, printed


def test_the_loss_walkthrough_runs_and_shows_the_clip(capsys):
    run_notebook(NOTEBOOKS[[p.name for p in NOTEBOOKS].index("loss_math.ipynb")])
    printed = capsys.readouterr().out
    assert "  1.50 |    -1.280       1 |     1.500       0 |     1.500    0" in printed
    assert "token-mean                per-token weight: long 0.1000, short 0.1000" in printed
    assert "{16384: 0.0, 18432: -0.5, 20480: -1.0}" in printed
