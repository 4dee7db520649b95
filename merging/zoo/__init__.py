"""The expert zoo: presets, the build (tokenizer, base, experts, mixture), training, its layout, and the
model x domain matrix."""
