"""@triton.jit kernels of the fused gather-window-attention-scatter, forward and backward.

No torch in here: pointers, strides, sizes and constexpr tile shapes only (plans.py sets
them up). Works with triton 3.6 and 3.9 (tl.dot(input_precision=...), tl.trans, tl.permute,
tl.reshape, 3-D tl.dot, tl.exp2).

Index space: row (b, g) of `index` is cut into segments of SEG consecutive positions, one per
program (with HPP heads of group g). A segment is either
  - one window in one BLOCK-row tile (SINGLE, WPP = 1),
  - WPP > 1 tiny windows (N < 16) in one tile of WPP x NB slots (SINGLE and PACKED): row r is
    slot r % NB of window r // NB, and the products run as batched 3-D dots, one batch per
    window, so no product ever mixes two windows (a NaN stays in its window),
  - or one window of N > BLOCK rows walked in BLOCK_M x BLOCK_N tiles (not SINGLE):
    FlashAttention's online softmax in the forward, two deterministic passes in the backward.
Every token row a program reads or writes belongs to it alone: no atomics, and bitwise
deterministic results.

A token index outside 0..L-1 is masked out: its row is neither loaded (it reads as zeros,
and as a key it takes no part in any softmax) nor stored. The backward recomputes each
window's softmax from the scores (never reads the forward's lse or out), so with an unchecked
index that is no permutation a token visited by several windows gets, row by row, one
window's output and gradients (which one is unspecified; on a GPU two programs' stores to one
row race element by element), and twice in one window it is two keys whose dk, dv rows are
each one slot's share; tokens no window visits are never written (launch.py zero-fills).

The backward has one formula on every path: dS = P * ((dP - top) - delta) with top the dP
at the row's top score and delta = rowsum(P * (dP - top)) / rowsum(P) in fp32 on chip (not
FlashAttention's rowsum(dO * O) from the rounded O, which fails fp16/bf16 accuracy at a
saturated softmax; the pivot `top`: _top_dp). The multi-tile path gets them from an extra
online pass over the key tiles per query tile (_row_stats: 2 of its now 9 tile products,
against 7 before) and keeps each row's softmax max and sum with (top, delta) in a (B, H, L, 4)
fp32 scratch between its dQ and dK/dV passes (not the lse: _bwd_tile).
"""
import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


# BF16_FIX is set for bf16 inputs under TRITON_INTERPRET=1 only: the interpreter of triton
# 3.9 gets bf16 tl.dot wrong and converts fp32 -> bf16 by truncation. With it, _mm multiplies
# the same bf16 values in fp32 and _cast rounds to nearest even first, as the GPU does.


@triton.jit
def _mm(a, b, DOT_PREC: tl.constexpr, BF16_FIX: tl.constexpr):
    """a @ b, fp32 accumulation."""
    if BF16_FIX:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _cast(x, dtype: tl.constexpr, BF16_FIX: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even."""
    if BF16_FIX:
        u = x.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        x = u.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tokens(idx_base, stride_il, pos, valid, L):
    """Token ids at index positions `pos` (int64, 0 where masked) and which are usable."""
    tok = tl.load(idx_base + pos.to(tl.int64) * stride_il, mask=valid, other=-1).to(tl.int64)
    ok = valid & (tok >= 0) & (tok < L)
    return tl.where(ok, tok, 0), ok


@triton.jit
def _segment_tokens(idx_base, stride_il, seg_start, seg_end, N, L, BLOCK: tl.constexpr,
                    WPP: tl.constexpr, NB: tl.constexpr):
    """Token ids of a SINGLE tile: row r is slot r % NB of the segment's window r // NB."""
    offs = tl.arange(0, BLOCK)
    if WPP == 1:
        pos = seg_start + offs
        valid = pos < seg_end
    else:
        slot = offs % NB
        pos = seg_start + (offs // NB) * N + slot
        valid = (slot < N) & (pos < seg_end)
    return _tokens(idx_base, stride_il, pos, valid, L)


@triton.jit
def _work_tokens(work, IDX, stride_ib, stride_ig, stride_il, L, G, N, SEG, num_seg, num_chunks,
                 BLOCK: tl.constexpr, WPP: tl.constexpr, NB: tl.constexpr):
    """Token ids of work item `work` of a SINGLE launch."""
    _, seg, _, g, b = _program_coords(work, 1, num_seg, num_chunks, G)
    seg_start = seg * SEG
    seg_end = tl.minimum(seg_start + SEG, L)
    idx_base = IDX + b * stride_ib + g.to(tl.int64) * stride_ig
    return _segment_tokens(idx_base, stride_il, seg_start, seg_end, N, L, BLOCK, WPP, NB)


# ALIGN (a power of two <= 16, from the launcher) divides every batch, token and head stride
# of the row tensors, and their head-dim stride is 1 (else ALIGN is 1): the hints let Triton
# vectorise row loads when D is not a multiple of 16 (D = 24: 8-element, 16-byte accesses).
# Integer and float arguments are not specialized (do_not_specialize): ALIGN carries what
# Triton's own specialization would have found (unit head-dim stride, divisibility), one
# compiled kernel serves every size, and launches skip the per-argument checks (launch.py).
# The index's token stride stays specialized: 1 in every call from rsir_kernels.ops.


@triton.jit
def _head_ptr(P, b, h, stride_b, stride_h, ALIGN: tl.constexpr):
    return P + tl.multiple_of(b * stride_b + h * stride_h, ALIGN)


@triton.jit
def _row_ptrs(base, tok, stride_l, stride_d, offs_d, ALIGN: tl.constexpr):
    rows = tl.multiple_of(tok * stride_l, ALIGN)
    if ALIGN > 1:  # the head-dim stride is 1 (plans.py): contiguous rows, vector accesses
        return base + rows[:, None] + offs_d[None, :]
    else:
        return base + rows[:, None] + offs_d[None, :] * stride_d


@triton.jit
def _load_rows(base, tok, ok, stride_l, stride_d, offs_d, D, ALIGN: tl.constexpr):
    ptrs = _row_ptrs(base, tok, stride_l, stride_d, offs_d, ALIGN)
    return tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_rows(base, tok, ok, stride_l, stride_d, offs_d, D, value, ALIGN: tl.constexpr):
    ptrs = _row_ptrs(base, tok, stride_l, stride_d, offs_d, ALIGN)
    tl.store(ptrs, value, mask=ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _program_coords(pid, num_mtiles, num_seg, num_chunks, G):
    """Flat work id -> (query tile, segment, head chunk, group, batch); segment fastest."""
    mt = pid % num_mtiles
    rest = pid // num_mtiles
    seg = rest % num_seg
    rest = rest // num_seg
    chunk = rest % num_chunks
    rest = rest // num_chunks
    return mt, seg, chunk, rest % G, (rest // G).to(tl.int64)


@triton.jit
def _fwd_packed(q, k, v, ok, qk_scale, WPP: tl.constexpr, NB: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, BF16_FIX: tl.constexpr):
    """Softmax(q k^T) v of WPP windows of NB slots each, batched (3-D dots): no product ever
    mixes two windows, so a NaN or inf stays in its own window. Returns 2-D (acc, m, l)."""
    q3 = tl.reshape(q, (WPP, NB, BLOCK_D))
    k3 = tl.reshape(k, (WPP, NB, BLOCK_D))
    v3 = tl.reshape(v, (WPP, NB, BLOCK_D))
    ok3 = tl.reshape(ok, (WPP, NB))
    s = _mm(q3, tl.permute(k3, (0, 2, 1)), DOT_PREC, BF16_FIX) * qk_scale
    s = tl.where(ok3[:, :, None] & ok3[:, None, :], s, float("-inf"))
    m = tl.max(s, 2)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - m[:, :, None])
    l = tl.sum(p, 2)
    acc = _mm(_cast(p, v.dtype, BF16_FIX), v3, DOT_PREC, BF16_FIX)
    return tl.reshape(acc, (ROWS, BLOCK_D)), tl.reshape(m, (ROWS,)), tl.reshape(l, (ROWS,))


@triton.jit
def _bwd_packed(q, k, v, do, ok, qk_scale, WPP: tl.constexpr, NB: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, BF16_FIX: tl.constexpr):
    """The backward of _fwd_packed: 2-D (dq, dk, dv) before the softmax scale of dq and dk
    (P and dS from _softmax_grad, per window)."""
    q3 = tl.reshape(q, (WPP, NB, BLOCK_D))
    k3 = tl.reshape(k, (WPP, NB, BLOCK_D))
    v3 = tl.reshape(v, (WPP, NB, BLOCK_D))
    do3 = tl.reshape(do, (WPP, NB, BLOCK_D))
    ok3 = tl.reshape(ok, (WPP, NB))
    s = _mm(q3, tl.permute(k3, (0, 2, 1)), DOT_PREC, BF16_FIX) * qk_scale
    dp = _mm(do3, tl.permute(v3, (0, 2, 1)), DOT_PREC, BF16_FIX)
    p, ds = _softmax_grad(s, dp, ok3[:, :, None] & ok3[:, None, :], 2)
    ds = _cast(ds, q.dtype, BF16_FIX)
    p = _cast(p, q.dtype, BF16_FIX)
    dv = _mm(tl.permute(p, (0, 2, 1)), do3, DOT_PREC, BF16_FIX)
    dq = _mm(ds, k3, DOT_PREC, BF16_FIX)
    dk = _mm(tl.permute(ds, (0, 2, 1)), q3, DOT_PREC, BF16_FIX)
    return tl.reshape(dq, (ROWS, BLOCK_D)), tl.reshape(dk, (ROWS, BLOCK_D)), tl.reshape(dv, (ROWS, BLOCK_D))


_FWD_UNSPECIALIZED = (
    "num_work",
    "stride_qb", "stride_ql", "stride_qh", "stride_qd", "stride_kb", "stride_kl", "stride_kh",
    "stride_kd", "stride_vb", "stride_vl", "stride_vh", "stride_vd", "stride_ib", "stride_ig",
    "stride_ob", "stride_ol", "stride_oh", "stride_od", "stride_lb", "stride_lh", "stride_ll", "L",
    "G", "HG", "N", "SEG", "num_seg", "num_mtiles", "num_chunks", "qk_scale",
)


@triton.jit
def _fwd_work(work, tok_m, ok_m,
    Q, K, V, IDX, OUT, LSE,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ib, stride_ig, stride_il,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ll,
    L, G, HG, N, SEG, num_seg, num_mtiles, num_chunks,
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain
    D: tl.constexpr, HPP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, PACKED: tl.constexpr, DOT_PREC: tl.constexpr,
    BF16_FIX: tl.constexpr, ALIGN: tl.constexpr, NUM_TILES: tl.constexpr, WPP: tl.constexpr,
    NB: tl.constexpr,
):
    """One work item of the forward: segment x head chunk x group x batch (x query tile when
    not SINGLE); tok_m, ok_m: the segment's token ids when SINGLE (else recomputed here)."""
    mt, seg, chunk, g, b = _program_coords(work, num_mtiles, num_seg, num_chunks, G)
    seg_start = seg * SEG
    seg_end = tl.minimum(seg_start + SEG, L)
    offs_d = tl.arange(0, BLOCK_D)
    idx_base = IDX + b * stride_ib + g.to(tl.int64) * stride_ig
    if not SINGLE:
        pos_m = seg_start + mt * BLOCK_M + tl.arange(0, BLOCK_M)
        tok_m, ok_m = _tokens(idx_base, stride_il, pos_m, pos_m < seg_end, L)
    for hh in tl.static_range(HPP):
        h = (g * HG + chunk * HPP + hh).to(tl.int64)
        qb = _head_ptr(Q, b, h, stride_qb, stride_qh, ALIGN)
        kb = _head_ptr(K, b, h, stride_kb, stride_kh, ALIGN)
        vb = _head_ptr(V, b, h, stride_vb, stride_vh, ALIGN)
        q = _load_rows(qb, tok_m, ok_m, stride_ql, stride_qd, offs_d, D, ALIGN)
        if SINGLE:
            k = _load_rows(kb, tok_m, ok_m, stride_kl, stride_kd, offs_d, D, ALIGN)
            v = _load_rows(vb, tok_m, ok_m, stride_vl, stride_vd, offs_d, D, ALIGN)
            if PACKED:
                acc, m, l = _fwd_packed(q, k, v, ok_m, qk_scale, WPP, NB, BLOCK_M, BLOCK_D, DOT_PREC, BF16_FIX)
            else:
                s = _mm(q, tl.trans(k), DOT_PREC, BF16_FIX) * qk_scale
                s = tl.where(ok_m[:, None] & ok_m[None, :], s, float("-inf"))
                m = tl.max(s, 1)
                m = tl.where(m == float("-inf"), 0.0, m)  # masked rows have no key at all
                p = tl.exp2(s - m[:, None])
                l = tl.sum(p, 1)
                acc = _mm(_cast(p, v.dtype, BF16_FIX), v, DOT_PREC, BF16_FIX)
        else:  # online softmax over the window's key tiles
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for start_n in range(0, NUM_TILES * BLOCK_N, BLOCK_N):
                pos_n = seg_start + start_n + tl.arange(0, BLOCK_N)
                tok_n, ok_n = _tokens(idx_base, stride_il, pos_n, pos_n < seg_end, L)
                k = _load_rows(kb, tok_n, ok_n, stride_kl, stride_kd, offs_d, D, ALIGN)
                v = _load_rows(vb, tok_n, ok_n, stride_vl, stride_vd, offs_d, D, ALIGN)
                s = _mm(q, tl.trans(k), DOT_PREC, BF16_FIX) * qk_scale
                s = tl.where(ok_m[:, None] & ok_n[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - m_use)
                p = tl.exp2(s - m_use[:, None])
                l = l * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + _mm(_cast(p, v.dtype, BF16_FIX), v, DOT_PREC, BF16_FIX)
                m = m_new
            m = tl.where(m == float("-inf"), 0.0, m)
        l = tl.where(l == 0.0, 1.0, l)
        out = _cast(acc / l[:, None], OUT.dtype.element_ty, BF16_FIX)
        ob = _head_ptr(OUT, b, h, stride_ob, stride_oh, ALIGN)
        _store_rows(ob, tok_m, ok_m, stride_ol, stride_od, offs_d, D, out, ALIGN)
        lse = (m + tl.log2(l)) * LN2
        tl.store(LSE + b * stride_lb + h * stride_lh + tok_m * stride_ll, lse, mask=ok_m)


@triton.jit(do_not_specialize=_FWD_UNSPECIALIZED)
def window_attn_fwd_kernel(
    Q, K, V, IDX, OUT, LSE,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ib, stride_ig, stride_il,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ll,
    L, G, HG, N, SEG, num_seg, num_mtiles, num_chunks, num_work,
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain
    D: tl.constexpr, HPP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, PACKED: tl.constexpr, DOT_PREC: tl.constexpr,
    BF16_FIX: tl.constexpr, ALIGN: tl.constexpr, NUM_TILES: tl.constexpr, WPP: tl.constexpr,
    NB: tl.constexpr,
):
    """One program per work item (num_work of them)."""
    pid = tl.program_id(0)
    if SINGLE:
        tok_m, ok_m = _work_tokens(pid, IDX, stride_ib, stride_ig, stride_il, L, G, N, SEG, num_seg,
                                   num_chunks, BLOCK_M, WPP, NB)
    else:  # _fwd_work loads each query tile's own
        tok_m = tl.zeros([BLOCK_M], tl.int64)
        ok_m = tl.zeros([BLOCK_M], tl.int1)
    _fwd_work(pid, tok_m, ok_m, Q, K, V, IDX, OUT, LSE, stride_qb, stride_ql, stride_qh, stride_qd, stride_kb,
              stride_kl, stride_kh, stride_kd, stride_vb, stride_vl, stride_vh, stride_vd, stride_ib, stride_ig,
              stride_il, stride_ob, stride_ol, stride_oh, stride_od, stride_lb, stride_lh, stride_ll, L, G, HG, N,
              SEG, num_seg, num_mtiles, num_chunks, qk_scale, D, HPP, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE, PACKED,
              DOT_PREC, BF16_FIX, ALIGN, NUM_TILES, WPP, NB)


@triton.jit
def _rowsum_ratio(pdp, p, AXIS: tl.constexpr):
    """rowsum(P * dP) / rowsum(P): normalised by P's row sum (1 up to rounding), so that a
    large common part of dP cancels exactly instead of leaving (rowsum(P) - 1) * dP. Empty rows
    give 0."""
    l = tl.sum(p, AXIS)
    return tl.sum(pdp, AXIS) / tl.where(l == 0.0, 1.0, l)


@triton.jit
def _top_dp(s, dp, m, AXIS: tl.constexpr):
    """dP at each row's top score m (the largest such dP on a tie; 0 for rows with no key):
    the pivot c of dP - delta = (dP - c) - rowsum(P * (dP - c)) / rowsum(P).

    Any c gives the same dS in exact arithmetic. c = dP_top makes the top column's dP - c
    exactly 0 and leaves a delta' of the size of the other columns' P: at a saturated softmax
    dP_top - delta is a difference of two nearly equal numbers, and with c = 0 one rounding of
    delta (an ulp of |dP|) was its whole error (fuzz case triton::50, scores ~3e3: dq 0.66
    off, 4.6x the fp32 reference's error; with the pivot 7e-5). It also takes out a large
    common part of dP (v with a large mean) before any product."""
    c = tl.max(tl.where(s == tl.expand_dims(m, AXIS), dp, float("-inf")), AXIS)
    return tl.where(c == float("-inf"), 0.0, c)


@triton.jit
def _softmax_grad(s, dp, mask, AXIS: tl.constexpr):
    """Rows that hold their whole windows: (P, dS) with P = softmax(s) along AXIS recomputed
    from the scores (row max and sum on chip; the saved lse is not read, so a token that
    several windows visit gets one window's consistent gradient) and dS = P * (dP - delta),
    delta = c + rowsum(P * (dP - c)) / rowsum(P) in fp32 from this very P, c = _top_dp: every
    row of dS sums to zero up to fp32 rounding, also at a saturated softmax (FlashAttention's
    rowsum(dO * O) reads the rounded O; docs/design.md section 9). Masked entries give P = dS = 0."""
    s = tl.where(mask, s, float("-inf"))
    m = tl.max(s, AXIS)
    m = tl.where(m == float("-inf"), 0.0, m)  # masked rows have no key at all
    p = tl.exp2(s - tl.expand_dims(m, AXIS))
    l = tl.sum(p, AXIS)
    p = p / tl.expand_dims(tl.where(l == 0.0, 1.0, l), AXIS)
    r = dp - tl.expand_dims(_top_dp(s, dp, m, AXIS), AXIS)
    delta = _rowsum_ratio(p * r, p, AXIS)
    return p, p * (r - tl.expand_dims(delta, AXIS))


@triton.jit
def _bwd_tile(q, k, v, do, m, inv_l, top, delta, mask, qk_scale, DOT_PREC: tl.constexpr,
              BF16_FIX: tl.constexpr):
    """One query tile x one key tile of the multi-tile path: (P, dS) with P = exp2(S - m) / l,
    dS = P * ((dP - top) - delta), dP = dO V^T; the row max m (log2 domain), 1 / l, top and
    delta come from _row_stats. m and l apart, not P = exp2(S - lse2): one rounding of an
    lse2 of size |S| is a relative error of ~|S| 2^-24 in every P of the row (dv 2.3e-5 off
    at scores ~3e3 where the fp32 reference is 2.5e-6). top and delta apart too: their sum
    would round away what _top_dp gains."""
    s = _mm(q, tl.trans(k), DOT_PREC, BF16_FIX) * qk_scale
    p = tl.where(mask, tl.exp2(s - m[:, None]) * inv_l[:, None], 0.0)
    dp = _mm(do, tl.trans(v), DOT_PREC, BF16_FIX)
    return p, p * ((dp - top[:, None]) - delta[:, None])


@triton.jit
def _row_stats(q, do, ok_m, kb, vb, idx_base, stride_il, seg_start, seg_end, L, stride_kl, stride_kd,
               stride_vl, stride_vd, offs_d, D, qk_scale, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr,
               NUM_TILES: tl.constexpr, DOT_PREC: tl.constexpr, BF16_FIX: tl.constexpr):
    """A query tile's softmax statistics over its whole window, one online pass over the key
    tiles: (m, 1 / l, top, delta), m = max s and l = sum exp2(s - m) (log2 domain), top = dP
    at the top score (_top_dp) and delta = rowsum(P * (dP - top)) / rowsum(P), the formula of _softmax_grad (both sums
    rescaled together as the running max moves; a common factor of P cancels in dP - delta).
    When a key tile brings a new top score, the sum so far moves to the new pivot:
    rowsum(P * (dP - top_new)) = rowsum(P * (dP - top_old)) + (top_old - top_new) rowsum(P)."""
    m = tl.full([q.shape[0]], float("-inf"), tl.float32)
    l = tl.zeros([q.shape[0]], tl.float32)
    pdp = tl.zeros([q.shape[0]], tl.float32)
    top = tl.zeros([q.shape[0]], tl.float32)
    for start_n in range(0, NUM_TILES * BLOCK_N, BLOCK_N):
        pos_n = seg_start + start_n + tl.arange(0, BLOCK_N)
        tok_n, ok_n = _tokens(idx_base, stride_il, pos_n, pos_n < seg_end, L)
        k = _load_rows(kb, tok_n, ok_n, stride_kl, stride_kd, offs_d, D, ALIGN)
        v = _load_rows(vb, tok_n, ok_n, stride_vl, stride_vd, offs_d, D, ALIGN)
        s = _mm(q, tl.trans(k), DOT_PREC, BF16_FIX) * qk_scale
        s = tl.where(ok_m[:, None] & ok_n[None, :], s, float("-inf"))
        dp = _mm(do, tl.trans(v), DOT_PREC, BF16_FIX)
        m_tile = tl.max(s, 1)
        top_new = tl.where(m_tile > m, _top_dp(s, dp, m_tile, 1), top)
        m_new = tl.maximum(m, m_tile)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        pdp = (pdp + (top - top_new) * l) * alpha + tl.sum(p * (dp - top_new[:, None]), 1)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
        top = top_new
    m = tl.where(m == float("-inf"), 0.0, m)
    l = tl.where(l == 0.0, 1.0, l)
    return m, 1.0 / l, top, pdp / l


_BWD_UNSPECIALIZED = (
    "num_work",
    "stride_dob", "stride_dol", "stride_doh", "stride_dod", "stride_qb", "stride_ql", "stride_qh",
    "stride_qd", "stride_kb", "stride_kl", "stride_kh", "stride_kd", "stride_vb", "stride_vl",
    "stride_vh", "stride_vd", "stride_ib", "stride_ig", "stride_gb", "stride_gl", "stride_gs",
    "stride_gh", "stride_gd", "L", "G", "HG", "N", "SEG", "num_seg", "num_chunks", "qk_scale",
    "sm_scale",
)


@triton.jit
def _bwd_work(work, tok, ok,
    DO, Q, K, V, IDX, DQKV, STATS,
    stride_dob, stride_dol, stride_doh, stride_dod,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ib, stride_ig, stride_il,
    stride_gb, stride_gl, stride_gs, stride_gh, stride_gd,  # dqkv (B, L, 3, H, D)
    L, G, HG, N, SEG, num_seg, num_chunks,
    qk_scale, sm_scale,
    D: tl.constexpr, HPP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, PACKED: tl.constexpr, DOT_PREC: tl.constexpr,
    BF16_FIX: tl.constexpr, ALIGN: tl.constexpr, NUM_TILES: tl.constexpr, WPP: tl.constexpr,
    NB: tl.constexpr,
):
    """One work item of the backward: segment x head chunk x group x batch; tok, ok: the
    segment's token ids when SINGLE (unused otherwise)."""
    _, seg, chunk, g, b = _program_coords(work, 1, num_seg, num_chunks, G)
    seg_start = seg * SEG
    seg_end = tl.minimum(seg_start + SEG, L)
    offs_d = tl.arange(0, BLOCK_D)
    idx_base = IDX + b * stride_ib + g.to(tl.int64) * stride_ig
    out_ty = DQKV.dtype.element_ty
    for hh in tl.static_range(HPP):
        h = (g * HG + chunk * HPP + hh).to(tl.int64)
        qb = _head_ptr(Q, b, h, stride_qb, stride_qh, ALIGN)
        kb = _head_ptr(K, b, h, stride_kb, stride_kh, ALIGN)
        vb = _head_ptr(V, b, h, stride_vb, stride_vh, ALIGN)
        dob = _head_ptr(DO, b, h, stride_dob, stride_doh, ALIGN)
        dqb = _head_ptr(DQKV, b, h, stride_gb, stride_gh, ALIGN)
        dkb = dqb + tl.multiple_of(stride_gs, ALIGN)
        dvb = dqb + tl.multiple_of(2 * stride_gs, ALIGN)
        if SINGLE:
            q = _load_rows(qb, tok, ok, stride_ql, stride_qd, offs_d, D, ALIGN)
            do = _load_rows(dob, tok, ok, stride_dol, stride_dod, offs_d, D, ALIGN)
            k = _load_rows(kb, tok, ok, stride_kl, stride_kd, offs_d, D, ALIGN)
            v = _load_rows(vb, tok, ok, stride_vl, stride_vd, offs_d, D, ALIGN)
            if PACKED:
                dq, dk, dv = _bwd_packed(q, k, v, do, ok, qk_scale, WPP, NB, BLOCK_M, BLOCK_D, DOT_PREC, BF16_FIX)
            else:
                s = _mm(q, tl.trans(k), DOT_PREC, BF16_FIX) * qk_scale
                dp = _mm(do, tl.trans(v), DOT_PREC, BF16_FIX)
                p, ds = _softmax_grad(s, dp, ok[:, None] & ok[None, :], 1)
                p = _cast(p, q.dtype, BF16_FIX)
                ds = _cast(ds, q.dtype, BF16_FIX)
                dv = _mm(tl.trans(p), do, DOT_PREC, BF16_FIX)
                dq = _mm(ds, k, DOT_PREC, BF16_FIX)
                dk = _mm(tl.trans(ds), q, DOT_PREC, BF16_FIX)
            dq = dq * sm_scale
            dk = dk * sm_scale
            _store_rows(dqb, tok, ok, stride_gl, stride_gd, offs_d, D, _cast(dq, out_ty, BF16_FIX), ALIGN)
            _store_rows(dkb, tok, ok, stride_gl, stride_gd, offs_d, D, _cast(dk, out_ty, BF16_FIX), ALIGN)
            _store_rows(dvb, tok, ok, stride_gl, stride_gd, offs_d, D, _cast(dv, out_ty, BF16_FIX), ALIGN)
        else:
            # pass 1, query tiles outer: each row's (m, 1 / l, top, delta) over its whole window,
            # then dQ; the statistics go to STATS at the row's index position, which this program
            # alone owns
            stats = STATS + (b * (G * HG) + h) * L * 4
            for start_m in range(0, NUM_TILES * BLOCK_M, BLOCK_M):
                pos_m = seg_start + start_m + tl.arange(0, BLOCK_M)
                in_seg = pos_m < seg_end
                tok_m, ok_m = _tokens(idx_base, stride_il, pos_m, in_seg, L)
                q = _load_rows(qb, tok_m, ok_m, stride_ql, stride_qd, offs_d, D, ALIGN)
                do = _load_rows(dob, tok_m, ok_m, stride_dol, stride_dod, offs_d, D, ALIGN)
                m, inv_l, top, delta = _row_stats(q, do, ok_m, kb, vb, idx_base, stride_il, seg_start, seg_end, L,
                                                  stride_kl, stride_kd, stride_vl, stride_vd, offs_d, D,
                                                  qk_scale, ALIGN, BLOCK_N, NUM_TILES, DOT_PREC, BF16_FIX)
                dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                for start_n in range(0, NUM_TILES * BLOCK_N, BLOCK_N):
                    pos_n = seg_start + start_n + tl.arange(0, BLOCK_N)
                    tok_n, ok_n = _tokens(idx_base, stride_il, pos_n, pos_n < seg_end, L)
                    k = _load_rows(kb, tok_n, ok_n, stride_kl, stride_kd, offs_d, D, ALIGN)
                    v = _load_rows(vb, tok_n, ok_n, stride_vl, stride_vd, offs_d, D, ALIGN)
                    p, ds = _bwd_tile(q, k, v, do, m, inv_l, top, delta, ok_m[:, None] & ok_n[None, :], qk_scale,
                                      DOT_PREC, BF16_FIX)
                    dq += _mm(_cast(ds, q.dtype, BF16_FIX), k, DOT_PREC, BF16_FIX)
                _store_rows(dqb, tok_m, ok_m, stride_gl, stride_gd, offs_d, D,
                            _cast(dq * sm_scale, out_ty, BF16_FIX), ALIGN)
                tl.store(stats + pos_m * 4, m, mask=in_seg)
                tl.store(stats + pos_m * 4 + 1, inv_l, mask=in_seg)
                tl.store(stats + pos_m * 4 + 2, top, mask=in_seg)
                tl.store(stats + pos_m * 4 + 3, delta, mask=in_seg)
            tl.debug_barrier()  # pass 2 reads statistics that other threads of this program stored
            # pass 2, key tiles outer: dK, dV (recomputes P)
            for start_n in range(0, NUM_TILES * BLOCK_N, BLOCK_N):
                pos_n = seg_start + start_n + tl.arange(0, BLOCK_N)
                tok_n, ok_n = _tokens(idx_base, stride_il, pos_n, pos_n < seg_end, L)
                k = _load_rows(kb, tok_n, ok_n, stride_kl, stride_kd, offs_d, D, ALIGN)
                v = _load_rows(vb, tok_n, ok_n, stride_vl, stride_vd, offs_d, D, ALIGN)
                dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                for start_m in range(0, NUM_TILES * BLOCK_M, BLOCK_M):
                    pos_m = seg_start + start_m + tl.arange(0, BLOCK_M)
                    in_seg = pos_m < seg_end
                    tok_m, ok_m = _tokens(idx_base, stride_il, pos_m, in_seg, L)
                    q = _load_rows(qb, tok_m, ok_m, stride_ql, stride_qd, offs_d, D, ALIGN)
                    do = _load_rows(dob, tok_m, ok_m, stride_dol, stride_dod, offs_d, D, ALIGN)
                    m = tl.load(stats + pos_m * 4, mask=in_seg, other=0.0)
                    inv_l = tl.load(stats + pos_m * 4 + 1, mask=in_seg, other=0.0)
                    top = tl.load(stats + pos_m * 4 + 2, mask=in_seg, other=0.0)
                    delta = tl.load(stats + pos_m * 4 + 3, mask=in_seg, other=0.0)
                    p, ds = _bwd_tile(q, k, v, do, m, inv_l, top, delta, ok_m[:, None] & ok_n[None, :], qk_scale,
                                      DOT_PREC, BF16_FIX)
                    dv += _mm(tl.trans(_cast(p, q.dtype, BF16_FIX)), do, DOT_PREC, BF16_FIX)
                    dk += _mm(tl.trans(_cast(ds, q.dtype, BF16_FIX)), q, DOT_PREC, BF16_FIX)
                _store_rows(dkb, tok_n, ok_n, stride_gl, stride_gd, offs_d, D,
                            _cast(dk * sm_scale, out_ty, BF16_FIX), ALIGN)
                _store_rows(dvb, tok_n, ok_n, stride_gl, stride_gd, offs_d, D, _cast(dv, out_ty, BF16_FIX), ALIGN)


@triton.jit(do_not_specialize=_BWD_UNSPECIALIZED)
def window_attn_bwd_kernel(
    DO, Q, K, V, IDX, DQKV, STATS,
    stride_dob, stride_dol, stride_doh, stride_dod,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ib, stride_ig, stride_il,
    stride_gb, stride_gl, stride_gs, stride_gh, stride_gd,  # dqkv (B, L, 3, H, D)
    L, G, HG, N, SEG, num_seg, num_chunks, num_work,
    qk_scale, sm_scale,
    D: tl.constexpr, HPP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, PACKED: tl.constexpr, DOT_PREC: tl.constexpr,
    BF16_FIX: tl.constexpr, ALIGN: tl.constexpr, NUM_TILES: tl.constexpr, WPP: tl.constexpr,
    NB: tl.constexpr,
):
    """STATS: (B, H, L, 4) float32 scratch of the multi-tile path, (m, 1 / l, top, delta) of each index
    position (not read when SINGLE: any pointer). O and the forward's lse are not inputs: both paths
    recompute the softmax from the scores. One program per work item (num_work of them)."""
    pid = tl.program_id(0)
    if SINGLE:
        tok, ok = _work_tokens(pid, IDX, stride_ib, stride_ig, stride_il, L, G, N, SEG, num_seg,
                               num_chunks, BLOCK_M, WPP, NB)
    else:  # _bwd_work walks the window's tiles itself
        tok = tl.zeros([BLOCK_M], tl.int64)
        ok = tl.zeros([BLOCK_M], tl.int1)
    _bwd_work(pid, tok, ok, DO, Q, K, V, IDX, DQKV, STATS, stride_dob, stride_dol, stride_doh, stride_dod,
              stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh, stride_kd, stride_vb,
              stride_vl, stride_vh, stride_vd, stride_ib, stride_ig, stride_il, stride_gb, stride_gl, stride_gs,
              stride_gh, stride_gd, L, G, HG, N, SEG, num_seg, num_chunks, qk_scale, sm_scale, D, HPP, BLOCK_M,
              BLOCK_N, BLOCK_D, SINGLE, PACKED, DOT_PREC, BF16_FIX, ALIGN, NUM_TILES, WPP, NB)
