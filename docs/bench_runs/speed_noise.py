"""Does the fixed probe (reuse_exp/tracking/probe.py) see what slows a decode? A benchmark.

Windows, one after another, each beside 0 to `--max-rivals` busy processes (cycling, so the
machine's load moves): the bundled model's decode of a fixed batch (the engine's own clock),
the probe (the median of its repetitions), and, for contrast, a 256x256 matmul loop. Per
kind of work: the correlation of its log seconds with the decode's over the windows, and the
slope of the decode's log seconds on its (how many times as much the decode moved): the
PROBE_SENSITIVITY that study/speed.py widens two runs' noise by. One torch thread, as the
frontier's runs. Raw JSON: every window.

    OMP_NUM_THREADS=1 python docs/bench_runs/speed_noise.py --windows 24 --out docs/bench_runs/speed_noise.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["What is 12 plus 7?", "Tom has 3 apples and buys 5 more. How many apples does he have?",
           "What is 9 times 4?", "A box holds 6 eggs. How many eggs are in 4 boxes?"]


def matmul_loop(reps: int = 10) -> list[float]:
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(20):
            a = torch.tanh(a @ a / 16)
        out.append(time.perf_counter() - t0)
    return out


def fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Correlation of log y with log x, and the slope of log y on log x."""
    lx, ly = np.log(x), np.log(y)
    return {"correlation": float(np.corrcoef(lx, ly)[0, 1]), "slope": float(np.polyfit(lx, ly, 1)[0])}


def main() -> None:
    from reuse_exp.engine.decoding import generate
    from reuse_exp.engine.loading import BUNDLED_MODEL_DIR, decode_config_for, load_model, load_tokenizer
    from reuse_exp.tracking.probe import probe
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--max-rivals", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model(BUNDLED_MODEL_DIR, "float32", "cpu")
    tok = load_tokenizer(BUNDLED_MODEL_DIR)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True)) for p in PROMPTS]
    cfg = decode_config_for(tok, max_new_tokens=args.max_new_tokens)
    generate(model, prompts, cfg)   # warm
    windows = []
    for w in range(args.windows):
        rivals = w % (args.max_rivals + 1)
        busy = [subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"]) for _ in range(rivals)]
        try:
            time.sleep(0.2)
            decode = float(np.median([generate(model, prompts, cfg).report.wall_seconds for _ in range(3)]))
            windows.append({"rivals": rivals, "decode_s": decode, "probe_s": float(np.median(probe("cpu"))),
                            "matmul_s": float(np.median(matmul_loop()))})
        finally:
            for p in busy:
                p.kill()
                p.wait()
        print(windows[-1], flush=True)
    decode = [x["decode_s"] for x in windows]
    summary = {"probe": fit([x["probe_s"] for x in windows], decode),
               "matmul_loop": fit([x["matmul_s"] for x in windows], decode)}
    print(summary)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "commit": commit, "torch_threads": 1,
                                    "summary": summary, "windows": windows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
