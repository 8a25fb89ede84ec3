"""Per-entry float32 primitives for the kernels: one-rounding multiply-add, half-width loads,
bit patterns.

``fma`` is LLVM's ``llvm.fma.f32``: a * b + c rounded once, on every CPU (a hardware FMA
where there is one, a correctly rounded libm call otherwise). ``as_f32`` widens an entry read
in its stored dtype: float32 as is, bfloat16 (stored as uint16 bits) shifted into the high half
of a float32, float16 (stored as int16 bits) by LLVM's exact ``fpext``.
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


@register_jitable
def sign(x):
    """torch.sign for float32: -1, 0 or +1 (a zero stays the float32 zero 0.0)."""
    if x > 0:
        return types.float32(1.0)
    if x < 0:
        return types.float32(-1.0)
    return types.float32(0.0)
