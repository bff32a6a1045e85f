"""The package's lean fastai loop: the same events, schedules, records and results as fastai's stock loop, without
its per-batch host reads."""
import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import SchedCos, SchedLin, SchedNo, combine_scheds, combined_cos
from fastai.callback.training import ShortEpochCallback
from fastai.torch_core import set_seed

from tp3_fastai.bench.loops import HostReadCounter
from tp3_fastai.data.mnist import TensorLoader, mnist_dls
from tp3_fastai.train.loop import QuietMixedPrecision, fast_schedule, untune_learner
from tp3_fastai.mnist.learner import mnist_learner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dls():
    return mnist_dls(bs=256)[0]


def test_fast_schedules_give_fastais_values_exactly():
    positions = [i / 997 for i in range(998)] + [0.25 + d for d in np.linspace(-1e-7, 1e-7, 41)]
    lr_max = np.array([1e-5, 1e-3])
    schedules = [combined_cos(0.25, lr_max / 25, lr_max, lr_max / 1e5),  # fit_one_cycle's learning rates
                 combined_cos(0.25, 0.95, 0.85, 0.95),  # and momentum
                 combined_cos(0.3, 0.95, 0.85, 0.95),  # fine_tune's pct_start
                 combine_scheds([0.75, 0.25], [SchedNo(1e-3, 1e-3), SchedCos(1e-3, 0)])]  # fit_flat_cos
    for f in schedules:
        fast = fast_schedule(f)
        assert fast is not f
        for pos in positions:
            assert np.array_equal(fast(pos), f(pos)), pos
    other = SchedLin(0, 1)
    assert fast_schedule(other) is other  # not a combined schedule: left as it is


class Log(Callback):
    """Records the events it receives; `fail_at` raises there."""
    order = 30

    def __init__(self, events, name, fail_at=None, **flags):
        self.events, self.label, self.fail_at = events, name, fail_at
        for k, v in flags.items():
            setattr(self, k, v)

    def _record(self, event):
        self.events.append((self.label, event, self.learn.training if hasattr(self.learn, "training") else None))
        if event == self.fail_at:
            raise RuntimeError("boom")

    def before_fit(self): self._record("before_fit")
    def before_batch(self): self._record("before_batch")
    def after_pred(self): self._record("after_pred")
    def after_batch(self): self._record("after_batch")
    def after_fit(self): self._record("after_fit")


def _events(dls, stock: bool, fail_at=None):
    learn = mnist_learner(dls, "mlp", progress=False, log=None)
    if stock:
        untune_learner(learn)
    log = []
    learn.add_cbs([Log(log, "all"), Log(log, "valid_only", run_train=False), Log(log, "train_only", run_valid=False),
                   Log(log, "first", order=-20), Log(log, "broken", fail_at=fail_at)])
    error = None
    try:
        learn.fit(1, 1e-3, cbs=ShortEpochCallback(0.2))  # a fifth of the batches, and the validation
    except RuntimeError as e:
        error = str(e)
    return log, error


def test_events_reach_the_same_callbacks_in_the_same_order_as_in_fastais_loop(dls):
    lean, _ = _events(dls, stock=False)
    stock, _ = _events(dls, stock=True)
    assert lean == stock and len(lean) > 20
    assert ("valid_only", "before_batch", True) not in lean and ("valid_only", "before_batch", False) in lean
    assert ("train_only", "before_batch", False) not in lean and ("train_only", "before_batch", True) in lean
    assert lean[0] == ("first", "before_fit", None) or lean[0][:2] == ("first", "before_fit")
    lean_error = _events(dls, stock=False, fail_at="after_pred")[1]
    assert lean_error == _events(dls, stock=True, fail_at="after_pred")[1]
    assert "Exception occured in `Log` when calling event `after_pred`" in lean_error and "boom" in lean_error


def test_epoch_records_equal_fastais_and_validation_reads_the_host_only_at_the_end(dls):
    runs = {}
    for name in ("stock", "lean"):
        dls.train.gen.manual_seed(0)  # the same batch order for both
        set_seed(0, reproducible=True)
        learn = mnist_learner(dls, "cnn", progress=False, log=None)
        learn.recorder.train_metrics = True
        if name == "stock":
            untune_learner(learn)
        learn.fit_one_cycle(1, 3e-3)
        records = (learn.recorder.values, torch.stack(learn.recorder.losses), learn.recorder.lrs, learn.recorder.hps)
        reads = []
        for n in (10, 20):  # validation loaders of 10 and 20 batches: the difference is 10 batches' reads
            with HostReadCounter("cpu") as c:
                learn.validate(dl=TensorLoader(dls.valid.x[:40 * n], dls.valid.y[:40 * n], 40))
            reads.append(c.total)
        runs[name] = records, (reads[1] - reads[0]) / 10
    (stock, stock_reads), (lean, lean_reads) = runs["stock"], runs["lean"]
    assert lean[0] == stock[0] and len(lean[0][0]) == 4  # train loss and accuracy, valid loss and accuracy
    assert torch.equal(lean[1], stock[1]) and lean[2] == stock[2] and lean[3] == stock[3]
    assert stock_reads >= 2  # per validation batch, fastai: its loss and its accuracy go to the CPU
    assert lean_reads == 0  # read once, at the end


def test_mixed_precision_of_the_package_learner_has_no_loss_scale_read_back(dls):
    learn = mnist_learner(dls, "mlp", progress=False, log=None)
    learn.to_fp16()
    assert [type(cb) for cb in learn.cbs if "Precision" in type(cb).__name__] == [QuietMixedPrecision]
    learn.to_fp32()
    assert not any(isinstance(cb, QuietMixedPrecision) for cb in learn.cbs)
    learn.to_bf16()
    assert next(cb for cb in learn.cbs if isinstance(cb, QuietMixedPrecision)).amp_mode.value == "bf16"
