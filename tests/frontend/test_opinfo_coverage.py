"""A small OpInfo subset through capture -> ir.interpret against eager (float32, one sample
each): fails when Core-ATen coverage drops. The full sweep is
`python -m benchmarks.opinfo_coverage` (about 5 minutes on 2 cores)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("expecttest")  # torch's OpInfo database imports it (test extras)

from benchmarks import opinfo_coverage as sweep  # noqa: E402


def test_core_aten_subset_keeps_its_coverage() -> None:
    infos = sweep.core_opinfos(set(sweep.SUBSET))
    assert len({i.aten_name or i.name for i in infos}) >= len(sweep.SUBSET) - 2
    results = [
        sweep.run_op(info, samples=1, backends=(), dtypes=(torch.float32,)) for info in infos
    ]
    summary = sweep.summary(results)
    failed = [f"{r.name}: {r.error}" for r in results if not (r.captured and r.interpreted)]
    assert summary["coverage"] >= sweep.SUBSET_FLOOR, "\n".join(failed)
