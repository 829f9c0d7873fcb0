"""LoRA and friends in pure PyTorch."""
