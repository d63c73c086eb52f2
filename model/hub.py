"""Hub-ready model folders: a model card (README.md) in every exported folder, ``--push_to_hub=REPO``, and hub
ids accepted wherever a model folder is read (resolved through ``huggingface_hub.snapshot_download``)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

CARD = "README.md"
FIGURE_FILES = ("train_result.json", "summary.json")  # the run's figures, where present
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(path: str | Path) -> Path:
    """A local folder as it is; a hub id (``org/name``, not a local path) downloaded once into the hub cache."""
    p = Path(path)
    if p.exists() or not _HUB_ID.match(str(path)):
        return p
    from huggingface_hub import snapshot_download  # only for hub ids

    try:
        return Path(snapshot_download(repo_id=str(path)))
    except Exception as e:  # offline, unknown repo, no access: say which and how to fix it
        raise FileNotFoundError(f"{path} is neither a local model folder nor a reachable hub model ({e}); "
                                f"pass a local folder or check the id and the network") from e


def push_folder(folder: str | Path, repo_id: str, private: bool = False, commit_message: str = "") -> str:
    """Upload a model folder (its card included; checkpoints/ and logs left out) to ``repo_id``."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / CARD).is_file():
        write_model_card(folder)
    api = HfApi()
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                      commit_message=commit_message or f"upload {folder.name}",
                      ignore_patterns=["checkpoints/*", ".*", "*.jsonl", "*.pkl", "ct2/*"])
    return f"https://huggingface.co/{repo_id}"


def _figures(folder: Path) -> dict:
    out = {}
    for name in FIGURE_FILES:
        f = folder / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except ValueError:
                continue
            out.update({k: v for k, v in data.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
                        and len(str(v)) < 80})
    return out


def write_model_card(folder: str | Path, training_data: Optional[str] = None, extra: Optional[dict] = None) -> Path:
    """README.md: what the model is, how to use it (plain transformers), its config, training data, the run's
    figures (train_result.json / summary.json where present), intended use and limits."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8")) if (folder / "config.json").is_file() else {}
    figures = dict(_figures(folder), **(extra or {}))
    data = training_data or figures.pop("train_file", None) or "not recorded"
    keys = ("d_model", "num_layers", "num_decoder_layers", "num_heads", "d_kv", "d_ff", "vocab_size")
    params = figures.get("n_params") or figures.get("params")
    lines = [
        "---", "language: zh", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [t5, chatlm-mini-chinese]", "---", "",
        f"# {folder.resolve().name}", "",
        "A small Chinese text-to-text chat model (T5) trained from scratch with the ChatLM-mini-Chinese kit. "
        "A plain Hugging Face T5 folder: no project code and no `trust_remote_code` needed.", "",
        "## Use", "", "```python",
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(MODEL)", "model = AutoModelForSeq2SeqLM.from_pretrained(MODEL)",
        'msgs = [{"role": "user", "content": "你好"}]',
        "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors=\"pt\")",
        "out = model.generate(**ids)  # decoding defaults from generation_config.json",
        "print(tok.decode(out[0], skip_special_tokens=True))", "```", "",
        "The chat template (in `tokenizer_config.json`) is the layout the model was trained on; "
        "`add_generation_prompt=True` ends the encoder input with `[EOS]`.", "",
        "## Config", "",
        "| field | value |", "|---|---|",
    ]
    lines += [f"| {k} | {cfg[k]} |" for k in keys if k in cfg]
    if params:
        lines.append(f"| parameters | {params} |")
    lines += ["", "## Training data", "", f"{data}", ""]
    if figures:
        lines += ["## Figures from the run", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(figures.items())]
        lines.append("")
    lines += [
        "## Intended use", "",
        "Research and teaching: a small model to study pretraining, SFT and preference tuning end to end, "
        "and to chat with on a CPU.", "",
        "## Limits", "",
        "A model this small knows little and makes facts up; answers can be short, generic or repetitive. "
        "It has no safety tuning: do not use it for advice (medical, legal, financial) or unreviewed "
        "user-facing text. Its knowledge is only what its training data held.", "",
    ]
    out = folder / CARD
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
