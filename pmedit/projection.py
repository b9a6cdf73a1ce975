"""Null-space projectors of C0 (AlphaEdit): the eigendecomposition of a layer's second moment,
computed once and cached on disk beside the statistics, verified.

AlphaEdit keeps an update off the keys a layer already uses by projecting it onto the span U of
C0's eigenvectors whose eigenvalues fall below a threshold (P = U Uᵀ). The eigendecomposition is
the expensive part (O(d³): about a second at d = 1536, tens of minutes at d = 14336 on a CPU),
so it is done once per (model, layer, C0) and stored as safetensors in the statistics directory
(``<stats root>/<model fingerprint>/eigh__L<layer>__<digest>.safetensors``) through
:func:`pmedit.fileio.save_verified`. The key is the model fingerprint, the layer, d and a
SHA-256 of C0's fp64 bytes, so a file can only be used for exactly the C0 it was computed from,
however C0 was obtained (collected, imported, or handed to the Editor); a file whose checksum or
key does not match is recomputed with a warning.

C0 is symmetric positive semidefinite, so ``eigh`` gives what the authors' SVD gives (their
singular values are these eigenvalues; the kept subspace is the same) at a third of the cost.

Not here: the update formula (pmedit.methods.alphaedit) or collecting C0 (pmedit.stats).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pmedit.fileio import load_verified, save_verified

log = logging.getLogger(__name__)

FORMAT = "pmedit-eigh-1"


@dataclass(frozen=True)
class Eigh:
    """C0 = V diag(values) Vᵀ: ``values`` [d] ascending, ``vectors`` [d, d] (columns), fp64 CPU."""

    values: torch.Tensor
    vectors: torch.Tensor
    path: Path | None = None


def c0_digest(C0: torch.Tensor) -> str:
    """SHA-256 of C0's fp64 bytes (row-major): the identity of the statistics a file was made from."""
    data = C0.detach().to(device="cpu", dtype=torch.float64).contiguous()
    return hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def stats_root(cache_dir: str | os.PathLike | None) -> Path:
    """Where pmedit.stats keeps its files: ``cache_dir``, else ``$PMEDIT_CACHE/stats``."""
    from pmedit.models import cache_root

    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "stats"


def eigh_path(root: Path, fingerprint: str, layer: int, digest: str) -> Path:
    return Path(root) / fingerprint / f"eigh__L{layer:03d}__{digest[:16]}.safetensors"


def load_or_compute_eigh(C0: torch.Tensor, *, layer: int, fingerprint: str,
                         root: str | os.PathLike | None) -> Eigh:
    """The eigendecomposition of ``C0`` from the verified cache under ``root`` (None: no disk
    cache), computing and storing it when absent or unusable."""
    if not isinstance(C0, torch.Tensor) or C0.ndim != 2 or C0.shape[0] != C0.shape[1]:
        raise ValueError(f"layer {layer}: C0 must be a square matrix, got "
                         f"{tuple(C0.shape) if isinstance(C0, torch.Tensor) else type(C0).__name__}")
    d = int(C0.shape[0])
    digest = c0_digest(C0)
    key = {"format": FORMAT, "fingerprint": fingerprint, "layer": int(layer), "dim": d, "c0_sha256": digest}
    path = eigh_path(Path(root), fingerprint, layer, digest) if root is not None else None
    if path is not None and path.is_file():
        try:
            return _read(path, key)
        except ValueError as e:
            warnings.warn(f"cached eigendecomposition {path} is unusable ({e}); recomputing", stacklevel=2)
    C = C0.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(C).all()):
        raise ValueError(f"layer {layer}: C0 has non-finite entries; cannot build the null-space projector")
    values, vectors = torch.linalg.eigh(0.5 * (C + C.mT))
    if path is not None:
        save_verified(path, {"values": values, "vectors": vectors}, key)
        log.info("eigendecomposition of C0 (layer %d, d=%d) cached at %s", layer, d, path)
    return Eigh(values, vectors, path)


def _read(path: Path, key: dict) -> Eigh:
    tensors, meta = load_verified(path, what="eigendecomposition cache")
    bad = [k for k in key if meta.get(k) != key[k]]
    if bad:
        raise ValueError("made for other statistics: " + ", ".join(f"{k}={meta.get(k)!r} (want {key[k]!r})" for k in bad))
    values, vectors = tensors.get("values"), tensors.get("vectors")
    d = key["dim"]
    if values is None or vectors is None or tuple(values.shape) != (d,) or tuple(vectors.shape) != (d, d) \
            or values.dtype != torch.float64 or vectors.dtype != torch.float64:
        raise ValueError(f"tensors 'values' (fp64 [{d}]) and 'vectors' (fp64 [{d}, {d}]) expected")
    return Eigh(values, vectors, path)


def null_space_basis(eig: Eigh, threshold: float, *, what: str = "C0") -> torch.Tensor:
    """U [d, r]: the eigenvectors of C0 with eigenvalue < ``threshold`` (P = U Uᵀ).

    ValueError when none is below it (the projector would be zero and no edit could land).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"{what}: nullspace_threshold must be a finite number > 0, got {threshold!r}")
    keep = eig.values < threshold
    r = int(keep.sum())
    d = int(eig.values.numel())
    if r == 0:
        raise ValueError(
            f"{what}: nullspace_threshold={threshold:g} keeps no dimensions (C0's eigenvalues span "
            f"{float(eig.values[0]):.3g} .. {float(eig.values[-1]):.3g}); raise the threshold above the smallest one")
    if r == d:
        log.warning("%s: nullspace_threshold=%g keeps all %d dimensions (largest eigenvalue %.3g): the projection "
                    "preserves nothing", what, threshold, d, float(eig.values[-1]))
    return eig.vectors[:, keep].contiguous()
