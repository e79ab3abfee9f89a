"""`dsv4c plan` arithmetic: parameter lists against the model, the brief's figures, verdicts."""

from __future__ import annotations

import json

import pytest
import torch

from backends.distributed import Mesh
from dsv4c import cli
from dsv4c.plan import kv_bytes_per_token, make_plan, param_specs
from models.config import Config
from models.deepseek_v4 import Transformer, count_params


@pytest.mark.parametrize("preset", ["tiny", "tiny-512", "small"])
def test_param_specs_match_the_model(preset: str) -> None:
    cfg = Config.preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    want = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert param_specs(cfg) == want


def _main_total(preset: str) -> int:
    return sum(
        torch.Size(s).numel() for n, s in param_specs(Config.preset(preset))
        if not n.startswith("mtp.")
    )


def test_totals_agree_with_count_params() -> None:
    assert _main_total("v4-flash") == count_params(Config.preset("v4-flash"))["total"]
    # count_params(v4-pro) builds 1.6T meta parameters (10 s); its figure, recorded once:
    assert _main_total("v4-pro") == 1_572_997_201_763


def test_figures_of_the_brief() -> None:
    pro = make_plan("v4-pro", Mesh.parse("tp=8,ep=8"), "h200", gpus=8)
    assert pro.world == 8 and pro.folded
    assert pro.weights["routed experts"] / 1e9 == pytest.approx(104.4, rel=1e-3)  # §5.1 EP8
    assert kv_bytes_per_token(Config.preset("v4-pro")) == pytest.approx(5031, abs=1)  # §5.1
    assert pro.fits[1] and not pro.fits[64]  # KV replicated 8x: one 1M sequence, not 64
    assert pro.comm_once == {"embedding all_reduce (tp)": 2 * 7 / 8 * 2 * 7168,  # bf16 ring
                             "head all_gather (tp)": 7 / 8 * 129280 * 4}  # fp32 logits
    ep64 = make_plan("v4-pro", Mesh.parse("dp=64,ep=64"), "h100", gpus=64)
    assert ep64.weights["routed experts"] / 1e9 == pytest.approx(13.06, rel=1e-3)
    per_token = ep64.comm["MoE dispatch (ep)"] / 7440  # 7,168 FP8 + 224 scales + 48 routing
    assert per_token == pytest.approx(6 * 63 / 64)  # low-latency: one copy per remote expert
    assert ep64.fits[64] and ep64.decode_ms[64] > ep64.decode_ms[1] > 0
    assert ep64.comm_once == {}  # no tp: the embedding and head are whole on each rank


def test_flash_on_one_h200_does_not_fit(capsys) -> None:
    assert cli.main(["plan", "--model", "v4-flash", "--mesh", "tp=1", "--gpu", "h200"]) == 2
    out = capsys.readouterr().out
    assert "verdict: DOES NOT FIT — weights alone need 159.6 GB per rank" in out


def test_cli_json_and_errors(tmp_path, capsys) -> None:
    path = tmp_path / "plan.json"
    argv = ["plan", "--model", "v4-flash", "--mesh", "tp=4,ep=4", "--gpus", "4", "--gpu", "h100",
            "--json", str(path)]
    assert cli.main(argv) == 2  # 64 sequences at 1M do not fit
    doc = json.loads(path.read_text())
    assert doc["world"] == 4 and doc["fits"] == {"1": True, "64": False}
    assert cli.main(["plan", "--model", "v4-pro", "--mesh", "tp=3"]) == 1
    assert "tp=3 must divide o_groups=16" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "v4-pro", "--mesh", "tp=8", "--gpus", "5"]) == 1
    assert "--gpus 5 does not fit mesh tp=8" in capsys.readouterr().err
