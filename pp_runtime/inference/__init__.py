"""Generation: requests, continuous batching, the pipelined engine, stage runners, sampling, kernels."""
