"""Part III: the receptive field (R, J, start) of every node of a model, optionally measured, mapped and drawn."""
from fastcore.script import call_parse

from tp3_fastai.cli import run_guarded
from tp3_fastai.receptive_field import receptive_field_run


@call_parse
def main(
    arch: str = "cnn",  # package (mlp, mlp-big, cnn), torchvision or timm name; 'timm:resnet50' picks a registry
    input_shape: str = "",  # batch,channels,*spatial, e.g. 1,3,224,224 (default: 1,1,28,28 or the model's default)
    layers: str = "",  # node or module names / glob patterns to show, e.g. 'maxpool,layer1.0,layer?' (default: all)
    verify: bool = False,  # also measure each shown node's field from the input gradient (slow for deep nodes)
    erf: bool = False,  # effective receptive field heat map of --node's centre unit (erf.png)
    image: str = "",  # draw the field of --node's centre unit on this image (rf_box.png)
    node: str = "",  # node for --erf and --image (default: the last shown node that still has positions)
    weights: str = "",  # state dict (.pt, .pth, .safetensors) to load first, e.g. to map a trained model's field
    out: str = "",  # run folder (default: runs/receptive_field-<arch>; a new -2, -3, ... if it exists)
    overwrite: bool = False,  # replace an existing run folder instead
    seed: int = 42,  # seed of the random initialisation (the effective field depends on it)
):
    "Print and save (CSV, Markdown, config.json, summary.json) the receptive field of every node of a model."
    summary = run_guarded(receptive_field_run, arch=arch, input_shape=input_shape or None, layers=layers or None,
                          verify=verify, erf=erf, image=image or None, node=node or None, weights=weights or None,
                          out=out or None, overwrite=overwrite, seed=seed)
    if summary.get("all_agree") is False:
        raise SystemExit(1)
