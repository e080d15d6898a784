"""The quickstart notebook (notebooks/quickstart.ipynb), run top to bottom in a Jupyter kernel as a user runs it.

It segments a photo with the miniature random model (`tiny`), names the masks with the tiny random CLIP, and
segments, names and scores a few toy-world scenes with the trained toy model. Running it here keeps it in
step with the library.
"""

import re

import nbformat
import pytest

from conftest import REPO

nbclient = pytest.importorskip("nbclient", reason="running the notebook needs nbclient and ipykernel (the dev extra)")
pytest.importorskip("ipykernel", reason="running the notebook needs nbclient and ipykernel (the dev extra)")

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
# The notebook's parameters for the suite (papermill's way: set after the parameters cell): the tiny model at 128 px
# with 5 denoising steps (as the browser test runs it) and 2 toy-world scenes, about 25 s of CPU in all.
FAST = 'OVERRIDES = ["segmentor.resolution=128", "segmentor.denoise_steps=5"]\nSCENES = 2'
CELL_TIMEOUT_S = 600  # one cell, on a loaded 2-core machine


def parameters(notebook) -> nbformat.NotebookNode:
    """The cell tagged "parameters" (papermill's convention): the settings a user changes."""
    return next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))


def printed(notebook) -> str:
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def pictures(notebook) -> list:
    return [o["data"]["image/png"] for c in notebook.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after running every cell, its text embeddings cached in a temporary folder."""
    folder = tmp_path_factory.mktemp("notebook")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters(notebook).source += f"\n{FAST}\nOUTPUT = {str(folder)!r}"
    nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}}).execute()  # a failing cell raises
    return notebook


def test_the_notebook_is_stored_valid_and_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert 'MODEL = "tiny"' in parameters(notebook).source  # runs offline as stored


def test_the_notebook_shows_the_masks_side_by_side_names_them_and_scores_the_toy_world(executed):
    text = printed(executed)
    assert re.search(r"^6 masks; k-means grid \(\d+, \d+\), labels \(512, 512\)$", text, re.M)  # tiny: K = 6
    vocabulary = {"person", "sky", "flag", "rocket", "wall", "None"}
    names = re.findall(r"^mask (\d): (\S+) \(score", text, re.M)
    assert [int(k) for k, _ in names] == list(range(6)) and {name for _, name in names} <= vocabulary
    assert re.search(r"^scene 1000000: ", text, re.M)  # the first validation scene
    scores = re.findall(r"^ +(nearest|bilinear|emerdiff): mIoU +([\d.]+) +Boundary IoU +([\d.]+) +pixel acc\. +([\d.]+)$",
                        text, re.M)
    assert [s[0] for s in scores] == ["nearest", "bilinear", "emerdiff"]
    assert all(0 <= float(v) <= 100 for s in scores for v in s[1:])
    assert "not Stable Diffusion" in text
    # the photo's figure, the named figure, the scene's ground truth and the scene's named figure
    assert len(pictures(executed)) == 4
