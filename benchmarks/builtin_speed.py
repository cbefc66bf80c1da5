"""Time of the first command a newcomer runs: the built-in model, a batch of 4 at 64x64, 20 guided
steps (DPM++ 2M Karras, CFG 7.5), in this process on this machine.

    python benchmarks/builtin_speed.py [--repeats 3]

Prints the load time and each generation's wall time (the decode included), then the median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sdtorch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    pipe = sdtorch.load()
    print(f"load: {time.perf_counter() - t0:.2f} s  (threads: {torch.get_num_threads()})")
    times = []
    for seed in range(args.repeats):
        t0 = time.perf_counter()
        images = pipe.generate("red apple", batch_size=4, steps=20, seed=seed, progress=False)
        times.append(time.perf_counter() - t0)
        print(f"batch of {len(images)} at {images[0].size[0]}x{images[0].size[1]}, 20 guided steps: {times[-1]:.2f} s")
    print(f"median: {statistics.median(times):.2f} s")


if __name__ == "__main__":
    main()
