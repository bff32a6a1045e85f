"""Data-parallel training: sharded in-memory loaders, the single-process no-op, and real 2-process launches
(torchrun, gloo on the CPU) of the MNIST and finetune scripts compared with single-process runs of the same
settings."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastai.data.core import DataLoaders
from torch import nn

from tp3_fastai.data.mnist import TensorLoader, load_mnist
from tp3_fastai.train.distributed import (LaunchConfig, digest, distributed_context, gather_object, is_main_process,
                                    launch_config, main_only, rank, setup_distributed, world_size)
from tp3_fastai.mnist.learner import mnist_learner
from probes import launcher, rank_records

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_mnist.py"
ARGS = ["--archs", "cnn", "--epochs", "2", "--device", "cpu", "--seed", "42"]
# Measured here, 2 processes vs 1, CNN without dropout, 2 epochs, bs 64: the same accuracies to 4 digits, weights
# within 2e-7 (summation order). With dropout each rank draws its own masks and the runs differ like two seeds:
# |test accuracy difference| 0.003-0.014 over seeds 0-4, hence the comparison runs without dropout.
TOLERANCE = 0.002  # 2 of 1,000 test digits


def _labels(loader):
    return [b[1].tolist() for b in loader]


@pytest.mark.parametrize("n, bs, world", [(10, 4, 2), (9, 4, 2), (7, 6, 3), (12, 4, 4)])
def test_shards_split_every_batch_of_the_same_permutation(n, bs, world):
    x, y = torch.arange(n).float()[:, None], torch.arange(n)
    single = TensorLoader(x, y, bs, shuffle=True, seed=3)
    shards = [TensorLoader(x, y, bs, shuffle=True, seed=3).shard(r, world) for r in range(world)]
    assert {len(s) for s in shards} == {len(single)}  # same number of steps everywhere: DDP never waits forever
    for _ in range(2):  # a new permutation every epoch, the same on every rank
        whole = _labels(single)
        parts = [_labels(s) for s in shards]
        for i, batch in enumerate(whole):
            sizes = {len(p[i]) for p in parts}
            assert len(sizes) == 1  # equal per-rank batches: gathered means are exact
            got = [v for p in parts for v in p[i]]
            # rank r holds the r-th part of the single-process batch; a last, short batch may be padded
            assert got[:len(batch)] == batch and len(got) - len(batch) < world
            assert got == batch or (n % world and i == len(whole) - 1)
        seen = [v for p in parts for b in p for v in b]
        assert sorted(set(seen)) == list(range(n)) and len(seen) - n < world  # at most world - 1 repeats


def test_unshuffled_shards_cover_the_set_once_and_bad_shards_are_refused():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    loader = TensorLoader(x, y, bs=4)
    parts = [_labels(loader.shard(r, 2)) for r in range(2)]
    assert sorted(v for p in parts for b in p for v in b) == list(range(10))
    assert _labels(loader) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # one process: unchanged
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        loader.shard(0, 3)
    with pytest.raises(ValueError, match="already rank 1's shard of 2"):
        loader.shard(1, 2).shard(0, 2)
    assert loader.shard(1, 2).new(shuffle=False).rank == 1


def test_launch_config_reads_the_launcher_variables():
    assert launch_config({}) == LaunchConfig(1, 0, 0) and not launch_config({}).distributed
    cfg = launch_config({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert cfg == LaunchConfig(4, 3, 1) and cfg.distributed
    with pytest.raises(ValueError, match="inconsistent launch"):
        launch_config({"WORLD_SIZE": "2", "RANK": "2"})


def test_single_process_is_a_no_op(tmp_path):
    assert (world_size(), rank(), is_main_process()) == (1, 0, True)
    assert setup_distributed(torch.device("cpu"), LaunchConfig()) == torch.device("cpu")
    assert gather_object("x") == ["x"] and main_only(print) is print
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    dls = DataLoaders(TensorLoader(x, y, 16, shuffle=True), TensorLoader(x, y, 32), device="cpu")
    learn = mnist_learner(dls, "cnn", progress=False, log=None, path=tmp_path)
    n_cbs = len(learn.cbs)
    with distributed_context(learn, launch=LaunchConfig()):
        learn.fit(1, 1e-3)
    assert isinstance(learn.model, nn.Module) and not hasattr(learn.model, "module")
    assert len(learn.cbs) == n_cbs and len(learn.curves.history) == 1


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# scripts/train_mnist.py with the CNN's dropout off (then a 2-process run must equal a single process up to float
# rounding, see TOLERANCE), launched with a probe that records what each rank trained on (tests/probes.py)
NO_DROPOUT = """
from tp3_fastai.mnist import models
models.MODELS["cnn"] = lambda: models.SmallCNN(dropout=0.0)
"""


def _local_port_opens() -> bool:
    """Whether this machine lets a process listen on a local TCP port (what torchrun's rendezvous needs)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
        return True
    except OSError:
        return False


def _launch(cmd: list[str], cwd: Path) -> subprocess.Popen:
    if not _local_port_opens():
        pytest.skip("this machine cannot open a local TCP port, which a launch of 2 processes needs")
    cwd.mkdir()
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, what: str) -> str:
    """The launch's stdout; it must exit 0 with nothing on stderr but warnings."""
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, f"{what} failed (exit {p.returncode}):\n{stderr[-3000:]}"
    assert not _not_warnings(stderr), f"{what} wrote to stderr:\n{stderr[-3000:]}"
    return stdout


def _not_warnings(stderr: str) -> list[str]:
    """stderr's lines other than Python warnings (a warning line and the source line printed under it)."""
    lines, out = stderr.splitlines(), []
    for i, line in enumerate(lines):
        if "Warning" in line or (i and "Warning" in lines[i - 1] and line.startswith("  ")) or not line.strip():
            continue
        out.append(line)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, monkeypatch_module):
    """Side by side: torchrun with 2 processes, and one process (this one) with the same settings."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        pytest.skip("distributed training needs accelerate (pip install accelerate)")
    base = tmp_path_factory.mktemp("dist")
    wrapper = launcher(base / "train_mnist_probed.py", SCRIPT, "RankWork", base / "probes", before=NO_DROPOUT)
    torchrun = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(wrapper), *ARGS, "--out", "r"], base / "two")
    from tp3_fastai.mnist import models
    from tp3_fastai.mnist.train import train_mnist

    monkeypatch_module.setitem(models.MODELS, "cnn", lambda: models.SmallCNN(dropout=0.0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): same arithmetic, no oversubscription
    try:
        one = train_mnist(archs=["cnn"], epochs=2, device="cpu", seed=42, out=base / "one" / "r",
                          log=lambda s: None, progress=False, launch=LaunchConfig())
    finally:
        torch.set_num_threads(threads)
    stdout = _finish(torchrun, "torchrun")
    return dict(one=dict(summary=one), two=dict(folder=base / "two", stdout=stdout,
                                                summary=json.loads((base / "two" / "r" / "summary.json").read_text()),
                                                work=[next(r for r in records if "grad" in r)
                                                      for records in rank_records(base / "probes", 2)]))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_two_processes_trained_their_shares_with_all_reduced_gradients(runs):
    s = runs["two"]["summary"]
    assert s["world_size"] == 2 and s["distributed"]["backend"] == "gloo"
    assert s["distributed"]["bs_per_process"] == 32
    ranks = s["distributed"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and len({r["pid"] for r in ranks}) == 2
    (cnn,) = s["models"]
    # 2 epochs x ceil(3200 / 64) steps on each rank, each of 32 images: the two halves of every batch
    assert [r["train_batches"] for r in cnn["ranks"]] == [100, 100]
    # measured by the probe in each process: every step took 32 images, and every epoch each rank saw 1,600 of
    # the 3,200 training images, the two halves disjoint and together the whole set, a new order every epoch
    work = runs["two"]["work"]
    assert [w["batch_sizes"] for w in work] == [{32}, {32}]
    for epoch in range(2):
        seen = [w["epochs"][epoch] for w in work]
        assert [len(v) for v in seen] == [1600, 1600] and [len(set(v)) for v in seen] == [1600, 1600]
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 3200
    assert work[0]["epochs"][0] != work[0]["epochs"][1]
    # the model was wrapped in DistributedDataParallel for every training step
    assert [w["ddp"] for w in work] == [{True}, {True}]
    # the first step: each rank's own batch gives its own gradient; the optimiser got their mean on both ranks
    g0, g1 = (w["grad"] for w in work)
    l0, l1 = (w["local_grad"] for w in work)
    assert not torch.allclose(l0, l1, atol=1e-4)
    assert torch.allclose(g0, g1, rtol=0, atol=1e-7)
    assert torch.allclose(g0, (l0 + l1) / 2, rtol=1e-4, atol=1e-7)
    # identical weights on both ranks after training on different images: only because of the all-reduce
    assert len({r["weights"] for r in cnn["ranks"]}) == 1
    # test accuracy gathered over the ranks' halves of the test set: every rank reports the same value
    assert len({r["test_accuracy"] for r in cnn["ranks"]}) == 1
    assert cnn["test_accuracy"] == pytest.approx(cnn["ranks"][0]["test_accuracy"])


def test_same_seed_gives_the_same_split_on_every_rank(runs):
    ranks = runs["two"]["summary"]["distributed"]["ranks"]
    s = load_mnist(seed=42)
    assert {r["split"] for r in ranks} == {digest(s.y_train, s.y_valid, s.y_test, s.x_train)}
    assert runs["two"]["summary"]["split_sizes"] == runs["one"]["summary"]["split_sizes"]


def test_outputs_are_written_once_by_rank_0(runs):
    folder, stdout = runs["two"]["folder"], runs["two"]["stdout"]
    assert sorted(p.name for p in folder.iterdir()) == ["r"]  # no r-2 made by a second rank
    assert {p.name for p in (folder / "r").iterdir()} == {"config.json", "summary.json", "summary.md",
                                                          "curves.png", "metrics_cnn.csv", "checkpoints"}
    with open(folder / "r" / "metrics_cnn.csv") as f:
        assert [r[0] for r in csv.reader(f)] == ["epoch", "1", "2"]
    assert stdout.count("cnn epoch 1/2") == 1 and stdout.count("cnn epoch 2/2") == 1
    assert stdout.count("| cnn | 27,830 | 2 |") == 1 and stdout.count("run folder:") == 1
    config = json.loads((folder / "r" / "config.json").read_text())
    assert config["world_size"] == 2 and config["bs"] == 64 and config["bs_per_process"] == 32
    assert sorted(p.name for p in (folder / "r" / "checkpoints" / "cnn").iterdir()) == ["best.pth", "last.pth"]


def test_checkpoint_of_a_distributed_run_loads_into_a_plain_model(runs, tmp_path):
    from tp3_fastai.train.checkpoint import load_checkpoint
    from tp3_fastai.data.mnist import mnist_dls

    dls, _ = mnist_dls(bs=64)
    learn = mnist_learner(dls, "cnn", progress=False, log=None, path=tmp_path)
    assert load_checkpoint(learn, runs["two"]["folder"] / "r" / "checkpoints" / "cnn" / "last.pth") == 2


def test_result_matches_a_single_process_run(runs):
    one, two = runs["one"]["summary"], runs["two"]["summary"]
    assert one["world_size"] == 1 and "distributed" not in one
    a, b = one["models"][0], two["models"][0]
    # measured: identical to 4 digits, weights within 2e-7 (float summation order only)
    assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=TOLERANCE)
    assert b["valid_accuracy"] == pytest.approx(a["valid_accuracy"], abs=TOLERANCE)
    assert b["test_accuracy"] > 0.85


THREADS_PROBE = """
import json, os
import torch
from tp3_fastai.data.mnist import mnist_dls
from tp3_fastai.train.distributed import (close_distributed, distributed_context, gather_object, launch_config, rank,
                                    setup_distributed)
from tp3_fastai.mnist.learner import mnist_learner

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
setup_distributed(torch.device("cpu"), launch_config())
dls, _ = mnist_dls(bs=64, device="cpu")
learn = mnist_learner(dls, "cnn", progress=False, log=None, path=".")
with distributed_context(learn):
    learn.fit(1, 1e-3)
gather_object(rank())  # a collective whose tensors Python lets go of at once: a worker thread frees them
during, me = threads(), rank()
close_distributed()
with open(f"threads{me}.json", "w") as f:
    json.dump(dict(rank=me, before=before, during=during, after=threads()), f)
"""


def test_leaving_the_group_joins_its_threads_before_the_interpreter_shuts_down(tmp_path):
    """The cause of aborts at exit ("terminate called without an active exception"): gloo's worker threads still ran
    during interpreter shutdown and one released a finished collective's tensors without the GIL. After
    close_distributed, every thread the group started is gone, so nothing of it can outlive the interpreter."""
    pytest.importorskip("accelerate", reason="distributed training needs accelerate (pip install accelerate)")
    if not Path("/proc/self/task").is_dir():
        pytest.skip("counting a process's threads needs /proc (Linux)")
    probe = tmp_path / "threads_probe.py"
    probe.write_text(THREADS_PROBE)
    p = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe)],
                tmp_path / "run")
    _finish(p, "torchrun")
    counts = [json.loads((tmp_path / "run" / f"threads{r}.json").read_text()) for r in range(2)]
    assert [c["rank"] for c in counts] == [0, 1]
    for c in counts:
        assert c["during"] > c["before"]  # the group's worker threads ran
        assert c["after"] == c["before"], c  # and were joined when the process left the group


FAILING_RANK = """
import torch
from tp3_fastai.train.distributed import gather_object, launch_config, rank, setup_distributed

setup_distributed(torch.device("cpu"), launch_config())
gather_object(rank())
if rank() == 1:
    raise RuntimeError("rank 1 fails on purpose")
"""


def test_a_failing_rank_fails_the_launch_at_once(tmp_path):
    """A rank that fails does not wait at the exit barrier for the others: the launch ends with an error, quickly."""
    probe = tmp_path / "failing.py"
    probe.write_text(FAILING_RANK)
    p = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe)],
                tmp_path / "run")
    _, stderr = p.communicate(timeout=120)
    assert p.returncode != 0 and "rank 1 fails on purpose" in stderr


def test_the_mnist_launch_exits_cleanly_again_and_again(tmp_path, request):
    """On demand (`--launches N`, e.g. `pytest tests/test_device.py tests/test_distributed.py --launches 30`): the
    `runs` fixture's two-process launch N times in a row in this pytest process, after the modules before it; every
    launch exits 0 with nothing on stderr but warnings and a complete run folder."""
    n = request.config.getoption("--launches")
    if not n:
        pytest.skip("runs only on demand: --launches N")
    wrapper = launcher(tmp_path / "train_mnist_probed.py", SCRIPT, "RankWork", tmp_path / "probes", before=NO_DROPOUT)
    for i in range(n):
        p = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     str(wrapper), *ARGS, "--out", "r"], tmp_path / f"launch{i}")
        _finish(p, f"launch {i + 1} of {n}")
        assert {f.name for f in (tmp_path / f"launch{i}" / "r").iterdir()} == {
            "config.json", "summary.json", "summary.md", "curves.png", "metrics_cnn.csv", "checkpoints"}


ACCELERATE_PROBE = """
import json, os
import torch
from accelerate import Accelerator
from tp3_fastai.train.distributed import gather_object, launch_config, rank, setup_distributed

setup_distributed(torch.device("cpu"), launch_config())
state = Accelerator(cpu=True).state  # what fastai's DistributedTrainer creates in distributed_context
info = gather_object(dict(rank=rank(), pid=os.getpid(), type=state.distributed_type.value, n=state.num_processes))
if rank() == 0:
    print(json.dumps(info))
"""


def test_accelerate_launch_starts_two_processes_that_join_one_gloo_group(tmp_path):
    """`accelerate launch --multi_gpu` is how accelerate starts N processes (through torch.distributed.run); on a
    machine without a GPU each joins the gloo group. (`--cpu` starts one process unless MPI is set up.) The full
    MNIST training under this launcher gave the very weights of the torchrun launch (docs/distributed.md)."""
    pytest.importorskip("accelerate", reason="distributed training needs accelerate (pip install accelerate)")
    probe = tmp_path / "probe.py"
    probe.write_text(ACCELERATE_PROBE)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(probe)]
    p = _launch(cmd, tmp_path / "run")
    info = json.loads(_finish(p, "accelerate launch").strip().splitlines()[-1])
    assert [r["rank"] for r in info] == [0, 1] and len({r["pid"] for r in info}) == 2
    assert {(r["type"], r["n"]) for r in info} == {("MULTI_CPU", 2)}


# Part II under torchrun: scripts/finetune.py unchanged, a ResNet with BatchNorm, fine_tune's two fits
FINETUNE_ARGS = ["--arch", "test_resnet", "--size", "32", "--bs", "32", "--epochs", "4", "--modes", "finetune,gradual",
                 "--aug", "none", "--device", "cpu", "--seed", "0"]
# Unlike the MNIST CNN, a ResNet cannot match a single process exactly, although every step sees the same images
# (test below): each process normalises with the BatchNorm statistics of its 16 images (SyncBatchNorm needs CUDA)
# and draws its own dropout masks in fastai's head, and the runs drift apart. Measured here with these arguments,
# seeds 0-4, 2 processes vs 1 (torchrun vs plain scripts/finetune.py): |final valid accuracy difference| 0.04,
# 0.00, 0.04, 0.02, 0.00 and |final valid loss difference| 0.11, 0.089, 0.073, 0.058, 0.018, while one process
# alone ranged over 0.50-0.84 accuracy and 0.37-1.08 loss across those seeds. Tolerances: the largest difference
# plus one validation image (0.02 of 50) for accuracy, plus 0.05 for loss.
FINETUNE_ACC_TOL, FINETUNE_LOSS_TOL = 0.06, 0.16


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """scripts/finetune.py launched by torchrun on 2 processes, and finetune_experiment in this process."""
    pytest.importorskip("accelerate", reason="distributed training needs accelerate (pip install accelerate)")
    base = tmp_path_factory.mktemp("dist_finetune")
    cache = base / "cache"
    torchrun = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "scripts" / "finetune.py"), *FINETUNE_ARGS, "--cache-dir", str(cache), "--out", "r"],
                       base / "two")
    from tp3_fastai.transfer.finetune import finetune_experiment

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1)
    try:
        one = finetune_experiment(arch="test_resnet", size=32, bs=32, epochs=4, modes=["finetune"], aug="none",
                                  device="cpu", seed=0, out=base / "one" / "r", cache_dir=cache, progress=False,
                                  log=lambda s: None, launch=LaunchConfig())
    finally:
        torch.set_num_threads(threads)
    stdout = _finish(torchrun, "torchrun finetune")
    return dict(one=one, folder=base / "two", stdout=stdout,
                two=json.loads((base / "two" / "r" / "summary.json").read_text()))


def test_finetune_on_two_processes_trains_both_and_writes_once(finetune_runs):
    s, folder, stdout = finetune_runs["two"], finetune_runs["folder"], finetune_runs["stdout"]
    assert s["world_size"] == 2 and s["distributed"]["backend"] == "gloo" and s["distributed"]["bs_per_process"] == 16
    ranks = s["distributed"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and len({r["pid"] for r in ranks}) == 2
    assert len({r["split"] for r in ranks}) == 1  # the same seed drew the same split on both
    ft = s["modes"]["finetune"]
    # 4 epochs x (150 // 32) steps on each rank, each of 16 images (one process takes 32 per step: same steps)
    assert [r["train_batches"] for r in ft["ranks"]] == [16, 16]
    assert len({r["weights"] for r in ft["ranks"]}) == 1  # all-reduced gradients: the same weights on both ranks
    assert sorted(p.name for p in folder.iterdir()) == ["r"]
    assert {p.name for p in (folder / "r").iterdir()} == {
        "config.json", "summary.json", "summary.md", "comparison.png", "show_batch.png", "predictions.png",
        "confusion_matrix.png", "model.pkl", "metrics_finetune.csv", "metrics_gradual.csv", "checkpoints"}
    with open(folder / "r" / "metrics_finetune.csv") as f:
        assert [r[0] for r in csv.reader(f)] == ["epoch", "1", "2", "3", "4"]
    assert stdout.count("finetune epoch 1/4") == 1 and stdout.count("finetune epoch 4/4") == 1
    assert stdout.count("run folder:") == 1
    config = json.loads((folder / "r" / "config.json").read_text())
    assert config["world_size"] == 2 and config["bs"] == 32 and config["bs_per_process"] == 16
    # rank 0 alone predicted the whole valid set, once: each row holds its class's images (true classes as rows),
    # and the diagonal is the exported mode's best validation accuracy, which the ranks had gathered in training
    cm, best = s["confusion_matrix"], s["modes"][s["best_mode"]]
    valid = Path(s["data"]["path"]) / "valid"
    assert [sum(row) for row in cm["matrix"]] == [len(list((valid / c).iterdir())) for c in cm["classes"]]
    assert sum(cm["matrix"][i][i] for i in range(len(cm["classes"]))) / 50 == pytest.approx(best["best_valid_accuracy"])


def test_gradual_unfreezing_all_reduces_every_group_it_thaws(finetune_runs):
    """DDP all-reduces the parameters that trained when it wrapped the model: a group thawed later must be
    all-reduced too, or the ranks' weights drift apart (they did before GradualUnfreezing wrapped the model again)."""
    gradual = finetune_runs["two"]["modes"]["gradual"]
    assert [p["trainable_params"] for p in gradual["phases"]] == sorted(p["trainable_params"] for p in gradual["phases"])
    assert len({p["trainable_params"] for p in gradual["phases"]}) == 4  # head, then layer4, layer3, layer2 thawed
    assert [r["train_batches"] for r in gradual["ranks"]] == [16, 16]
    assert len({r["weights"] for r in gradual["ranks"]}) == 1  # the same weights on both ranks


def test_finetune_on_two_processes_matches_a_single_process(finetune_runs):
    a, b = finetune_runs["one"]["modes"]["finetune"], finetune_runs["two"]["modes"]["finetune"]
    assert finetune_runs["one"]["world_size"] == 1 and "distributed" not in finetune_runs["one"]
    assert b["final_valid_accuracy"] == pytest.approx(a["final_valid_accuracy"], abs=FINETUNE_ACC_TOL)
    assert b["final_valid_loss"] == pytest.approx(a["final_valid_loss"], abs=FINETUNE_LOSS_TOL)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_image_loader_shards_take_their_part_of_every_single_process_step(split, tmp_path):
    """A fastai image loader of bs/2 split over 2 ranks: step i of rank 0 then rank 1 is step i of one process with
    bs, epoch after epoch (fastai's own DistributedDL gives each rank a contiguous half of the epoch instead)."""
    pytest.importorskip("accelerate", reason="distributed training needs accelerate (pip install accelerate)")
    from tp3_fastai.train.distributed import _trainer_classes
    from tp3_fastai.data.images import image_dls, reseed

    one = reseed(image_dls("lfw", size=16, bs=16, aug="none", cache_dir=tmp_path), 42)
    single = [[b[0].flatten(1).clone() for b in getattr(one, split)] for _ in range(2)]
    shards = []
    for r in range(2):
        per = reseed(image_dls("lfw", size=16, bs=8, aug="none", cache_dir=tmp_path), 42)
        dl = _trainer_classes().dl_class(getattr(per, split), rank=r, world_size=2, device="cpu")
        dl._broadcast = lambda t, src: t  # every rank computes the same order: no process group needed here
        shards.append([[b[0].flatten(1).clone() for b in dl] for _ in range(2)])
    for epoch in range(2):
        assert len(shards[0][epoch]) == len(shards[1][epoch]) == len(single[epoch])
        for i, batch in enumerate(single[epoch]):
            assert torch.equal(torch.cat([shards[0][epoch][i], shards[1][epoch][i]]), batch)
