"""Config values and files that used to pass validation (or end in a traceback) are refused with one
line that names the key: negative image limits, seeds outside int64, momentum outside [0, 1), a
regenerator width that would allocate gigabytes, a file that is not UTF-8, a key given twice."""

import pytest
from click.testing import CliRunner

from pssr import config, train_classifier, train_purifier
from pssr_cli.main import cli

CLASSIFIER = (train_classifier.ClassifierConfig, "classifier")
PURIFIER = (train_purifier.PurifierConfig, "purifier")


def load(kind, *overrides, source="mnist"):
    cls, prefix = kind
    return config.load(cls, source, overrides, prefix=prefix)


@pytest.mark.parametrize("kind, override, message", [
    (CLASSIFIER, "data.train_limit=-5", r"data: train_limit must be >= 1 .*got -5"),
    (CLASSIFIER, "data.test_limit=-1", r"data: test_limit must be >= 1 .*got -1"),
    (CLASSIFIER, "data.train_limit=0", r"train_limit must be >= 1"),
    (PURIFIER, "data.train_limit=-5", r"data: train_limit must be >= 1 .*got -5"),
    (PURIFIER, "data.test_limit=-1", r"data: test_limit must be >= 1 .*got -1"),
    (CLASSIFIER, "train.seed=1e29", r"train.seed: must be an integer"),  # YAML 1.1 reads 1e29 as a string
    (CLASSIFIER, "train.seed=100000000000000000000000000000", r"train: seed must be an integer from 0 to 2\*\*63-1"),
    (CLASSIFIER, f"train.seed={2**63}", r"train: seed must be an integer from 0 to 2\*\*63-1"),
    (CLASSIFIER, "train.seed=-1", r"train: seed must be an integer from 0 to 2\*\*63-1"),
    (PURIFIER, "train.seed=100000000000000000000000000000", r"train: seed must be an integer from 0 to 2\*\*63-1"),
    (PURIFIER, "train.seed=-3", r"train: seed must be an integer from 0 to 2\*\*63-1"),
    (CLASSIFIER, "train.momentum=-5", r"train: momentum must be in \[0, 1\), got -5"),
    (CLASSIFIER, "train.momentum=1", r"train: momentum must be in \[0, 1\)"),
    (PURIFIER, "regenerator.width=100000", r"regenerator: width must be from 1 to 256, got 100000"),
    (PURIFIER, "regenerator.width=0", r"regenerator: width must be from 1 to 256"),
    (CLASSIFIER, "train.lr=.nan", r"train.lr: must be a finite number"),  # the lead's check, kept
])
def test_bad_values_are_refused_naming_the_key(kind, override, message):
    with pytest.raises(config.ConfigError, match=message):
        load(kind, override)


def test_the_edges_still_load():
    c = load(CLASSIFIER, "data.train_limit=1", "data.test_limit=1", f"train.seed={2**63 - 1}", "train.momentum=0")
    assert (c.data.train_limit, c.train.seed, c.train.momentum) == (1, 2**63 - 1, 0.0)
    p = load(PURIFIER, "regenerator.width=256", "train.seed=0", "data.train_limit=128")
    assert (p.regenerator.width, p.data.train_limit) == (256, 128)
    for name in config.preset_names("classifier"):  # every shipped preset is still valid
        load(CLASSIFIER, source=name)
    for name in config.preset_names("purifier"):
        load(PURIFIER, source=name)


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"data:\n  dataset: mnist\n# caf\xe9\n")
    with pytest.raises(config.ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 on line 3\)"):
        load(CLASSIFIER, source=str(path))


@pytest.mark.parametrize("text, key, first", [
    ("train:\n  epochs: 1\n  lr: 0.1\n  epochs: 3\n", "epochs", 2),
    ("train:\n  epochs: 1\ndata:\n  dataset: mnist\ntrain:\n  lr: 0.1\n", "train", 1),
    ("train: {epochs: 1, epochs: 2}\n", "epochs", 1),
])
def test_duplicate_keys_are_refused_naming_the_key(tmp_path, text, key, first):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=rf"twice.yaml: not valid YAML \(duplicate key '{key}' "
                                                 rf"\(first on line {first}\) at line \d+, column \d+\)"):
        load(CLASSIFIER, source=str(path))


def test_merge_keys_may_still_override():
    """`<<: *defaults` then a key of the defaults is YAML's way to override, not a duplicate."""
    assert config.parse_yaml("d: &d {epochs: 1, lr: 0.1}\ntrain:\n  <<: *d\n  epochs: 3\n", "t")["train"] == \
        {"epochs": 3, "lr": 0.1}


@pytest.mark.parametrize("command", ["train-classifier", "train"])
def test_the_cli_says_one_line(tmp_path, command):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  epochs: 1\n  epochs: 2\n")
    for args, needle in [
        ([str(bad)], "duplicate key 'epochs'"),
        (["mnist", "--set", "data.train_limit=-5"], "train_limit must be >= 1"),
        (["mnist", "--set", "train.seed=100000000000000000000000000000"], "seed must be an integer"),
    ]:
        r = CliRunner().invoke(cli, [command, *args, "--out", str(tmp_path / "run")])
        assert r.exit_code == 1, r.output
        assert r.output.startswith("Error: ") and needle in r.output and len(r.output.strip().splitlines()) == 1
        assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not (tmp_path / "run").exists()
