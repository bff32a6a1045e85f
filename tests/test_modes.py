"""The one table of training modes (tp3_fastai.train.modes) and every command that takes modes: `frozen` freezes
the body's BatchNorm (weights and running statistics unchanged by training, layers in eval mode) and `frozen_bn`
trains it, in `tp3 finetune`, `tp3 label-efficiency`, `tp3 bench` and `tp3 run`; old spellings are refused in one
line that names the new one."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch

from tp3_fastai.cli import main as tp3
from tp3_fastai.train import modes as M
from probes import BatchNormWatch, batchnorm_state, body_batchnorms, installed

ARCH = "test_resnet"  # timm's smallest ResNet (BatchNorm in every block): seconds per run on the CPU
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# ---------------------------------------------------------------- the table
def test_the_table_says_what_each_mode_freezes_and_where_it_applies():
    frozen, frozen_bn = M.MODES["frozen"], M.MODES["frozen_bn"]
    assert (frozen.freeze_to, frozen.train_bn, frozen.bn_frozen) == (-1, False, True)
    assert (frozen_bn.freeze_to, frozen_bn.train_bn, frozen_bn.bn_frozen) == (-1, True, False)
    assert not M.MODES["scratch"].pretrained and M.MODES["scratch"].freeze_to == 0
    assert M.MODES["finetune"].schedule == "fine_tune" and M.MODES["precomputed"].schedule == "features"
    assert M.modes_for("finetune") == M.modes_for("label-efficiency") == M.modes_for("run") == (
        "scratch", "finetune", "frozen", "frozen_bn", "gradual")
    assert set(M.modes_for("bench")) == {"frozen", "frozen_bn", "unfrozen", "precomputed", "gradual"}
    assert M.families_for("finetune") == M.families_for("bench") == (
        "frozen_to:K", "frozen_bn_to:K", "surgical:K", "discriminative:R")
    # the ends of the depth families are the table's rows: frozen_to:5 is frozen, frozen_bn_to:5 is frozen_bn
    for family, row in (("frozen_to", "frozen"), ("frozen_bn_to", "frozen_bn")):
        a, b = M.training_mode(f"{family}:5").settings(), M.MODES[row].settings()
        assert {k: v for k, v in a.items() if k not in ("label", "freeze_to")} == {
            k: v for k, v in b.items() if k not in ("label", "freeze_to")}
        assert M.training_mode(f"{family}:5").frozen_groups(6) == M.MODES[row].frozen_groups(6) == [True] * 5 + [False]
    assert M.training_mode("frozen_to:0").frozen_groups(6) == M.MODES["unfrozen"].frozen_groups(6) == [False] * 6
    assert M.training_mode("surgical:2").frozen_groups(6) == [True, True, False, True, True, False]
    assert M.training_mode("discriminative:10").lr_max(1e-3) == slice(1e-4, 1e-3)
    assert [sum(M.MODES["gradual"].frozen_groups(6, e)) for e in range(7)] == [5, 4, 3, 2, 1, 0, 0]
    for command, defaults in M.DEFAULT_MODES.items():
        assert M.check_modes(defaults, command) == list(defaults)
    # every label starts with its mode's name: legends and reports show the name and what trains
    assert all(m.label.startswith(f"{name} (") for name, m in M.MODES.items())
    assert M.check_modes("frozen, frozen_bn,frozen", "bench") == ["frozen", "frozen_bn"]


@pytest.mark.parametrize("modes, command, message", [
    ("frozen_train_bn", "bench", "training mode 'frozen_train_bn' is now called 'frozen_bn': frozen_bn (body frozen"),
    ("unfrozen", "finetune", "training mode 'unfrozen' does not apply to tp3 finetune (it applies to tp3 bench): "
                             "choose from scratch, finetune, frozen, frozen_bn"),
    ("scratch", "bench", "training mode 'scratch' does not apply to tp3 bench"),
    ("frozn", "label-efficiency", "unknown training mode 'frozn'. Did you mean: frozen"),
    ("", "run", "no training mode given: tp3 run takes scratch, finetune, frozen, frozen_bn, gradual, frozen_to:K, "
                "frozen_bn_to:K, surgical:K, discriminative:R"),
    ("frozen_to:6", "finetune", "training mode 'frozen_to:6': frozen_to takes the number of stage groups frozen, 0-5"),
    ("frozen_to:03", "bench", "training mode 'frozen_to:03': frozen_to takes the number of stage groups frozen, 0-5"),
    ("surgical:5", "label-efficiency", "training mode 'surgical:5': surgical takes the stage group that trains, 0-4"),
    ("discriminative:0.5", "run", "training mode 'discriminative:0.5': discriminative takes the ratio of the head's "
                                  "learning rate to the stem's, a number >= 1"),
])
def test_unknown_old_or_misplaced_modes_are_refused_in_one_line(modes, command, message):
    with pytest.raises(ValueError) as e:
        M.check_modes(modes, command)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_parametrised_family_extends_the_table(monkeypatch):
    """A family 'name:argument' (e.g. a freeze depth) makes modes that every command checks like the table's."""
    def frozen_to(k: str) -> M.TrainingMode:
        if not k.isdigit():
            raise ValueError(f"frozen_to takes a number of parameter groups, got {k!r}")
        return replace(M.MODES["frozen"], name=f"frozen_to:{k}", label=f"frozen_to:{k} (test)", freeze_to=int(k))

    monkeypatch.setattr(M, "FAMILIES", {})
    M.register_family("frozen_to", frozen_to)
    assert M.training_mode("frozen_to:3").freeze_to == 3
    assert M.check_modes("scratch,frozen_to:1", "finetune") == ["scratch", "frozen_to:1"]
    with pytest.raises(ValueError, match="frozen_to takes a number"):
        M.check_modes("frozen_to:x", "finetune")
    with pytest.raises(ValueError, match=r"unknown training mode 'frozen_too:1'.*frozen_to:\.\.\."):
        M.training_mode("frozen_too:1")
    with pytest.raises(ValueError, match="cannot be named"):
        M.register_family("frozen", frozen_to)


# ---------------------------------------------------------------- BatchNorm in every command
def _assert_frozen_vs_trained(records: list[dict], modes: tuple[str, ...] = ("frozen", "frozen_bn")) -> None:
    """Each learner that trained in `frozen` left the body's BatchNorm as it found it, in eval mode; each that
    trained in `frozen_bn` changed its weights and statistics, in training mode."""
    seen = {m: 0 for m in modes}
    for r in records:
        if r.get("mode") not in modes or "after" not in r:
            continue
        seen[r["mode"]] += 1
        before, after = r["before"], r["after"]
        assert before["weight"], "the body has no BatchNorm layer: the test would prove nothing"
        same = {k: all(torch.equal(a, b) for a, b in zip(before[k], after[k])) for k in before}
        if r["mode"] == "frozen":
            assert all(same.values()), (r["mode"], same)  # weights, biases, running means and variances
            assert r["bn_training"] == {False}  # eval mode at every training batch (BnFreeze)
        else:
            assert not same["weight"] and not same["running_mean"] and not same["running_var"], same
            assert r["bn_training"] == {True}
    assert all(seen.values()), f"learners seen per mode: {seen}"


def test_finetune_command_frozen_freezes_batchnorm_and_frozen_bn_trains_it(cache, tmp_path):
    out = tmp_path / "run"
    with installed(BatchNormWatch) as records:
        tp3(["finetune", "--arch", ARCH, "--size", "32", "--bs", "32", "--epochs", "2", "--modes", "frozen,frozen_bn",
             "--aug", "none", "--device", "cpu", "--cache-dir", str(cache), "--out", str(out)])
    _assert_frozen_vs_trained(records)
    config = json.loads((out / "config.json").read_text())
    assert config["modes"] == ["frozen", "frozen_bn"] and "train_bn" not in config
    assert config["mode_settings"]["frozen"]["train_bn"] is False and config["mode_settings"]["frozen_bn"]["train_bn"]
    summary = json.loads((out / "summary.json").read_text())
    # frozen trains the head alone; frozen_bn the head and the body's BatchNorm weights and biases
    learn = timm.create_model(ARCH, num_classes=0)
    bn_params = sum(p.numel() for m in learn.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                    for p in m.parameters())
    trained = {m: summary["modes"][m]["trainable_params"] for m in ("frozen", "frozen_bn")}
    assert trained["frozen_bn"] - trained["frozen"] == bn_params > 0


def test_label_efficiency_command_frozen_freezes_batchnorm_and_frozen_bn_trains_it(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "body.safetensors"
    save_file(timm.create_model(ARCH, pretrained=False, num_classes=0, in_chans=1).state_dict(), str(weights))
    out = tmp_path / "le"
    with installed(BatchNormWatch) as records:
        tp3(["label-efficiency", "--ks", "2", "--seeds", "0", "--modes", "frozen,frozen_bn", "--arch", ARCH,
             "--epochs", "2", "--bs", "8", "--weights", str(weights), "--device", "cpu", "--out", str(out)])
    _assert_frozen_vs_trained(records)
    config = json.loads((out / "config.json").read_text())
    assert config["mode_settings"]["frozen"]["train_bn"] is False and config["mode_settings"]["frozen_bn"]["train_bn"]


def test_bench_command_frozen_freezes_batchnorm_and_frozen_bn_trains_it(tmp_path, monkeypatch):
    """The fastai loops (overhead section) through the probe; the plain PyTorch loops, which no callback sees,
    through a wrapper of PlainLoop.run that watches the body's BatchNorm the same way."""
    from tp3_fastai.bench import freeze, loops, modes as bench_modes

    plain_records: list[dict] = []
    run, make = loops.PlainLoop.run, bench_modes.mode_learner

    def mode_learner(dls, arch, mode, *args, **kwargs):  # tag each model with its mode (deep copies keep it)
        learn = make(dls, arch, mode, *args, **kwargs)
        learn.model.tp3_mode = mode
        return learn

    def watched_run(self, *args, **kwargs):
        bns = body_batchnorms(self.model) if hasattr(self.model, "tp3_mode") else []
        record = dict(mode=getattr(self.model, "tp3_mode", None), before=batchnorm_state(bns), bn_training=set())
        hooks = [m.register_forward_pre_hook(lambda m, _: record["bn_training"].add(m.training)
                                             if torch.is_grad_enabled() else None) for m in bns]
        try:
            return run(self, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
            record["after"] = batchnorm_state(bns)
            plain_records.append(record)

    monkeypatch.setattr(bench_modes, "mode_learner", mode_learner)
    monkeypatch.setattr(freeze, "mode_learner", mode_learner)
    monkeypatch.setattr(loops.PlainLoop, "run", watched_run)
    with installed(BatchNormWatch) as records:
        tp3(["bench", "--quick", "--arch", ARCH, "--size", "32", "--bs", "4", "--steps", "1", "--repeats", "2",
             "--warmup", "1", "--modes", "frozen,frozen_bn", "--precisions", "fp32", "--formats", "contiguous",
             "--overhead-modes", "frozen,frozen_bn", "--no-pipeline", "--no-count-reads", "--device", "cpu",
             "--threads", "1", "--out", str(tmp_path / "bench")])
    _assert_frozen_vs_trained(records)  # package, stock and fastai-Adam learner loops
    _assert_frozen_vs_trained(plain_records)  # the modes x levers grid and the plain loop of the overhead section
    assert sum(r["mode"] == "frozen" for r in plain_records) == 1 + 2  # one grid cell, two overhead rounds
    config = json.loads((tmp_path / "bench" / "config.json").read_text())
    assert config["modes"] == ["frozen", "frozen_bn"] and config["overhead_modes"] == ["frozen", "frozen_bn"]


def test_run_command_frozen_freezes_batchnorm_and_frozen_bn_trains_it(tmp_path):
    out = tmp_path / "report"
    with installed(BatchNormWatch) as records:
        tp3(["run", "--parts", "transfer", "--images", "lfw", "--arch", ARCH, "--transfer-epochs", "2", "--modes",
             "frozen,frozen_bn", "--device", "cpu", "--out", str(out)])
    _assert_frozen_vs_trained(records)
    summary = json.loads((out / "part2_transfer" / "summary.json").read_text())
    assert list(summary["modes"]) == ["frozen", "frozen_bn"]
    assert "## Part II: transfer learning, frozen vs frozen_bn" in (out / "report.md").read_text()


# ---------------------------------------------------------------- old spellings
SMALL = {"finetune": ["--arch", ARCH, "--size", "32", "--epochs", "2", "--aug", "none", "--device", "cpu"],
         "bench": ["--quick", "--arch", ARCH, "--size", "32", "--bs", "4", "--steps", "1", "--repeats", "1",
                   "--warmup", "1", "--precisions", "fp32", "--formats", "contiguous", "--no-pipeline",
                   "--device", "cpu"]}  # were the refusal gone, the run would stay short


TRAIN_BN_GONE = ("error: --train-bn and --no-train-bn are gone: the modes say it (--modes frozen freezes the body's "
                 "BatchNorm with the body, --modes frozen_bn trains it)")
RENAMED = "error: training mode 'frozen_train_bn' is now called 'frozen_bn': frozen_bn (body frozen, its BatchNorm"


@pytest.mark.parametrize("argv, message", [(["finetune", "--no-train-bn"], TRAIN_BN_GONE),
                                           (["finetune", "--train-bn"], TRAIN_BN_GONE),
                                           (["bench", "--modes", "unfrozen,frozen_train_bn"], RENAMED),
                                           (["bench", "--overhead-modes", "frozen_train_bn"], RENAMED)])
def test_old_spellings_are_refused_naming_the_new_one(argv, message, cache, tmp_path, capsys):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        tp3([*argv, *SMALL[argv[0]], "--cache-dir", str(cache), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(message), err
    assert not out.exists()  # refused before any work


def test_old_keywords_are_refused_naming_the_new_one(tmp_path):
    from tp3_fastai.transfer.finetune import finetune_experiment
    from tp3_fastai.transfer.learner import set_mode

    with pytest.raises(ValueError, match="train_bn is gone: the modes say it: 'frozen' freezes .* 'frozen_bn'"):
        finetune_experiment(train_bn=False, out=tmp_path / "r")
    with pytest.raises(TypeError):
        set_mode(None, "frozen", train_bn=False)
    assert not (tmp_path / "r").exists()


def _old_run(folder: Path, modes: list[str], train_bn: bool) -> Path:
    """A run folder as finetune wrote it before the modes table: train_bn beside the modes."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(
        data="lfw", arch=ARCH, size=32, bs=32, epochs=2, modes=modes, pretrained=False, lr=2e-3, freeze_epochs=1,
        train_bn=train_bn, aug="none", seed=42, channels_last=False, weights="random init")))
    return folder


def test_resume_reads_an_old_run_folder_and_refuses_one_whose_frozen_meant_frozen_bn(tmp_path):
    from tp3_fastai.transfer.finetune import FinetuneConfig, plan_finetune

    plan = plan_finetune(FinetuneConfig(resume=_old_run(tmp_path / "a", ["scratch", "finetune"], True)))
    assert (plan.arch, plan.modes, plan.size, plan.epochs) == (ARCH, ["scratch", "finetune"], 32, 2)
    plan = plan_finetune(FinetuneConfig(resume=_old_run(tmp_path / "b", ["frozen"], False)))
    assert plan.modes == ["frozen"]  # train_bn=False: the old frozen is the new one
    with pytest.raises(ValueError, match=r"its 'frozen' trained the body's BatchNorm \(train_bn=True\), which is "
                                         r"'frozen_bn' now.*start a new run"):
        plan_finetune(FinetuneConfig(resume=_old_run(tmp_path / "c", ["scratch", "frozen"], True)))
    with pytest.raises(ValueError, match=r"its 'finetune' kept the body's BatchNorm frozen"):
        plan_finetune(FinetuneConfig(resume=_old_run(tmp_path / "d", ["finetune"], False)))
