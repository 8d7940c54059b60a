"""`hf_escrow.vllm` is `hf_escrow.buyer.vllm` (the buyer's adapters live in `hf_escrow.buyer`); this
name keeps its public import path working and is the very same module object."""

import sys

from .buyer import vllm as _module

sys.modules[__name__] = _module
