"""One checkpoint format for every stage: a plain Hugging Face T5 folder, written atomically."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch

REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")


def save_model_folder(model, tokenizer, out_dir: str | Path) -> Path:
    """Write model + tokenizer to a temporary sibling folder, then rename it into place.

    A kill during the save leaves the previous folder intact (at worst a stray ``.tmp-*`` folder).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    model = getattr(model, "module", model)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    missing = [f for f in REQUIRED_FILES if not (tmp / f).is_file()]
    if missing:
        raise RuntimeError(f"saving {out} produced no {', '.join(missing)}")
    old = None
    if out.exists():
        old = out.parent / f".old-{out.name}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def check_model_folder(path: str | Path) -> Path:
    p = Path(path)
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
    from model.tokenizer import load_tokenizer

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
