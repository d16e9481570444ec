"""Print benchmarks/results/batch_size_study.json as the README's markdown table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parent / "results" / "batch_size_study.json"


def main() -> None:
    data = json.loads((Path(sys.argv[1]) if len(sys.argv) > 1 else PATH).read_text())
    sizes = data["batch_sizes"]
    print("| model | method | " + " | ".join(f"batch {s}" for s in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for name, model in data["models"].items():
        for method, row in model["accuracy"].items():
            print(f"| {name} | {method} | " + " | ".join(f"{100 * a:.2f}" for a in row) + " |")
        oracle = f"{100 * model['oracle']:.2f}"
        print(f"| {name} | oracle (one batch of all) | " + " | ".join(oracle for _ in sizes) + " |")


if __name__ == "__main__":
    main()
