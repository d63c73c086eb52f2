"""Foundation contracts: plain-HF checkpoints, every search type, streaming, presets, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import TextIteratorStreamer

from config import EOS_ID, PAD_ID, make_config, model_config, TrainConfig
from model.chat_model import SEARCH_TYPES, TextToTextModel
from model.data.checkpoint import check_model_folder, load_model_folder

PROMPTS = ["3加5等于多少？", "中国的首都是哪里？", "把数字42写成中文。"]


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    model, tok = load_model_folder(tiny_model_dir, device="cpu")
    # A random tiny model with default init emits mostly one token; scale weights up so that outputs differ
    # between prompts and between search types (this is about the decoding machinery, not quality).
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model, tok


def _batch(tok, prompts):
    return tok(prompts, padding=True, return_tensors="pt")


def test_checkpoint_folder_is_plain_hf(tiny_model_dir):
    names = {p.name for p in Path(tiny_model_dir).iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert cfg["model_type"] == "t5"
    assert cfg["architectures"] == ["T5ForConditionalGeneration"]
    gen = json.loads((Path(tiny_model_dir) / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["decoder_start_token_id"]) == (EOS_ID, PAD_ID, PAD_ID)


def test_plain_transformers_loads_in_subprocess_and_logits_match(tiny_model_dir, tmp_path):
    """A fresh process outside the repo, with no project code on the path, loads and generates."""
    script = tmp_path / "load.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"  # the test process runs 1 thread too (conftest): same reduction order
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n"
        f"d = {str(tiny_model_dir)!r}\n"
        "tok = AutoTokenizer.from_pretrained(d)\n"
        "m = AutoModelForSeq2SeqLM.from_pretrained(d).eval()\n"
        "assert 'model' not in sys.modules, 'project code was imported'\n"
        "enc = tok(['今天天气很好'], return_tensors='pt')\n"
        "out = m.generate(**enc, max_new_tokens=5)\n"
        "with torch.no_grad():\n"
        "    lg = m(**enc, decoder_input_ids=torch.tensor([[0, 7, 9]])).logits\n"
        "torch.save({'ids': enc['input_ids'], 'logits': lg, 'gen': out}, sys.argv[1])\n"
        "print(type(m).__name__)\n")
    out_file = tmp_path / "res.pt"
    r = subprocess.run([sys.executable, str(script), str(out_file)], cwd=tmp_path, capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "T5ForConditionalGeneration" in r.stdout
    res = torch.load(out_file)
    assert res["ids"][0, -1].item() == EOS_ID
    model, tok = load_model_folder(tiny_model_dir, device="cpu")
    assert isinstance(model, TextToTextModel)
    assert tok(["今天天气很好"])["input_ids"][0] == res["ids"][0].tolist()
    with torch.no_grad():
        ours = model(input_ids=res["ids"], decoder_input_ids=torch.tensor([[0, 7, 9]])).logits
    # Both processes use one thread on the same machine and library, so the reductions run in the same order:
    # bitwise equality is the claim. (With different thread counts the order differs by ~1e-6.)
    torch.testing.assert_close(ours, res["logits"], rtol=0, atol=0)
    assert res["gen"].shape[1] >= 2


@pytest.mark.parametrize("search_type", SEARCH_TYPES)
def test_every_search_type(model_and_tok, search_type):
    model, tok = model_and_tok
    enc = _batch(tok, PROMPTS)
    torch.manual_seed(0)
    out = model.my_generate(enc.input_ids, enc.attention_mask, max_new_tokens=12, search_type=search_type)
    assert out.shape[0] == len(PROMPTS)
    assert 2 <= out.shape[1] <= 13
    assert (out[:, 0] == PAD_ID).all()
    texts = tok.batch_decode(out, skip_special_tokens=True)
    assert all(isinstance(t, str) for t in texts)


def test_greedy_matches_manual_argmax_decoding(model_and_tok):
    """Greedy with the KV cache equals step-by-step argmax over full recomputation."""
    model, tok = model_and_tok
    enc = _batch(tok, PROMPTS[:1])
    out = model.my_generate(enc.input_ids, enc.attention_mask, max_new_tokens=8, search_type="greedy")
    dec = torch.tensor([[PAD_ID]])
    with torch.no_grad():
        for _ in range(out.shape[1] - 1):
            nxt = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                        decoder_input_ids=dec, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat([dec, nxt], dim=1)
            if nxt.item() == EOS_ID:
                break
    assert dec.tolist() == out.tolist()


def test_contrastive_with_zero_penalty_equals_greedy(model_and_tok):
    model, tok = model_and_tok
    enc = _batch(tok, PROMPTS)
    g = model.my_generate(enc.input_ids, enc.attention_mask, max_new_tokens=10, search_type="greedy")
    c = model.my_generate(enc.input_ids, enc.attention_mask, max_new_tokens=10, search_type="contrastive",
                          penalty_alpha=0.0)
    width = min(g.shape[1], c.shape[1])
    # after EOS greedy pads with PAD and so does contrastive
    assert g[:, :width].tolist() == c[:, :width].tolist()


def test_contrastive_penalty_changes_choices(model_and_tok):
    model, tok = model_and_tok
    enc = _batch(tok, PROMPTS)
    a = model.my_generate(enc.input_ids, enc.attention_mask, max_new_tokens=16, search_type="contrastive",
                          penalty_alpha=0.0)
    b = model.my_generate(enc.input_ids, enc.attention_mask, max_new_tokens=16, search_type="contrastive",
                          penalty_alpha=0.9)
    assert a.tolist() != b.tolist()


@pytest.mark.parametrize("search_type", ["greedy", "beam", "contrastive"])
def test_streaming_equals_non_streamed(model_and_tok, search_type):
    model, tok = model_and_tok
    enc = _batch(tok, PROMPTS[1:2])
    ref = model.my_generate(enc.input_ids, enc.attention_mask, max_new_tokens=12, search_type=search_type)
    expected = tok.decode(ref[0], skip_special_tokens=True)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    th = threading.Thread(target=model.my_generate, kwargs=dict(
        input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=12, search_type=search_type,
        streamer=streamer))
    th.start()
    pieces = list(streamer)
    th.join()
    assert "".join(pieces) == expected
    assert len([p for p in pieces if p]) >= 1


def test_eos_added_exactly_once(tiny_tokenizer):
    tok = tiny_tokenizer
    for text in ["你好", "你好[EOS]", "", "Hello 世界 3.14\n第二行"]:
        ids = tok(text)["input_ids"]
        assert ids[-1] == EOS_ID
    assert tok("你好")["input_ids"].count(EOS_ID) == 1
    batch = tok(["你好", "今天天气很好"], text_target=["好", "是的"], padding=True)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        real = [i for i, m in zip(ids, mask) if m]
        assert real[-1] == EOS_ID and real.count(EOS_ID) == 1
    for ids in batch["labels"]:
        assert [i for i in ids if i != PAD_ID][-1] == EOS_ID
        assert ids.count(EOS_ID) == 1


def test_special_token_ids(tiny_tokenizer):
    expected = ["[PAD]", "[EOS]", "[SEP]", "[BOS]", "[CLS]", "[MASK]", "[UNK]", "<extra_id_0>", "<extra_id_1>"]
    assert tiny_tokenizer.convert_ids_to_tokens(list(range(9))) == expected
    assert tiny_tokenizer.pad_token_id == PAD_ID and tiny_tokenizer.eos_token_id == EOS_ID


def test_base_preset_is_about_0_2b():
    with torch.device("meta"):
        model = TextToTextModel.from_preset("base")
    n = sum(p.numel() for p in model.parameters())
    assert 0.17e9 < n < 0.23e9, n
    cfg = model.config
    assert (cfg.d_model, cfg.num_layers, cfg.num_decoder_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff,
            cfg.vocab_size) == (768, 10, 10, 12, 64, 3072, 29298)
    assert cfg.tie_word_embeddings


def test_presets_get_smaller():
    sizes = [model_config(p).d_model for p in ("base", "small", "tiny")]
    assert sizes == sorted(sizes, reverse=True)


def test_unknown_search_type_is_a_clear_error(model_and_tok):
    model, tok = model_and_tok
    enc = _batch(tok, PROMPTS[:1])
    with pytest.raises(ValueError, match="unknown search_type 'nucleus'.*greedy, beam, sampling, contrastive"):
        model.my_generate(enc.input_ids, enc.attention_mask, max_new_tokens=4, search_type="nucleus")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.my_generate(enc.input_ids, enc.attention_mask, max_new_tokens=0)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        check_model_folder(tmp_path / "empty")


def test_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown option.*lerning_rate"):
        make_config(TrainConfig, lerning_rate=1e-3)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        model_config("huge")
    assert model_config("tiny", d_model=64).d_model == 64
