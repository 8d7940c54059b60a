"""`hf_escrow.datasets` is `hf_escrow.buyer.datasets` (the buyer's adapters live in `hf_escrow.buyer`); this
name keeps its public import path working and is the very same module object."""

import sys

from .buyer import datasets as _module

sys.modules[__name__] = _module
