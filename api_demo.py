"""HTTP API: ``POST /api/chat`` (the reference's), OpenAI-compatible ``/v1/chat/completions`` and
``/v1/completions``, ``/health``, ``/metrics``, and a web chat page at ``/`` (http://127.0.0.1:8812/).

    python api_demo.py --model_dir=model_save/sft [--port=8812] [--api_key=KEY] [--engine=ct2]
    python api_demo.py --cors_origins=http://localhost:3000   # let a browser app on that origin call the API
    python api_demo.py --help                      # every InferConfig field with its type, default and meaning

Any InferConfig field can be given (``--max_concurrency=4 --max_new_tokens=128``); the key may also come from
the environment variable CHATLM_API_KEY (no key: no auth). The server lives in model/serving/server.py.
"""
from __future__ import annotations

import sys

from config import InferConfig, make_config, run_cli


def main(**overrides) -> None:
    cfg = make_config(InferConfig, **overrides)
    from model.serving.server import serve  # torch and the model load here, after --help and flag checks
    try:
        serve(cfg)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
