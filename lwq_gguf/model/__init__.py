"""The model stage (floor 1 in docs/design.md): open a Hugging Face safetensors folder lazily,
check it, stream its layers."""
