"""Model zoo: registry, parameter counts from the papers, shapes, no randomness in forward."""

import pytest
import torch

from zohpc.config import ConfigError
from zohpc.models import MODEL_NAMES, build_model, count_parameters

EXPECTED = {  # 3x32x32 inputs, 10 classes
    "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018, "resnet110": 1_727_962,
    "cnn_d1": 730, "cnn_d2": 3_700, "cnn_d3": 6_670, "cnn_d4": 9_640, "cnn_d5": 12_610,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_counts(name):
    assert count_parameters(build_model(name, (3, 32, 32), 10)) == EXPECTED[name]


def test_digits_cnn_is_small_and_fits_8x8():
    model = build_model("digits_cnn", (1, 8, 8), 10)
    assert count_parameters(model) == 1946
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_from_data_set(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 7)  # MNIST-like input, 7 classes
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())


def test_forward_is_deterministic():
    model = build_model("resnet20", (3, 32, 32), 10).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name.*vgg"):
        build_model("vgg", (3, 32, 32), 10)
