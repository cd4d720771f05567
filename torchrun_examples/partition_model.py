"""Partition Mistral 7B and Mixtral 8x7B over N stages by cost (pure function, no processes).

    python torchrun_examples/partition_model.py 4
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.model.args import preset  # noqa: E402
from pp_runtime.model.partition import plan_for  # noqa: E402

stages = int(sys.argv[1]) if len(sys.argv) > 1 else 4
for name in ("mistral-7b", "mixtral-8x7b"):
    for training in (False, True):
        # inference costs weight bytes (decode reads every expert); training costs FLOPs (+ the loss)
        plan = plan_for(preset(name), stages, training=training)
        print(f"{name}, {'training' if training else 'inference'}: split {plan.split}")
        print(plan.describe())
# an explicit split overrides the cost model
print(plan_for(preset("mistral-7b"), 4, split=[9, 8, 8, 7]).describe())
