"""Measure how long kinject's in-memory hash of a loaded base takes.

Usage: python bench/bench_state_hash.py [--model smollm2] [--dtype float32] [--repeat 5]

Loads the model as kinject does, then times ``hash_state_dict`` several times and prints the
fastest and the median run, with the size of the distinct tensors hashed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from kinject_pytest.models import hash_state_dict, load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, default=5)
    arguments = parser.parse_args()

    loaded = load_model(arguments.model, device="cpu", dtype=arguments.dtype)
    distinct = {tensor.data_ptr(): tensor.numel() * tensor.element_size() for tensor in loaded.model.state_dict().values()}
    seconds = []
    for _ in range(arguments.repeat):
        started = time.perf_counter()
        hash_state_dict(loaded.model)
        seconds.append(time.perf_counter() - started)
    print(f"{arguments.model} {arguments.dtype}: {sum(distinct.values()) / 1e6:.0f} MB of distinct tensors, "
          f"fastest {min(seconds):.2f} s, median {statistics.median(seconds):.2f} s over {arguments.repeat} runs "
          f"on {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
