"""Checkpoints on disk: safetensors files, Hugging Face folders, GGUF import, synthetic checkpoints for tests."""
