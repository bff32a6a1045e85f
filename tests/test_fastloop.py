"""The package's lean fastai loop: the same events, schedules, records and results as fastai's stock loop, without
its per-batch host reads; built from subclasses at construction (no class of a live object changed, no fastai
closure read)."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai import learner as fastai_learner
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler, SchedCos, SchedLin, SchedNo, combine_scheds, combined_cos
from fastai.callback.training import ShortEpochCallback
from fastai.learner import AvgMetric, Recorder
from fastai.torch_core import set_seed

from tp3_fastai.bench.loops import HostReadCounter
from tp3_fastai.data.mnist import TensorLoader, mnist_dls
from tp3_fastai.train.loop import (CombinedSchedule, DeviceAvgLoss, DeviceAvgMetric, DeviceSmoothLoss, HostLosses,
                                   LeanParamScheduler, LeanRecorder, Learner, PlainTensors, QuietMixedPrecision,
                                   cosine_cycle, learner_class)
from tp3_fastai.mnist.learner import mnist_learner

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PKG = Path(__file__).resolve().parents[1] / "tp3_fastai"


@pytest.fixture(scope="module")
def dls():
    return mnist_dls(bs=256)[0]


def test_the_package_schedules_give_fastais_values_exactly():
    positions = [i / 997 for i in range(998)] + [0.25 + d for d in np.linspace(-1e-7, 1e-7, 41)]
    lr_max = np.array([1e-5, 1e-3])
    pairs = [(cosine_cycle(0.25, lr_max / 25, lr_max, lr_max / 1e5),  # fit_one_cycle's learning rates
              combined_cos(0.25, lr_max / 25, lr_max, lr_max / 1e5)),
             (cosine_cycle(0.25, 0.95, 0.85, 0.95), combined_cos(0.25, 0.95, 0.85, 0.95)),  # and momentum
             (cosine_cycle(0.3, 0.95, 0.85, 0.95), combined_cos(0.3, 0.95, 0.85, 0.95)),  # fine_tune's pct_start
             (cosine_cycle(0.99, 1e-3, 1e-2, 1e-7), combined_cos(0.99, 1e-3, 1e-2, 1e-7)),  # fine_tune's first fit
             (CombinedSchedule([0.75, 0.25], [SchedNo(1e-3, 1e-3), SchedCos(1e-3, 0)]),  # fit_flat_cos
              combine_scheds([0.75, 0.25], [SchedNo(1e-3, 1e-3), SchedCos(1e-3, 0)])),
             (CombinedSchedule([0.2, 0.5, 0.3], [SchedLin(0, 1), SchedCos(1, 0.1), SchedNo(0.1, 0)]),
              combine_scheds([0.2, 0.5, 0.3], [SchedLin(0, 1), SchedCos(1, 0.1), SchedNo(0.1, 0)]))]
    for ours, fastais in pairs:
        for pos in positions:
            assert np.array_equal(ours(pos), fastais(pos)), pos
    with pytest.raises(ValueError, match="summing to 1"):
        CombinedSchedule([0.5, 0.4], [SchedNo(0, 0), SchedNo(0, 0)])


def _private_tricks(tree: ast.AST) -> list[tuple[int, str]]:
    """Lines that change the class of an object or read a function's closure."""
    out = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        out += [(node.lineno, "assigns __class__") for t in targets
                if isinstance(t, ast.Attribute) and t.attr == "__class__"]
        if isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and a.value == "__class__"
                                              for a in node.args[1:2]):
            out.append((node.lineno, f"{ast.unparse(node.func)}(..., '__class__', ...)"))
        if isinstance(node, ast.Attribute) and node.attr in ("__closure__", "co_freevars", "cell_contents"):
            out.append((node.lineno, f"reads {node.attr}"))
    return out


def test_no_class_is_swapped_and_no_closure_is_read_anywhere_in_the_package():
    bad = [f"{p.relative_to(PKG.parent)}:{line}: {what}" for p in sorted(PKG.rglob("*.py"))
           for line, what in _private_tricks(ast.parse(p.read_text()))]
    assert not bad, "the package changes classes of live objects or reads closures:\n" + "\n".join(bad)
    # the check itself sees each form
    probe = ("a.__class__ = B\nobject.__setattr__(a, '__class__', B)\nsetattr(a, '__class__', B)\n"
             "f.__closure__\nf.__code__.co_freevars\nc.cell_contents\n")
    assert [line for line, _ in _private_tricks(ast.parse(probe))] == [1, 2, 3, 4, 5, 6]


class Classes(Callback):
    """Records the classes of the learner, its own callbacks, recorder parts, metrics and loss at every fit's start
    and end."""
    order = 100

    def __init__(self):
        self.seen = []

    def snapshot(self):
        learn = self.learn
        rec = learn.recorder
        kept = [c for c in learn.cbs if not isinstance(c, (ParamScheduler, ShortEpochCallback))]  # not per fit
        return (type(learn), tuple(sorted((type(c).__name__, id(c)) for c in kept)), type(rec.smooth_loss),
                type(rec.loss), tuple(type(m) for m in learn.metrics), type(learn.loss_func))

    def before_fit(self): self.seen.append(("before", self.snapshot()))
    def after_fit(self): self.seen.append(("after", self.snapshot()))


def test_the_package_learner_is_lean_from_construction_and_fits_change_no_class(dls):
    learn = mnist_learner(dls, "mlp", progress=False, log=None)
    assert type(learn) is Learner and learner_class() is Learner
    rec = learn.recorder
    assert type(rec) is LeanRecorder and learn.cbs.filter(lambda c: isinstance(c, Recorder)) == [rec]
    assert type(rec.smooth_loss) is DeviceSmoothLoss and type(rec.loss) is DeviceAvgLoss
    assert [type(m) for m in learn.metrics] == [DeviceAvgMetric] and learn.metrics[0].name == "accuracy"
    assert sum(isinstance(c, HostLosses) for c in learn.cbs) == 1 and sum(isinstance(c, PlainTensors)
                                                                         for c in learn.cbs) == 1
    learn.metrics = [lambda inp, targ: (inp.argmax(-1) == targ).float().mean()]  # set later: wrapped alike
    assert type(learn.metrics[0]) is DeviceAvgMetric
    watch = Classes()
    learn.add_cb(watch)
    schedulers = []

    class Schedulers(Callback):
        def before_fit(self): schedulers.append([type(c) for c in self.learn.cbs if isinstance(c, ParamScheduler)])

    learn.add_cb(Schedulers())
    learn.fit_one_cycle(1, 1e-3, cbs=ShortEpochCallback(0.1))
    learn.fine_tune(1, 1e-3, cbs=ShortEpochCallback(0.1))  # one group: freeze() freezes nothing, two one-cycle fits
    assert schedulers == [[LeanParamScheduler]] * 3
    assert len(watch.seen) == 6 and len({s for _, s in watch.seen}) == 1  # the same objects, of the same classes


def test_the_stock_learner_is_fastais_own(dls):
    learn = mnist_learner(dls, "mlp", progress=False, log=None, stock=True)
    assert type(learn) is fastai_learner.Learner and learner_class(stock=True) is fastai_learner.Learner
    assert type(learn.recorder) is Recorder and [type(m) for m in learn.metrics] == [AvgMetric]
    assert not any(isinstance(c, (HostLosses, PlainTensors)) for c in learn.cbs)


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
    learn = mnist_learner(dls, "mlp", progress=False, log=None, stock=stock)
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
        learn = mnist_learner(dls, "cnn", progress=False, log=None, stock=name == "stock")
        learn.recorder.train_metrics = True
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
