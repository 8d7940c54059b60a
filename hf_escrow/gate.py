"""`hf_escrow.gate` is `hf_escrow.seller.gate` (the seller's faces live in `hf_escrow.seller`); this
name keeps its public import path working and is the very same module object."""

import sys

from .seller import gate as _module

sys.modules[__name__] = _module
