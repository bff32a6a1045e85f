"""Fine-tuning by depth (issue 26): parameter groups by stage, freeze depth K, surgical fine-tuning, discriminative
rates and gradual unfreezing as modes of the one table, what a frozen prefix keeps for backward, the input-shift
target task, the depth bench and the depth study."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from fastai.callback.core import Callback
from fastai.vision.learner import create_timm_model

from tp3_fastai.cli import main as tp3
from tp3_fastai.data.images import image_dls
from tp3_fastai.data.tasks import corrupt, input_shift_task, load_tasks, mnist_tasks
from tp3_fastai.train.modes import training_mode
from tp3_fastai.transfer.learner import resnet_learner, set_mode, train_mode
from tp3_fastai.transfer.stages import saved_for_backward, stage_groups, stage_split
from figures import assert_series

ARCH = "test_resnet"  # timm's smallest ResNet: stem, four stages, BatchNorm everywhere
GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dls(tmp_path_factory):
    return image_dls("lfw", size=32, bs=32, aug="none", cache_dir=tmp_path_factory.mktemp("cache"))


def _learner(dls, **kwargs):
    torch.manual_seed(0)
    return resnet_learner(dls, kwargs.pop("arch", ARCH), progress=False, log=None, **kwargs)


def _group_of(name: str) -> str:
    """Where a parameter of fastai's (TimmBody, head) ResNet belongs, by its name."""
    if name.startswith("1."):
        return "head"
    inner = name[len("0.model."):]
    return next((g for g in GROUPS[1:5] if inner.startswith(g + ".")), "stem")


# ---------------------------------------------------------------- the splitter
@pytest.mark.parametrize("arch", [ARCH, "resnet10t", "resnet18"])
def test_the_splitter_gives_six_groups_in_order_holding_every_parameter_once(dls, arch):
    learn = _learner(dls, arch=arch)
    assert learn.splitter is stage_split
    groups = stage_groups(learn.model)
    assert [g.name for g in groups] == GROUPS
    names = [n for g in groups for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in learn.model.named_parameters())  # every parameter, once
    assert len(set(names)) == len(names)
    for g in groups:
        assert g.params and all(_group_of(n) == g.name for n in g.param_names), g.name
    # in the model's order: the groups follow one another along named_parameters
    order = [GROUPS.index(_group_of(n)) for n, _ in learn.model.named_parameters()]
    assert order == sorted(order)
    learn.create_opt()
    assert [len(ps) for ps in learn.opt.param_lists] == [len(g.params) for g in groups]


def test_other_timm_bodies_with_feature_info_get_a_group_per_feature(dls):
    model, _ = create_timm_model("efficientnet_b0", 5, pretrained=False)
    groups = stage_groups(model)
    assert [g.name for g in groups] == ["stem+blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "head"]
    where = {n: g.name for g in groups for n in g.param_names}
    assert where["0.model.conv_stem.weight"] == "stem+blocks.0"
    assert where["0.model.blocks.3.0.conv_pw.weight"] == "blocks.4"  # up to the next feature module
    assert where["0.model.conv_head.weight"] == "blocks.6"  # after the last one: the last stage
    assert sum(len(g.params) for g in groups) == len(list(model.parameters()))


# ---------------------------------------------------------------- what each mode trains
class GroupWatch(Callback):
    """Per training epoch: the groups whose parameters got a gradient, and the training flag of every BatchNorm
    layer of each group during the forward passes."""
    order = 80

    def before_fit(self):
        self.grads, self.bn_training = {}, {}
        self.names = [g.name for g in stage_groups(self.learn.model)]
        self.bns = [(g.name, m) for g in stage_groups(self.learn.model) for m in self._modules(g)]

    def _modules(self, group):
        owners = {n.rsplit(".", 1)[0] for n in group.param_names}
        return [m for n, m in self.learn.model.named_modules()
                if n in owners and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def before_batch(self):
        if self.training:
            seen = self.bn_training.setdefault(self.epoch, {})
            for name, m in self.bns:
                seen.setdefault(name, set()).add(m.training)

    def after_backward(self):
        got = self.grads.setdefault(self.epoch, set())
        for name, ps in zip(self.names, self.learn.opt.param_lists):
            if any(p.grad is not None and p.ndim > 1 and bool(p.grad.abs().sum()) for p in ps):
                got.add(name)


def _weights(learn) -> dict[str, dict[str, torch.Tensor]]:
    """Per group: its parameters and BatchNorm statistics, copied."""
    state = learn.model.state_dict()
    out = {g: {} for g in GROUPS}
    for n, t in state.items():
        out[_group_of(n)][n] = t.detach().clone()
    return out


def _changed(before, after) -> dict[str, dict[str, bool]]:
    """Per group: whether its conv/linear weights, BatchNorm weights and BatchNorm running statistics changed."""
    out = {}
    for g in GROUPS:
        kinds = {"weights": False, "bn": False, "stats": False}
        for n, t in before[g].items():
            kind = ("stats" if "running" in n else "bn" if t.ndim == 1 and not n.endswith("num_batches_tracked")
                    and "bn" in n or "downsample.1" in n else "weights" if t.ndim > 1 else None)
            if kind and not torch.equal(t, after[g][n]):
                kinds[kind] = True
        out[g] = kinds
    return out


def _train(dls, mode: str, epochs: int = 1, **kwargs):
    learn = _learner(dls)
    watch = GroupWatch()
    learn.add_cb(watch)
    before = _weights(learn)
    done = train_mode(learn, mode, epochs=epochs, lr=kwargs.pop("lr", 5e-3), **kwargs)
    return learn, watch, _changed(before, _weights(learn)), done


@pytest.mark.parametrize("k", range(6))
def test_frozen_to_k_trains_exactly_the_stages_from_k_and_freezes_the_others_batchnorm(dls, k):
    learn, watch, changed, done = _train(dls, f"frozen_to:{k}")
    frozen, trained = GROUPS[:k], GROUPS[k:]
    assert watch.grads[0] == set(trained)
    for g in frozen:  # weights, BatchNorm weights and running statistics as loaded; BatchNorm in eval mode
        assert changed[g] == {"weights": False, "bn": False, "stats": False}, g
        assert watch.bn_training[0].get(g, {False}) == {False}, g
    for g in trained:
        assert changed[g]["weights"], g
        assert watch.bn_training[0].get(g, {True}) == {True}, g
    assert {n for n, p in learn.model.named_parameters() if p.requires_grad} == {
        n for n, _ in learn.model.named_parameters() if _group_of(n) in trained}
    assert done["phases"][0]["trains"] == ("all layers" if k == 0 else "head only (BatchNorm frozen too)" if k == 5
                                           else ", ".join(trained))


@pytest.mark.parametrize("k", [1, 3])
def test_frozen_bn_to_k_trains_the_frozen_stages_batchnorm(dls, k):
    _, watch, changed, done = _train(dls, f"frozen_bn_to:{k}")
    assert watch.grads[0] == set(GROUPS[k:])  # the convolutions of the first k stages get no gradient
    for g in GROUPS[:k]:
        assert changed[g] == {"weights": False, "bn": True, "stats": True}, g
        assert watch.bn_training[0][g] == {True}, g
    assert done["phases"][0]["trains"] == ", ".join(GROUPS[k:]) + " (+ BatchNorm of the frozen groups)"


@pytest.mark.parametrize("k", range(5))
def test_surgical_k_trains_one_stage_with_the_head(dls, k):
    _, watch, changed, done = _train(dls, f"surgical:{k}")
    trained = {GROUPS[k], "head"}
    assert watch.grads[0] == trained
    for g in GROUPS:
        assert changed[g]["weights"] == (g in trained), g
        if g not in trained:
            assert not changed[g]["stats"] and watch.bn_training[0].get(g, {False}) == {False}, g
    assert done["phases"][0]["trains"] == f"{GROUPS[k]}, head"


def test_gradual_unfreezing_thaws_one_more_stage_each_epoch(dls):
    learn, watch, changed, done = _train(dls, "gradual", epochs=7)
    for epoch in range(7):
        trained = GROUPS[max(5 - epoch, 0):]
        assert watch.grads[epoch] == set(trained), epoch
        for g in GROUPS:  # still frozen: BatchNorm in eval mode (its statistics kept), thawed: training
            assert watch.bn_training[epoch].get(g, {g in trained}) == {g in trained}, (epoch, g)
    assert [(p["trains"], p["epochs"]) for p in done["phases"]] == [
        ("head only (BatchNorm frozen too)", 1), ("layer4, head", 1), ("layer3, layer4, head", 1),
        ("layer2, layer3, layer4, head", 1), ("layer1, layer2, layer3, layer4, head", 1), ("all layers", 2)]
    assert [p["trainable_params"] for p in done["phases"]] == sorted(p["trainable_params"] for p in done["phases"])
    assert [r["phase"] for r in learn.curves.history] == [p["trains"] for p in done["phases"]
                                                         for _ in range(p["epochs"])]
    # the optimiser state of the groups already training is kept as the next one thaws (fastai's freeze_to clears
    # it): the head's Adam step counter counts every step of the fit
    steps = len(dls.train) * 7
    assert {int(learn.opt.opt.state[p]["step"]) for p in learn.opt.param_lists[-1]} == {steps}


class LearningRates(Callback):
    """The torch optimiser's learning rates, both halves of every fastai group, at the first training batch."""
    order = 70  # after the scheduler set them

    def before_batch(self):
        if self.training and self.iter == 0 and self.epoch == 0:
            self.lrs = [g["lr"] for g in self.learn.opt.opt.param_groups]


@pytest.mark.parametrize("ratio", ["10", "100"])
def test_discriminative_rates_reach_the_optimizer_groups_geometrically(dls, ratio):
    learn = _learner(dls)
    rec = LearningRates()
    learn.add_cb(rec)
    done = train_mode(learn, f"discriminative:{ratio}", epochs=1, lr=1e-3)
    r = float(ratio)
    assert len(rec.lrs) == 12  # six fastai groups, each a decaying and a non-decaying torch group
    per_group = rec.lrs[::2]
    assert rec.lrs[1::2] == per_group  # both halves of a group at its rate
    start = 1e-3 / r / 25  # fit_one_cycle starts at lr_max / 25
    assert per_group == pytest.approx([start * r ** (i / 5) for i in range(6)])
    assert per_group[-1] / per_group[0] == pytest.approx(r)
    assert done["phases"][0] == dict(done["phases"][0], trains="all layers", lr=f"slice({1e-3 / r:.3g}, 0.001)")


# ---------------------------------------------------------------- what a frozen prefix keeps for backward
def test_a_frozen_prefix_keeps_no_activations_for_backward(dls):
    x, y = next(iter(dls.train))
    x, y = x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)
    totals = {}
    for family in ("frozen_to", "frozen_bn_to"):
        for k in range(6):
            learn = _learner(dls)
            set_mode(learn, f"{family}:{k}")
            learn.model.train()
            for cb in learn.cbs:  # BnFreeze puts the frozen stages' BatchNorm in eval mode, as fit does
                if type(cb).__name__ == "BnFreeze":
                    cb.before_train()
            saved = saved_for_backward(learn.model, x, y)
            totals[family, k] = sum(saved.values())
            if family == "frozen_to":
                assert all(saved[g] == 0 for g in GROUPS[:k]), (k, saved)  # nothing recorded in the frozen prefix
                assert all(saved[g] > 0 for g in GROUPS[k:]), (k, saved)
            else:  # the frozen stages' BatchNorm trains: autograd keeps their activations
                assert all(saved[g] > 0 for g in GROUPS), (k, saved)
    depth = [totals["frozen_to", k] for k in range(6)]
    assert all(a > b for a, b in zip(depth, depth[1:])), depth  # less kept with every stage frozen
    assert all(totals["frozen_bn_to", k] > totals["frozen_to", k] for k in range(1, 6))


def test_stage_modes_need_a_learner_with_stage_groups(dls):
    from fastai.vision.learner import default_split

    learn = _learner(dls)
    learn.splitter, learn.opt = default_split, None  # body and head only, as fastai's vision_learner
    with pytest.raises(ValueError, match=r"training mode 'frozen_to:3' needs 4 parameter groups .* this learner has "
                                         r"2"):
        set_mode(learn, "frozen_to:3")
    set_mode(learn, "frozen_to:1")  # the body: the same as frozen
    assert all(not p.requires_grad for p in learn.model[0].parameters())


# ---------------------------------------------------------------- the input-shift target
def test_the_input_shift_target_is_the_sources_held_out_images_changed():
    source, label_target = mnist_tasks()
    target = input_shift_task(source, "invert")
    assert target.sizes() == {"pool": 250, "valid": 0, "test": 250} and target.max_k() == 50
    assert target.classes == source.classes == ["0", "1", "2", "3", "4"] and label_target.classes[0] == "5"
    held_out = set(source.ids["test"])
    assert set(target.ids["pool"]) | set(target.ids["test"]) == held_out  # never seen by pretraining
    assert not held_out & set(source.ids["train"])
    index = {i: n for n, i in enumerate(source.ids["test"])}
    for ids, x, y in ((target.ids["test"], target.x_test, target.y_test), (target.ids["pool"], target.x_pool,
                                                                            target.y_pool)):
        pos = torch.tensor([index[i] for i in ids])
        assert torch.equal(x, 255 - source.x_test[pos]) and torch.equal(y, source.y_test[pos])
    noisy = corrupt(source.x_test[:8], "noise", seed=3)
    assert torch.equal(noisy, corrupt(source.x_test[:8], "noise", seed=3)) and not torch.equal(noisy, source.x_test[:8])
    blurred = corrupt(source.x_test[:8], "blur").float()
    assert abs(blurred.mean() - source.x_test[:8].float().mean()) < 1.5  # blurring moves ink, keeps its amount
    assert blurred.std() < source.x_test[:8].float().std()
    with pytest.raises(ValueError, match="k=51 labelled images per class asked for, but the target pool holds only 50"):
        target.draw(51, 0)
    with pytest.raises(ValueError, match="unknown shift 'rotate': choose from label, invert, noise, blur"):
        load_tasks(shift="rotate")
    _, noise = load_tasks(shift="noise")
    assert "noise (input-level shift" in noise.description


# ---------------------------------------------------------------- the bench and the study
def test_bench_times_the_depth_modes_in_alternating_rounds(tmp_path):
    out = tmp_path / "bench"
    tp3(["bench", "--quick", "--arch", ARCH, "--size", "32", "--bs", "8", "--steps", "1", "--repeats", "2",
         "--warmup", "1", "--modes", "frozen", "--precisions", "fp32", "--formats", "contiguous", "--no-overhead",
         "--no-pipeline", "--device", "cpu", "--threads", "1", "--depth-modes",
         "frozen_to:0,frozen_to:2,frozen_to:5,frozen,surgical:1,gradual,discriminative:10", "--out", str(out)])
    result = json.loads((out / "bench.json").read_text())
    rows = {r["mode"]: r for r in result["depth"]}
    assert list(rows) == ["frozen_to:0", "frozen_to:2", "frozen_to:5", "frozen", "surgical:1", "gradual",
                          "discriminative:10"]
    assert all(r["step_ms"]["n"] == 2 and r["step_ms"]["median"] > 0 for r in rows.values())
    assert rows["frozen_to:0"]["saved_mb"] > rows["frozen_to:2"]["saved_mb"] > rows["frozen_to:5"]["saved_mb"] > 0
    assert rows["frozen_to:5"]["saved_mb"] == rows["frozen"]["saved_mb"]
    assert rows["frozen_to:5"]["trainable_params"] == rows["frozen"]["trainable_params"]
    assert rows["discriminative:10"]["saved_mb"] == rows["frozen_to:0"]["saved_mb"]
    # gradual over the bench's 5 epochs: the head alone, then layer4, layer3, layer2, layer1 thawed in turn
    assert rows["gradual"]["frozen_groups"] == [5, 4, 3, 2, 1] and len(rows["gradual"]["state_step_ms"]) == 5
    md = (out / "bench.md").read_text()
    assert "## Freeze depth: what each mode costs" in md and "| surgical:1 |" in md
    assert "Step time falls with every stage frozen" in md and "frozen_to:5 / frozen = " in md


@pytest.mark.parametrize("argv, message", [
    (["--modes", "unfrozen,gradual"], "--modes: gradual changes what trains every epoch"),
    (["--depth-modes", "precomputed"], "--depth-modes: precomputed trains on cached features"),
    (["--depth-modes", "frozen_to:7"], "training mode 'frozen_to:7': frozen_to takes"),
    (["--depth-modes", "frozen_to:2,frozen_to:5", "--arch", "test_convnext"],
     "training mode 'frozen_to:5' needs 6 parameter groups (a timm body that lists its stages, e.g. a ResNet: stem, "
     "layer1..layer4, head), but this learner has 5 (stem+stages.0, stages.1, stages.2, stages.3, head)"),
])
def test_bench_refuses_what_it_cannot_time_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as e:
        tp3(["bench", "--quick", "--no-pipeline", "--device", "cpu", *argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: {message}") and "\n" not in err, err
    assert not out.exists()


def test_the_depth_study_writes_the_tradeoff_and_the_surgical_comparison(tmp_path):
    out = tmp_path / "depth"
    tp3(["freeze-depth", "--arch", ARCH, "--ks", "2", "--seeds", "0,1", "--epochs", "2", "--pretrain-epochs", "1",
         "--steps", "1", "--repeats", "2", "--warmup", "1", "--cache-dir", str(tmp_path / "bodies"),
         "--device", "cpu", "--threads", "1", "--out", str(out)])
    s = json.loads((out / "summary.json").read_text())
    modes = [f"frozen_to:{k}" for k in range(6)] + [f"surgical:{k}" for k in range(5)] + ["gradual",
                                                                                          "discriminative:10"]
    assert [p["mode"] for p in s["points"]] == modes
    assert set(s["label_shift"]["accuracy"]) == set(modes)
    assert set(s["input_shift"]["accuracy"]) == {"frozen_to:0", "frozen_to:5", *[f"surgical:{k}" for k in range(5)]}
    assert all(len(s["label_shift"]["accuracy"][m]["2"]) == 2 for m in modes)  # both seeds
    assert "invert (input-level shift" in s["input_shift"]["target"]
    cost = {r["mode"]: r for r in s["cost"]}
    saved = [cost[f"frozen_to:{k}"]["saved_mb"] for k in range(6)]
    assert all(a > b for a, b in zip(saved, saved[1:]))
    for p in s["points"]:  # cost per epoch: 10 images in batches of 32 is one step of the measured step time
        assert p["epoch_s"] == pytest.approx(cost[p["mode"]]["step_ms"]["median"] / 1000)
        assert p["accuracy"] == pytest.approx(sum(s["label_shift"]["accuracy"][p["mode"]]["2"]) / 2)
    (v,) = s["verdicts"]
    assert v["complete"] and set(v["beats_both_per_s"]) <= {1, 2, 3, 4}
    (sg,) = s["surgical"]
    assert sg["complete"] and sg["label"]["best"] in ("stem", "layer1", "layer2", "layer3", "layer4")
    md = (out / "depth.md").read_text()
    assert "does a depth strictly between 0 and 5 beat both ends on accuracy per unit of cost?" in md
    assert "Paper: Lee et al." in md and f"the best single stage is **{sg['label']['best']}**" in md
    assert_series(out / "tradeoff.png", 4)  # frozen_to, surgical, gradual and discriminative colours
    assert_series(out / "surgical.png", 2)  # a line per shift
    config = json.loads((out / "config.json").read_text())
    assert config["mode_settings"]["surgical:3"]["train_groups"] == [3]


def test_the_command_line_defaults_are_the_study_s():
    from tp3_fastai import cli
    from tp3_fastai.bench import tradeoff
    from tp3_fastai.practical import DEPTH_MODES as PRACTICAL

    assert cli.DEPTH_MODES == ",".join(tradeoff.DEPTH_MODES) and cli.SURGICAL_MODES == ",".join(tradeoff.SURGICAL_MODES)
    assert cli.DEPTH_CURVE == ",".join(tradeoff.DEPTHS) == ",".join(PRACTICAL)


@pytest.mark.parametrize("argv, message", [
    (["--shift", "label"], "shift must be an input-level shift, one of invert, noise, blur"),
    (["--ks", "10,60"], "the input-shift target holds 50 images per class to draw from"),
    (["--modes", "frozen_to:2,finetune"], "training mode 'finetune' does not apply to tp3 bench"),
    (["--modes", "frozen_to:9"], "training mode 'frozen_to:9': frozen_to takes"),
])
def test_the_depth_study_refuses_bad_arguments_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "depth"
    with pytest.raises(SystemExit) as e:
        tp3(["freeze-depth", *argv, "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: {message}") and "\n" not in err, err
    assert not out.exists()


def test_the_modes_run_through_finetune_into_one_run_folder_and_predict(dls, tmp_path):
    from tp3_fastai.transfer.finetune import finetune_experiment, predict

    modes = ["frozen_to:3", "surgical:1", "discriminative:10", "gradual"]
    s = finetune_experiment(data="lfw", arch=ARCH, size=32, bs=32, epochs=3, modes=modes, aug="none", device="cpu",
                            progress=False, out=tmp_path / "run", cache_dir=tmp_path / "cache", log=lambda line: None)
    run = Path(s["run_dir"])
    assert list(s["modes"]) == modes
    for m in modes:
        stem = m.replace(":", "-")  # no colon in file names
        assert (run / f"metrics_{stem}.csv").is_file() and (run / "checkpoints" / stem / "result.json").is_file()
        assert s["modes"][m]["epochs"] == 3
    assert [p["trains"] for p in s["modes"]["gradual"]["phases"]] == [
        "head only (BatchNorm frozen too)", "layer4, head", "layer3, layer4, head"]
    assert s["modes"]["surgical:1"]["phases"][0]["trains"] == "layer1, head"
    config = json.loads((run / "config.json").read_text())
    assert config["mode_settings"]["discriminative:10"]["lr_mult"] == 10
    assert config["mode_settings"]["frozen_to:3"] == dict(training_mode("frozen_to:3").settings())
    label, prob = predict(run / "model.pkl", next((run.parent / "cache").rglob("*.png"), None)
                          or next(Path(s["data"]["path"]).rglob("*.png")))
    assert label in ("face", "non_face") and 0.5 <= prob <= 1
