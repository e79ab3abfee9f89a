"""The tuning database (dsv4c/tuning.py): JSON round trip, corrupted or foreign entries ignored
with a warning (never trusted), compile applies an entry (the kernel's source says so and the
schedule changes, outputs still equal eager), GPU defaults are cost-model entries marked
untuned, and `dsv4c tune` measures candidates that compute the default kernel's outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import dsv4c
from backends.tvm.schedule_cpu import Knobs
from dsv4c import tuning
from dsv4c.tuning import Entry, TuningDB, TuningKey

from dsv4c_helpers import compiled, eager, mlp, x


def _entry(kernel: str = "rmsnorm_0123", **knobs: int) -> Entry:
    key = TuningKey(kernel, "B<=1", "cpu:testcpu", "tvm 0; schedules 1")
    return Entry(key, Knobs(**knobs), "measured", 1e-6, 2e-6)


def test_round_trip_is_plain_json(tmp_path: Path) -> None:
    db = TuningDB()
    db.put(_entry(serial_max=32))
    db.put(_entry("matmul_nt_99", tile_i=16, tile_j=8, dots=False))
    path = tmp_path / "db.json"
    db.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "dsv4c-tuning" and len(doc["entries"]) == 2
    assert all(len(e["sha256"]) == 64 for e in doc["entries"])
    assert TuningDB.load(path).entries == db.entries
    found = TuningDB.load(path).lookup("matmul_nt_99", "B<=1", "cpu:testcpu", "tvm 0; schedules 1")
    assert found is not None and found.knobs == Knobs(tile_i=16, tile_j=8, dots=False)
    assert TuningDB.load(tmp_path / "missing.json").entries == {}


def test_a_corrupted_entry_is_ignored_with_a_warning(tmp_path: Path) -> None:
    db = TuningDB()
    db.put(_entry("good_1", serial_max=32))
    db.put(_entry("bad_2", serial_max=32))
    path = tmp_path / "db.json"
    db.save(path)
    doc = json.loads(path.read_text())
    bad = next(e for e in doc["entries"] if e["kernel"] == "bad_2")
    bad["knobs"]["serial_max"] = 1  # edited without its hash: must not be trusted
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match=r"entry \d \(bad_2\) ignored: its sha256 does not match"):
        loaded = TuningDB.load(path)
    assert [k.kernel for k in loaded.entries] == ["good_1"]


def test_unknown_knobs_and_bad_files_are_ignored_with_a_warning(tmp_path: Path) -> None:
    entry = _entry().to_json()
    entry["knobs"]["warp_specialise"] = True  # a knob this version does not know, hash redone
    body = {k: v for k, v in entry.items() if k != "sha256"}
    entry["sha256"] = tuning._digest(body)
    path = tmp_path / "db.json"
    path.write_text(json.dumps({"format": "dsv4c-tuning", "schema": 1, "entries": [entry]}))
    with pytest.warns(UserWarning, match="unknown schedule knob"):
        assert TuningDB.load(path).entries == {}
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="not readable JSON"):
        assert TuningDB.load(path).entries == {}
    path.write_text(json.dumps({"format": "other", "entries": []}))
    with pytest.warns(UserWarning, match="expected format 'dsv4c-tuning'"):
        assert TuningDB.load(path).entries == {}


def test_buckets_and_lookup_order() -> None:
    assert tuning.bucket_of({"T": 3000, "B": 1}) == "B<=1,T<=4096"
    assert tuning.bucket_of({"B": 5}) == "B<=8" and tuning.bucket_of({}) == "*"
    db = TuningDB()
    key = TuningKey("k_1", "*", "cpu:x", "v")
    db.put(Entry(key, Knobs(vector=8)))
    db.put(Entry(TuningKey("k_1", "B<=1", "cpu:x", "v"), Knobs(vector=32)))
    assert db.lookup("k_1", "B<=1", "cpu:x", "v").knobs.vector == 32
    assert db.lookup("k_1", "B<=8", "cpu:x", "v").knobs.vector == 8
    assert db.lookup("k_1", "B<=1", "cpu:other", "v") is None  # another CPU: not applied
    assert db.lookup("k_1", "B<=1", "cpu:x", "tvm 1") is None  # another TVM: not applied
    with pytest.raises(ValueError, match="Knobs.vector must be a power of two"):
        Knobs(vector=12)


def test_gpu_defaults_come_from_the_cost_model_and_say_untuned() -> None:
    from backends.targets import get_target

    shipped = TuningDB.load(tuning.DEFAULTS)
    assert shipped.entries == tuning.shipped_defaults().entries  # the file is regenerated
    for name in ("sm_80", "sm_90", "gfx942"):
        e = shipped.lookup("*", "*", name, f"schedules {tuning.SCHEDULES}")
        assert e is not None and e.source == "cost model (untuned)" and e.seconds is None
        t = e.knobs.tile_i
        assert t == e.knobs.tile_j and 2 * 2 * t * 32 * 2 <= get_target(name).smem_per_block
    with pytest.raises(ValueError, match="not a GPU target"):
        tuning.gpu_defaults("cpu")


def test_compile_applies_a_database_entry(tmp_path: Path, monkeypatch) -> None:
    """An entry for the layernorm kernel (serial_max 1: run its rows in parallel) changes that
    kernel's loops and marks its source; the outputs still equal eager; a compile without the
    entry afterwards gets the untuned kernel back (no stale session cache)."""
    plain = compiled("tvm")
    files = {n: d.decode() for n, d in plain.files.items() if n.endswith(".tir.py")}
    name, source = next((n, s) for n, s in files.items() if "/layernorm_" in n)
    assert "dsv4c.tuned" not in source
    symbol = Path(name).name.split(".")[0]
    db = TuningDB()
    key = TuningKey(symbol, "B<=4", tuning.cpu_target_key(), tuning.versions())
    db.put(Entry(key, Knobs(serial_max=1)))
    path = tmp_path / "db.json"
    db.save(path)
    monkeypatch.setenv("DSV4C_TUNING_DB", str(path))
    tuned = dsv4c.compile(mlp(), (x(),), backend="tvm", target="cpu", dynamic={"x": {0: "B"}})
    tuned_source = tuned.files[name].decode()
    assert '"dsv4c.tuned": "serial_max=1"' in tuned_source
    assert "T.parallel" in tuned_source and "T.parallel" not in source
    for batch in (1, 5):
        (got,) = tuned(x(batch, seed=batch))
        torch.testing.assert_close(got, eager(x(batch, seed=batch)))
    monkeypatch.delenv("DSV4C_TUNING_DB")
    monkeypatch.setenv("DSV4C_CACHE_DIR", str(tmp_path / "empty"))
    again = dsv4c.compile(mlp(), (x(),), backend="tvm", target="cpu", dynamic={"x": {0: "B"}})
    assert again.files[name].decode() == source


def test_applied_is_a_no_op_for_other_backends_and_gpus() -> None:
    from backends.targets import get_target

    db = TuningDB()
    db.put(Entry(TuningKey("*", "*", tuning.cpu_target_key(), tuning.versions()), Knobs(vector=8)))
    with tuning.applied("triton", get_target("cpu"), {}, db=db) as knobs:
        assert knobs == {}
    with tuning.applied("tvm", get_target("sm_90"), {}, db=db) as knobs:
        assert knobs == {}
    with tuning.applied("tvm", get_target("cpu"), {"B": 1}, db=db) as knobs:
        assert knobs == {"*": Knobs(vector=8)}


def test_tune_kernel_measures_candidates_that_compute_the_same() -> None:
    """Candidates of the MLP's kernels build, equal the default's outputs and are timed."""
    from dsv4c.tune import _record_calls, candidates, tune_kernel

    c = dsv4c.compile(mlp(), (x(),), backend="tvm", target="cpu", dynamic={"x": {0: "B"}})
    exe = c.entries["forward"].executable
    seen = _record_calls(exe)
    c(x(3))
    assert seen, "no kernel call was recorded"
    for kernel in exe.kernels():
        n_out = len(kernel.tensor_ir.params) - len(kernel.body.inputs)
        best, best_s, default_s, n = tune_kernel(kernel, seen[kernel.key], n_out, 2, limit=3)
        assert n >= 2, kernel.symbol  # the default and at least one other candidate ran
        assert best in candidates("generic") and best_s <= default_s


@pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="minutes on 2 cores; DSV4C_SLOW=1")
def test_cli_tune_tiny_writes_a_database(tmp_path: Path) -> None:
    from dsv4c.cli import main

    path = tmp_path / "db.json"
    argv = ["tune", "--model", "tiny", "--methods", "decode", "--candidates", "2", "--repeat", "2"]
    assert main([*argv, "--db", str(path)]) == 0
    db = TuningDB.load(path)
    assert all(e.key.target == tuning.cpu_target_key() for e in db.entries.values())
    assert all(e.seconds < e.baseline_s for e in db.entries.values())


def test_cli_tune_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from dsv4c.cli import main

    db = str(tmp_path / "db.json")
    assert main(["tune", "--model", "tiny", "--target", "sm_90", "--db", db]) == 1
    assert "measures on this machine's CPU only" in capsys.readouterr().err
    assert main(["tune", "--model", "tiny", "--methods", "forward", "--db", db]) == 1
    assert "unknown method(s) ['forward']" in capsys.readouterr().err
    assert main(["tune", "--model", "huge", "--db", db]) == 1
    assert "unknown model 'huge'" in capsys.readouterr().err
    assert not Path(db).exists()  # nothing written on an error
