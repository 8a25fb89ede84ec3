"""The MiniLM zoo: a real pretrained sentence encoder, two fine-tunes of it and their embedding
tasks (a sub-package, so that its code does not enter the tiny zoo's hash)."""

from amalgam.zoo.minilm.build import EmbeddingZoo, build_embedding_zoo

__all__ = ["EmbeddingZoo", "build_embedding_zoo"]
