"""Part 0's architecture table: parameters equal the built model's, multiply-adds equal PyTorch's flop counter, the
stage fields equal the receptive-field module's gradient measurement; the ResNet50 stem with a max-pool of 2 and 3."""
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tp3_fastai.review.architectures import (ARCHITECTURES, architecture_rows, architecture_table, build_architecture,
                                      maxpool_kernel_rows, plot_architectures, recurrence, stage_nodes)
from tp3_fastai.receptive_field import measure_receptive_field, receptive_fields
from figures import assert_series

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def table():
    return {s.name: s for s in architecture_table()}


def test_parameters_depth_and_multiply_adds_of_every_architecture(table):
    assert list(table) == list(ARCHITECTURES)
    for name, s in table.items():
        model = build_architecture(name)   # meta device: shapes only
        assert s.params == sum(p.numel() for p in model.parameters())
        flops = FlopCounterMode(display=False)
        with flops:
            model(torch.empty(1, 3, 224, 224, device="meta"))
        assert s.macs * 2 == flops.get_total_flops(), name   # PyTorch counts 2 flops per multiply-add
        assert s.depth == int(re.sub(r"\D", "", name))        # VGG16 has 16 weighted layers, ResNet50 50, ...


def test_stage_shapes_are_the_models_own(table):
    for name in ("vgg16", "resnet50"):
        model = build_architecture(name)
        ends = [model.get_submodule(n) for _, n in stage_nodes(model)]
        if name == "vgg16":   # the five max-pools that close VGG's blocks
            assert len(ends) == 5 and all(isinstance(m, torch.nn.MaxPool2d) for m in ends)
        else:                 # the stem's max-pool, then the four stages
            assert ends == [model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4]
        shapes = {}
        for _, node in stage_nodes(model):
            model.get_submodule(node).register_forward_hook(
                lambda m, i, o, node=node: shapes.__setitem__(node, tuple(o.shape[1:])))
        model(torch.empty(1, 3, 224, 224, device="meta"))
        assert [st.out_shape for st in table[name].stages] == [shapes[n] for _, n in stage_nodes(model)]


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_stage_fields_equal_the_gradient_measurement(table, name):
    """Measured from a 32 px input that `measure_receptive_field` enlarges only until one unit's field and its
    neighbour's fit inside the image (VGG16's last stage: 314 px, ResNet18's: 538 px). R and J do not depend on
    the input size here: the table's 224 px fields come from the same kernels and strides, and no stage end is
    after a global pooling."""
    torch.manual_seed(0)
    model = build_architecture(name, "cpu")
    for st in table[name].stages:
        m = measure_receptive_field(model, st.node, (1, 3, 32, 32))
        assert m.R == (st.R, st.R) and m.J == (st.J, st.J), (st.node, m)
        assert m.agrees


def test_table_rows_and_figure(table, tmp_path):
    rows = architecture_rows(list(table.values()))
    r50 = next(r for r in rows if r["arch"] == "resnet50")
    st = table["resnet50"].stages[-1]
    assert r50["stage 5"] == f"{'x'.join(map(str, st.out_shape))}, R {st.R}, J {st.J}"
    assert r50["gmacs"] == round(table["resnet50"].macs / 1e9, 2) and r50["params"] == table["resnet50"].params
    path = plot_architectures(list(table.values()), tmp_path / "a.png")
    assert_series(path, len(table))  # a colour per network


def test_resnet50_stem_with_the_slides_kernel_and_the_real_one():
    torch.manual_seed(0)
    model = build_architecture("resnet50", "cpu")
    rows = {r["layer"].split()[0]: r for r in maxpool_kernel_rows(model)}
    # the slides' values (9x9 after the max-pool, 17x17 after the first block) come from a max-pool kernel of 2
    assert (rows["maxpool"]["R_slides"], rows["layer1.0"]["R_slides"]) == (9, 17)
    traced = {r.name: r for r in receptive_fields(model, (1, 3, 224, 224))}
    for name in ("conv1", "maxpool"):
        assert rows[name]["R_recurrence"] == rows[name]["R_measured"] == traced[name].R[0]
    assert rows["layer1.0"]["R_recurrence"] == rows["layer1.0"]["R_measured"] == \
        next(r for r in traced.values() if "layer1.0" in r.ends).R[0]
    assert rows["maxpool"]["R_measured"] != rows["maxpool"]["R_slides"]
    assert rows["maxpool"]["layer"] == "maxpool (3x3/2)"


def test_recurrence_by_hand():
    assert recurrence([("a", 3, 1), ("b", 3, 2), ("c", 3, 1)]) == [("a", 3, 1), ("b", 5, 2), ("c", 9, 2)]


def test_unknown_architecture_is_refused_with_close_names():
    with pytest.raises(ValueError, match="resnet50"):
        build_architecture("resnet5O")
