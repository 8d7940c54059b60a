"""`hf_escrow.inference` is `hf_escrow.buyer.inference` (the buyer's adapters live in `hf_escrow.buyer`); this
name keeps its public import path working and is the very same module object."""

import sys

from .buyer import inference as _module

sys.modules[__name__] = _module
