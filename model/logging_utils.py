"""Metrics as JSON lines: one object per call, appended and flushed, readable while a run goes on.

Generic on purpose (every stage logs through it): ``MetricsLogger(path).log(step=..., **metrics)``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional


def _plain(v: Any) -> Any:
    """Tensors and numpy scalars become Python numbers; NaN/inf become strings JSON can hold."""
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Appends JSON lines to ``path``.

    ``overwrite=True`` starts the file afresh (a new run); ``resume_step`` keeps it but drops the lines a killed
    run logged after the checkpoint it resumes from, so a curve never shows those steps twice.
    """

    def __init__(self, path: str | Path, resume_step: Optional[int] = None, overwrite: bool = False,
                 enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_jsonl(self.path) if r.get("step") is None or r["step"] <= resume_step]
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
            tmp.replace(self.path)
        elif overwrite and self.path.is_file():
            self.path.unlink()

    def log(self, step: Optional[int] = None, **metrics: Any) -> dict:
        rec = {"step": step, "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in metrics.items()})
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return rec


def read_jsonl(path: str | Path) -> list[dict]:
    """Every parseable line of a JSON-lines file (a line cut by a kill is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
