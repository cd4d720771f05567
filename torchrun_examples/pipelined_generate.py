"""Pipelined generation through the library API, on CPU with gloo or on GPUs with NCCL.

    torchrun --nproc_per_node=2 torchrun_examples/pipelined_generate.py
"""

import random
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.checkpoints.model_source import ModelSource, resolve_dtype  # noqa: E402
from pp_runtime.distributed.parallel import init_parallel, shutdown  # noqa: E402
from pp_runtime.inference.batching import Request  # noqa: E402
from pp_runtime.inference.engine import InferenceConfig, StageRunner, run_pipeline  # noqa: E402
from pp_runtime.inference.sampling import SamplingParams  # noqa: E402
from pp_runtime.model.args import preset  # noqa: E402
from pp_runtime.model.partition import plan_for  # noqa: E402

# 1. process groups from torchrun's environment: world = data-parallel x pipeline stages
ctx = init_parallel(device="auto")

# 2. a model (random weights of the tiny preset here; ModelSource(load_model_args(DIR), DIR) loads a checkpoint)
source = ModelSource(preset("tiny"), path=None, seed=0)
plan = plan_for(source.args, ctx.pp_size)
dtype = resolve_dtype("auto", ctx.device)
module = source.build_stage(plan.stages[ctx.pp_rank], dtype, ctx.device)  # only this stage's layers

# 3. a runner: the stage module plus its shard of the rolling KV cache
cfg = InferenceConfig(microbatches=ctx.pp_size, batch_size=4).resolved(source.args, ctx.pp_size)
runner = StageRunner(source.args, module, cfg, ctx.device, dtype)

# 4. only the first stage holds the requests; it schedules, the others follow the headers it sends
rng = random.Random(0)
requests = [Request(uid=i, id=f"req-{i}", prompt="", max_new_tokens=8, sampling=SamplingParams(),
                    prompt_tokens=[rng.randrange(3, 256) for _ in range(rng.randint(5, 60))]) for i in range(10)]
completions, stats = run_pipeline(ctx, runner, iter(requests) if ctx.is_first else None, eos_id=None)

if ctx.rank == 0:
    print(plan.describe())
    for c in sorted(completions, key=lambda c: c.request.uid):
        print(c.request.id, len(c.request.prompt_tokens), "prompt tokens ->", c.tokens)
    print(stats.summary())
shutdown()
