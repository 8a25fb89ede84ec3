"""Per-entry float32 primitives for the kernels: one-rounding multiply-add, half-width loads,
bit patterns.

``fma`` is LLVM's ``llvm.fma.f32``: a * b + c rounded once, on every CPU (a hardware FMA
where there is one, a correctly rounded libm call otherwise). ``as_f32`` widens an entry read
in its stored dtype: float32 as is, bfloat16 (stored as uint16 bits) shifted into the high half
of a float32, float16 (stored as int16 bits) by LLVM's exact ``fpext``. ``store`` narrows a
float32 result into an output array of one of those dtypes, rounding as torch's ``Tensor.to``
does on CPU (its AVX2/AVX-512 conversions): to nearest, ties to even, overflow to infinity,
float16 subnormals kept; a NaN becomes 0xFFFF in bfloat16 and keeps its sign and top payload
bits (made quiet) in float16.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic, overload, register_jitable

WIDTH = 8  # lanes of ``add_widened``


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c in float32 with a single rounding."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f], ir.FunctionType(f, [f, f, f]))
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _bits_to_f32(typingctx, bits):
    """The float32 whose bit pattern is the uint32 ``bits``."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def f32_bits(typingctx, x):
    """The bit pattern (uint32) of the float32 ``x``."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _half_to_f32(typingctx, bits):
    """The float16 with bit pattern ``bits`` (int16), widened exactly to float32."""
    sig = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return sig, codegen


@intrinsic
def add_widened(typingctx, acc, rows, groups):
    """acc[a] += float64(rows[g * 8 + a]) for g in range(groups), a in range(8): eight float64
    lanes (``acc``, float64, 8 entries) each adding its float32 entries in order, as one LLVM
    vector of 8 doubles kept in registers (each lane rounds as a scalar sum would). Contiguous
    arrays only; ``rows`` must hold at least 8 * groups entries (not checked)."""
    contiguous = all(isinstance(a, types.Array) and a.layout == "C" for a in (acc, rows))
    if not (contiguous and acc.dtype == types.float64 and rows.dtype == types.float32):
        return None
    sig = types.none(acc, rows, types.intp)
    wide = ir.VectorType(ir.DoubleType(), WIDTH)
    narrow = ir.VectorType(ir.FloatType(), WIDTH)

    def codegen(context, builder, signature, args):
        total = context.make_array(signature.args[0])(context, builder, args[0])
        src = context.make_array(signature.args[1])(context, builder, args[1])
        target = builder.bitcast(total.data, wide.as_pointer())
        first = builder.bitcast(src.data, narrow.as_pointer())
        slot = cgutils.alloca_once(builder, wide)
        builder.store(builder.load(target, align=8), slot)
        with cgutils.for_range(builder, args[2]) as loop:
            v = builder.fpext(builder.load(builder.gep(first, [loop.index]), align=4), wide)
            builder.store(builder.fadd(builder.load(slot), v), slot)
        builder.store(builder.load(slot), target, align=8)
        return context.get_dummy_value()

    return sig, codegen


def as_f32(v):
    """An entry in its stored dtype as float32 (exact); typed by ``overload`` below."""
    raise NotImplementedError("only callable from compiled kernels")


@overload(as_f32)
def _as_f32(v):
    if v == types.float32:
        return lambda v: v
    if v == types.uint16:  # bfloat16 bits
        return lambda v: _bits_to_f32(types.uint32(v) << types.uint32(16))
    if v == types.int16:  # float16 bits
        return lambda v: _half_to_f32(v)
    return None


U32 = types.uint32
F16_MIN_NORMAL = 0x38800000  # 2**-14 as float32 bits
F16_INF_FROM = 0x477FF000  # 65520 (max finite 65504 plus half an ulp): rounds to infinity
F16_REBIAS = (127 - 15) << 23  # float32 exponent bias minus float16's, at the exponent's place


@register_jitable
def bf16_bits(x):
    """``x`` rounded to bfloat16 (uint16 bits): drop the low 16 bits, to nearest, ties to even
    (a carry reaches the exponent, so overflow gives infinity); a NaN becomes 0xFFFF."""
    b = f32_bits(x)
    rounded = (b + U32(0x7FFF) + ((b >> U32(16)) & U32(1))) >> U32(16)
    return types.uint16(U32(0xFFFF) if x != x else rounded)


@register_jitable
def f16_bits(x):
    """``x`` rounded to float16 (int16 bits), to nearest, ties to even: normals by rebiasing
    the exponent and rounding off 13 mantissa bits, subnormals as the integer multiple of 2**-24
    nearest |x|, from 65520 up infinity; a NaN keeps its sign and top 10 payload bits, quiet."""
    b = f32_bits(x)
    a = b & U32(0x7FFFFFFF)
    normal = (a - U32(F16_REBIAS) + U32(0xFFF) + ((a >> U32(13)) & U32(1))) >> U32(13)
    # |x| = m * 2**(e - 150) with the implicit bit in m: in units of 2**-24, m >> (126 - e)
    shift = min(max(U32(126) - (a >> U32(23)), U32(14)), U32(25))  # a below 2**-14: e <= 112
    m = (a & U32(0x7FFFFF)) | U32(0x800000)
    q = m >> shift
    rest, half = m & ((U32(1) << shift) - U32(1)), U32(1) << (shift - U32(1))
    sub = q + U32(1 if rest > half or (rest == half and q & U32(1)) else 0)
    nan = U32(0x7E00) | ((a >> U32(13)) & U32(0x3FF))
    big = U32(0x7C00) if a <= U32(0x7F800000) else nan
    h = sub if a < U32(F16_MIN_NORMAL) else (normal if a < U32(F16_INF_FROM) else big)
    return types.int16(((b >> U32(16)) & U32(0x8000)) | h)


def store(out, j, v):
    """out[j] = the float32 ``v`` in ``out``'s dtype; typed by ``overload`` below."""
    raise NotImplementedError("only callable from compiled kernels")


@overload(store)
def _store(out, j, v):
    if out.dtype == types.float32:

        def impl(out, j, v):
            out[j] = v

    elif out.dtype == types.uint16:  # bfloat16 bits

        def impl(out, j, v):
            out[j] = bf16_bits(v)

    elif out.dtype == types.int16:  # float16 bits

        def impl(out, j, v):
            out[j] = f16_bits(v)

    else:
        return None
    return impl


@register_jitable
def sign(x):
    """torch.sign for float32: -1, 0 or +1 (a zero stays the float32 zero 0.0)."""
    if x > 0:
        return types.float32(1.0)
    if x < 0:
        return types.float32(-1.0)
    return types.float32(0.0)
