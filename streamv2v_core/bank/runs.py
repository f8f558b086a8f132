"""Index runs: the one way the bank turns lists of row or key indices into strided slices."""
from __future__ import annotations


def arithmetic_runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """``indices`` as maximal increasing arithmetic runs ``(first, count, stride)``, in order.

    A run of one index has stride 1; an index that does not continue the current run (or is
    not above its first element) starts a new one.
    """
    runs: list[tuple[int, int, int]] = []
    for i in indices:
        if runs:
            first, count, stride = runs[-1]
            if count == 1 and i > first:
                runs[-1] = (first, 2, i - first)
                continue
            if count > 1 and i == first + count * stride:
                runs[-1] = (first, count + 1, stride)
                continue
        runs.append((i, 1, 1))
    return runs
