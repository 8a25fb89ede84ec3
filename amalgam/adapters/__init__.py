"""PEFT adapters: reading, merging, writing and extracting low-rank updates."""
