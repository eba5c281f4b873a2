"""Build a checked, self-contained TorchServe archive (.mar) around camserve/serving/handler.py.

    make archive                                                  # the default shapes model -> model_store/shapes.mar
    make archive MODEL=resnet18 WEIGHTS=resnet18.pth              # a torchvision builder + state dict (or weights name)
    make archive MODEL=timm:resnet50 WEIGHTS=resnet50.pth         # a timm model + state dict
    make archive MODEL_FILE=model.py [CLASS=Net] WEIGHTS=net.pth [EXTRA_FILES=a.py,b.py]   # TorchServe's convention
    make archive EXPORTED=model.pt2                               # a torch.export.save file, no Python source needed
    common: LABELS=labels.json NAME=... INPUT_SIZE=224|H,W MEAN=r,g,b STD=r,g,b METHOD=gradcam LAYER=name[,name]

    python scripts/build_archive.py --name shapes --model-dir models/shapes
    python scripts/build_archive.py --model timm:test_efficientnet --weights w.pth --labels labels.json

The model is built and run (dummy forwards, one map) from the unpacked archive before the archive is kept; a
request that cannot serve ends here with a one-line error and exit status 1 (camserve_tools/archive.py).
"""

from camserve_tools.commands.archive import build_main

if __name__ == "__main__":
    build_main()
