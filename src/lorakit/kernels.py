"""`lorakit.kernels`, the documented name of the GPU training fast path, which lives in
`lorakit.train.fastpath`: the same objects under the old import path."""

from lorakit.train.fastpath import *  # noqa: F403
from lorakit.train.fastpath import __all__  # noqa: F401
