"""The paper's equations as pure torch functions: no I/O, no Ray, no DeepSpeed.

- ``agapo``: leave-one-out + global advantages, zero-variance filtering, truncated-IS loss (Eq. 1-2).
- ``grouper``: preference advantages in [-1, 1] and the group-wise SimPER loss (Eq. 3-4).
- ``sft``: assistant-only negative log-likelihood.
- ``logprobs``: token log-probabilities computed in chunks over the vocabulary projection.
"""

from kexaone_align.algorithms import agapo, grouper, logprobs, sft

__all__ = ["agapo", "grouper", "logprobs", "sft"]
