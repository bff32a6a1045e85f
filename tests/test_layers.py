"""Part 0's layer examples: every shape and weight count the package computes equals what PyTorch's module gives."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tp3_fastai.review.layers import (COURSE_EXAMPLES, LayerExample, adaptive_windows, course_layer_facts, layer_facts,
                               layer_notes, output_size, rule_output_shape, weight_counts)


def _pytorch_shape(module: nn.Module, shape) -> tuple:
    """The module's own output shape, computed on the meta device (the Conv3d's output would need ~1 GiB)."""
    return tuple(module.to("meta")(torch.empty(shape, device="meta")).shape)


@pytest.mark.parametrize("example", COURSE_EXAMPLES, ids=[e.code for e in COURSE_EXAMPLES])
def test_every_course_example_matches_pytorchs_module(example):
    facts = layer_facts(example)
    module = example.build()
    weights = sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))
    biases = sum(p.numel() for n, p in module.named_parameters() if n.endswith("bias"))
    expected = _pytorch_shape(module, example.input_shape)
    assert facts.output_shape == expected and facts.pytorch_shape == expected
    assert (facts.weights, facts.biases, facts.params) == (weights, biases, weights + biases)
    assert facts.activations == math.prod(expected) and facts.bytes == 4 * math.prod(expected)
    if weights:   # the formula shows the count PyTorch has
        assert facts.formula.endswith(f"= {weights + biases:,}")


def test_the_course_examples_are_the_ones_of_the_issue():
    codes = [e.code for e in COURSE_EXAMPLES]
    assert codes[:4] == ["nn.Linear(1024, 512)", "nn.Conv2d(3, 64, kernel_size=7, padding=3, stride=2)",
                         "nn.Conv1d(2, 16, kernel_size=5, padding=2, stride=4, bias=False)",
                         "nn.Conv3d(1, 32, kernel_size=3, padding=1)"]
    assert [e.input_shape for e in COURSE_EXAMPLES[:4]] == [(32, 1024), (32, 3, 256, 256), (8, 2, 10201),
                                                            (32, 1, 60, 64, 64)]


def test_output_size_rule_equals_pytorch_on_a_grid_of_settings():
    checked = 0
    for length in range(1, 14):
        for k in (1, 2, 3, 5):
            for s in (1, 2, 3):
                for p in (0, 1, 2):
                    for d in (1, 2):
                        if p > (d * (k - 1) + 1) // 2 or length + 2 * p < d * (k - 1) + 1:
                            continue   # PyTorch refuses these (padding > half the kernel, kernel > input)
                        conv = nn.Conv1d(1, 1, k, stride=s, padding=p, dilation=d, bias=False)
                        assert output_size(length, k, s, p, d) == conv(torch.zeros(1, 1, length)).shape[-1]
                        if d == 1:
                            pool = F.max_pool1d(torch.zeros(1, 1, length), k, s, p)
                            assert output_size(length, k, s, p) == pool.shape[-1]
                        checked += 1
    assert checked > 300
    with pytest.raises(ValueError, match="does not fit"):
        output_size(3, 5)


def test_the_slides_values_differ_from_pytorch_and_the_notes_say_why():
    facts = {f.code: f for f in course_layer_facts()}
    linear, conv1d = facts["nn.Linear(1024, 512)"], facts[COURSE_EXAMPLES[2].code]
    assert linear.slide_shape == (32, 64) != linear.pytorch_shape
    assert conv1d.slide_shape == (8, 16, 2501) != conv1d.pytorch_shape
    # the explanation given: 2501 is the rule applied to 10,001 samples instead of 10,201
    assert output_size(10001, 5, 4, 2) == 2501 and "10,001" in conv1d.slide_note
    adaptive = facts["nn.AdaptiveAvgPool2d(64)"]
    assert "maxpool2D" in adaptive.slide_note and adaptive.slide_shape is None
    assert {f.code for f in facts.values() if f.slide_shape} == {linear.code, conv1d.code}
    notes = layer_notes(list(facts.values()))
    assert sum("Slide vs PyTorch" in n for n in notes) == 3


def test_only_the_3d_convolution_warns_about_its_activation_memory():
    facts = course_layer_facts()
    warned = [f for f in facts if f.warning]
    assert [f.code for f in warned] == ["nn.Conv3d(1, 32, kernel_size=3, padding=1)"]
    assert warned[0].bytes == 32 * 32 * 60 * 64 * 64 * 4 and "960.0 MiB" in warned[0].warning
    assert f"{warned[0].activations:,}" in warned[0].warning


def test_adaptive_windows_are_pytorchs():
    # column i of adaptive_avg_pool1d(eye) holds 1/size on the inputs of window i
    out = F.adaptive_avg_pool1d(torch.eye(100, dtype=torch.float64).unsqueeze(1), 64).squeeze(1)
    sizes = [round(1 / out[:, i].max().item()) for i in range(64)]
    assert adaptive_windows(100, 64) == sizes and set(sizes) == {2, 3}
    _, rule = rule_output_shape(nn.AdaptiveAvgPool2d(64), (32, 16, 100, 100))
    assert "2 or 3 pixels" in rule


def test_weight_formula_of_grouped_and_anisotropic_convolutions():
    conv = nn.Conv2d(8, 16, (3, 5), groups=4)
    w, b, formula = weight_counts(conv)
    assert (w, b) == (conv.weight.numel(), conv.bias.numel()) and "in_channels/4" in formula
    assert rule_output_shape(conv, (2, 8, 10, 12))[0] == tuple(conv(torch.zeros(2, 8, 10, 12)).shape)


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="needs a last dimension of 1024"):
        rule_output_shape(nn.Linear(1024, 512), (32, 1000))
    with pytest.raises(ValueError, match="no output-size rule for LSTM"):
        layer_facts(LayerExample("nn.LSTM(4, 4)", lambda: nn.LSTM(4, 4), (2, 3, 4)))
    with pytest.raises(ValueError, match="no weight formula for BatchNorm2d"):
        weight_counts(nn.BatchNorm2d(3))
