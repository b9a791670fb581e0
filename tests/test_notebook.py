"""notebooks/quickstart.ipynb as a user runs it, executed headless by nbclient on the smoke variant."""

import os
import signal
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_the_notebook_is_committed_without_outputs_and_with_one_parameters_cell():
    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def _stop_tensorboards(logdir: str) -> None:
    from tensorboard import manager

    for info in manager.get_all():
        if logdir in info.logdir:
            os.kill(info.pid, signal.SIGTERM)


def _tensorboard_binary(folder) -> str:
    """tests/tensorboard_one_copy.py as an executable (TensorBoard's notebook magic runs a program)."""
    path = os.path.join(folder, "tensorboard")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" "{REPO}/tests/tensorboard_one_copy.py" "$@"\n')
    os.chmod(path, 0o755)
    return path


@pytest.mark.heavy(150)
def test_the_quickstart_trains_shows_samples_and_exports(tmp_path, monkeypatch):
    """Every cell runs: the install cell finds this checkout, the smoke job trains and evaluates, the
    metrics table, the grid, TensorBoard, a sample of a held-out crop and the diffusers export appear."""
    monkeypatch.setenv("TENSORBOARD_BINARY", _tensorboard_binary(str(tmp_path)))
    nb = _read()
    workdir = str(tmp_path / "run")
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    # As papermill injects parameters: assignments after the defaults.
    params.source += f'\nVARIANT = "smoke"\nWORKDIR = {workdir!r}\nEXTRA_FLAGS = ["--config.eval.previews=False"]\n'
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}
    )
    try:
        client.execute()
    finally:
        _stop_tensorboards(workdir)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "codi: complete at step" in text or "codi step" in text
    assert "cpu [CpuDevice(id=0)]" in text  # the devices cell
    markdown = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(markdown) == 1 and "| codi_1step |" in markdown[0] and "| bicubic |" in markdown[0]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 2  # the grid, and the photo beside its sample
    frames = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(frames) == 1 and "<iframe" in frames[0], [o.get("data") for o in outputs]  # TensorBoard's frame
    assert os.path.isfile(os.path.join(workdir, "samples", "photo.png"))
    assert "diffusers loads the U-Net" in text
    assert os.path.isfile(os.path.join(workdir, "diffusers", "codi_jax.json"))
