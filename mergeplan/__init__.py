"""mergeplan: merge fine-tuned LLM experts."""
