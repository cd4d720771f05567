"""The network: Mistral/Mixtral layers, MoE experts, the stage module, the stage partitioner."""
