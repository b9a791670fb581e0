"""Reading and writing diffusers / transformers format checkpoints (safetensors)."""
