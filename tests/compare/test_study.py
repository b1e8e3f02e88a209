"""Study files: expansion, budgets from the trainer's FLOPs counter, size matching, clear errors."""
from pathlib import Path

import pytest
import yaml

from archlab.compare.study import Match, load_study, plan_runs, solve_size
from archlab.compare.synthetic import parse_task
from archlab.train.errors import ConfigError

from ..train.conftest import TINY

ARMS = {
    "transformer": {},
    "mamba": {"model": {"backbone": "mamba", "d_state": 4}, "match": {"to": "transformer", "by": "params"}},
    "diffusion": {"model": {"objective": "masked_diffusion"}, "sample": {"tokens": 0}},
    "jepa": {"model": {"objective": "jepa", "jepa": {"offsets": [1, 4]}}},
}


def write_study(tmp_path, **fields):
    study = {"study": "t", "base": {"include": [str(TINY)]}, "budget": {"flops": 2.0e9}, "arms": ARMS} | fields
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_flops_budget_gives_every_arm_the_same_compute_within_two_percent(tmp_path):
    specs = plan_runs(load_study(write_study(tmp_path)))
    assert [spec.name for spec in specs] == ["transformer-s0", "mamba-s0", "diffusion-s0", "jepa-s0"]
    for spec in specs:
        tokens_per_step = spec.config.train.batch_size * spec.config.data.seq_len
        spent = spec.config.train.max_steps * tokens_per_step * spec.flops_per_token
        assert abs(spent / 2.0e9 - 1) <= 0.02, (spec.name, spent)
    steps = {spec.arm: spec.config.train.max_steps for spec in specs}
    assert steps["jepa"] < steps["transformer"]  # JEPA pays for its target encoder and predictor
    flags = {spec.arm: (spec.probe, spec.bound, spec.quality_metric) for spec in specs}
    assert flags == {"transformer": (False, False, "bpb"), "mamba": (False, False, "bpb"),
                     "diffusion": (False, True, "bpb"), "jepa": (True, False, "bpb")}


def test_matching_parameters_solves_the_width_within_tolerance(tmp_path):
    specs = {spec.arm: spec for spec in plan_runs(load_study(write_study(tmp_path)))}
    mamba = specs["mamba"]
    assert mamba.config.model.d_model != 32 and abs(mamba.params / specs["transformer"].params - 1) <= 0.02
    assert mamba.match["achieved"] == mamba.params and abs(mamba.match["mismatch"]) <= 0.02


def test_matching_flops_per_token_by_depth(tmp_path):
    arms = {"small": {}, "deep": {"model": {"d_model": 32}, "match": {"to": "small", "by": "flops_per_token",
                                                                         "solve": "n_layers", "tolerance": 0.2}}}
    base = {"include": [str(TINY)], "model": {"n_layers": 4}}
    specs = {s.arm: s for s in plan_runs(load_study(write_study(tmp_path, arms=arms, base=base)))}
    assert specs["deep"].config.model.n_layers == 4


def test_unreachable_match_names_the_closest_miss(tmp_path):
    study = load_study(write_study(tmp_path))
    with pytest.raises(ConfigError, match=r"the closest, \d+, gives .*over 0%"):
        solve_size(study.base, Match(to="x", by="params", tolerance=1e-9), target=123_457, source="test")


def test_token_budget_and_seeds_and_sizes_expand(tmp_path):
    path = write_study(tmp_path, budget=[{"tokens": 2560}, {"tokens": 5120}], seeds=[0, 1],
                       arms={"transformer": {}}, sizes={"a": {"d_model": 32}, "b": {"d_model": 64}})
    specs = plan_runs(load_study(path))
    assert len(specs) == 2 * 2 * 2
    assert specs[0].name == "transformer-a-b0-s0" and specs[-1].name == "transformer-b-b1-s1"
    assert {spec.config.train.max_steps for spec in specs} == {10, 20}  # 256 tokens per step
    assert {spec.config.train.seed for spec in specs} == {0, 1}


def test_seconds_budget_measures_speed_and_sets_the_time_limit(tmp_path):
    path = write_study(tmp_path, budget={"seconds": 3.0}, arms={"transformer": {}})
    (spec,) = plan_runs(load_study(path), steps_per_second=lambda cfg: 10.0)
    assert spec.config.train.max_steps == 30 and spec.config.train.max_seconds == 3.0


@pytest.mark.parametrize("fields,message", [
    ({"budget": None}, "needs a budget"),
    ({"budget": {"flops": 1e9, "tokens": 10}}, "exactly one of flops, tokens, seconds"),
    ({"arms": {"a": {"modle": {}}}}, "arm a: unknown section 'modle'"),
    ({"arms": {"a": {"match": {"to": "b"}}}}, "match.to='b' must name another arm"),
    ({"seeds": [1, 1]}, "repeat"),
    ({"arms": {"a": {"model": {"d_model": 30}}}},
     "run a-s0: head dim model.d_model/model.attention.n_heads=15 must be even"),
    ({"budget": {"tokens": 256}}, "warmup_steps=3 must be below max_steps=1"),
    ({"kind": "synthetic", "synthetic": {"tasks": [{}], "widths": [8], "steps": 1, "batch_size": 1, "lr": 1.0}},
     "a synthetic study has no budget"),
    ({"kind": "synthetic", "budget": None}, "needs a synthetic: section"),
    ({"arms": {"a/b": {}}}, "name 'a/b' may hold only letters"),
    ({"arms": {"h": {"model": {"layers": "attention,mamba"}},
               "g": {"model": {"layers": "attention,mamba"},
                     "match": {"to": "h", "solve": "n_layers"}}}},
     "solve: n_layers needs model.layers to be one mixer"),
    ({"linear_probe": {"arms": ["nope"]}}, "linear_probe names arm 'nope', which the study does not have"),
    ({"linear_probe": {"arms": ["jepa"], "baseline": "nope"}}, "linear_probe names arm 'nope'"),
    ({"linear_probe": {"arms": ["diffusion"]}}, "linear_probe arm diffusion trains objective masked_diffusion, which "
                                                "has no fixed representation to probe"),
    ({"linear_probe": {"arms": ["jepa"], "baseline": "diffusion"}}, "baseline diffusion probes the nothing"),
    ({"arms": ARMS | {"masked": {"model": {"objective": "jepa", "jepa": {"mode": "masked_span", "spans": 2,
                                                                           "span_length": [2, 6]}},
                                 "sample": {"tokens": 0}}},
      "linear_probe": {"arms": ["masked"], "baseline": "transformer"}}, "probes the next byte, arm masked the masked"),
    ({"kind": "synthetic", "budget": None, "arms": {"a": {}}, "linear_probe": {"arms": ["a"]},
      "synthetic": {"tasks": [{}], "widths": [8], "steps": 1, "batch_size": 1, "lr": 1.0}}, "linear_probe is for lm"),
    ({"evals": {"arms": ["nope"], "lengths": [1, 2]}}, "evals names arm 'nope'"),
    ({"evals": {"passkey": True}}, "evals needs lengths"),
    ({"evals": {"inference": {"contexts": []}}}, "evals.inference.contexts"),
    ({"kind": "synthetic", "budget": None, "arms": {"a": {}}, "evals": {"lengths": [1]},
      "synthetic": {"tasks": [{}], "widths": [8], "steps": 1, "batch_size": 1, "lr": 1.0}}, "evals are for lm"),
])
def test_bad_study_files_are_one_line_errors(tmp_path, fields, message):
    path = write_study(tmp_path, **fields)
    with pytest.raises(ConfigError, match=message) as caught:
        plan_runs(load_study(path))
    assert "\n" not in str(caught.value)


def test_linear_probe_pairs_each_run_with_the_baselines_run_of_its_seed(tmp_path):
    from archlab.compare.study import probe_pairs

    study = load_study(write_study(tmp_path, seeds=[0, 1], linear_probe={"arms": ["jepa"], "baseline": "transformer"}))
    pairs = probe_pairs(study, plan_runs(study))
    assert [(run.name, baseline.name) for run, baseline in pairs] == [("jepa-s0", "transformer-s0"),
                                                                      ("jepa-s1", "transformer-s1")]
    assert all(run.probe_task == baseline.probe_task == "next byte" for run, baseline in pairs)


def test_missing_or_malformed_study_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_study(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(bad)


def test_every_shipped_study_plans():
    """Each study in configs/studies loads; lm studies plan (validated and sized) without touching data."""
    studies = sorted((Path(__file__).resolve().parents[2] / "configs" / "studies").glob("*.yaml"))
    assert {path.stem for path in studies} >= {"quick", "recall", "recall-gpu", "scaling", "enwik8-small"}
    for path in studies:
        study = load_study(path)
        if study.kind == "lm":
            assert plan_runs(study)
        else:
            assert all(parse_task(task) for task in study.synthetic.tasks)
