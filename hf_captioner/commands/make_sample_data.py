"""Write the sample data set to a folder: images/ + dataset_sample.json (Karpathy layout, with shape boxes)."""

import logging

from hf_captioner.cli import CommandParser


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--out", default="data/sample", help="folder to write")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs=3,
        default=[2000, 200, 200],
        metavar=("TRAIN", "VAL", "TEST"),
        help="pictures of the train, validation and test splits",
    )
    parser.add_argument("--seed", type=int, default=0, help="the seed the pictures are drawn from")
    parser.add_argument("--image_size", type=int, default=64, help="side of the pictures in pixels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from hf_captioner.data import write_sample_dataset  # torch: only once there is work

    path = write_sample_dataset(args.out, *args.sizes, seed=args.seed, image_size=args.image_size)
    logging.info("Wrote %s", path)


if __name__ == "__main__":
    main()
