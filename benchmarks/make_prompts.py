"""Write a JSONL file of prompts of mixed lengths for batch-inference benchmarks.

    python benchmarks/make_prompts.py --n 1000 --out prompts.jsonl
"""

import argparse
import json
import math
import random

WORDS = ("the a of to and in is it that for on with as was at by an be this from or have not are but "
         "model pipeline stage token window cache prompt batch layer expert river mountain city market "
         "history science music garden winter summer engine signal number letter question answer").split()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--min-words", type=int, default=8)
    p.add_argument("--max-words", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rng = random.Random(a.seed)
    lo, hi = math.log(a.min_words), math.log(a.max_words)
    with open(a.out, "w") as f:
        for i in range(a.n):
            n = int(math.exp(rng.uniform(lo, hi)))  # log-uniform: many short prompts, some long ones
            f.write(json.dumps({"id": f"q{i}", "prompt": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")


if __name__ == "__main__":
    main()
