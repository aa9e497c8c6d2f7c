"""The dynamics study's figures by window of rollout steps, read from a sweep's runs:

    python notebooks/dynamics/windows.py runs/dynamics [--window 20]

For each combination and window: the mean over the window's steps of entropy, mean token
probability, response length, truncation share, training accuracy and the clip fractions, per
seed, then their mean and [min, max] over seeds; then held-out avg@k at every evaluation (%).
"""

import argparse
import collections
import json
import re
from pathlib import Path

import numpy as np

METRICS = (("actor/entropy", "entropy", 3), ("rollout/token_prob_mean", "token prob", 3),
           ("rollout/response_length_mean", "length", 1), ("rollout/truncated_frac", "truncated", 3),
           ("rollout/acc_mean", "train acc", 3), ("actor/clip_frac_high", "clip high", 4),
           ("actor/clip_frac_low", "clip low", 4))


def runs(workdir: Path) -> dict[str, list[list[dict]]]:
    out = collections.defaultdict(list)
    for run in sorted(workdir.iterdir()):
        if (run / "result.json").is_file():
            combo = re.sub(r",?seed=\d+", "", run.name)
            out[combo].append([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()])
    return out


def cell(values, digits):
    v = np.asarray(values)
    return f"{v.mean():.{digits}f} [{v.min():.{digits}f}, {v.max():.{digits}f}]"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--window", type=int, default=20)
    args = parser.parse_args()
    combos = runs(args.workdir)
    last = min(max(r["step"] for r in records if "actor/entropy" in r) for seeds in combos.values() for records in seeds)
    windows = [(lo, min(lo + args.window - 1, last)) for lo in range(1, last + 1, args.window)]
    for key, name, digits in METRICS:
        print(f"\n### {name} ({key}): mean over the window's steps, mean [min, max] over seeds\n")
        print("| steps | " + " | ".join(combos) + " |")
        print("|---|" + "---|" * len(combos))
        for lo, hi in windows:
            row = []
            for seeds in combos.values():
                per_seed = [np.mean([r[key] for r in records if lo <= r["step"] <= hi and r.get(key) is not None])
                            for records in seeds]
                row.append(cell(per_seed, digits))
            print(f"| {lo}-{hi} | " + " | ".join(row) + " |")
    print("\n### held-out accuracy (eval/all/avg@*), mean [min, max] over seeds\n")
    print("| step | " + " | ".join(combos) + " |")
    print("|---|" + "---|" * len(combos))
    evals = sorted({r["step"] for seeds in combos.values() for records in seeds for r in records
                    if any(k.startswith("eval/all/avg@") for k in r)})
    for step in evals:
        row = []
        for seeds in combos.values():
            vals = [next(v for r in records if r["step"] == step for k, v in r.items() if k.startswith("eval/all/avg@"))
                    for records in seeds]
            row.append(cell(np.asarray(vals) * 100, 1))
        print(f"| {step} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
