import pytest
import yaml
from hypothesis import given, settings, strategies as st

from archlab.train.config import Config, config_differences, dump_config, load_config
from archlab.train.errors import ConfigError

from .conftest import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def test_quickstart_composes_its_pieces():
    cfg = load_config(QUICKSTART)
    assert cfg.model.layers == "transformer" and cfg.model.d_model == 128  # from configs/archs/
    assert cfg.data.path == "tinyshakespeare.txt"                            # from configs/data/
    assert cfg.data.seq_len == 128                                            # the file's own key


def test_dotted_overrides_are_typed():
    cfg = load_config(QUICKSTART, ["train.max_steps=200", "model.d_model=64", "train.lr=1e-3", "run.resume=auto"])
    assert (cfg.train.max_steps, cfg.model.d_model, cfg.train.lr, cfg.run.resume) == (200, 64, 1e-3, "auto")


def test_every_shipped_config_validates():
    """Run configs validate as run configs; study files (configs/studies) are checked in tests/compare."""
    for path in (ROOT / "configs").rglob("*.yaml"):
        if path.parent.name != "studies":
            load_config(path)


def test_dumped_config_round_trips(tmp_path):
    cfg = load_config(QUICKSTART, ["model.attention.n_kv_heads=2"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert config_differences(cfg, load_config(path, ["train.lr=0.5"])) == ["train.lr"]


@pytest.mark.parametrize("override, message", [
    ("model.d_modle=64", "unknown key model.d_modle; did you mean model.d_model?"),
    ("trian.lr=1", "unknown key trian; did you mean train?"),
    ("train.lr=-1", "train.lr: input should be greater than 0"),
    ("train.lr=fast", "train.lr: input should be a valid number"),
    ("train.batch_size=0", "train.batch_size: input should be greater than 0"),
    ("train.max_steps=-5", "train.max_steps: input should be greater than 0"),
    ("train.batch_size=2.5", "train.batch_size: input should be a valid integer"),
    ("model.attention.n_heads=3", "model.attention.n_heads=3 does not divide model.d_model=128"),
    ("model.attention.n_kv_heads=3", "n_kv_heads=3 must divide model.attention.n_heads=4"),
    ("model.layers=transfomer", "unknown mixer 'transfomer'; did you mean 'transformer'?"),
    ("model.n_heads=3", "model.attention.n_heads=3 does not divide model.d_model=128"),  # the old flat key
    ("model.objective=nope", "unknown objective 'nope'"),
    ("train.device=tpu", "train.device: input should be 'auto', 'cpu' or 'cuda'"),
    ("kernels.attention=fast", "kernels.attention: input should be"),
    ("data.test_fraction=0.95", "data: val_fraction + test_fraction must be below 1"),
    ("train.micro_batch_size=5", "micro_batch_size=5 must divide batch_size=32"),
    ("train.lr", "must look like section.key=value"),
    ("train.lr.x=1", "train.lr is a value, not a section"),
    ("sample.steps=8", "sample.steps does not apply to objective autoregressive; remove it"),
    ("model.objective=masked_diffusion", "sample.prompt (6 bytes) + sample.tokens (300) must fit in "
                                         "data.seq_len=128; lower sample.tokens"),
    ("sample.strategy=greedy", "sample.strategy: input should be 'ancestral', 'confidence' or 'block'"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_model: [128\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path)


def test_missing_and_non_mapping_configs(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_include_cycles_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_later_includes_and_own_keys_win(tmp_path):
    (tmp_path / "one.yaml").write_text("train: {lr: 0.1, max_steps: 700}\n")
    (tmp_path / "two.yaml").write_text("train: {lr: 0.2}\n")
    (tmp_path / "top.yaml").write_text("include: [one.yaml, two.yaml]\ntrain: {batch_size: 3}\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size) == (0.2, 700, 3)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 512), st.integers(1, 16))
def test_heads_must_divide_d_model(d_model, n_heads):
    overrides = [f"model.d_model={d_model}", f"model.attention.n_heads={n_heads}"]
    valid = d_model % n_heads == 0 and (d_model // n_heads) % 2 == 0 and d_model // n_heads <= 256
    if valid:
        assert load_config(None, overrides).model.mixer_settings("attention").n_heads == n_heads
    else:
        with pytest.raises(ConfigError):
            load_config(None, overrides)


def test_defaults_are_a_valid_config():
    assert Config().model.objective == "autoregressive"
    yaml.safe_load(dump_config(Config()))
