"""Triton kernels behind ``pmkernels.batched_solve_triton`` (imported lazily: the interpreter
switch must be set before any @triton.jit body runs). See that module for the algorithm."""
import triton
import triton.language as tl

@triton.jit
def _chol_tile(a, rows, cols, BS: tl.constexpr, base, info):
    """Right-looking Cholesky of the register tile ``a`` (lower triangle read): L, info."""
    L = tl.zeros((BS, BS), dtype=a.dtype)
    for k in range(BS):
        colk = tl.sum(tl.where(cols[None, :] == k, a, 0.0), axis=1)
        akk = tl.sum(tl.where(rows == k, colk, 0.0), axis=0)
        bad = ~(akk > 0.0)  # NaN too
        info = tl.where((info == 0) & bad, base + k + 1, info)
        # Correctly rounded sqrt and divide: for fp32, tl.sqrt and "/" compile to the approximate
        # sqrt.approx / div.full instructions (up to 2 ulp), which the jitter logic would misread.
        # (fp64 sqrt and "/" are already correctly rounded; sqrt_rn/div_rn take fp32 only.)
        if a.dtype == tl.float32:
            piv = tl.sqrt_rn(tl.where(bad, 1.0, akk))
            lk = tl.where(rows >= k, tl.div_rn(colk, piv), 0.0)
        else:
            piv = tl.sqrt(tl.where(bad, 1.0, akk))
            lk = tl.where(rows >= k, colk / piv, 0.0)
        a = a - lk[:, None] * lk[None, :]
        L = L + tl.where(cols[None, :] == k, lk[:, None], 0.0)
    return L, info


@triton.jit
def _inv_lower_t(L, rows, cols, BS: tl.constexpr):
    """(L⁻¹)ᵀ for lower-triangular L, by forward substitution on L T = I, row by row."""
    Tt = tl.zeros((BS, BS), dtype=L.dtype)  # Tt[c, j] = T[j, c]
    for k in range(BS):
        lk = tl.sum(tl.where(rows[:, None] == k, L, 0.0), axis=0)  # row k of L, along axis 1
        lkk = tl.sum(tl.where(cols == k, lk, 0.0), axis=0)
        lkk = tl.where(lkk == 0.0, 1.0, lkk)
        s = tl.sum(lk[None, :] * Tt, axis=1)  # Σ_j L[k, j] T[j, c], along axis 0
        if L.dtype == tl.float32:
            newrow = tl.div_rn(tl.where(rows == k, 1.0, 0.0) - s, lkk)
        else:
            newrow = (tl.where(rows == k, 1.0, 0.0) - s) / lkk
        Tt = Tt + tl.where(cols[None, :] == k, newrow[:, None], 0.0)
    return Tt


@triton.jit
def _batched_chol_solve(
    W_ptr, T_ptr, X_ptr, info_ptr,
    NP: tl.constexpr, MP: tl.constexpr,
    BS: tl.constexpr, NB: tl.constexpr, BM: tl.constexpr, NCH: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BS)
    cols = tl.arange(0, BS)
    cm = tl.arange(0, BM)
    w = W_ptr + pid.to(tl.int64) * NP * NP
    t = T_ptr + pid.to(tl.int64) * NB * BS * BS
    x = X_ptr + pid.to(tl.int64) * NP * MP
    tile = rows[:, None] * NP + cols[None, :]
    ttile = rows[:, None] * BS + cols[None, :]
    info = tl.zeros((), dtype=tl.int32)

    # ---- factor: W ← L (blocked right-looking), T[p] ← (L_pp⁻¹)ᵀ
    for p in range(NB):
        dpp = w + (p * BS) * NP + p * BS
        Lpp, info = _chol_tile(tl.load(dpp + tile), rows, cols, BS, p * BS, info)
        tl.store(dpp + tile, Lpp)
        Tt = _inv_lower_t(Lpp, rows, cols, BS)
        tl.store(t + p * BS * BS + ttile, Tt)
        for i in range(p + 1, NB):
            pip = w + (i * BS) * NP + p * BS
            Lip = tl.dot(tl.load(pip + tile), Tt, input_precision="ieee")  # A_ip L_pp⁻ᵀ
            tl.store(pip + tile, Lip)
        tl.debug_barrier()
        for i in range(p + 1, NB):
            Lip = tl.load(w + (i * BS) * NP + p * BS + tile)
            for j in range(p + 1, i + 1):
                Ljp = tl.load(w + (j * BS) * NP + p * BS + tile)
                pij = w + (i * BS) * NP + j * BS
                Aij = tl.load(pij + tile) - tl.dot(Lip, tl.trans(Ljp), input_precision="ieee")
                tl.store(pij + tile, Aij)
        tl.debug_barrier()
    tl.store(info_ptr + pid, info)

    # ---- solve, BM right-hand-side columns at a time: L y = b, then Lᵀ x = y (in place in X)
    xtile = rows[:, None] * MP + cm[None, :]
    for c in range(NCH):
        xc = x + c * BM
        for p in range(NB):
            y = tl.load(xc + (p * BS) * MP + xtile)
            for j in range(0, p):
                Lpj = tl.load(w + (p * BS) * NP + j * BS + tile)
                y = y - tl.dot(Lpj, tl.load(xc + (j * BS) * MP + xtile), input_precision="ieee")
            Tt = tl.load(t + p * BS * BS + ttile)
            y = tl.dot(tl.trans(Tt), y, input_precision="ieee")  # L_pp⁻¹ y
            tl.store(xc + (p * BS) * MP + xtile, y)
            tl.debug_barrier()
        for q in range(NB):
            p = NB - 1 - q
            z = tl.load(xc + (p * BS) * MP + xtile)
            for j in range(p + 1, NB):
                Ljp = tl.load(w + (j * BS) * NP + p * BS + tile)
                z = z - tl.dot(tl.trans(Ljp), tl.load(xc + (j * BS) * MP + xtile), input_precision="ieee")
            Tt = tl.load(t + p * BS * BS + ttile)
            z = tl.dot(Tt, z, input_precision="ieee")  # L_ppᵀ⁻¹ z
            tl.store(xc + (p * BS) * MP + xtile, z)
            tl.debug_barrier()
