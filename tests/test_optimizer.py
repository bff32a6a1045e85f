"""The package's optimiser: torch's AdamW in fastai's OptimWrapper trains exactly as fastai's Adam did (same
hyper-parameters, schedules, weight decay exemptions, discriminative rates), one fastai group per splitter group."""
import pytest
import torch
from fastai.callback.training import ShortEpochCallback
from fastai.optimizer import Adam as FastaiAdam
from fastai.torch_core import set_seed
from torch import nn

from tp3_fastai.data.mnist import mnist_dls
from tp3_fastai.data.images import image_dls, reseed
from tp3_fastai.mnist.learner import mnist_learner
from tp3_fastai.train.optimizer import ADAM_HYPERS, TorchOptimizer, default_opt_func, implementation
from tp3_fastai.transfer.learner import resnet_learner, train_mode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _max_weight_difference(a: nn.Module, b: nn.Module) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.state_dict().values(),
                                                                              b.state_dict().values()))


def test_one_cycle_with_the_package_optimizer_ends_where_fastais_adam_ends():
    """MNIST CNN (BatchNorm and biases: no weight decay there), fit_one_cycle, whose momentum schedule drives
    betas[0]: the same weights as with fastai's Adam up to float rounding."""
    learners = {}
    for name, opt_func in (("fastai", FastaiAdam), ("package", None)):
        dls, _ = mnist_dls(bs=256)  # the same shuffled order for both
        set_seed(0, reproducible=True)
        learners[name] = mnist_learner(dls, "cnn", opt_func=opt_func, progress=False, log=None)
        learners[name].fit_one_cycle(1, 3e-3, cbs=ShortEpochCallback(0.4))  # 5 of the 13 batches: seconds
    package = learners["package"]
    assert isinstance(package.opt, TorchOptimizer) and isinstance(package.opt.opt, torch.optim.AdamW)
    assert _max_weight_difference(learners["fastai"].model, package.model) < 1e-5
    assert package.recorder.hps["mom"] == learners["fastai"].recorder.hps["mom"]  # 0.95 -> 0.85 -> 0.95
    assert list(package.recorder.values[-1]) == pytest.approx(list(learners["fastai"].recorder.values[-1]), abs=1e-4)


def test_fine_tune_with_discriminative_rates_matches_fastais_adam(tmp_path):
    """Six splitter groups (stem, layer1..layer4, head): the head-only phase, then everything with slice(lr/100, lr)
    spread over the groups."""
    learners = {}
    for name, opt_func in (("fastai", FastaiAdam), ("package", default_opt_func("cpu"))):
        dls = image_dls("lfw", size=32, bs=32, aug="none", cache_dir=tmp_path / "cache")
        set_seed(0, reproducible=True)
        reseed(dls, 0)
        learn = resnet_learner(dls, "test_resnet", progress=False, log=None, path=tmp_path)
        learn.opt_func = opt_func
        train_mode(learn, "finetune", 2, lr=2e-3, freeze_epochs=1)
        learners[name] = learn
    package = learners["package"]
    assert len(package.opt.param_lists) == 6 and len(package.opt.opt.param_groups) == 12
    assert [h["lr"] for h in package.opt.hypers] == [h["lr"] for h in learners["fastai"].opt.hypers]
    assert _max_weight_difference(learners["fastai"].model, package.model) < 1e-5


def test_hyper_parameters_reach_both_halves_of_a_group_and_weight_decay_only_the_decaying_one():
    body, head = nn.Linear(4, 3), nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    groups = [list(body.parameters()), list(head.parameters())]
    opt = default_opt_func("cpu")(groups, lr=1e-3)
    torch_groups = opt.opt.param_groups
    assert [len(g["params"]) for g in torch_groups] == [1, 1, 1, 3]  # (weights, 1-D) per fastai group
    assert [g["weight_decay"] for g in torch_groups] == [0.01, 0.0, 0.01, 0.0]
    assert torch_groups[0]["betas"] == (0.9, 0.99) and torch_groups[0]["eps"] == 1e-5
    assert [len(ps) for ps in opt.param_lists] == [2, 4]
    opt.set_hyper("lr", slice(1e-4, 1e-2))
    opt.set_hyper("mom", 0.85)
    opt.set_hyper("wd", [0.1, 0.2])
    assert [g["lr"] for g in torch_groups] == pytest.approx([1e-4, 1e-4, 1e-2, 1e-2])
    assert all(g["betas"] == (0.85, 0.99) for g in torch_groups)
    assert [g["weight_decay"] for g in torch_groups] == [0.1, 0.0, 0.2, 0.0]
    assert opt.hypers[1]["lr"] == pytest.approx(1e-2) and opt.hypers[1]["mom"] == 0.85 and opt.hypers[1]["wd"] == 0.2
    with pytest.raises(AssertionError, match="3 values for lr but there are 2 parameter groups"):
        opt.set_hyper("lr", [1e-3, 1e-3, 1e-3])
    opt.freeze()  # fastai's freeze works on fastai's groups: the body's weight and bias stop training
    assert not any(p.requires_grad for p in body.parameters()) and all(p.requires_grad for p in head.parameters())


def test_the_implementation_is_fused_where_torch_has_one():
    assert implementation("cpu") == implementation("cuda") == dict(fused=True)
    assert implementation("meta") == dict(foreach=True)
    p = nn.Parameter(torch.randn(3, 3))
    assert default_opt_func("cpu")([p], lr=1e-3).opt.param_groups[0]["fused"] is True
    assert ADAM_HYPERS == dict(betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)  # fastai.optimizer.Adam's
