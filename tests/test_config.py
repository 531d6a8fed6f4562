import pytest

from emnist.train.config import ConfigError, TrainConfig


def test_defaults_are_valid():
    cfg = TrainConfig.from_sources({}, {})
    assert cfg.batch_size == 100 and cfg.number_of_workers is None and cfg.execution_type == 3


def test_environment_strings_are_parsed_and_request_wins():
    env = {"alpha": "0.05", "batch_size": "32", "number_of_workers": "", "dataset": "synthetic",
           "PATH": "/bin"}
    cfg = TrainConfig.from_sources(env, {"batch_size": 64, "alpha": 1})
    assert cfg.alpha == 1.0 and cfg.batch_size == 64 and cfg.dataset == "synthetic"
    assert cfg.number_of_workers is None


@pytest.mark.parametrize("request_, field", [
    ({"bogus": 1}, "bogus"),
    ({"batch_size": "64"}, "batch_size"),
    ({"batch_size": 6.5}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"alpha": -1}, "alpha"),
    ({"dropout_percent": 1.0}, "dropout_percent"),
    ({"target_accuracy": 1.5}, "target_accuracy"),
    ({"number_of_workers": 0}, "number_of_workers"),
    ({"dataset": "cifar"}, "dataset"),
    ({"execution_type": 7}, "execution_type"),
    ({"update": "sometimes"}, "update"),
    ({"store_url": "ftp://x"}, "store_url"),
    ({"chunk_bytes": 2_000_000}, "chunk_bytes"),
])
def test_bad_values_name_the_field(request_, field):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_sources({}, request_)
    assert e.value.field == field and str(e.value).startswith(field)


def test_bad_environment_value_names_the_field():
    with pytest.raises(ConfigError, match="^n_fetch: environment value 'ten'"):
        TrainConfig.from_sources({"n_fetch": "ten"})


def test_optional_fields_accept_null():
    assert TrainConfig.from_sources({}, {"num_labels": None}).num_labels is None


def test_booleans_from_environment_and_request():
    assert TrainConfig.from_sources({"overlap": "true"}).overlap is True
    assert TrainConfig.from_sources({"overlap": "0"}).overlap is False
    assert TrainConfig.from_sources({}, {"overlap": True}).overlap is True
    with pytest.raises(ConfigError, match="^overlap: environment value 'maybe'"):
        TrainConfig.from_sources({"overlap": "maybe"})
    with pytest.raises(ConfigError, match="^overlap: must be of type bool"):
        TrainConfig.from_sources({}, {"overlap": 1})
