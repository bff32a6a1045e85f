"""Weights for a timm body: the hub (ImageNet, through timm's own pretrained path), a local file (safetensors or a
state dict, loaded with weights_only), or none; the normalisation they expect; where they came from, said once in
words for every report; and `check_weights`, which tries all of it before any run folder is made."""
from __future__ import annotations


import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

import timm
import torch
from torch import nn

from ..core.checks import plain_text
from ..core.config import BODY_CACHE
from ..data.download import DownloadError, unreachable


RANDOM_INIT = "random init"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # fastai's imagenet_stats, timm's default
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")
STRIP_PREFIXES = ("module.", "model.")  # DataParallel, a fastai TimmBody (timm model under `model.`)
WeightsArg = bool | str | Path


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_bodies(cache: str | Path = BODY_CACHE) -> list[str]:
    """The names of the bodies in the body cache (file stems, e.g. 'resnet10t-32px-1ch-<digest>'), newest first."""
    files = Path(cache).expanduser().glob("*.safetensors")
    return [p.stem for p in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)]


def weights_path(pretrained: WeightsArg, cache: str | Path = BODY_CACHE) -> Path | None:
    """The weights file of `pretrained` (None for True/False), checked to exist: a path, or the name of a body in
    the body cache (`tp3 pretrain` prints it; with or without .safetensors)."""
    if isinstance(pretrained, bool):
        return None
    if not isinstance(pretrained, (str, Path)) or not str(pretrained):
        raise ValueError(f"pretrained must be True, False or the path of a weights file, got {pretrained!r}")
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    cache = Path(cache).expanduser()
    if path.name == str(pretrained):  # a bare name: a cached body?
        for name in (path.name, f"{path.name}.safetensors"):
            if (cache / name).is_file():
                return cache / name
    bodies = cached_bodies(cache)
    cached = f" Cached bodies ({cache}): {', '.join(bodies[:3])}{' ...' if len(bodies) > 3 else ''}." if bodies else ""
    raise FileNotFoundError(f"weights file {path} does not exist, nor a body of that name in the body cache: pass a "
                            ".safetensors file or a PyTorch state dict (.pt/.pth) holding a timm body of the chosen "
                            f"arch, or the name of a cached body.{cached} `tp3 pretrain --out body.safetensors` "
                            "writes one where you want it.")


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The JSON file beside a weights file (same stem, .json), if any."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"weights sidecar {side} is not valid JSON: {e}") from e


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a PyTorch state dict, loaded without executing pickled code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for pickled objects, RuntimeError for non-torch files
            raise ValueError(pickled_file_message(path, e)) from e
        for key in ("state_dict", "model"):  # common checkpoint wrappers
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return dict(sd)


def pickled_file_message(path: Path, e: Exception) -> str:
    """Why `path` is refused (weights_only=True refuses pickled objects) and the one line that turns it into a
    file that loads: a fastai export (model.pkl) or a whole pickled model -> its state dict."""
    text = plain_text(str(e))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    pickled = found.group(1) if found else ""
    out = f"{path.stem}_weights.pth"
    if "Learner" in pickled:
        what = f"a fastai export (a pickled {pickled}, e.g. a run folder's model.pkl)"
        line = (f"python -c \"import torch; from fastai.learner import load_learner; "
                f"torch.save(load_learner('{path}').model.state_dict(), '{out}')\"")
    elif pickled:
        what = f"a pickled object ({pickled}: a whole model?)"
        line = f"python -c \"import torch; torch.save(torch.load('{path}', weights_only=False).state_dict(), '{out}')\""
    else:
        first = text.splitlines()[0] if text else ""
        return (f"{path} is not a PyTorch state dict nor a safetensors file ({type(e).__name__}: {first}): pass a "
                ".safetensors file or a state dict saved with torch.save(model.state_dict(), PATH)")
    return (f"{path} is {what}, which loading with weights_only=True refuses (unpickling can run code). If you made "
            f"it yourself, save its weights with one line, then pass {out}: {line}")


def body_state_dict_of(sd: dict[str, torch.Tensor], own: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The body's tensors of a state dict saved from a body, a DataParallel / timm wrapper or a whole fastai
    Learner's model (`learn.model.state_dict()`: body under `0.`, head under `1.`), and the keys left out (a
    Learner's head)."""
    ignored: list[str] = []
    if not own.keys() & sd.keys() and all(k.startswith(("0.", "1.")) for k in sd) and any(
            k.startswith("0.") for k in sd):
        ignored = sorted(k for k in sd if k.startswith("1."))  # the Learner's head: a new one is made for the classes
        sd = {k[2:]: v for k, v in sd.items() if k.startswith("0.")}
    for prefix in STRIP_PREFIXES:
        if not own.keys() & sd.keys() and any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd, ignored


def _first_conv_keys(body: nn.Module) -> list[str]:
    first = getattr(body, "pretrained_cfg", {}).get("first_conv") or []
    return [f"{k}.weight" for k in ([first] if isinstance(first, str) else first)]


def load_body_weights(body: nn.Module, path: str | Path, n_in: int = 3) -> dict[str, Any]:
    """Load a weights file into a timm body (classifier keys ignored, first conv adapted to `n_in`), strictly."""
    path = Path(path)
    own = body.state_dict()
    sd, head = body_state_dict_of(read_state_dict(path), own)
    dropped = head + sorted(k for k in sd if k.startswith(CLASSIFIER_PREFIXES) and k not in own)
    sd = {k: v for k, v in sd.items() if k not in dropped}
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{path} does not match this {type(body).__name__} body: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}. Is it a state dict of "
                         "the same timm architecture?")
    adapted = []
    for k in _first_conv_keys(body):
        if k in sd and sd[k].ndim == 4 and sd[k].shape[1] != own[k].shape[1]:
            from timm.models import adapt_input_conv

            sd[k] = adapt_input_conv(own[k].shape[1], sd[k], base_chans=sd[k].shape[1])  # as timm adapts in_chans
            adapted.append(k)
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if sd[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{path} has tensors of other shapes than this body: {'; '.join(bad[:3])}. "
                         "Is it the same architecture (depth, width)?")
    body.load_state_dict(sd, strict=True)
    return dict(ignored_keys=dropped, adapted_first_conv=adapted, n_in=n_in)


def hub_cfg(arch: str) -> dict[str, Any]:
    """timm's pretrained configuration of `arch` (its default tag when none is given); {} when timm has none."""
    try:
        cfg = timm.get_pretrained_cfg(arch)
    except (RuntimeError, ValueError, KeyError):
        return {}
    return cfg.to_dict() if cfg is not None else {}


def hub_id(arch: str) -> str:
    """Where timm takes `arch`'s pretrained weights from: the Hugging Face hub id (e.g. timm/resnet18.a1_in1k)."""
    cfg = hub_cfg(arch)
    return cfg.get("hf_hub_id") or cfg.get("url") or arch


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline mode (what HF_HUB_OFFLINE=1 sets, read at every request) while the block runs:
    files come from its cache only, without a request and so without its retries."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def hub_unreachable() -> str | None:
    """None when the hub's endpoint (HF_ENDPOINT, default https://huggingface.co) answers within seconds or
    huggingface_hub is offline anyway (HF_HUB_OFFLINE=1: no request is made); else why not, in one line."""
    import huggingface_hub.constants as hub

    return None if hub.HF_HUB_OFFLINE else unreachable(hub.ENDPOINT)


def hub_state_dict(arch: str, n_in: int) -> tuple[dict[str, torch.Tensor], str]:
    """The body state dict timm's own `pretrained=True` path gives (hub download or the Hugging Face cache; classifier
    dropped; first conv adapted to `n_in` channels), and the hub id; a DownloadError that says what to do instead.

    One connection check first (download.unreachable): when the hub does not answer, the weights are read from
    the Hugging Face cache in offline mode, and an empty cache is said at once instead of after the hub client's
    retries (46 s measured against a refused port)."""
    why = hub_unreachable()
    try:
        with hub_offline(why is not None):
            model = timm.create_model(arch, pretrained=True, num_classes=0, in_chans=n_in)
    except RuntimeError as e:
        msg = str(e).lower()
        if "no pretrained weights" in msg or "invalid pretrained tag" in msg:  # timm's own refusals, not network
            raise ValueError(f"timm has no pretrained weights for {arch!r}: {e}. Choose another arch or tag, or "
                             "pass a local weights file (pretrained=PATH).") from e
        raise DownloadError(_hub_message(arch, e, why)) from e
    except Exception as e:  # huggingface_hub / requests / urllib raise many types; all mean "not downloaded"
        raise DownloadError(_hub_message(arch, e, why)) from e
    cfg = model.pretrained_cfg
    return model.state_dict(), cfg.get("hf_hub_id") or cfg.get("url") or arch


def _hub_message(arch: str, e: Exception, unreachable_why: str | None) -> str:
    import huggingface_hub.constants as hub

    if unreachable_why is not None:
        what = (f"the timm / Hugging Face hub ({hub.ENDPOINT}) is not reachable ({unreachable_why}) and the Hugging "
                f"Face cache ({hub.HF_HUB_CACHE}) does not hold them. Are you offline?")
    else:
        first = plain_text(str(e)).splitlines()[0] if str(e) else ""
        what = f"the timm / Hugging Face hub ({type(e).__name__}: {first}). Are you offline?"
    return (f"could not download ImageNet weights for {arch} ({hub_id(arch)}) from {what} Instead pass a local "
            "weights file: pretrained=PATH (or --weights PATH), a .safetensors or .pth state dict of the same timm "
            "architecture (`tp3 pretrain --out body.safetensors` makes one offline, for --arch resnet10t); or train from a random init with "
            "pretrained=False.")


def check_weights(pretrained: WeightsArg, arch: str, n_in: int = 3) -> None:
    """Raise before any training if the weights cannot be used: a missing or unreadable file (a pickle that
    weights_only refuses, another architecture) is loaded into a fresh `arch` body; hub weights are fetched (or
    found in the Hugging Face cache) through timm, so the learners built afterwards read them from the cache."""
    path = weights_path(pretrained)
    if path is not None:
        load_body_weights(timm.create_model(arch, pretrained=False, num_classes=0, in_chans=n_in), path, n_in)
    elif pretrained is True:
        hub_state_dict(arch, n_in)


def normalization(pretrained: WeightsArg, arch: str, n_in: int = 3) -> dict[str, Any]:
    """The mean and std (per channel, on 0-1 pixels) that inputs get: the pretrained configuration's for hub
    weights (averaged over channels when `n_in` differs), ImageNet's otherwise; and where they came from."""
    cfg = hub_cfg(arch) if pretrained is True else {}
    if cfg.get("mean") and cfg.get("std"):
        mean, std, origin = list(cfg["mean"]), list(cfg["std"]), f"timm pretrained config of {hub_id(arch)}"
    else:
        mean, std, origin = list(IMAGENET_MEAN), list(IMAGENET_STD), "ImageNet statistics (fastai imagenet_stats)"
    if len(mean) != n_in:
        mean, std = [sum(mean) / len(mean)] * n_in, [sum(std) / len(std)] * n_in
    return dict(mean=mean, std=std, source=origin)


def check_normalization(dls: Any, pretrained: WeightsArg, arch: str, n_in: int = 3) -> None:
    """Raise when hub weights meet DataLoaders whose fastai Normalize uses other statistics than the weights'
    pretrained configuration (DataLoaders without one, e.g. the label-efficiency tensors normalised beforehand, pass)."""
    if pretrained is not True:
        return
    from fastai.data.transforms import Normalize

    want = normalization(True, arch, n_in)
    for tfm in getattr(getattr(getattr(dls, "train", None), "after_batch", None), "fs", []):
        if isinstance(tfm, Normalize):
            mean, std = tfm.mean.flatten().tolist(), tfm.std.flatten().tolist()
            if len(mean) != len(want["mean"]) or not (
                    torch.allclose(torch.tensor(mean), torch.tensor(want["mean"]), atol=1e-4)
                    and torch.allclose(torch.tensor(std), torch.tensor(want["std"]), atol=1e-4)):
                raise ValueError(
                    f"these DataLoaders normalise with mean {_fmt(mean)} and std {_fmt(std)}, but {hub_id(arch)} "
                    f"was pretrained on inputs normalised with mean {_fmt(want['mean'])} and std {_fmt(want['std'])} "
                    f"({want['source']}): build them with stats=(mean, std) from weights.normalization(True, "
                    f"{arch!r}{'' if n_in == 3 else f', n_in={n_in}'}), e.g. "
                    f"{'folder_dls' if n_in == 3 else 'mnist_dls'}(..., stats=...)")


def _fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def short_weights(weights: str) -> str:
    """Where weights came from (describe_weights' words) short enough for a figure title: a file by its name and
    digest, not its whole path ('file: /long/path/body.safetensors (sha256 ab12...)' -> 'file body.safetensors
    (sha256 ab12...)')."""
    if not weights.startswith("file: "):
        return weights
    path, _, digest = weights[len("file: "):].partition(" (sha256 ")
    return f"file {Path(path).name}" + (f" (sha256 {digest}" if digest else "")


def describe_weights(pretrained: WeightsArg, arch: str = "") -> tuple[str, dict | None]:
    """Where weights come from, as written into summaries, and the JSON sidecar of a weights file."""
    path = weights_path(pretrained)
    if path is not None:
        return f"file: {path.resolve()} (sha256 {file_sha256(path)[:16]})", read_sidecar(path)
    return (f"timm hub: {hub_id(arch)}" if pretrained else RANDOM_INIT), None
