"""Self-critical sequence training (Rennie et al., CVPR 2017): fine-tune a cross-entropy model on CIDEr-D itself.

Cross-entropy only ever feeds the model reference words; at test time it continues its own words, and it is scored
by CIDEr, not by likelihood. Here the model samples K captions per image, each sample is rewarded with its CIDEr-D
against the image's references, and its log-likelihood is pushed up or down by how much it beat the mean reward of
the image's other K - 1 samples (the baseline of Luo, arXiv:2003.09971: no extra greedy decode per step).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .metrics.tokenizer import ptb_tokenize

NGRAM_ORDER = 4
SIGMA = 6.0
# samples come from the model's own distribution: REINFORCE weighs them by its log-probabilities, so the saved
# generation config's filters (top-k, repeat bans, penalties) must not reshape it
PURE_SAMPLING = dict(top_k=0, top_p=1.0, temperature=1.0, no_repeat_ngram_size=0, repetition_penalty=1.0)


def _ngram_counts(words: list[str]) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, NGRAM_ORDER + 1) for i in range(len(words) - n + 1))


class CiderDReward:
    """CIDEr-D of one caption against one image's references, with the idf of a fixed reference corpus.

    The COCO evaluation code takes document frequencies from the references of the captions it scores; a reward
    must not change with the batch, so they come from every reference set given here (the train split) once.
    Otherwise the formula is the COCO code's: n-grams 1..4, tf-idf vectors, clipped cosine per order, a Gaussian
    length penalty (sigma 6) on the bigram counts, averaged over orders and references, times 10.
    """

    def __init__(self, references: Sequence[Sequence[str]], cached_images: int = 16384):
        self.reference_captions = references
        self.document_frequency: Counter = Counter()
        for captions in references:  # an image counts once per n-gram
            self.document_frequency.update(set().union(*(_ngram_counts(ptb_tokenize(c)) for c in captions)))
        self.log_corpus_size = math.log(len(references))
        # an image's reference vectors are made when a batch first needs them and the last `cached_images` kept (the
        # sizes are in docs/performance.md): held for a whole split they would grow with it
        self._reference_vectors = functools.lru_cache(maxsize=cached_images)(self._image_vectors)

    def _image_vectors(self, image: int) -> list[tuple[list[dict], list[float], int]]:
        return [self._vector(_ngram_counts(ptb_tokenize(caption))) for caption in self.reference_captions[image]]

    def _vector(self, counts: Counter) -> tuple[list[dict], list[float], int]:
        """tf-idf weights per n-gram order, their norms, and the bigram count (the COCO code's caption length)."""
        weights: list[dict] = [{} for _ in range(NGRAM_ORDER)]
        for gram, frequency in counts.items():
            idf = self.log_corpus_size - math.log(max(1.0, self.document_frequency.get(gram, 0.0)))
            weights[len(gram) - 1][gram] = frequency * idf
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
        return weights, norms, sum(f for gram, f in counts.items() if len(gram) == 2)

    def __call__(self, caption: str, image: int) -> float:
        """The CIDEr-D (x10 scale, as reported) of `caption` for reference set number `image`."""
        weights, norms, length = self._vector(_ngram_counts(ptb_tokenize(caption)))
        total = 0.0
        references = self._reference_vectors(image)
        for ref_weights, ref_norms, ref_length in references:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * SIGMA**2))
            for order in range(NGRAM_ORDER):
                ref = ref_weights[order]
                overlap = sum(min(w, ref.get(g, 0.0)) * ref.get(g, 0.0) for g, w in weights[order].items())
                if norms[order] and ref_norms[order]:
                    overlap /= norms[order] * ref_norms[order]
                total += overlap * penalty
        return 10.0 * total / (NGRAM_ORDER * len(references))


class SelfCriticalObjective:
    """The loss of one batch of images (`rows` into the reward's reference sets, plus `pixel_values`,
    `encoder_outputs` or `frozen_features`): -sum_k (r_k - mean of the other samples' r) * log p(sample_k), averaged
    over samples.

    Dropout stays off (eval mode) for both the sampling and the gradient pass, so that the log-likelihoods are those
    of the distribution that drew the samples. (Dropout on in both passes, each with its own masks, was worse on
    Flickr8k: greedy dev CIDEr-D 43.3 vs 47.0 after one epoch from the same model.)
    """

    def __init__(self, processor, references: Sequence[Sequence[str]], num_samples: int = 5, max_new_tokens: int = 30):
        if num_samples < 2:
            raise ValueError(f"self-critical training needs at least 2 samples per image, got {num_samples}")
        self.processor = processor
        self.reward = CiderDReward(references)
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens

    def __call__(self, model, batch: dict, unwrapped=None) -> tuple[torch.Tensor, dict]:
        """(loss, logs); `model` may be wrapped (DDP) for the gradient pass, `unwrapped` is the same model bare."""
        unwrapped = unwrapped or model
        model.eval()
        regions = batch.get("encoder_outputs")
        if regions is None:  # from the images, or from the cached output of a fine-tuned encoder's frozen bottom
            images = dict(pixel_values=batch.get("pixel_values"), frozen_features=batch.get("frozen_features"))
            regions = unwrapped.encoder(**images).last_hidden_state  # (B, k, C)
        with torch.no_grad():
            samples = unwrapped.generate(
                encoder_outputs=regions.detach(),
                do_sample=True,
                num_beams=1,
                num_return_sequences=self.num_samples,
                **PURE_SAMPLING,
                max_new_tokens=self.max_new_tokens,
            )
        captions = self.processor.batch_decode(samples)
        images = batch["rows"].repeat_interleave(self.num_samples).tolist()
        rewards = torch.tensor([self.reward(c, i) for c, i in zip(captions, images, strict=True)])
        rewards = rewards.view(-1, self.num_samples)  # (B, K)
        baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (self.num_samples - 1)
        advantage = (rewards - baseline).flatten().to(regions.device)  # (B * K,)

        labels = self.sample_labels(samples, unwrapped.config.eos_token_id)  # (B * K, T)
        # the expected context (hard attention's too): the policy whose captions were sampled and are rewarded
        outputs = model(
            encoder_outputs=regions.repeat_interleave(self.num_samples, dim=0),
            labels=labels,
            use_cache=False,
            sample_regions=False,
        )
        target = labels.clamp(min=0).unsqueeze(-1)
        log_probs = F.log_softmax(outputs.logits.float(), dim=-1).gather(-1, target).squeeze(-1)  # (B * K, T)
        sequence_log_probs = (log_probs * (labels != -100)).sum(dim=1)
        loss = -(advantage * sequence_log_probs).mean()
        logs = {
            "train/reward": rewards.mean().item(),
            "train/sample_tokens": (labels != -100).sum(1).float().mean().item(),
        }
        return loss, logs

    @staticmethod
    def sample_labels(samples: torch.Tensor, eos_token_id: int) -> torch.Tensor:
        """Sampled ids (start token first) -> targets: each word up to and including the first </s>, -100 after."""
        tokens = samples[:, 1:]
        ended_before = (tokens == eos_token_id).long().cumsum(dim=1) - (tokens == eos_token_id).long()
        return tokens.masked_fill(ended_before > 0, -100)
