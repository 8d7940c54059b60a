"""`hf_escrow.till` is `hf_escrow.seller.till` (the seller's faces live in `hf_escrow.seller`); this
name keeps its public import path working and is the very same module object."""

import sys

from .seller import till as _module

sys.modules[__name__] = _module
