"""Hub-ready folders: model cards, --push_to_hub (upload mocked: no network here), hub ids resolved through
snapshot_download (mocked) wherever a model folder is read."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model.data.checkpoint import check_model_folder, load_model_folder, publish_model, save_model_folder


class FakeApi:
    calls: list = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        FakeApi.calls.append(("create_repo", repo_id))

    def upload_folder(self, repo_id, folder_path, commit_message="", ignore_patterns=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        FakeApi.calls.append(("upload_folder", repo_id, folder_path, files, tuple(ignore_patterns or ())))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi.calls


def _model_and_tokenizer(folder):
    return load_model_folder(folder, device="cpu")


def test_every_saved_folder_has_a_model_card_with_the_run_figures(tiny_model_dir, tmp_path):
    card = (tiny_model_dir / "README.md").read_text(encoding="utf-8")
    for part in ("library_name: transformers", "apply_chat_template", "## Config", "| d_model |",
                 "## Intended use", "## Limits", "## Training data"):
        assert part in card, part
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_result.json").write_text(json.dumps({"steps": 12, "eval_bpc": 7.5, "train_file": "sft.jsonl",
                                                       "nested": {"x": 1}}), encoding="utf-8")
    model, tok = _model_and_tokenizer(tiny_model_dir)
    publish_model(model, tok, out)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| eval_bpc | 7.5 |" in card and "| steps | 12 |" in card and "sft.jsonl" in card
    assert "nested" not in card


def test_push_to_hub_from_train_dpo_and_pipeline(tiny_model_dir, tmp_path, monkeypatch, fake_hub):
    import dpo_train
    import model.training.dpo
    import model.training.trainer
    import train

    def fake_run(cfg):  # the training itself is tested elsewhere: here only what happens after it
        shutil.copytree(tiny_model_dir, cfg.output_dir, dirs_exist_ok=True)
        (Path(cfg.output_dir) / "checkpoints").mkdir(exist_ok=True)
        return {"output_dir": cfg.output_dir, "steps": 3}

    monkeypatch.setattr(model.training.trainer, "train", fake_run)
    train.train(stage="demo_sft", output_dir=str(tmp_path / "sft"), push_to_hub="me/chatlm-sft")
    kind, repo, folder, files, ignore = fake_hub[-1]
    assert (kind, repo, folder) == ("upload_folder", "me/chatlm-sft", str(tmp_path / "sft"))
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert "checkpoints/*" in ignore
    assert "demo" in (tmp_path / "sft" / "README.md").read_text(encoding="utf-8")  # its training data

    monkeypatch.setattr(model.training.dpo, "train_dpo", fake_run)
    dpo_train.train(output_dir=str(tmp_path / "dpo"), push_to_hub="me/chatlm-dpo")
    assert fake_hub[-1][1:3] == ("me/chatlm-dpo", str(tmp_path / "dpo"))

    from config import PipelineConfig
    from pipeline import export_final
    root = tmp_path / "pipe"
    shutil.copytree(tiny_model_dir, root / "sft")
    export_final(PipelineConfig(root=str(root), push_to_hub="me/chatlm"))
    assert fake_hub[-1][1:3] == ("me/chatlm", str(root))
    assert "pipeline_profile" in (root / "README.md").read_text(encoding="utf-8")
    assert [c[0] for c in fake_hub].count("create_repo") == 3


def test_hub_ids_are_resolved_wherever_a_folder_is_read(toy_model_dir, tmp_path, monkeypatch):
    import huggingface_hub
    asked = []

    def fake_download(repo_id, **kw):
        asked.append(repo_id)
        return str(toy_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert check_model_folder("someone/chatlm-toy") == toy_model_dir
    model, tok = load_model_folder("someone/chatlm-toy", device="cpu")
    from model.serving.infer import ChatBot
    bot = ChatBot(model_dir="someone/chatlm-toy", device="cpu", max_new_tokens=8)
    assert bot.chat("你好") == ChatBot(model_dir=str(toy_model_dir), device="cpu", max_new_tokens=8).chat("你好")
    # init_from (train.py) and sft_model_dir (dpo_train.py) read folders through check_model_folder too
    from config import TrainConfig
    from model.training.trainer import load_tokenizer_and_model
    _, m = load_tokenizer_and_model(TrainConfig(is_finetune=True, init_from="someone/chatlm-toy"))
    assert torch.equal(m.shared.weight, model.shared.weight)
    assert set(asked) == {"someone/chatlm-toy"}
    # a local path that does not exist is still a clear local error, not a download
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_folder(str(tmp_path / "missing"))
    assert set(asked) == {"someone/chatlm-toy"}

    def offline(repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="neither a local model folder nor a reachable hub model"):
        check_model_folder("someone/other")
