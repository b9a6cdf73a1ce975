"""pmkernels: the numerical kernels behind pmedit.

Streaming second moments (``covariance``) and Cholesky-based solves (``solve``), each with a
plain torch reference and compiled backends (C++/OpenMP, Triton, CUDA) behind one API. This
package never imports transformers or pmedit.
"""
