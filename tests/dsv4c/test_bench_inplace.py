"""`dsv4c bench` rows in place (`<backend>-inplace`): the same compile as the functional row, the
bytes the cache updates move per step (fewer in place), and a private copy of the workload's
cache, so the rows after it still start from the original (at position 15 a ratio-4 block
completes: a second step on an updated cache would give other logits)."""

from __future__ import annotations

from dsv4c.bench import bench, bench_table


def test_inplace_rows_move_fewer_bytes_and_leave_the_workload_alone() -> None:
    doc = bench(
        "tiny",
        ["eager", "reference-inplace", "reference"],
        prompt_len=0,
        context=15,
        batches=(2,),
        repeat=2,
        say=lambda _: None,
    )
    rows = {r["backend"]: r for r in doc["rows"]}
    inplace, functional = rows["reference-inplace"], rows["reference"]
    for r in (inplace, functional):
        assert r["check"]["ok"] and r["check"]["max_rel_err"] <= 1e-5, r
    assert functional["compile_s"] < 1.0  # the in-place row compiled it
    # tiny at B=2: the rows and one compressed row per completed block vs copies of every cache
    assert 0 < inplace["cache_update_bytes"] < functional["cache_update_bytes"] / 3
    assert "| cache MB moved |" in bench_table(doc)
