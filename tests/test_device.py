"""Device decisions: the precision 'auto' picks per GPU generation, the memory format per device (CUDA's answers
simulated on the CPU by replacing what torch.cuda reports)."""
import pytest
import torch

from tp3_fastai.core.device import parse_memory_format, resolve_channels_last, resolve_precision
from tp3_fastai.mnist.learner import mnist_learner
from tp3_fastai.data.mnist import mnist_dls

CUDA = torch.device("cuda")


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"),
                                                  ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp16")])
def test_auto_precision_is_bf16_from_ampere_on_and_fp16_before(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", CUDA) == expected
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_channels_last_by_default_on_cuda_only():
    assert resolve_channels_last(None, "cuda") is True and resolve_channels_last(None, torch.device("cuda:1")) is True
    assert resolve_channels_last(None, "cpu") is False and resolve_channels_last(None, None) is False
    assert resolve_channels_last(False, "cuda") is False and resolve_channels_last(True, "cpu") is True
    assert [parse_memory_format(m) for m in ("auto", "channels_last", "contiguous")] == [None, True, False]
    with pytest.raises(ValueError, match="unknown memory format 'nhwc': choose one of auto, channels_last"):
        parse_memory_format("nhwc")


def test_learners_record_the_memory_format_they_train_in():
    from fastai.callback.channelslast import ChannelsLast

    dls, _ = mnist_dls(bs=256)
    learn = mnist_learner(dls, "cnn", progress=False, log=None)
    assert learn.memory_format == "contiguous" and not any(isinstance(cb, ChannelsLast) for cb in learn.cbs)
    from tp3_fastai.train.learner import setup_learner

    learn = setup_learner(mnist_learner(dls, "cnn", progress=False, log=None), channels_last=True, progress=False,
                          log=None)
    assert learn.memory_format == "channels_last" and any(isinstance(cb, ChannelsLast) for cb in learn.cbs)
