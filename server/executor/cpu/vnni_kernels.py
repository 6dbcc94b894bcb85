"""Integer dot-product kernels over GGUF blocks (AVX-512 VNNI), beside block_kernels' float ones.

Activations are quantized per block of 32 (as llama.cpp does for its Q8 dot products), and
each 4-weight group of a block meets the matching 4 activation bytes in one `vpdpbusd`
(unsigned bytes times signed bytes, summed into int32 lanes): 64 multiply-adds per
instruction where a float32 FMA does 16. Weights stay in block_kernels' row-tiled layout;
each tile's bytes are regrouped per block into 4-byte words (nibbles split) once per call,
and shared by every input row. A block's int32 sum then joins the float32 accumulator with
the weight scale times the activation scale; Q4_1's min (and Q4_0's -8 d) multiplies the
activations' exact float sum.

Activation precision, per block, scaled to its largest magnitude:

- ``split=False``: 8 bits (levels +-127), one `vpdpbusd` per 4 weights;
- ``split=True``: 15 bits (+-16383) as a high byte and a low 7 bits, two `vpdpbusd` per
  4 weights, combined in int32: within about 3e-5 of the block maximum, where float32 is
  within 6e-8.

Callable only where the CPU has AVX-512 VNNI (``available()``); elsewhere block_weights uses
the float kernels. Compiled on first use and cached on disk, like block_kernels.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from server.executor.cpu.block_kernels import TILE, _block_scales, _store

F32 = np.float32
QUADS = 8  # 4-byte groups in a block of 32
LANES = 16  # int32 lanes of a 512-bit vector
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_I32, LANES)

_kernel = njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
_parallel_kernel = njit(cache=True, fastmath=True, nogil=True, error_model="numpy",
                        parallel=True)


@functools.cache
def available() -> bool:
    """True when this CPU runs 512-bit VNNI and numba compiles for it (the host CPU, not a
    portable target chosen with NUMBA_CPU_NAME)."""
    from llvmlite import binding
    from numba.core import config

    if config.CPU_NAME is not None:  # type: ignore[attr-defined]
        return False
    features = binding.get_host_cpu_features()
    return all(features.get(f, False) for f in ("avx512f", "avx512bw", "avx512vnni"))


def _block_dot_codegen(weights_unsigned: bool, split: bool):  # type: ignore[no-untyped-def]
    """LLVM for ``out[o:o+16] = sum over a block's 8 quads of dot4(w word, x word)``: w a
    [8, TILE] grid of words from column w_off, x 8 consecutive words from x_off (split: the
    high words' sum times 128 plus the low words', the weights loaded once for both). The
    unsigned operand of vpdpbusd is the weights (4-bit) or the activations (Q8_0: + 128)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        out_v, out_o, w_v, w_o, high_v, low_v, x_o = args
        out_arr = context.make_array(signature.args[0])(context, builder, out_v)
        w_arr = context.make_array(signature.args[2])(context, builder, w_v)
        xs = [context.make_array(signature.args[i])(context, builder, v)
              for i, v in ((4, high_v), (5, low_v))[: 2 if split else 1]]
        dot = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]),
            "llvm.x86.avx512.vpdpbusd.512")
        w_o, x_o = builder.sext(w_o, _I64), builder.sext(x_o, _I64)
        accs = [ir.Constant(_V16, [0] * LANES) for _ in xs]
        for q in range(QUADS):
            at = builder.gep(w_arr.data, [builder.add(w_o, ir.Constant(_I64, q * TILE))])
            w = builder.load(builder.bitcast(at, _V16.as_pointer()), align=4)
            for i, x_arr in enumerate(xs):
                word = builder.load(
                    builder.gep(x_arr.data, [builder.add(x_o, ir.Constant(_I64, q))]))
                x = builder.insert_element(ir.Constant(_V16, None), word, ir.Constant(_I32, 0))
                x = builder.shuffle_vector(x, ir.Constant(_V16, None),
                                           ir.Constant(_V16, [0] * LANES))
                accs[i] = builder.call(dot, [accs[i], w, x] if weights_unsigned
                                       else [accs[i], x, w])
        total = accs[0]
        if split:
            total = builder.add(builder.shl(total, ir.Constant(_V16, [7] * LANES)), accs[1])
        at = builder.gep(out_arr.data, [builder.sext(out_o, _I64)])
        builder.store(total, builder.bitcast(at, _V16.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


def _block_dot(weights_unsigned: bool, split: bool):  # type: ignore[no-untyped-def]
    @intrinsic
    def block_dot(typingctx, out, out_off, w, w_off, high, low, x_off):  # type: ignore[no-untyped-def]
        return (types.void(out, out_off, w, w_off, high, low, x_off),
                _block_dot_codegen(weights_unsigned, split))

    return block_dot


_dot_u = _block_dot(True, False)
_dot_u_split = _block_dot(True, True)
_dot_s = _block_dot(False, False)
_dot_s_split = _block_dot(False, True)


@_kernel
def quantize_rows(x, split, unsigned, high, low, dx, sx):  # pragma: no cover - compiled
    """x [n, in] float32 -> per block of 32: high (and low) bytes [n, in], dx (the scale)
    and sx (the exact float sum) [n, in / 32]. ``unsigned`` stores the high byte + 128."""
    n, width = x.shape
    levels = F32(16383.0) if split else F32(127.0)
    for j in range(n):
        for b in range(width // 32):
            amax, total = F32(0.0), F32(0.0)
            for c in range(b * 32, b * 32 + 32):
                amax = max(amax, abs(x[j, c]))
                total += x[j, c]
            inv = levels / amax if amax > 0 else F32(0.0)
            for c in range(b * 32, b * 32 + 32):
                q = np.int32(np.rint(x[j, c] * inv))
                h = q >> 7 if split else q
                high[j, c] = np.uint8((h + 128 if unsigned else h) & 255)
                low[j, c] = np.uint8(q & 127)
            dx[j, b] = amax / levels
            sx[j, b] = total


@_kernel
def _nibble_words(quants, t, b, w):  # pragma: no cover - compiled
    """Tile t, block b of 4-bit quants -> w [8 * TILE] words: quad q < 4 holds weights
    4q..4q+3 (low nibbles), quad 4 + q weights 16+4q..16+4q+3 (high nibbles), row r at q*TILE+r."""
    for kq in range(4):
        for r in range(TILE):
            word = (np.uint32(quants[t, b, 4 * kq, r])
                    | (np.uint32(quants[t, b, 4 * kq + 1, r]) << np.uint32(8))
                    | (np.uint32(quants[t, b, 4 * kq + 2, r]) << np.uint32(16))
                    | (np.uint32(quants[t, b, 4 * kq + 3, r]) << np.uint32(24)))
            w[kq * TILE + r] = word & np.uint32(0x0F0F0F0F)
            w[(4 + kq) * TILE + r] = (word >> np.uint32(4)) & np.uint32(0x0F0F0F0F)


@_kernel
def _int8_words(quants, t, b, w, wsum):  # pragma: no cover - compiled
    """Tile t, block b of int8 quants -> w [8 * TILE] words (quad q: weights 4q..4q+3) and
    wsum [TILE], each row's sum of the block's weights (what the +128 offset adds)."""
    for r in range(TILE):
        wsum[r] = 0
    for kq in range(QUADS):
        for r in range(TILE):
            b0, b1 = quants[t, b, 4 * kq, r], quants[t, b, 4 * kq + 1, r]
            b2, b3 = quants[t, b, 4 * kq + 2, r], quants[t, b, 4 * kq + 3, r]
            wsum[r] += np.int32(b0) + np.int32(b1) + np.int32(b2) + np.int32(b3)
            w[kq * TILE + r] = (np.uint32(np.uint8(b0)) | (np.uint32(np.uint8(b1)) << np.uint32(8))
                                | (np.uint32(np.uint8(b2)) << np.uint32(16))
                                | (np.uint32(np.uint8(b3)) << np.uint32(24)))


@_parallel_kernel
def matmul_nibbles(quants, d, m, has_min, high, low, split, dx, sx, rows,
                   out):  # pragma: no cover - compiled
    """out[n, rows] = x @ W.T for 4-bit blocks; x as quantize_rows(unsigned=False) made it,
    high and low flattened to int32 words."""
    n, tiles, blocks = dx.shape[0], quants.shape[0], quants.shape[1]
    for t in prange(tiles):
        w = np.empty(QUADS * TILE, np.uint32)
        dot = np.empty(TILE, np.int32)
        scale, bias = np.empty(TILE, F32), np.empty(TILE, F32)
        acc = np.zeros((n, TILE), F32)
        for b in range(blocks):
            _nibble_words(quants, t, b, w)
            _block_scales(d, m, has_min, t, b, scale, bias)
            for j in range(n):
                at = (j * blocks + b) * QUADS
                for g in range(0, TILE, LANES):
                    if split:
                        _dot_u_split(dot, g, w, g, high, low, at)
                    else:
                        _dot_u(dot, g, w, g, high, low, at)
                sdx, ssx = dx[j, b], sx[j, b]
                for r in range(TILE):
                    acc[j, r] += scale[r] * sdx * F32(dot[r]) + bias[r] * ssx
        _store(acc, t, rows, out)


@_parallel_kernel
def matmul_int8(quants, d, high, low, split, dx, rows, out):  # pragma: no cover - compiled
    """out[n, rows] = x @ W.T for 8-bit blocks; x as quantize_rows(unsigned=True) made it."""
    n, tiles, blocks = dx.shape[0], quants.shape[0], quants.shape[1]
    for t in prange(tiles):
        w = np.empty(QUADS * TILE, np.uint32)
        wsum = np.empty(TILE, np.int32)
        dot = np.empty(TILE, np.int32)
        scale, unused = np.empty(TILE, F32), np.empty(TILE, F32)
        acc = np.zeros((n, TILE), F32)
        offset = 128 * 128 if split else 128  # what the high bytes' +128 added, per weight
        for b in range(blocks):
            _int8_words(quants, t, b, w, wsum)
            _block_scales(d, d, False, t, b, scale, unused)
            for j in range(n):
                at = (j * blocks + b) * QUADS
                for g in range(0, TILE, LANES):
                    if split:
                        _dot_s_split(dot, g, w, g, high, low, at)
                    else:
                        _dot_s(dot, g, w, g, high, low, at)
                sdx = dx[j, b]
                for r in range(TILE):
                    acc[j, r] += scale[r] * sdx * F32(dot[r] - offset * wsum[r])
        _store(acc, t, rows, out)
