"""Precomputed body features: the split, the cache, the head-only training path and its equivalence with the
`frozen` mode (body and its BatchNorm frozen: fastai's train_bn=False) on the same batch."""
from __future__ import annotations

import copy

import pytest
import torch
from fastai.callback.core import Callback, CancelStepException
from fastai.data.core import DataLoaders
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from torch import nn

from tp3_fastai.train.curves import read_curves
from tp3_fastai.data.mnist import TensorLoader
from tp3_fastai.transfer.features import (FeatureFit, feature_learner, feature_split, plain_batches, precompute_features,
                                 train_head_on_features, unaugmented_loader)
from tp3_fastai.data.images import image_dls
from tp3_fastai.transfer.learner import resnet_learner, set_mode

ARCH = "resnet18"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dls(tmp_path_factory):
    # the training loader augments (random crop + aug_transforms): the feature path must not see that
    return image_dls("lfw", size=32, bs=16, aug="default", cache_dir=tmp_path_factory.mktemp("cache"))


def _learner(dls, tmp_path, train_bn=False, seed=0):
    torch.manual_seed(seed)
    learn = resnet_learner(dls, ARCH, progress=False, log=None, path=tmp_path, train_bn=train_bn)
    _nonzero_residuals(learn.model)
    return learn


def _nonzero_residuals(model: nn.Module) -> None:
    """timm zero-initialises the last BatchNorm of each block; give it weight so the body is a real function."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(0.5)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


class GradProbe(Callback):
    """Same dropout masks in every learner (seeded before each batch); records the gradients instead of stepping."""

    def __init__(self, params):
        self.params, self.grads = list(params), []

    def before_batch(self):
        torch.manual_seed(123)

    def before_step(self):
        self.grads.append([p.grad.detach().clone() for p in self.params])
        raise CancelStepException()


def _one_batch_fit(learn, x, y, probe_params):
    learn.dls = DataLoaders(TensorLoader(x, y, len(y)), TensorLoader(x[:0], y[:0], 1), device="cpu")
    probe = GradProbe(probe_params)
    with learn.added_cbs(probe):
        learn.fit(1, 1e-3)
    return probe.grads[0]


def test_feature_split_caches_body_and_pooling_and_shares_the_head(dls, tmp_path):
    learn = _learner(dls, tmp_path)
    extractor, head = feature_split(learn.model)
    assert extractor[0] is learn.model[0]
    assert [type(m).__name__ for m in extractor[1:]] == ["AdaptiveConcatPool2d", "Flatten"]
    head_params = {id(p) for p in learn.model[1].parameters()}
    assert {id(p) for p in head.parameters()} == head_params  # the same modules: training them trains learn
    assert isinstance(head[0], nn.BatchNorm1d)
    x = torch.randn(2, 3, 32, 32)
    learn.model.eval()
    assert torch.allclose(head(extractor(x)), learn.model(x))
    with pytest.raises(ValueError, match="Sequential"):
        feature_split(nn.Linear(3, 2))


def test_precompute_features_is_deterministic_unaugmented_and_restores_mode(dls, tmp_path):
    learn = _learner(dls, tmp_path)
    extractor, _ = feature_split(learn.model)
    extractor.train()
    loader = unaugmented_loader(learn.dls, "train")
    f1, y1 = precompute_features(extractor, loader, "cpu")
    f2, y2 = precompute_features(extractor, unaugmented_loader(learn.dls, "train"), "cpu", store="cpu")
    assert extractor.training  # state restored
    assert f1.shape == (len(learn.dls.train_ds), 1024) and f1.dtype == torch.float32
    assert torch.equal(f1, f2) and torch.equal(y1, y2)  # no random crop, no aug_transforms: same every time
    assert torch.equal(y1, torch.tensor([int(learn.dls.train_ds[i][1]) for i in range(len(y1))]))
    with torch.no_grad():
        x, _ = next(iter(plain_batches(learn.dls.train)))  # augmented training batch
    assert type(x) is torch.Tensor
    with pytest.raises(ValueError, match="no batches"):
        precompute_features(extractor, [], "cpu")
    with pytest.raises(ValueError, match="store"):
        precompute_features(extractor, loader, "cpu", store="disk")


def test_head_gradients_equal_the_frozen_full_model_path_without_bn_training(dls, tmp_path):
    """The cached path is the `frozen` mode (fastai's train_bn=False): body parameters frozen and body BatchNorm in
    eval mode (BnFreeze), so the body is a fixed function and its cache is exact. Same batch, same dropout masks:
    the head gradients agree."""
    x, y = (t.as_subclass(torch.Tensor) for t in next(iter(unaugmented_loader(dls, "valid"))))
    full = _learner(dls, tmp_path, train_bn=False)
    set_mode(full, "frozen")
    cached = copy.deepcopy(full.model)  # same weights, separate modules
    full_grads = _one_batch_fit(full, x, y, full.model[1].parameters())

    extractor, head = feature_split(cached)
    feats, labels = precompute_features(extractor, [(x, y)], "cpu")
    fdls = DataLoaders(TensorLoader(feats, labels, len(labels)), TensorLoader(feats[:0], labels[:0], 1),
                       device="cpu")
    head_learn = feature_learner(head, fdls, CrossEntropyLossFlat(), Adam, 1e-3)
    head_grads = _one_batch_fit(head_learn, feats, labels, head.parameters())
    assert len(full_grads) == len(head_grads) == len(list(head.parameters()))
    for g_full, g_head in zip(full_grads, head_grads):
        assert torch.allclose(g_full, g_head, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in head_grads)

    # frozen_bn (fastai's default freeze(), train_bn=True) normalises the body with each batch's statistics: another
    # function of the image than the cache (eval-mode BatchNorm), so its head gradients differ.
    bn_learn = _learner(dls, tmp_path, train_bn=True)
    set_mode(bn_learn, "frozen_bn")
    bn_grads = _one_batch_fit(bn_learn, x, y, bn_learn.model[1].parameters())
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(bn_grads, head_grads))


def test_train_head_on_features_trains_only_the_head_of_the_learner(dls, tmp_path):
    learn = _learner(dls, tmp_path)
    body_before = copy.deepcopy(learn.model[0].state_dict())  # parameters and BatchNorm running statistics
    head_before = copy.deepcopy(learn.model[1].state_dict())
    fit = train_head_on_features(learn, epochs=2, lr=1e-2, csv_path=tmp_path / "metrics.csv")
    assert isinstance(fit, FeatureFit)
    assert (fit.n_train, fit.n_valid, fit.feature_dim, fit.epochs) == (150, 50, 1024, 2)
    assert [r["epoch"] for r in fit.history] == [1, 2]
    assert [r["epoch"] for r in read_curves(tmp_path / "metrics.csv")] == [1, 2]
    for k, v in learn.model[0].state_dict().items():
        assert torch.equal(v, body_before[k]), k  # the body never changed, BatchNorm statistics included
    changed = [k for k, v in learn.model[1].state_dict().items() if not torch.equal(v, head_before[k])]
    assert any(k.endswith("weight") for k in changed)
    assert fit.head_learner.model[-1] is learn.model[1][-1]  # learn now predicts with the trained head
    # so the whole learner, on images, scores what the head scored on the cached features in its last epoch
    loss, acc = learn.validate()
    assert (loss, acc) == (pytest.approx(fit.history[-1]["valid_loss"], abs=1e-4),
                           pytest.approx(fit.history[-1]["valid_accuracy"], abs=1e-6))
    s = fit.summary()
    assert s["sec_per_epoch"] == pytest.approx(fit.fit_seconds / 2) and "head_learner" not in s
    with pytest.raises(ValueError, match="positive"):
        train_head_on_features(learn, epochs=0)
