"""The compress stage: ComPEFT task-vector compression with exact sizes, and decompression."""

from amalgam.compress.compeft import TernaryTensor, compeft
from amalgam.compress.errors import CompressError
from amalgam.compress.stage import (
    CompressResult,
    TensorReport,
    compress_model,
    decompress_model,
    read_manifest,
)

__all__ = [
    "CompressError",
    "CompressResult",
    "TensorReport",
    "TernaryTensor",
    "compeft",
    "compress_model",
    "decompress_model",
    "read_manifest",
]
