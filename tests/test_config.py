"""Config tree: defaults == configs/default.toml, round trip, overrides, every validation error."""

import dataclasses
import os
import subprocess
import sys

import pytest

from zohpc.config import Config, ConfigError, from_toml_text, load_config, to_toml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_toml_states_the_builtin_defaults():
    assert load_config(os.path.join(ROOT, "configs", "default.toml")) == Config()


def test_round_trip_through_toml():
    cfg = load_config(overrides=["optim.lr=0.3", "data.batch_size=17", "zo.difference=central",
                                 "optim.betas=[0.8, 0.9]", "run.out=some dir/with \"quotes\""])
    again = from_toml_text(to_toml(cfg))
    assert again == cfg
    assert again.optim.lr == 0.3 and again.data.batch_size == 17 and again.optim.betas == [0.8, 0.9]


def test_resnet_config_states_deepzero_setting(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "cifar10_resnet20_s90.toml"), [f"data.dir={tmp_path}"])
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.schedule, cfg.optim.momentum) == (256, 0.1, "cosine", 0.9)
    assert (cfg.optim.weight_decay, cfg.optim.warmup_epochs, cfg.train.epochs) == (5e-4, 3, 50)
    assert (cfg.zo.mu, cfg.prune.sparsity, cfg.prune.mask_interval, cfg.model.name) == (5e-3, 0.9, 5, "resnet20")


def test_override_int_accepted_for_float_and_string_bare():
    cfg = load_config(overrides=["optim.lr=1", "model.name=resnet20"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.name == "resnet20"


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=0.1", ["optim.lrr", "unknown"]),
    ("optimizer.lr=0.1", ["optimizer", "unknown"]),
    ("data.batch_size=0", ["data.batch_size", "range"]),
    ("data.batch_size=1.5", ["data.batch_size", "integer"]),
    ("optim.lr=0", ["optim.lr", "range"]),
    ("optim.lr=-0.1", ["optim.lr", "range"]),
    ("optim.lr=fast", ["optim.lr", "number"]),
    ("prune.sparsity=1.0", ["prune.sparsity", "range"]),
    ("prune.sparsity=-0.1", ["prune.sparsity", "range"]),
    ("optim.nesterov=1", ["optim.nesterov", "true or false"]),
    ("zo.estimator=sge", ["zo.estimator", "cge"]),
    ("model.name=vgg", ["model.name", "vgg"]),
    ("data.name=cifar10", ["data.dir", "required"]),
    ("optim.lr", ["optim.lr", "section.key=value"]),
])
def test_validation_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_missing_data_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="data.dir.*does not exist"):
        load_config(overrides=["data.name=mnist", f"data.dir={missing}"])


def test_typo_in_file_is_caught(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlrr = 0.1\n")
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(str(path))
    path.write_text("[optim\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "absent.toml"))
    path.write_bytes(b"\x89HDF\r\n\x1a\n")  # an HDF5 file given as the config
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(TOML\): byte 0 is b'\\x89'"):
        load_config(str(path))


def test_every_section_key_has_a_default():
    for f in dataclasses.fields(Config):
        section = getattr(Config(), f.name)
        assert dataclasses.is_dataclass(section)


@pytest.mark.parametrize("args, words", [
    (["--set", "optim.lrr=0.1"], ["optim.lrr"]),
    (["--set", "prune.sparsity=1.5"], ["prune.sparsity"]),
    (["--set", "data.batch_size=0"], ["data.batch_size"]),
    (["--set", "data.name=cifar10", "--set", "data.dir=/nonexistent/zohpc"], ["data.dir", "/nonexistent/zohpc"]),
    (["--config", "/nonexistent/zohpc.toml"], ["/nonexistent/zohpc.toml"]),
])
def test_cli_config_errors_exit_2_with_one_line(tmp_path, args, words):
    proc = subprocess.run([sys.executable, "-m", "zohpc.train", "--out", str(tmp_path / "run"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0]
    assert not (tmp_path / "run").exists()


def test_train_help():
    proc = subprocess.run([sys.executable, "-m", "zohpc.train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for opt in ("--config", "--set", "--out", "--resume"):
        assert opt in proc.stdout
