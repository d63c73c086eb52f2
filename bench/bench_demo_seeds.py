"""Does `make demo` generalise every time? The demo profile with several training seeds, held-out answers each.

Each seed runs the whole demo pipeline, every stage redone (its own root; the data and tokenizer stages are
seed-free, redone so that a change to utils/demo_data.py is never measured on stale data) and answers
the three held-out questions that never appear in its training data. The goal is at least 2 of 3 with every
seed, in under 8 minutes of stages on 2 cores.

    python bench/bench_demo_seeds.py                  # seeds 1, 2, 3
    python bench/bench_demo_seeds.py --seeds=4,5 --quick

Last line: {"bench": "demo_seeds", "ratio": fewest correct / 2 (>= 1: the goal holds for every seed),
"correct": {seed: n}, "stage_minutes": {seed: m}, "cpu_minutes": {seed: m}, "load": {seed: [before, after]}, ...}.
Stage minutes are wall time and grow when other work shares the cores; cpu_minutes (user + system time of the
pipeline and every process it started) and the 1-minute load average before and after each seed say how much.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage_summaries(root: Path, seed: int) -> dict[str, dict]:
    """Each stage's summary.json, found where the pipeline writes it for this root."""
    from config import PIPELINE_PROFILES, PipelineConfig, make_config
    from pipeline import build_stages, summary_path
    cfg = make_config(PipelineConfig, "demo", PIPELINE_PROFILES, root=str(root), seed=seed)
    return {st.name: json.loads(summary_path(root / "stages", st).read_text(encoding="utf-8"))
            for st in build_stages(cfg)}


def main(seeds: str | tuple = "1,2,3", root: str = "model_save/demo_seeds", quick: bool = False) -> None:
    if isinstance(seeds, int):  # fire reads "--seeds=4" as a number
        seeds = (seeds,)
    seeds = [int(s) for s in (seeds.split(",") if isinstance(seeds, str) else seeds)]
    if quick:
        seeds = seeds[:1]
    correct, minutes, cpu, load = {}, {}, {}, {}
    for seed in seeds:
        out = Path(root) / f"seed{seed}"
        shutil.rmtree(ROOT / out, ignore_errors=True)  # nothing from an earlier run can be read back
        t = time.perf_counter()
        load_before = os.getloadavg()[0]
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        p = subprocess.run([sys.executable, "pipeline.py", "--profile=demo", f"--root={out}", f"--seed={seed}",
                            "--force=demo_data,data,tokenizer,pretrain,sft,dpo,final,ceval,ie,chat,report"],
                           cwd=ROOT, text=True, capture_output=True)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu[seed] = round((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / 60, 2)
        load[seed] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        if p.returncode != 0:
            raise SystemExit(f"seed {seed}: pipeline failed\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        stages = stage_summaries(ROOT / out, seed)
        chat = stages["chat"]["figures"]
        correct[seed] = sum(h["correct"] for h in chat["heldout"])
        minutes[seed] = round(sum(s.get("wall_s") or 0 for s in stages.values()) / 60, 2)
        print(f"seed {seed}: {correct[seed]} of {len(chat['heldout'])} held-out questions, stages "
              f"{minutes[seed]} min (wall {(time.perf_counter() - t) / 60:.1f} min, cpu {cpu[seed]} min, load "
              f"{load[seed][0]} -> {load[seed][1]})", flush=True)
        for h in chat["heldout"]:
            print(f"  {h['prompt']} -> {h['answer']} ({'ok' if h['correct'] else 'wrong'})")
    print(json.dumps({"bench": "demo_seeds", "ratio": min(correct.values()) / 2, "correct": correct,
                      "stage_minutes": minutes, "max_stage_minutes": max(minutes.values()), "cpu_minutes": cpu,
                      "load": load}))


if __name__ == "__main__":
    import fire
    fire.Fire(main)
