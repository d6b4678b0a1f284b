"""Stage 1 - model: open a Hugging Face safetensors folder lazily, check it, stream its layers."""
