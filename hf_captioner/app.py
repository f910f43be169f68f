"""The attention explorer: a Gradio page where a person captions a picture and sees, word by word, where the model
looked. `hf-captioner app --model FOLDER` serves it for a saved model; `hf-captioner publish --space` stages it as a
Hugging Face Space, which loads the model by its Hub id through `trust_remote_code`.

A Space carries a copy of this file (as captioner_app.py) and of visualize.py beside its app.py and cannot import
hf_captioner, so this file imports nothing else of the package; what only the package knows (the reference boxes of
a data set's pictures, the model card's facts) comes in as arguments.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    from .visualize import overlay_image, plot_attention
except ImportError:  # in a Space: the copy beside this file
    from visualize import overlay_image, plot_attention

DECODINGS = ("beam search", "sampling")
QUEUE_SIZE = 64  # requests waiting beyond those being served: more are refused with a "queue full" message
CONCURRENCY = 2  # requests captioned at once (two cores; torch's threads are shared)
Box = tuple[float, float, float, float]


@dataclass
class Captioned:
    """One captioned picture: the caption, its words, each word's (S, S) attention and the named thing's boxes."""

    picture: Image.Image
    caption: str
    words: list[str]
    maps: list[np.ndarray]
    boxes: list[list[Box]] | None = None

    def choices(self) -> list[str]:
        """The word strip's labels: numbered, so a repeated word is still its own choice."""
        return [f"{i + 1}. {word}" for i, word in enumerate(self.words)]

    def index(self, choice: str | None) -> int:
        return int(choice.split(".", 1)[0]) - 1 if choice else 0

    def view(self, choice: str | None) -> Image.Image:
        """The chosen word's attention over the picture."""
        i = self.index(choice)
        return overlay_image(self.picture, self.maps[i], self.boxes[i] if self.boxes else None)


def open_picture(path: str | Path | None, name: str | None = None) -> Image.Image:
    """An uploaded picture in RGB, upright (EXIF), its first frame if animated; a ValueError saying what is wrong
    (`name`: the file's name as the person knows it)."""
    if not path:
        raise ValueError("No picture: upload one, paste one, or pick an example")
    path = Path(path)
    name = name or path.name
    if path.stat().st_size == 0:
        raise ValueError(f"{name} is an empty file (0 bytes), not a picture")
    try:
        with Image.open(path) as image:
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name} could not be read as a picture ({type(error).__name__}: {error})") from None


class PageFiles:
    """The pictures the page shows, written as files under one folder. Gradio copies a file it is given into its cache
    atomically (a temporary name, then a rename), but writes an image given in memory in place under its content's
    hash: two requests showing the same picture then rewrite a file while another response is still sending it, and
    that download arrives empty (seen with 20 concurrent requests for the same picture). Files older than `max_age_s`
    are removed as new ones are written: Gradio serves its own copies."""

    def __init__(self, max_age_s: float = 600.0):
        self.folder = Path(tempfile.mkdtemp(prefix="captioner-page-"))
        self.max_age_s = max_age_s

    def save(self, name: str, picture: Image.Image | None = None, draw: Callable[[Path], object] | None = None) -> str:
        """The path of a new PNG named `name`-something (the name a download gets): `picture` saved, or what
        `draw(path)` writes there."""
        cutoff = time.time() - self.max_age_s
        for old in self.folder.glob("*.png"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
        path = self.folder / f"{name}-{uuid.uuid4().hex[:12]}.png"
        if picture is not None:
            picture.save(path)
        else:
            draw(path)
        return str(path)


class Explorer:
    """Captions with per-word attention, for the page: one model and its processor; `boxes_for(name, words, size)`
    may give each word's reference boxes for a data-set picture (by file name), or None."""

    def __init__(self, model, processor, boxes_for: Callable | None = None, bf16: bool = False):
        """bf16: autocast the products to bfloat16 (where it pays: `hf-captioner app --precision auto` decides)."""
        self.model, self.processor, self.boxes_for, self.bf16 = model.eval(), processor, boxes_for, bf16
        self.lock = threading.Lock()  # one generate at a time: concurrent ones would share the same two cores

    @torch.no_grad()
    def caption(
        self,
        picture: Image.Image,
        num_beams: int = 3,
        decoding: str = DECODINGS[0],
        max_new_tokens: int = 30,
        prompt: str = "",
        name: str | None = None,
    ) -> Captioned:
        """Caption `picture` as `generate()` would with these settings (`prompt`: the caption's forced start), then
        feed the caption back for each word's attention (teacher forcing reproduces decoding exactly)."""
        processor, model = self.processor, self.model
        inputs = processor(images=[picture], text=prompt.strip(), return_tensors="pt").to(model.device)
        sampling = decoding == DECODINGS[1]
        options = {"do_sample": True, "num_beams": 1} if sampling else {"do_sample": False, "num_beams": num_beams}
        with self.lock, torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, **options)
            outputs = model(
                pixel_values=inputs["pixel_values"], decoder_input_ids=sequences[:, :-1], output_attentions=True
            )
        side = model.config.grid_size
        maps = outputs.cross_attentions[0].float().cpu().view(-1, side, side)
        words = processor.words_of(sequences[0, 1:].tolist())
        if not words:
            raise ValueError("The model wrote an empty caption for this picture")
        captioned = Captioned(
            picture=picture,
            caption=processor.batch_decode(sequences)[0],
            words=[word for word, _ in words],
            maps=[maps[steps].mean(0).numpy() for _, steps in words],
        )
        if self.boxes_for is not None and name:
            captioned.boxes = self.boxes_for(name, captioned.words, picture.size)
        return captioned


def build_app(
    explorer: Explorer,
    title: str = "Where the captioner looks",
    facts: str = "",
    examples: Sequence[str] = (),
    defaults: dict | None = None,
):
    """The Gradio Blocks page. `facts`: markdown about the model (data, scores, decoding defaults); `examples`:
    picture files offered in a row; `defaults`: the generation config's num_beams and max_new_tokens."""
    import gradio as gr

    defaults = {"num_beams": 3, "max_new_tokens": 30, **(defaults or {})}
    files = PageFiles()

    def checked_upload(component):
        """`component` (a gr.Image) with its preprocessing wrapped: an unreadable upload gets this app's message in
        the page instead of a processing error. Wrapped on the instance: Gradio writes a .pyi stub beside the source
        of every component subclass it sees, so there is none."""
        preprocess = component.preprocess

        def check(payload):
            if payload is not None and payload.path:
                try:
                    open_picture(payload.path, payload.orig_name)
                except ValueError as error:
                    raise gr.Error(str(error)) from None
            return preprocess(payload)

        component.preprocess = check
        return component

    def caption(path, num_beams, decoding, max_new_tokens, prompt, progress=gr.Progress()):  # noqa: B008 (Gradio asks so)
        progress(0.1, desc="Reading the picture")
        try:
            picture = open_picture(path)
            progress(0.3, desc="Captioning")
            captioned = explorer.caption(
                picture, int(num_beams), decoding, int(max_new_tokens), prompt or "", name=Path(path).stem
            )
        except ValueError as error:  # a bad upload or prompt: a message in the page, the app goes on
            raise gr.Error(str(error)) from None
        choices = captioned.choices()
        view = files.save("view", captioned.view(choices[0]))
        return captioned.caption, gr.update(choices=choices, value=choices[0]), view, captioned

    def show_word(choice, captioned):
        return None if captioned is None or not choice else files.save("view", captioned.view(choice))

    def all_words(captioned):
        if captioned is None:
            raise gr.Error("Caption a picture first")
        path = files.save(
            "attention",
            draw=lambda path: plot_attention(
                captioned.picture, captioned.words, captioned.maps, path, boxes=captioned.boxes
            ),
        )
        return path, path

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {title}\nUpload a picture, caption it, then choose a word to see where the model looked.")
        state = gr.State()
        with gr.Row():
            with gr.Column():
                picture = checked_upload(
                    gr.Image(
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard", "webcam"],
                        label="Picture",
                        elem_id="picture",
                    )
                )
                num_beams = gr.Slider(1, 8, value=defaults["num_beams"], step=1, label="Beams")
                decoding = gr.Radio(list(DECODINGS), value=DECODINGS[0], label="Decoding")
                max_new_tokens = gr.Slider(4, 60, value=defaults["max_new_tokens"], step=1, label="Max length")
                prompt = gr.Textbox(label="Prompt: the caption starts with it (optional)", elem_id="prompt")
                run = gr.Button("Caption", variant="primary", elem_id="run")
                if examples:
                    gr.Examples([[str(e)] for e in examples], inputs=[picture], label="Examples")
            with gr.Column():
                caption_box = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
                words = gr.Radio([], label="Words", elem_id="words")
                view = gr.Image(label="Where the model looks", type="filepath", interactive=False, elem_id="view")
                grid_button = gr.Button("All words", elem_id="all-words")
                grid = gr.Image(label="All words", type="filepath", interactive=False, elem_id="grid")
                download = gr.File(label="All words (PNG)", elem_id="download")
                if facts:
                    gr.Markdown(facts, elem_id="facts")
        run.click(
            caption,
            [picture, num_beams, decoding, max_new_tokens, prompt],
            [caption_box, words, view, state],
            api_name="caption",
            concurrency_limit=CONCURRENCY,
        )
        words.change(show_word, [words, state], [view], api_name="word")
        grid_button.click(all_words, [state], [grid, download], api_name="all_words")
    page.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY)
    return page


def launch(model_id: str, host: str = "0.0.0.0", port: int | None = None, **app_kwargs):
    """Serve the page for `model_id` (a Hub id or a folder), loaded through `trust_remote_code`: a Space's app.py
    calls this with the model's Hub id."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_id, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
    defaults = {k: getattr(model.generation_config, k) for k in ("num_beams", "max_new_tokens")}
    page = build_app(Explorer(model, processor), defaults=defaults, **app_kwargs)
    page.launch(server_name=host, server_port=port, show_error=True)


def screenshot_page(
    url: str, picture: str | Path, path: str | Path, executable_path: str | None = None, timeout_ms: int = 120_000
) -> dict:
    """Use the page as a person does, in headless Chromium (Playwright): upload `picture`, caption it, choose the
    second word, and save a screenshot to `path`. Returns the caption read from the page, whether the attention
    view changed with the word, and the screenshot's path. The browser test and the README's screenshot run this."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable_path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            page.locator("#picture input[type=file]").set_input_files(str(picture))
            page.locator("#picture img").first.wait_for()  # the upload is shown
            page.locator("#run").click()
            page.wait_for_function("() => document.querySelector('#caption textarea').value.length > 0")
            caption = page.locator("#caption textarea").input_value()
            page.locator("#view img").first.wait_for()
            current = "() => document.querySelector('#view img').src"
            first = page.evaluate(current)  # read before the click: the new image may arrive at once
            page.locator("#words label").nth(1).click()
            page.wait_for_function(
                "(first) => { const img = document.querySelector('#view img'); return img && img.src !== first; }",
                arg=first,
            )
            changed = page.evaluate(current) != first
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()
    return {"caption": caption, "view_changed": changed, "screenshot": str(path)}
