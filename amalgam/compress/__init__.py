"""The compress stage: ComPEFT task-vector compression and TALL-mask storage of several
experts, with exact sizes, and decompression; MC-SMoE expert merging of an MoE."""

from amalgam.compress.compeft import TernaryTensor, compeft
from amalgam.compress.errors import CompressError
from amalgam.compress.moe_compress import MoECompressResult, compress_moe
from amalgam.compress.stage import (
    CompressResult,
    TensorReport,
    compress_model,
    decompress_model,
    read_manifest,
)
from amalgam.compress.tall import compress_tall

__all__ = [
    "CompressError",
    "CompressResult",
    "MoECompressResult",
    "TensorReport",
    "TernaryTensor",
    "compeft",
    "compress_model",
    "compress_moe",
    "compress_tall",
    "decompress_model",
    "read_manifest",
]
