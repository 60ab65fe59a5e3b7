"""Part-size plans that respect S3's multipart limits."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from recgw_server.domain import ErrorKind, Reason, RecgwError, invalid

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * TiB
# With an unknown length the part size doubles every this many parts: starting from 8 MiB an
# upload passes 1 TiB after about 7,000 parts and can reach the 5 TiB object limit, while a
# short recording keeps small parts (and so small buffers).
GROWTH_INTERVAL = 1_000


@dataclass(frozen=True)
class PartPlan:
    """Decides the size of each part of one upload."""

    base_size: int
    growing: bool
    expected_size: int | None = None
    growth_interval: int = GROWTH_INTERVAL

    def size_of(self, part_number: int) -> int:
        """Size of part `part_number` (1-based); the last part may be shorter."""
        if not self.growing:
            return self.base_size
        steps = (part_number - 1) // self.growth_interval
        return min(self.base_size << steps, MAX_PART_SIZE)

    @functools.cached_property
    def capacity(self) -> int:
        """The largest object this plan can hold in MAX_PARTS parts."""
        if not self.growing:
            return min(self.base_size * MAX_PARTS, MAX_OBJECT_SIZE)
        total = sum(self.size_of(n) for n in range(1, MAX_PARTS + 1, self.growth_interval))
        return min(total * self.growth_interval, MAX_OBJECT_SIZE)


def plan_parts(
    configured_size: int,
    expected_size: int | None,
    equal_sizes: bool,
    growth_interval: int = GROWTH_INTERVAL,
) -> PartPlan:
    """Choose part sizes for an upload.

    With a declared size the parts are equal and large enough to fit in 10,000 parts; with an
    unknown length they grow as the upload grows, unless the store needs equal parts.
    """
    base = min(max(configured_size, MIN_PART_SIZE), MAX_PART_SIZE)
    if expected_size is not None:
        if expected_size < 0:
            raise invalid("expected_size must not be negative", "start.expected_size")
        if expected_size > MAX_OBJECT_SIZE:
            raise RecgwError(
                ErrorKind.OUT_OF_RANGE,
                f"expected_size {expected_size} exceeds the S3 object limit of 5 TiB "
                f"({MAX_OBJECT_SIZE} bytes)",
                reason=Reason.SIZE_LIMIT_EXCEEDED,
            )
        needed = -(-expected_size // MAX_PARTS)
        needed = -(-needed // MiB) * MiB  # whole MiB keep parts aligned and readable
        return PartPlan(max(base, needed), growing=False, expected_size=expected_size)
    return PartPlan(base, growing=not equal_sizes, growth_interval=growth_interval)
