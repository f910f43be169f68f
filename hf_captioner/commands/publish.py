"""Publish a saved captioner to the Hub: `hf-captioner publish --model runs/flickr8k/final --repo_id me/sat-flickr8k`.

Stages the upload (weights, processor, code, records, model card), checks in a separate Python that it loads through
`trust_remote_code` (AutoModel, AutoModelForImageTextToText, the image-text-to-text pipeline) and captions like the
original, then pushes it. `--dry_run OUT` writes the staged folder to OUT
and uploads nothing. The token comes from HF_TOKEN or `hf auth login` and is never printed.
"""

import logging
import sys
import tempfile
from pathlib import Path

from PIL import Image

from hf_captioner.cli import CommandParser

logger = logging.getLogger("publish")


def original_captions(model_dir: str, images: list[Path]) -> list[list[int]]:
    import torch

    from hf_captioner import CaptionerForConditionalGeneration, CaptionerProcessor

    model = CaptionerForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = CaptionerProcessor.from_pretrained(model_dir)
    inputs = processor(images=[Image.open(p) for p in images], return_tensors="pt")
    with torch.no_grad():
        return model.generate(pixel_values=inputs["pixel_values"]).tolist()


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--model", help="saved model folder (with its processor); not needed with --space")
    parser.add_argument("--repo_id", required=True, help="Hub repository, e.g. me/sat-flickr8k")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--dry_run", metavar="OUT", help="write the staged folder here and upload nothing")
    parser.add_argument("--commit_message", default="Upload hf-captioner model", help="the Hub commit's message")
    parser.add_argument(
        "--space",
        metavar="OWNER/NAME",
        help="instead, stage (and push) a Gradio Space that serves the attention explorer for the Hub model --repo_id",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.space:
        return publish_space(args, parser)
    if not args.model or not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: not a saved model folder (no config.json)")
    from hf_captioner.hub import load_without_package, probe_images, stage_for_hub  # torch: only once there is work

    with tempfile.TemporaryDirectory() as scratch:
        stage = Path(args.dry_run) if args.dry_run else Path(scratch) / "stage"
        stage_for_hub(args.model, stage, args.repo_id)
        images = probe_images(Path(scratch))
        try:
            remote = load_without_package(stage, images)
        except RuntimeError as error:  # the staged copy failed where a Hub user would: not publishing, exit 1
            sys.exit(f"Not publishing: {error}")
        if remote["ids"] != original_captions(args.model, images):
            sys.exit(f"The staged folder captions differently from {args.model}: not publishing")
        if remote["image_text_ids"] != remote["ids"] or remote["pipeline"] != remote["captions"]:
            sys.exit(
                "The staged folder captions differently through AutoModelForImageTextToText or the "
                "image-text-to-text pipeline than through AutoModel: not publishing"
            )
        logger.info(
            "Staged folder loads through trust_remote_code and captions like the original: %s", remote["captions"]
        )
        if args.dry_run:
            logger.info(
                "Dry run: wrote %s (%s); nothing uploaded", stage, ", ".join(sorted(p.name for p in stage.iterdir()))
            )
            return
        from huggingface_hub import HfApi

        api = HfApi()
        repo = api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(stage), commit_message=args.commit_message)
        logger.info("Published %s", repo.repo_id)


def publish_space(args, parser) -> None:
    """Stage the Space for --repo_id (into --dry_run, or a temporary folder) and push it unless it is a dry run."""
    from hf_captioner.hub import stage_space

    with tempfile.TemporaryDirectory() as scratch:
        try:
            stage = stage_space(
                args.repo_id, args.space, Path(args.dry_run) if args.dry_run else Path(scratch) / "space"
            )
        except FileExistsError as error:
            parser.error(str(error))
        if args.dry_run:
            logger.info(
                "Dry run: wrote the Space %s to %s (%s); nothing uploaded",
                args.space,
                stage,
                ", ".join(sorted(p.name for p in stage.iterdir())),
            )
            return
        from huggingface_hub import HfApi

        api = HfApi()
        repo = api.create_repo(args.space, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
        api.upload_folder(
            repo_id=repo.repo_id, repo_type="space", folder_path=str(stage), commit_message=args.commit_message
        )
        logger.info("Published the Space %s", repo.repo_id)


if __name__ == "__main__":
    main()
