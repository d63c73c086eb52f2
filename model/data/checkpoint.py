"""Every stage saves and loads through here: model folders (plain Hugging Face T5, or a peft adapter) and the
run state that makes a killed run continue exactly (``output_dir/checkpoints/step-N``).

Everything is written to a temporary sibling first and renamed into place, so a kill during a save leaves the
previous folder intact (at worst a stray ``.tmp-*`` folder, removed by the next save).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch

from model.hub import resolve_model_dir, write_model_card

REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")


CHECKPOINT_DIR = "checkpoints"
RUN_STATE = "run_state.json"


def _tmp_sibling(path: Path, tag: str = "tmp") -> Path:
    return path.parent / f".{tag}-{path.name}-{uuid.uuid4().hex[:8]}"


def is_adapter(model) -> bool:
    """A peft model (LoRA): saving it writes the adapter, not the base weights."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _write_model(model, tokenizer, folder: Path, state_dict: Optional[dict] = None) -> None:
    model = getattr(model, "module", model)
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)
    if not getattr(tokenizer, "chat_template", None):  # a tokenizer saved without the template: add it
        from model.prompt import CHAT_TEMPLATE
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)  # chat_template in tokenizer_config.json
    from model.tokenizer.build import save_sentencepiece_model
    save_sentencepiece_model(tokenizer, folder)
    if not is_adapter(model):
        missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
        if missing:
            raise RuntimeError(f"saving {folder} produced no {', '.join(missing)}")


def save_model_folder(model, tokenizer, out_dir: str | Path) -> Path:
    """Write model (or adapter) + tokenizer as a new folder ``out_dir``, replacing any old one in one rename."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out)
    _write_model(model, tokenizer, tmp)
    old = None
    if out.exists():
        old = _tmp_sibling(out, "old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if not is_adapter(getattr(model, "module", model)):
        write_model_card(out)
    return out


def publish_model(model, tokenizer, out_dir: str | Path, state_dict: Optional[dict] = None) -> Path:
    """Write model (or adapter) + tokenizer INTO ``out_dir``, keeping what else lives there (checkpoints/,
    metrics): each file is renamed into place, the weights last, so a reader never sees new config with old
    weights missing. ``state_dict``: the weights to write instead of the model's own (gathered from shards)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out)
    _write_model(model, tokenizer, tmp, state_dict)
    for f in sorted(tmp.iterdir(), key=lambda x: x.suffix == ".safetensors"):
        target = out / f.name
        if target.is_dir() and not f.is_dir():
            shutil.rmtree(target)
        os.replace(f, target)
    shutil.rmtree(tmp, ignore_errors=True)
    if not is_adapter(getattr(model, "module", model)):
        write_model_card(out)  # with the figures of an earlier run in out_dir, where present
    return out


# ------------------------------------------------------------------------------------------- run state
def _step_of(p: Path) -> Optional[int]:
    name = p.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoints/step-N`` folders, oldest first (a folder still being written is ``.tmp-*``)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    found = [p for p in root.glob("step-*") if _step_of(p) is not None and (p / RUN_STATE).is_file()] \
        if root.is_dir() else []
    return sorted(found, key=_step_of)


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    done = checkpoints(output_dir)
    return done[-1] if done else None


def save_run_state(accelerator, output_dir: str | Path, step: int, state: dict, rank_state: dict,
                   keep_last_n: int = 2, keep_steps: tuple = ()) -> Path:
    """Every rank: accelerate's ``save_state`` (model, optimizer, scheduler, RNG, scaler: sharded correctly
    under DDP and FSDP, tests/test_fsdp.py) plus this rank's ``rank_state`` (its data position); the main rank adds
    ``state`` (step, best eval...) as JSON, renames the folder into place and prunes old checkpoints
    (the newest ``keep_last_n`` and ``keep_steps`` stay)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    with open(tmp / f"rank_state{accelerator.process_index}.pkl", "wb") as f:
        pickle.dump(rank_state, f, protocol=pickle.HIGHEST_PROTOCOL)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = dict(state, step=step, world_size=accelerator.num_processes)
        (tmp / RUN_STATE).write_text(json.dumps(state, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = checkpoints(output_dir)
        keep = set(done[-max(1, keep_last_n):]) | {root / f"step-{s}" for s in keep_steps if s is not None}
        for p in done:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".tmp-step-*"):  # left by a kill during an earlier save
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_run_state(accelerator, ckpt: Path) -> tuple[dict, dict]:
    """Restore what :func:`save_run_state` wrote into the prepared objects; returns (state, this rank's state)."""
    state = json.loads((ckpt / RUN_STATE).read_text(encoding="utf-8"))
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(f"{ckpt} was written by {state['world_size']} processes, this run has "
                         f"{accelerator.num_processes}: an exact resume needs the same number")
    rank_file = ckpt / f"rank_state{accelerator.process_index}.pkl"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} is missing: the checkpoint is incomplete")
    accelerator.load_state(str(ckpt))
    with open(rank_file, "rb") as f:
        return state, pickle.load(f)


def check_model_folder(path: str | Path) -> Path:
    """The model folder, checked; a hub id (``org/name`` that is not a local path) is downloaded first."""
    p = resolve_model_dir(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder {p} does not exist: train one first (make demo writes "
                                f"model_save/demo) or pass --model_dir")
    missing = [f for f in ("config.json", "tokenizer.json") if not (p / f).is_file()]
    if missing or not any((p / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise FileNotFoundError(f"{p} is not a model folder: missing {', '.join(missing) or 'model weights'} "
                                f"(expected {', '.join(REQUIRED_FILES)})")
    return p


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model_folder(path: str | Path, device: str = "auto", dtype: Optional[torch.dtype] = None):
    """Load (model, tokenizer) from a model folder: fp32 on CPU, bf16 (or fp16) on GPU unless told."""
    from model.chat_model import TextToTextModel
    from model.tokenizer.build import load_tokenizer

    p = check_model_folder(path)
    dev = pick_device(device)
    if dtype is None:
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    model = TextToTextModel.from_pretrained(str(p), dtype=dtype).to(dev).eval()
    tokenizer = load_tokenizer(p)
    return model, tokenizer
