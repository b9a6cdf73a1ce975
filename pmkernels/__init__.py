"""pmkernels: the numerical kernels behind pmedit.

Streaming second moments (``covariance``) and Cholesky-based solves (``solve``), each with a
plain torch reference and compiled backends (C++/OpenMP, Triton, CUDA) behind one API. This
package never imports transformers or pmedit.
"""

from pmkernels.batched_solve import batched_spd_solve
from pmkernels.covariance import SecondMoment
from pmkernels.solve import DeltaResult, pm_delta, rank_one_delta
from pmkernels.spd import NotSPDError, SPDFactor, rank_update

__all__ = ["SecondMoment", "SPDFactor", "NotSPDError", "DeltaResult", "rank_update", "pm_delta", "rank_one_delta", "batched_spd_solve"]
