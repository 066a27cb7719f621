"""The ``llm`` backend: causal language models from Hugging Face folders, served with continuous batching."""
