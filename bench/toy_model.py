"""fit_toy_model: a tiny model trained in seconds, shared by the benchmarks and the tests (never used by the kit)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from config import PAD_ID
from model.chat_model import TextToTextModel
from model.data.checkpoint import save_model_folder
from model.tokenizer.build import train_tokenizer


def fit_toy_model(out_dir: str | Path, pairs: Sequence[tuple[str, str]], tokenizer=None, preset: str = "tiny",
                  steps: int = 100, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                  reuse: bool = False) -> Path:
    """A few AdamW steps on (prompt, response) pairs, for tests and benchmarks only.

    A randomly initialised T5 with tied embeddings copies its input token ([PAD] forever); a hundred steps
    (about 5 s for ``tiny`` on one core) give prompt-dependent answers that end with [EOS].
    """
    if reuse and (Path(out_dir) / "model.safetensors").is_file():
        return Path(out_dir)
    if tokenizer is None:
        texts = [t for p in pairs for t in p]
        tokenizer = train_tokenizer(texts, vocab_size=1024, token_type="char")
    torch.manual_seed(seed)
    model = TextToTextModel.from_preset(preset, vocab_size=len(tokenizer))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    pairs = list(pairs)
    for _ in range(steps):
        idx = torch.randint(len(pairs), (batch_size,), generator=g).tolist()
        b = tokenizer([pairs[i][0] for i in idx], text_target=[pairs[i][1] for i in idx], padding=True,
                      truncation=True, max_length=128, return_tensors="pt")
        labels = b["labels"].masked_fill(b["labels"] == PAD_ID, -100)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return save_model_folder(model, tokenizer, out_dir)
