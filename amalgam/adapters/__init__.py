"""PEFT LoRA adapters: reading, writing and extracting them."""
