"""The one rule that sizes padded token axes (prompt widths, scoring rows, response lengths).

Static shapes keep the number of compiled programs small, so every padded length is rounded up to
a bucket.  Powers of two waste up to half the row at long lengths (a 33k-token teacher row
would pad to 65,536), so above `LONG_FROM` tokens the buckets grow in fixed steps of
`LONG_STEP` instead: at most 2,047 padding tokens per row, about 20 buckets up to 40k.
"""

from __future__ import annotations

from typing import Sequence

MIN_BUCKET = 16
LONG_FROM = 8192
LONG_STEP = 2048


def default_bucket(n: int) -> int:
    """Smallest power of two >= n (at least MIN_BUCKET) up to LONG_FROM, then the next multiple
    of LONG_STEP."""
    n = max(int(n), 1)
    if n > LONG_FROM:
        return -(-n // LONG_STEP) * LONG_STEP
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
    """Smallest of `buckets` >= n, or `default_bucket(n)` when no buckets are given."""
    if not buckets:
        return default_bucket(n)
    fits = [b for b in sorted(buckets) if b >= n]
    if not fits:
        raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}; add a larger "
                         "bucket or lower the length limit")
    return int(fits[0])
