import pytest
import torch

from tp3_fastai.mnist.models import MLP, SmallCNN, create_model
from tp3_fastai.train.learner import count_params


def test_mlp_p60_parameter_count_is_the_hand_computation():
    assert count_params(MLP((50,))) == (784 * 50 + 50 + 50 * 10 + 10,) * 2 == (39_760, 39_760)


def test_bigger_mlp_parameter_count():
    n = 784 * 50 + 50 + 50 * 200 + 200 + 200 * 50 + 50 + 50 * 10 + 10
    assert count_params(create_model("mlp-big")) == (n, n) == (60_010, 60_010)


def test_small_cnn_parameter_count_is_the_hand_computation():
    n = 10 * (1 * 25) + 10 + 10 * (10 * 25) + 10 + 490 * 50 + 50 + 50 * 10 + 10
    assert count_params(SmallCNN()) == (n, n) == (27_830, 27_830)


def test_count_params_separates_frozen_parameters():
    m = SmallCNN()
    for p in m.conv1.parameters():
        p.requires_grad_(False)
    assert count_params(m) == (27_830 - 260, 27_830)


@pytest.mark.parametrize("name", ["mlp", "mlp-big", "cnn"])
def test_models_map_a_batch_of_digits_to_ten_logits(name):
    assert create_model(name)(torch.zeros(7, 1, 28, 28)).shape == (7, 10)


def test_small_cnn_flattens_490_features():
    m = SmallCNN()
    x = m.act(m.pool2(m.conv2(m.act(m.pool1(m.conv1(torch.zeros(2, 1, 28, 28)))))))
    assert x.shape == (2, 10, 7, 7) and m.flatten(x).shape == (2, 490)


def test_unknown_architecture_suggests_close_matches():
    with pytest.raises(ValueError, match=r"unknown MNIST architecture 'cnm'.*Did you mean: cnn"):
        create_model("cnm")
