"""Shared fixtures: a tiny tokenizer and model built here (nothing from a hub)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    from utils.demo_data import write_demo_data
    return write_demo_data(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="session")
def tiny_tokenizer(demo_data):
    from model.tokenizer.build import train_tokenizer
    lines = Path(demo_data["corpus"]).read_text(encoding="utf-8").splitlines()
    return train_tokenizer(lines, vocab_size=1024, token_type="char")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A randomly initialised tiny model saved as a plain HF folder."""
    from model.chat_model import TextToTextModel
    from model.data.checkpoint import save_model_folder
    torch.manual_seed(0)
    model = TextToTextModel.from_preset("tiny", vocab_size=len(tiny_tokenizer))
    return save_model_folder(model, tiny_tokenizer, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory, demo_data, tiny_tokenizer) -> Path:
    """The tiny model after 100 steps on the demo SFT pairs: prompt-dependent answers ending in [EOS]."""
    import pandas as pd
    from bench.toy_model import fit_toy_model
    df = pd.read_parquet(demo_data["sft"])
    return fit_toy_model(tmp_path_factory.getbasetemp() / "toy_chat", list(zip(df.prompt, df.response)),
                         tiny_tokenizer, steps=100, reuse=True)


# ------------------------------------------------------------------------------------------ the API server
@pytest.fixture(scope="module")
def server(bot):
    """The API server around the requesting module's ``bot`` fixture, on a free port."""
    from model.serving.server import ServerThread, create_app
    with ServerThread(create_app(bot)) as srv:
        yield srv


@pytest.fixture()
def client(server):
    import httpx
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
