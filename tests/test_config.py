import math

import pytest

from emnist.policy import PolicyError
from emnist.train.config import FIELD_KINDS, LIMITS, ConfigError, TrainConfig


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
    with pytest.raises(ConfigError, match='^n_fetch: environment value "ten" is not an integer'):
        TrainConfig.from_sources({"n_fetch": "ten"})


def test_optional_fields_accept_null():
    assert TrainConfig.from_sources({}, {"num_labels": None}).num_labels is None


def test_booleans_from_environment_and_request():
    assert TrainConfig.from_sources({"overlap": "true"}).overlap is True
    assert TrainConfig.from_sources({"overlap": "0"}).overlap is False
    assert TrainConfig.from_sources({}, {"overlap": True}).overlap is True
    with pytest.raises(ConfigError, match='^overlap: environment value "maybe"'):
        TrainConfig.from_sources({"overlap": "maybe"})
    with pytest.raises(ConfigError, match="^overlap: must be a boolean, got 1$"):
        TrainConfig.from_sources({}, {"overlap": 1})


@pytest.mark.parametrize("request_, text", [
    ({"batch_size": True}, "batch_size: must be an integer, got true"),
    ({"alpha": "0.1"}, "alpha: must be a number, got a string"),
    ({"dataset": ["mnist"]}, "dataset: must be a string, got an array"),
    ({"update": "sometimes"}, 'update: must be one of ["atomic", "overwrite"], got "sometimes"'),
    ({"dataset": "cifar"}, 'dataset: unknown dataset "cifar"'),
])
def test_messages_use_json_words_not_python_reprs(request_, text):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_sources({}, request_)
    assert str(e.value).startswith(text)
    assert "True" not in str(e.value) and "'" not in str(e.value).split(";")[0]


@pytest.mark.parametrize("name", [n for n, (_, _, _) in LIMITS.items()])
def test_every_numeric_field_has_an_upper_bound_and_refuses_nan(name):
    low, high, _ = LIMITS[name]
    kind = FIELD_KINDS[name][0]
    too_big = high * 2 + 1 if kind is float else int(high) + 1
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_sources({}, {name: too_big})
    assert e.value.field == name
    if kind is float:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=f"^{name}: "):
                TrainConfig(**{name: bad})
    # the bounds themselves are accepted (the high one, and the low one when it is included)
    ok = {"chunk_bytes": 900 * 1024, "dropout_percent": 0.5, "target_accuracy": 1.0}
    TrainConfig.from_sources({}, {name: ok.get(name, kind(high))}, ignore=())


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-Infinity", "1e999"])
def test_environment_refuses_non_finite_numbers(raw):
    with pytest.raises(ConfigError, match="^alpha: environment value"):
        TrainConfig.from_sources({"alpha": raw})
    with pytest.raises(ConfigError, match="^iterations: environment value"):
        TrainConfig.from_sources({"iterations": raw})


def test_huge_json_integer_for_a_float_field_is_refused():
    with pytest.raises(ConfigError, match="^alpha: "):
        TrainConfig.from_sources({}, {"alpha": 10**400})


def test_model_size_is_capped_by_max_params_before_anything_is_allocated():
    with pytest.raises(ConfigError, match="^hidden_size: .*max_params \\(150000000\\)"):
        TrainConfig.from_request({}, {"hidden_size": 1_000_000})
    cfg = TrainConfig.from_request({"max_params": "1e6"}, {"hidden_size": 1000})
    assert cfg.num_params == 785 * 1000 + 1001 * 10
    with pytest.raises(ConfigError, match="^hidden_size: "):
        TrainConfig.from_request({"max_params": "100000"}, {"hidden_size": 1000})
    # the operator's own environment is capped too
    with pytest.raises(ConfigError, match="^hidden_size: "):
        TrainConfig.from_request({"max_params": "100000", "hidden_size": "1000"})
    # EMNIST byclass has 62 classes: counted without reading the data
    assert TrainConfig(dataset="emnist-byclass").num_params == 785 * 100 + 101 * 62


def test_number_of_workers_is_capped_by_max_workers():
    with pytest.raises(ConfigError, match="^number_of_workers: at most 256"):
        TrainConfig.from_request({}, {"number_of_workers": 100000})
    assert TrainConfig.from_request({"max_workers": "1000"},
                                    {"number_of_workers": 1000}).number_of_workers == 1000
    with pytest.raises(ConfigError, match="^number_of_workers: at most 8"):
        TrainConfig.from_request({"max_workers": "8"}).check_caps({"max_workers": "8"}, 9)


@pytest.mark.parametrize("raw", ["nan", "inf", "-1", "0", "1.5", "lots", "1e11"])
def test_bad_policy_caps_in_the_environment_are_refused(raw):
    with pytest.raises(PolicyError, match="^max_params: "):
        TrainConfig.from_request({"max_params": raw})


def test_an_empty_dataset_dir_means_the_default_not_the_current_directory():
    assert TrainConfig.from_sources({}, {"dataset_dir": ""}).dataset_dir is None
    assert TrainConfig.from_request({}, {"dataset_dir": ""}).dataset_dir is None
