"""Helpers that the kernels call on tiles.

matmul_tile: one (TILE_M, TILE_N) tile of X @ W^T or X @ W in fp32, the main loop of every
persistent matmul whose epilogue is ours (the LM head's logits, c_fc's GELU, the GELU's backward
after the MLP's c_proj).

widen: a tile in fp32. A bf16 tile is widened by moving its bits up 16 places, which is exact and
what a conversion does; tileiras 13.4 pipelines the loads of a kernel that does so as deep as those
of its fp16 twin, but gives the kernel that converts with astype half the shared-memory stages
(docs/layernorm-notes.md: the LayerNorm backward ran 20-30% slower in bf16 than in fp16 for it).
"""
from __future__ import annotations

try:
    import cuda.tile as ct
except Exception:  # kernels.available() says why; nothing here is called without cuda-tile
    ct = None


def widen(tile):
    """tile as fp32 (defined without cuda-tile too, so that the kernel modules import anywhere)."""
    if tile.dtype == ct.bfloat16:
        bits = ct.astype(ct.bitcast(tile, ct.uint16), ct.uint32)
        return ct.bitcast(ct.bitwise_lshift(bits, 16), ct.float32)
    return ct.astype(tile, ct.float32)


def matmul_tile(X, W, i, j, TILE_M, TILE_N, TILE_K, W_ROWS_ARE_N):
    """Tile (i, j) of X @ W^T for X (M, K) and W (N, K) if W_ROWS_ARE_N, else of X @ W for W
    (K, N); accumulated in fp32 over TILE_K-deep steps of K, where rows, columns and steps past
    the arrays' ends read as zeros."""
    acc = ct.zeros((TILE_M, TILE_N), dtype=ct.float32)
    for k in range(ct.cdiv(X.shape[1], TILE_K)):
        a = ct.load(X, (i, k), (TILE_M, TILE_K), padding_mode=ct.PaddingMode.ZERO)
        if W_ROWS_ARE_N:
            b = ct.transpose(ct.load(W, (j, k), (TILE_N, TILE_K), padding_mode=ct.PaddingMode.ZERO))
        else:
            b = ct.load(W, (k, j), (TILE_K, TILE_N), padding_mode=ct.PaddingMode.ZERO)
        acc = ct.mma(a, b, acc)
    return acc
