"""The notebooks run top to bottom (tiny settings injected after each notebook's `parameters` cell).

The kernel is ``python3``; jupyter_client starts it with this interpreter (``sys.executable``), so the
notebooks see .venv's packages without any kernel installation step.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def run_notebook(path: Path, params: dict, timeout: int = 600) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(idx) == 1, f"{path}: expected one cell tagged 'parameters'"
    src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(idx[0] + 1, nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]}))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return nb


def outputs_text(nb) -> str:
    """What a notebook printed (stdout chunks joined as they came: a line may span chunks) and displayed."""
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream" and o.get("name") == "stdout":
                parts.append(o["text"])
            elif "data" in o and "text/plain" in o["data"]:
                parts.append("\n" + o["data"]["text/plain"] + "\n")
    return "".join(parts)


def assert_shows(nb, *needles: str) -> None:
    text = outputs_text(nb)
    for n in needles:
        assert n in text, f"{n!r} not in the notebook's output:\n{text[-3000:]}"


def test_notebooks_have_no_stored_outputs():
    for p in (ROOT / "train.ipynb", ROOT / "eval" / "c_eval.ipynb",
              ROOT / "finetune_examples" / "info_extract" / "finetune_IE_task.ipynb"):
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), p


def test_train_notebook(tmp_path, demo_data):
    nb = run_notebook(ROOT / "train.ipynb", {
        "OUT": str(tmp_path / "nb"), "CORPUS": str(demo_data["corpus"]), "SFT_FILE": str(demo_data["sft"]),
        "VALID_FILE": str(demo_data["sft_valid"]), "VOCAB_SIZE": 600, "PRETRAIN_STEPS": 2, "SFT_STEPS": 2,
        "NUM_THREADS": 1, "QUESTIONS": ["3加5等于多少？"]})
    assert_shows(nb, "[EOS]", "3加5等于多少？ ->", "T5ForConditionalGeneration ->")
    assert (tmp_path / "nb" / "sft" / "model.safetensors").is_file()


def test_c_eval_notebook(tmp_path, demo_data, tiny_model_dir):
    nb = run_notebook(ROOT / "eval" / "c_eval.ipynb", {
        "MODEL_DIR": str(tiny_model_dir), "DATA_DIR": str(demo_data["ceval"]), "OUT_DIR": str(tmp_path / "ceval"),
        "NUM_THREADS": 1, "K_SHOT": 1})
    assert_shows(nb, "2 subjects, 6 questions", "average accuracy", "generate mode average accuracy")
    assert (tmp_path / "ceval" / "results.json").is_file()


def test_ie_notebook(tmp_path, demo_data, tiny_model_dir):
    nb = run_notebook(ROOT / "finetune_examples" / "info_extract" / "finetune_IE_task.ipynb", {
        "TRAIN_FILE": str(demo_data["ie"]), "DEV_FILE": str(demo_data["ie"]), "INIT_FROM": str(tiny_model_dir),
        "OUTPUT_DIR": str(tmp_path / "ie"), "MAX_STEPS": 2, "BATCH_SIZE": 4, "EVAL_LIMIT": 4, "NUM_THREADS": 1})
    assert_shows(nb, "dev (4 sentences): P", "《平凡的世界》是路遥创作的长篇小说。 ->")
