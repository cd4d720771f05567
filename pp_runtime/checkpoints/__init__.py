"""Weights on disk: Mistral consolidated and Hugging Face formats, random weights, a model's source."""
