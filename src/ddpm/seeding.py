"""Seeds derived from integers, so every random draw can be reproduced from (seed, index)."""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence), e.g. (seed, step) or (seed, image index)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))
