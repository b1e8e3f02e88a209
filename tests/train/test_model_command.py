"""`archlab model CONFIG [overrides]`: the stack as a table, its rows summing to the model's own counts."""
import pytest
import torch

from archlab.archs.registry import build_model
from archlab.archs.summary import decoding_state_bytes, describe_stack
from archlab.train.config import load_config

from .conftest import ROOT
from .test_cli import run_cli

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def test_rows_add_up_to_the_model():
    cfg = load_config(QUICKSTART, ["model.layers=mamba,attention,mamba", "model.objective=jepa"])
    model = build_model(cfg.model)
    rows = describe_stack(model, cfg.data.seq_len)
    blocks, total = rows[:3], rows[-1]
    assert [r["mixer"] for r in blocks] == ["mamba", "attention + mlp", "mamba"]
    assert total["params"] == sum(r["params"] for r in rows[:-1]) == model.num_parameters()
    assert total["flops_per_token"] == sum(r["flops_per_token"] for r in rows[:-1]) == model.flops_per_token(128)
    kv = 2 * 128 * 128 * torch.bfloat16.itemsize  # keys + values of 128 positions, 4 heads x 32 dims
    assert blocks[1]["state_bytes"] == kv and blocks[0]["state_bytes"] == blocks[2]["state_bytes"] > 0


def test_run_summaries_state_bytes_grow_with_length_for_attention_only():
    """What summary.json records: one sequence's state at the trained length and at 4x, the KV cache's part
    growing 4x, the recurrent part fixed; a bidirectional model keeps no decoding state."""
    cfg = load_config(QUICKSTART, ["model.layers=mamba,attention"])
    model = build_model(cfg.model)
    state = decoding_state_bytes(model, 128, dtype=torch.float32)
    kv = 2 * 128 * 128 * torch.float32.itemsize
    recurrent = state["state_bytes"] - kv
    assert recurrent > 0 and state["state_bytes_4x"] == recurrent + 4 * kv and state["state_dtype"] == "float32"
    diffusion = build_model(load_config(QUICKSTART, ["model.objective=masked_diffusion", "sample.tokens=0"]).model)
    assert set(decoding_state_bytes(diffusion, 128, dtype=torch.float32).values()) == {None}


def test_the_command_prints_the_table(capsys):
    code, out, err = run_cli(capsys, "model", QUICKSTART, "model.layers=(mamba*2,attention)*2")
    assert code == 0, err
    lines = out.splitlines()
    assert "'(mamba*2,attention)*2' (hybrid, 6 blocks)" in lines[0]
    assert sum(line.startswith("| ") and ("| mamba |" in line or "| attention + mlp |" in line) for line in lines) == 6
    assert lines[-1].startswith("| total |")


@pytest.mark.parametrize("override,message", [("model.layers=mamba*2,gru", "unknown mixer 'gru'"),
                                               ("model.n_layers=3", None)])
def test_bad_stacks_are_one_error_line(capsys, override, message):
    code, out, err = run_cli(capsys, "model", QUICKSTART, "model.layers=mamba,attention", override)
    assert code == 2 and out == "" and err.count("error:") == 1
    assert message is None or message in err
