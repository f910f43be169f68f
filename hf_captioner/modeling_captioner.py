"""Show, Attend and Tell style captioner with decoder self-attention, as a transformers `PreTrainedModel`.

image -> backbone -> S x S grid of k region vectors (computed once per image)
y_{t-1}, h_{t-1} -> [Bahdanau attention over regions (gated), self-attention over h_0..h_{t-1}] -> LSTM/GRU -> h_t
h_t, context, embedding -> deep output -> p(y_t)

This file is copied next to the weights by `save_pretrained` (for `trust_remote_code` loading), so it imports
nothing from `hf_captioner` except, relatively, its sibling files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING
from transformers.utils import logging

from .backbones import (
    backbone_stages,
    build_backbone,
    check_output_stride,
    is_backbone_name,
    last_feature_map,
    layer_sequence,
    modules_after,
    parse_backbone,
    pretrained_source,
    run_layers,
    top_layers_start,
)
from .configuration_captioner import CaptionerConfig
from .packed_decoding import PackedProducts, packed_decoding
from .pipeline_captioner import CUSTOM_PIPELINES

logger = logging.get_logger(__name__)


# transformers 5.24 renamed the decoding cache from `past_key_values` to `cache`: `generate()` passes it to `forward`
# and reads it back from the outputs under the new name. Saved model folders run this file under the user's
# transformers, so the model follows whichever name the installed version gives its own output classes.
CACHE_NAME = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"


@dataclass
class CaptionerOutput(Seq2SeqLMOutput):
    """Outputs of [`CaptionerForConditionalGeneration`]: transformers' sequence-to-sequence outputs (whose cache field
    is `cache` from transformers 5.24 on, `past_key_values` before) plus the two parts of the loss.

    loss: token_loss + attention_loss (when labels are given).
    logits: (B, T, V) next-token scores.
    cache / past_key_values: the [`CaptionerCache`] to continue decoding from (when `use_cache`).
    decoder_attentions: (B, heads, T, P + T) self-attention over the P + T earlier decoder states h_0.. (when
        `output_attentions` and self-attention is on); entries a step cannot see are 0. Also `self_attentions`.
    cross_attentions: (B, T, k) attention over the k regions at each step (when `output_attentions`).
    encoder_last_hidden_state: (B, k, C) the region features.
    sentinel_attentions: (B, T) the share of each step's attention given to the visual sentinel instead of the image
        (when `output_attentions` and `config.visual_sentinel`); `cross_attentions` are then the image's share
        renormalised: where the model looks when it looks.
    token_loss: the (label-smoothed) token cross-entropy, padding ignored.
    attention_loss: lambda times the attention penalty (`attention_penalty_form`), batch mean; when a training batch
        samples its regions (hard attention), plus the REINFORCE surrogate of the sampled regions and the entropy bonus
        (`CaptionerForConditionalGeneration.hard_attention_loss`): its gradient is the estimator, its value no likelihood.
    supervision_loss: lambda times the attention supervision loss (`attention_supervision`), when the batch has
        `attention_targets` and `config.attention_supervision_weight` > 0; 0 otherwise.
    """

    sentinel_attentions: torch.FloatTensor | None = None
    token_loss: torch.FloatTensor | None = None
    attention_loss: torch.FloatTensor | None = None
    supervision_loss: torch.FloatTensor | None = None

    @property
    def self_attentions(self) -> torch.FloatTensor | None:
        """The decoder's self-attention weights, under the name the model's description uses."""
        return self.decoder_attentions


class CaptionerCache:
    """Decoding state carried between `generate` steps: everything beam search must reorder.

    hidden/cell: (R, H) recurrent state of R rows (cell is None for a GRU); keys/values: (R, heads, P+1, d)
    self-attention memory over h_0..h_P (None without self-attention); projected_regions: (B, k, A) W_f f, once per
    image; regions: (B, k, C) the regions the decoder reads (after the region encoder: computed once per image, not
    once per step); attention_hidden/attention_cell: (R, H) the top-down decoder's attention LSTM (None otherwise);
    mean_region_gates: (R, G·H) that LSTM's input product of the mean region, made once by the packed step.
    Generation runs `rows_per_image` consecutive rows per image (beams, returned sequences): they share one copy of
    the regions and their projection, which beam search never needs to move.
    """

    STATES = ("hidden", "cell", "keys", "values", "attention_hidden", "attention_cell", "mean_region_gates")  # per row

    is_compileable = False  # the recurrence is stateful and grows no fixed-size buffers
    is_croppable = False  # an LSTM state cannot be rolled back to an earlier step

    def __init__(
        self,
        hidden: torch.Tensor,
        cell: torch.Tensor | None,
        keys: torch.Tensor | None,
        values: torch.Tensor | None,
        projected_regions: torch.Tensor,
        rows_per_image: int = 1,
        seen_tokens: int = 0,
        regions: torch.Tensor | None = None,
        attention_hidden: torch.Tensor | None = None,
        attention_cell: torch.Tensor | None = None,
        mean_region_gates: torch.Tensor | None = None,
    ):
        self.hidden = hidden
        self.cell = cell
        self.keys = keys
        self.values = values
        self.projected_regions = projected_regions
        self.regions = regions
        self.attention_hidden = attention_hidden
        self.attention_cell = attention_cell
        self.mean_region_gates = mean_region_gates
        self.rows_per_image = rows_per_image
        self.seen_tokens = seen_tokens
        self._scratch: torch.Tensor | None = None
        self.products: PackedProducts | None = None  # the packed path's stacked weights, made once per generate()

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer reused from step to step for the attention's largest temporary (B, n, k, A) when no gradient is
        kept: a fresh one of that size (tens of MB in batched beam search) costs page faults at every step."""
        if self._scratch is None or self._scratch.shape != shape or self._scratch.dtype != dtype:
            self._scratch = self.hidden.new_empty(shape, dtype=dtype)
        return self._scratch

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep, for every row, the state of the beam it continues (beam search calls this after each step)."""
        beam_idx = beam_idx.to(self.hidden.device)
        if self.rows_per_image == 1:
            self.projected_regions = self.projected_regions.index_select(0, beam_idx)
            if self.regions is not None:
                self.regions = self.regions.index_select(0, beam_idx)
        else:
            rows = torch.arange(beam_idx.shape[0], device=beam_idx.device)
            if not torch.equal(beam_idx // self.rows_per_image, rows // self.rows_per_image):
                raise ValueError("reorder_cache: a row may only continue a beam of its own image")
        for name in self.STATES:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, beam_idx))

    def __len__(self) -> int:
        return self.seen_tokens


class CaptionerGridEncoder(nn.Module):
    """Backbone -> last feature map -> average pool to S x S -> k = S*S region vectors (B, k, C).

    The backbone is a transformers `AutoBackbone` built from `config.vision_config`, or a timm / torchvision
    network named by `config.vision_backbone`. When only its last stages fine-tune, a timm / torchvision backbone
    splits into a frozen bottom and a trainable top: `frozen_features` gives the bottom's output (what a feature store
    caches then) and `forward(frozen_features=...)` runs the top alone from it.
    """

    main_input_name = "pixel_values"

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.library = parse_backbone(config.vision_backbone)[0] if config.vision_backbone else "transformers"
        if self.library == "transformers":
            self.backbone = AutoBackbone.from_config(config.vision_config)
            self.num_channels = self.backbone.channels[-1]
        else:
            self.backbone, self.num_channels = build_backbone(
                config.vision_backbone, output_stride=config.vision_output_stride
            )
        self.pool = nn.AdaptiveAvgPool2d(config.grid_size)
        self.norm_statistics = config.encoder_norm_statistics
        self.set_trainable_stages(config.encoder_trainable_stages)

    def set_trainable_stages(self, num_stages: int) -> None:
        """Fine-tune the last `num_stages` stages (0: frozen, -1: everything); the rest gets no gradient."""
        self.backbone.requires_grad_(num_stages == -1)
        self.trainable_stages = num_stages
        self.split = None  # (frozen bottom, trainable top) layers, where the backbone is a layer sequence
        if num_stages > 0:
            stages = backbone_stages(self.library, self.backbone)
            if stages is None:
                raise ValueError(
                    f"Cannot find the stages of the {type(self.backbone).__name__} backbone to fine-tune "
                    f"{num_stages} of them; use encoder_trainable_stages=0 (frozen) or -1 (all)"
                )
            layers = layer_sequence(self.library, self.backbone)
            if layers is None:  # transformers: the stages, and what follows the last one (a final norm)
                trainable = stages[len(stages) - num_stages :] + modules_after(self.backbone, stages[-1])
            else:
                start = top_layers_start(layers, stages, num_stages)
                self.split = layers[:start], layers[start:]
                trainable = self.split[1]
            for module in trainable:
                module.requires_grad_(True)
        self.train(self.training)

    @property
    def is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> CaptionerGridEncoder:
        """Frozen normalisation layers keep their ImageNet statistics: they stay in eval mode while training, and so
        do the fine-tuning ones under `encoder_norm_statistics="frozen"`."""
        super().train(mode)
        keep_all = self.norm_statistics == "frozen"
        for module in self.backbone.modules():
            params = list(module.parameters(recurse=False))
            frozen = not any(p.requires_grad for p in params)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (frozen or keep_all):
                module.eval()
        return self

    def split_layers(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """(frozen bottom, trainable top) of the backbone's layer sequence."""
        if self.split is None:
            raise ValueError(
                "Cached features of an encoder that fine-tunes are the input of its trainable stages, which needs "
                "encoder_trainable_stages > 0 and a timm or torchvision backbone whose layers run one after another; "
                f"this encoder has encoder_trainable_stages={self.trainable_stages} and a {self.library} backbone "
                "(set cache_features false to train from the images)"
            )
        return self.split

    @torch.no_grad()
    def frozen_features(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """The frozen bottom's output (B, C', H', W'): the input of the stages that fine-tune."""
        return run_layers(self.split_layers()[0], pixel_values)

    def forward(
        self, pixel_values: torch.FloatTensor | None = None, frozen_features: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutput:
        if frozen_features is not None:  # only the trainable top runs, from the frozen bottom's (cached) output
            feature_map = run_layers(self.split_layers()[1], frozen_features)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.is_frozen):
                feature_map = last_feature_map(self.library, self.backbone, pixel_values)  # (B, C, H, W)
        regions = self.pool(feature_map).flatten(2).transpose(1, 2)  # (B, k, C)
        return BaseModelOutput(last_hidden_state=regions)


class AdditiveScores(torch.autograd.Function):
    """The additive scores v^T tanh(p_i + q) (B, n, k) of queries q (B, n, A) over projected regions p (B, k, A).

    The same values and gradients as autograd through `tanh` and a linear layer (tests/test_modeling.py checks it), in
    fewer passes over the (B, n, k, A) sum, the step's largest tensor: tanh(x) = 2 sigmoid(2x) - 1, so the forward is
    one sum, one in-place sigmoid and one product, and the backward uses tanh'(x) = 4 s (1 - s) with s = sigmoid(2x),
    the only tensor kept. (torch's tanh also runs slower than its sigmoid on the CPUs measured: docs/performance.md.)
    """

    @staticmethod
    def forward(ctx, projected_regions, query, v, scratch=None):
        shape = (query.shape[0], query.shape[1], *projected_regions.shape[1:])  # (B, n, k, A)
        dtype = torch.promote_types(query.dtype, projected_regions.dtype)
        out = scratch(shape, dtype) if scratch is not None else None
        # s = sigmoid(2 (q + p)): 2q + 2p in one pass, then in place
        s = torch.add(2 * query.unsqueeze(2), projected_regions.unsqueeze(1), alpha=2, out=out).sigmoid_()
        v = v.to(dtype)
        ctx.save_for_backward(s, v)
        return s @ (2 * v) - v.sum()  # v . (2s - 1)

    @staticmethod
    def backward(ctx, grad_scores):
        s, v = ctx.saved_tensors
        grad_scores = grad_scores.to(s.dtype)
        grad_v = None
        if ctx.needs_input_grad[2]:  # sum over rows and regions of grad_e * (2s - 1)
            flat_s = s.flatten(0, 2)  # (B n k, A)
            grad_v = 2 * (grad_scores.reshape(1, -1) @ flat_s).view(-1) - grad_scores.sum()
        # d e / d x = 4 v s (1 - s) (s stays as it was: a graph kept with retain_graph may run backward again)
        grad_sum = torch.addcmul(s, s, s, value=-1).mul_(4 * v).mul_(grad_scores.unsqueeze(-1))  # (B, n, k, A)
        grad_query = grad_sum.sum(dim=2) if ctx.needs_input_grad[1] else None  # (B, n, A)
        grad_regions = None
        if ctx.needs_input_grad[0]:  # (B, k, A); one query per row (teacher forcing): a view, not a zeroed copy
            grad_regions = grad_sum.squeeze(1) if grad_sum.shape[1] == 1 else grad_sum.sum(dim=1)
        return grad_regions, grad_query, grad_v, None


def chosen_regions(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.LongTensor:
    """The region each row draws from its attention weights (..., k), given one uniform number (...) per row (inverse
    transform sampling). The draws are made from noise drawn beforehand, so that the reference and the packed decoder
    read the same regions and the loss can find, from the returned weights, which ones were read."""
    return (weights.cumsum(dim=-1) < uniforms.unsqueeze(-1)).sum(dim=-1).clamp(max=weights.shape[-1] - 1)


class VisualSentinel(nn.Module):
    """The adaptive sentinel of "Knowing When to Look" (Lu et al. 2017): s = g * tanh(m), g = sigmoid(W_x x + W_h h),
    from the decoder's memory m (the LSTM cell; a GRU's state) and the step's input, mapped into the regions' space so
    that the cross-attention can choose it as one more region: a word the decoder knows from its language model ("a",
    "of") need not look at the picture."""

    def __init__(self, config: CaptionerConfig, region_dim: int):
        super().__init__()
        self.gate = nn.Linear(config.embed_dim + config.hidden_size, config.hidden_size)  # W_x, W_h
        self.value = nn.Linear(config.hidden_size, region_dim, bias=False)  # into the regions' space

    def forward(self, embedded: torch.Tensor, state: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """embedded (R, E), state (R, H) the attention's query state, memory (R, H) -> the sentinel (R, C)."""
        gate = torch.sigmoid(self.gate(torch.cat([embedded, state], dim=-1)))  # (R, H)
        return self.value(gate * torch.tanh(memory))  # (R, C)


class CaptionerCrossAttention(nn.Module):
    """Attention of the previous hidden state over the k regions, and the gated context (SAT eq. 4-6, beta gate).

    additive: e_i = v^T tanh(W_f f_i + W_h h); dot: e_i = (W_f f_i)^T (W_h h); scaled_dot: the same / sqrt(A).
    Soft attention reads the expectation sum_i alpha_i f_i; hard attention (SAT section 4.1) one region drawn from alpha.
    With a visual sentinel (config.visual_sentinel), the sentinel s is scored as a (k+1)-th region, W_f s its key.
    """

    def __init__(self, config: CaptionerConfig, region_dim: int):
        super().__init__()
        self.kind = config.cross_attention
        self.region_proj = nn.Linear(region_dim, config.attention_dim)  # W_f
        self.query_proj = nn.Linear(config.hidden_size, config.attention_dim)  # W_h
        self.score = nn.Linear(config.attention_dim, 1) if self.kind == "additive" else None  # v
        self.gate = nn.Linear(config.hidden_size, region_dim)  # W_beta
        self.scale = 1.0 / math.sqrt(config.attention_dim) if self.kind == "scaled_dot" else 1.0
        self.sentinel = VisualSentinel(config, region_dim) if config.visual_sentinel else None

    def project_regions(self, regions: torch.Tensor) -> torch.Tensor:
        return self.region_proj(regions)  # (B, k, C) -> (B, k, A)

    def scores(self, query: torch.Tensor, projected_regions: torch.Tensor, scratch=None) -> torch.Tensor:
        """e (B, n, k) for queries (B, n, A) of n rows per image over projected regions (B, k, A), or (R, A) / (R, 1, A)
        for one key per row (the sentinel's). `scratch(shape, dtype)` may lend a reusable buffer for the additive
        scores' (B, n, k, A) sum, the largest tensor of a step (inference)."""
        if self.score is None:
            return torch.bmm(query, projected_regions.transpose(1, 2)) * self.scale
        scores = AdditiveScores.apply(projected_regions, query, self.score.weight.view(-1), scratch)  # (B, n, k)
        return scores + self.score.bias

    def weights(
        self, query: torch.Tensor, projected_regions: torch.Tensor, scratch=None, sentinel_key: torch.Tensor = None
    ) -> torch.Tensor:
        """alpha = softmax_i(e_i) (B, n, k) for queries (B, n, A); with `sentinel_key` (R, A), (B, n, k + 1), the
        sentinel's weight last."""
        scores = self.scores(query, projected_regions, scratch)  # (B, n, k)
        if sentinel_key is not None:
            rows = query.flatten(0, 1).unsqueeze(1)  # (R, 1, A): each row scores its own sentinel
            sentinel = self.scores(rows, sentinel_key.unsqueeze(1)).view(*query.shape[:2], 1)  # (B, n, 1)
            scores = torch.cat([scores, sentinel], dim=-1)  # (B, n, k + 1)
        return scores.softmax(dim=-1)

    @staticmethod
    def read(
        weights: torch.Tensor, regions: torch.Tensor, noise: torch.Tensor | None = None, sentinel: torch.Tensor = None
    ) -> torch.Tensor:
        """The context before the gate (R, C) from weights (B, n, k) over regions (B, k, C): their expectation, or, given
        uniform `noise` (R,), the one region each row draws (no gradient reaches alpha through it: see the loss). With
        a `sentinel` (R, C), weights (B, n, k + 1) and the sentinel's share of it added."""
        if noise is not None:
            choices = chosen_regions(weights, noise.view(weights.shape[:2]))  # (B, n)
            weights = F.one_hot(choices, weights.shape[-1])
        if sentinel is None:
            return torch.bmm(weights.to(regions.dtype), regions).flatten(0, 1)
        on_regions = torch.bmm(weights[..., :-1].to(regions.dtype), regions).flatten(0, 1)  # (R, C)
        return on_regions + weights[..., -1].reshape(-1, 1) * sentinel

    def forward(
        self,
        hidden: torch.Tensor,
        regions: torch.Tensor,
        projected_regions: torch.Tensor,
        scratch=None,
        noise=None,
        sentinel: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (R, H) for R = B x n rows, n consecutive rows per image; regions (B, k, C), projected (B, k, A);
        noise (R,): draw the region each row reads (hard attention) instead of reading the expectation; sentinel (R, C):
        the visual sentinel, one more thing to attend to. Returns the gated context (R, C) and the weights (R, k) or,
        with a sentinel, (R, k + 1)."""
        query = self.query_proj(hidden).view(regions.shape[0], -1, self.query_proj.out_features)  # (B, n, A)
        sentinel_key = None if sentinel is None else self.region_proj(sentinel)  # (R, A)
        weights = self.weights(query, projected_regions, scratch, sentinel_key)  # (B, n, k [+ 1])
        context = self.read(weights, regions, noise, sentinel)  # (R, C)
        gate = torch.sigmoid(self.gate(hidden))  # (R, C)
        return gate * context, weights.flatten(0, 1)  # (R, C), (R, k [+ 1])


class CaptionerRegionEncoder(nn.Module):
    """Self-attention among the regions before decoding (the refiner of Attention on Attention, Huang et al. 2019; a
    Transformer captioner's encoder): the k region vectors, projected to the decoder's width and given 2-D position
    embeddings of their grid cells, through `config.region_encoder_layers` pre-norm Transformer encoder layers. It
    reads the encoder's output, so a feature store of the encoder stays valid."""

    def __init__(self, config: CaptionerConfig, region_dim: int):
        super().__init__()
        width = config.hidden_size
        self.grid_size = config.grid_size
        self.project = nn.Linear(region_dim, width)
        self.row_embed = nn.Embedding(config.grid_size, width)  # position of a cell: its row's + its column's
        self.column_embed = nn.Embedding(config.grid_size, width)
        layer = nn.TransformerEncoderLayer(
            width,
            config.self_attention_heads,
            dim_feedforward=4 * width,
            dropout=0.1,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, config.region_encoder_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out_dim = width

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """(B, k, C) -> (B, k, H)."""
        cells = torch.arange(self.grid_size, device=regions.device)
        positions = (self.row_embed(cells)[:, None] + self.column_embed(cells)[None, :]).flatten(0, 1)  # (k, H)
        hidden = self.project(regions) + positions  # (B, k, H)
        return self.norm(self.layers(hidden))  # (B, k, H)


class CaptionerSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention from the current step over the decoder's own states h_0..h_{t-1}.

    Causal by construction: the memory only ever holds states already computed.
    """

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.num_heads = config.self_attention_heads
        self.head_dim = config.hidden_size // config.self_attention_heads
        self.query = nn.Linear(config.embed_dim + config.hidden_size, config.hidden_size)
        self.key_value = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def split_memory(self, key_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected new state (B, 2H) as a key and a value of 2 x (B, heads, 1, d)."""
        shape = (key_value.shape[0], self.num_heads, 1, self.head_dim)
        key, value = key_value.chunk(2, dim=-1)  # 2 x (B, H)
        return key.view(shape), value.view(shape)

    def project_memory(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value of one new state: (B, H) -> 2 x (B, heads, 1, d)."""
        return self.split_memory(self.key_value(state))

    def attend(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, H) over keys/values (B, heads, M, d): the attended state (B, H) and the weights (B, heads, M)."""
        query = query.view(query.shape[0], self.num_heads, 1, self.head_dim)  # (B, heads, 1, d)
        weights = (query @ keys.transpose(-1, -2) / math.sqrt(self.head_dim)).softmax(dim=-1)  # (B, heads, 1, M)
        return (weights @ values).reshape(query.shape[0], -1), weights.squeeze(2)

    def forward(
        self, step_input: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.attend(self.query(step_input), keys, values)
        return self.out(attended), weights  # (B, H), (B, heads, M)


class LinearPiece(NamedTuple):
    """One linear map of a decoder step, or the columns of it that read one part of a concatenated input."""

    name: str  # what its output is called in the step
    weight: nn.Parameter  # (out, in) the whole map's weight
    columns: slice | torch.Tensor = slice(None)  # the columns of `weight` that read this part (a slice or indices)
    bias: torch.Tensor | None = None  # (out,) added once per map, with one of its parts


class CaptionerDecoder(nn.Module):
    """The recurrent decoder: one word per step, from the embedding, the region context and the self-attention.

    `step` is the math, once. The runner that `config.decoder_implementation` names (`DECODER_RUNNERS`) decides how
    the steps run; `linear_maps` tells a runner that stacks products (packed_decoding.py) what each step multiplies.
    """

    def __init__(self, config: CaptionerConfig, region_dim: int):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.pad_token_id)
        self.init_hidden = nn.Linear(region_dim, config.hidden_size)
        self.init_cell = nn.Linear(region_dim, config.hidden_size) if config.rnn_type == "lstm" else None
        self.cross_attention = CaptionerCrossAttention(config, region_dim)
        self.self_attention = CaptionerSelfAttention(config) if config.self_attention else None
        self.cell = self.cell_class(self.cell_input_size(config, region_dim), config.hidden_size)
        # deep output (SAT eq. 7): L_o(E y_{t-1} + L_h h_t + L_z z_t)
        self.out_hidden = nn.Linear(config.hidden_size, config.embed_dim)
        self.out_context = nn.Linear(region_dim, config.embed_dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size)
        self.compiled_steps: dict[Callable, Callable] | None = None  # `compile_steps()`: step -> its compiled form

    @property
    def cell_class(self) -> type[nn.Module]:
        return nn.LSTMCell if self.config.rnn_type == "lstm" else nn.GRUCell

    @staticmethod
    def cell_input_size(config: CaptionerConfig, region_dim: int) -> int:
        """The cell reads [embedding, context (, self-attended state)]."""
        return config.embed_dim + region_dim + (config.hidden_size if config.self_attention else 0)

    def start(self, regions: torch.Tensor, rows_per_image: int = 1) -> CaptionerCache:
        """The state before the first word: h_0 (and c_0) from the mean region, projections of the regions; each
        image's state is repeated for its `rows_per_image` rows (beams), its regions are not."""
        mean_region = regions.mean(dim=1)  # (B, C)
        hidden = torch.tanh(self.init_hidden(mean_region)).repeat_interleave(rows_per_image, dim=0)  # (R, H)
        cell = None
        if self.init_cell is not None:
            cell = torch.tanh(self.init_cell(mean_region)).repeat_interleave(rows_per_image, dim=0)  # (R, H)
        keys = values = None
        if self.self_attention is not None:
            keys, values = self.self_attention.project_memory(hidden)  # 2 x (R, heads, 1, d)
        projected = self.cross_attention.project_regions(regions)  # (B, k, A)
        return CaptionerCache(hidden, cell, keys, values, projected, rows_per_image, regions=regions)

    def step(
        self, embedded: torch.Tensor, regions: torch.Tensor, cache: CaptionerCache, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Consume one word embedding (B, E); update `cache` in place; return its context and attention weights.
        noise (B,): uniform numbers that draw the region each row reads (hard attention); None reads the expectation."""
        context, cross_weights = self.look(embedded, cache.hidden, regions, cache, noise)  # (B, C), (B, k [+ 1])
        self_weights = self.advance([embedded, context], embedded, cache.hidden, cache)
        return context, cross_weights, self_weights

    def look(
        self, embedded: torch.Tensor, state: torch.Tensor, regions: torch.Tensor, cache: CaptionerCache, noise=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention from `state` (B, H): the gated context (B, C) and the weights (B, k), or (B, k + 1) with
        the visual sentinel (made from the step's embedding, `state` and the cell's memory) last."""
        scratch = None if torch.is_grad_enabled() else cache.scratch  # autograd keeps each step's sum
        sentinel = None
        if self.cross_attention.sentinel is not None:
            memory = cache.cell if cache.cell is not None else cache.hidden  # (B, H)
            sentinel = self.cross_attention.sentinel(embedded, state, memory)  # (B, C)
        return self.cross_attention(state, regions, cache.projected_regions, scratch, noise, sentinel)

    def advance(
        self, inputs: list[torch.Tensor], embedded: torch.Tensor, state: torch.Tensor, cache: CaptionerCache
    ) -> torch.Tensor | None:
        """The cell's update from `inputs`, plus, with self-attention, what the query [embedding, `state`] reads from
        the memory of earlier states; then the memory of the new state. Returns the self-attention weights or None."""
        self_weights = None
        if self.self_attention is not None:
            step_query = torch.cat([embedded, state], dim=-1)  # (B, E + H)
            attended, self_weights = self.self_attention(step_query, cache.keys, cache.values)
            inputs = [*inputs, attended]  # (B, H); self_weights (B, heads, M)
        cache.hidden, cache.cell = run_cell(self.cell, torch.cat(inputs, dim=-1), cache.hidden, cache.cell)
        if self.self_attention is not None:
            key, value = self.self_attention.project_memory(cache.hidden)  # 2 x (B, heads, 1, d)
            cache.keys = torch.cat([cache.keys, key], dim=2)  # (B, heads, M + 1, d)
            cache.values = torch.cat([cache.values, value], dim=2)  # (B, heads, M + 1, d)
        cache.seen_tokens += 1
        return self_weights

    def output(
        self, embedded: torch.Tensor, hidden: torch.Tensor, context: torch.Tensor, real: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Deep output over all steps at once: (B, T, E), (B, T, H), (B, T, C) -> logits (B, T, V). With `real` (B, T),
        only those positions are projected onto the vocabulary (the others' logits are zeros): a third or more of a
        training batch is padding, and the vocabulary projection is its largest product. Dropout still draws its
        mask over every position, so the random numbers, and the real positions' logits, are the same either way."""
        deep = self.dropout(embedded + self.out_hidden(hidden) + self.out_context(context))  # (B, T, E)
        if real is None:
            return self.lm_head(deep)
        projected = self.lm_head(deep[real])  # (N, V)
        logits = projected.new_zeros(*real.shape, projected.shape[-1])
        logits[real] = projected
        return logits

    def linear_maps(self) -> dict[str, list[LinearPiece]]:
        """The step's linear maps grouped by the vector they read, for a runner that stacks each group into one
        product: "hidden" h_{t-1}, "embedding" E y_{t-1}, "reads" [context, attended] (the cell's input after the
        embedding), with self-attention "attended" (its output layer) and "new_state" h_t (its key and value), and
        the deep output's "deep_hidden" h_t, "deep_context" the context, "vocabulary" the deep output; with a visual
        sentinel, its gate reads [embedding, h_{t-1}], "sentinel_value" the gated memory, "sentinel_key" the
        sentinel (the regions' projection W_f, which also projects the sentinel). A map that
        reads a concatenation (the cell's input, the self-attention query) appears once per part, with the
        part's columns; its bias rides with one part. Keep it beside `step`: a new layer there is listed here."""
        e = self.embed_tokens.embedding_dim
        attention, memory, cell = self.cross_attention, self.self_attention, self.cell
        hidden = [
            LinearPiece("query", attention.query_proj.weight, bias=attention.query_proj.bias),
            LinearPiece("gate", attention.gate.weight, bias=attention.gate.bias),
        ]
        embedding, maps = [], {}
        if memory is not None:  # its query reads [embedding, h_{t-1}]
            hidden.append(LinearPiece("memory_query", memory.query.weight, slice(e, None)))
            embedding.append(LinearPiece("memory_query", memory.query.weight, slice(0, e), memory.query.bias))
            maps["attended"] = [LinearPiece("attended", memory.out.weight, bias=memory.out.bias)]
            maps["new_state"] = [LinearPiece("key_value", memory.key_value.weight, bias=memory.key_value.bias)]
        sentinel = attention.sentinel
        if sentinel is not None:  # its gate reads [embedding, h_{t-1}]
            hidden.append(LinearPiece("sentinel_gate", sentinel.gate.weight, slice(e, None)))
            embedding.append(LinearPiece("sentinel_gate", sentinel.gate.weight, slice(0, e), sentinel.gate.bias))
            maps["sentinel_value"] = [LinearPiece("sentinel", sentinel.value.weight)]
            maps["sentinel_key"] = [
                LinearPiece("sentinel_key", attention.region_proj.weight, bias=attention.region_proj.bias)
            ]
        hidden.append(LinearPiece("hidden_gates", cell.weight_hh, bias=cell.bias_hh))
        embedding.append(LinearPiece("input_gates", cell.weight_ih, slice(0, e), cell.bias_ih))  # cell input: [e, ..]
        reads = [LinearPiece("input_gates", cell.weight_ih, slice(e, None))]  # .. context, attended]
        maps["deep_hidden"] = [LinearPiece("deep", self.out_hidden.weight, bias=self.out_hidden.bias)]  # output
        maps["deep_context"] = [LinearPiece("deep", self.out_context.weight)]
        maps["vocabulary"] = [LinearPiece("logits", self.lm_head.weight, bias=self.lm_head.bias)]
        return {"hidden": hidden, "embedding": embedding, "reads": reads, **maps}

    def compile_steps(self) -> None:
        """From now on, the step function generation runs (the reference `step` or a runner's) is `torch.compile`d
        (dynamic shapes), once per function."""
        self.compiled_steps = {}

    def compiled(self, step: Callable) -> Callable:
        """`step`, compiled when `compile_steps` asked for it."""
        if self.compiled_steps is None:
            return step
        if step not in self.compiled_steps:
            self.compiled_steps[step] = torch.compile(step, dynamic=True)
        return self.compiled_steps[step]

    def forward(
        self,
        input_ids: torch.LongTensor,
        regions: torch.Tensor,
        cache: CaptionerCache,
        noise: torch.Tensor | None = None,
        step: Callable | None = None,
        output: Callable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run the T input words through the recurrence from `cache` (teacher forcing, or steps of generation), one
        `step` (default: the reference one) per word, then the deep `output` (default: `self.output`); `noise` (B, T)
        draws the regions read (hard attention). Returns logits (B, T, V), cross-attention (B, T, k), self-attention
        (B, heads, T, P + T) or None."""
        past = cache.seen_tokens
        embedded = self.embed_tokens(input_ids)  # (B, T, E)
        step = step if step is not None else self.compiled(self.step)
        hiddens, contexts, cross_weights, self_weights = [], [], [], []
        for t in range(input_ids.shape[1]):
            context, cross, self_w = step(embedded[:, t], regions, cache, None if noise is None else noise[:, t])
            hiddens.append(cache.hidden)
            contexts.append(context)
            cross_weights.append(cross)
            self_weights.append(self_w)
        logits = (output or self.output)(embedded, torch.stack(hiddens, dim=1), torch.stack(contexts, dim=1))
        return logits, torch.stack(cross_weights, dim=1), self.stack_self_attention(self_weights, past + len(hiddens))

    @staticmethod
    def stack_self_attention(step_weights: list[torch.Tensor | None], memory: int) -> torch.Tensor | None:
        """The steps' self-attention weights (B, heads, M_t) as (B, heads, T, memory): step t saw h_0..h_{P+t}; the
        states it could not see get weight 0. None without self-attention."""
        if not step_weights or step_weights[0] is None:
            return None
        return torch.stack([F.pad(w, (0, memory - w.shape[-1])) for w in step_weights], dim=2)


def run_cell(
    cell: nn.Module, inputs: torch.Tensor, hidden: torch.Tensor, memory: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of an LSTM cell (hidden, memory) or a GRU cell (hidden, None)."""
    if memory is not None:
        return cell(inputs, (hidden, memory))
    return cell(inputs, hidden), None


class TopDownDecoder(CaptionerDecoder):
    """The top-down decoder of Anderson et al. 2018 on the same regions: an attention LSTM reads [the language LSTM's
    previous state, the mean region, the word embedding] and its state queries the regions; the language LSTM reads
    [the context, the attention LSTM's state (, the self-attended earlier language states)] and its state predicts the
    word through the same deep output. The cache's hidden/cell are the language LSTM's."""

    def __init__(self, config: CaptionerConfig, region_dim: int):
        super().__init__(config, region_dim)
        hidden = config.hidden_size
        self.attention_cell = self.cell_class(hidden + region_dim + config.embed_dim, hidden)
        self.init_attention_hidden = nn.Linear(region_dim, hidden)
        self.init_attention_cell = nn.Linear(region_dim, hidden) if config.rnn_type == "lstm" else None

    @staticmethod
    def cell_input_size(config: CaptionerConfig, region_dim: int) -> int:
        """The language cell reads [context, attention state (, self-attended state)]."""
        return region_dim + config.hidden_size + (config.hidden_size if config.self_attention else 0)

    def start(self, regions: torch.Tensor, rows_per_image: int = 1) -> CaptionerCache:
        cache = super().start(regions, rows_per_image)
        mean_region = regions.mean(dim=1)  # (B, C)
        cache.attention_hidden = torch.tanh(self.init_attention_hidden(mean_region)).repeat_interleave(
            rows_per_image, dim=0
        )  # (R, H)
        if self.init_attention_cell is not None:
            cache.attention_cell = torch.tanh(self.init_attention_cell(mean_region)).repeat_interleave(
                rows_per_image, dim=0
            )  # (R, H)
        return cache

    def linear_maps(self) -> dict[str, list[LinearPiece]]:
        """As `CaptionerDecoder.linear_maps`, for this step's reads: "hidden" the language state h_{t-1} (the attention
        cell's first input columns, the language cell's hidden product), "attention_hidden" the attention cell's
        state, "state" its new state (the query, the beta gate, the self-attention query's and the sentinel gate's
        share, the language cell's columns for it), "embedding" the word (the attention cell's and the queries'
        shares), "mean_region" the mean region (once per caption), "reads" [context, attended] (the language cell's
        other columns); the self-attention, sentinel and deep output maps are the base class's."""
        e, h = self.embed_tokens.embedding_dim, self.cell.hidden_size
        c = self.cross_attention.region_proj.in_features
        attention, memory, sentinel = self.cross_attention, self.self_attention, self.cross_attention.sentinel
        attention_cell, cell = self.attention_cell, self.cell
        own = ("hidden", "embedding", "reads")  # made here: the rest (memory, sentinel, deep output) as the base's
        maps = {name: pieces for name, pieces in super().linear_maps().items() if name not in own}
        state = [
            LinearPiece("query", attention.query_proj.weight, bias=attention.query_proj.bias),
            LinearPiece("gate", attention.gate.weight, bias=attention.gate.bias),
        ]
        # the attention cell reads [h_{t-1}, mean region, embedding]
        embedding = [
            LinearPiece("attention_gates", attention_cell.weight_ih, slice(h + c, None), attention_cell.bias_ih)
        ]
        if memory is not None:  # its query reads [embedding, state]
            state.append(LinearPiece("memory_query", memory.query.weight, slice(e, None)))
            embedding.append(LinearPiece("memory_query", memory.query.weight, slice(0, e), memory.query.bias))
        if sentinel is not None:  # its gate reads [embedding, state]
            state.append(LinearPiece("sentinel_gate", sentinel.gate.weight, slice(e, None)))
            embedding.append(LinearPiece("sentinel_gate", sentinel.gate.weight, slice(0, e), sentinel.gate.bias))
        # the language cell reads [context, state (, attended)]
        state.append(LinearPiece("input_gates", cell.weight_ih, slice(c, c + h)))
        read_columns = (
            torch.arange(c) if memory is None else torch.cat([torch.arange(c), torch.arange(c + h, c + 2 * h)])
        )
        return {
            **maps,
            "hidden": [
                LinearPiece("attention_gates", attention_cell.weight_ih, slice(0, h)),
                LinearPiece("hidden_gates", cell.weight_hh, bias=cell.bias_hh),
            ],
            "attention_hidden": [LinearPiece("gates", attention_cell.weight_hh, bias=attention_cell.bias_hh)],
            "state": state,
            "embedding": embedding,
            "mean_region": [LinearPiece("attention_gates", attention_cell.weight_ih, slice(h, h + c))],
            "reads": [LinearPiece("input_gates", cell.weight_ih, read_columns, cell.bias_ih)],
        }

    def step(
        self, embedded: torch.Tensor, regions: torch.Tensor, cache: CaptionerCache, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        mean_region = regions.mean(dim=1).repeat_interleave(embedded.shape[0] // regions.shape[0], dim=0)  # (R, C)
        attention_input = torch.cat([cache.hidden, mean_region, embedded], dim=-1)  # (R, H + C + E)
        cache.attention_hidden, cache.attention_cell = run_cell(
            self.attention_cell, attention_input, cache.attention_hidden, cache.attention_cell
        )  # (R, H) each
        state = cache.attention_hidden
        context, cross_weights = self.look(embedded, state, regions, cache, noise)  # (R, C), (R, k [+ 1])
        self_weights = self.advance([context, state], embedded, state, cache)
        return context, cross_weights, self_weights


# `config.decoder_type` -> the decoder class
DECODER_CLASSES: dict[str, type[CaptionerDecoder]] = {"show_attend_tell": CaptionerDecoder, "top_down": TopDownDecoder}


def reference_decoding(
    decoder: CaptionerDecoder,
    input_ids: torch.LongTensor,
    regions: torch.Tensor,
    cache: CaptionerCache | None,
    lengths: torch.LongTensor | None = None,
    noise: torch.Tensor | None = None,
    keep_cache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, CaptionerCache | None]:
    """The paper's loop: one `decoder.step` per word, from `cache` or from a fresh start (R / B rows per image). The
    definition every other runner is tested against. `lengths` (R,) of the real targets, and `keep_cache` (the caller
    continues from the cache), are what a faster runner may use; this one needs neither."""
    cache = cache if cache is not None else decoder.start(regions, input_ids.shape[0] // regions.shape[0])
    return (*decoder(input_ids, regions, cache, noise), cache)


# `config.decoder_implementation` -> the runner of the decoder's steps, as transformers' ALL_ATTENTION_FUNCTIONS picks
# an attention kernel. Every runner takes (decoder, input_ids (R, T), regions (B, k, C), cache or None, lengths (R,) or
# None, noise (R, T) or None, keep_cache) and returns logits (R, T, V), cross-attention (R, T, k), self-attention
# (R, heads, T, P + T) or None, and the cache to continue from (None when keep_cache is False and it kept none).
DECODER_RUNNERS: dict[str, Callable] = {"reference": reference_decoding, "packed": packed_decoding}


class CaptionerPreTrainedModel(PreTrainedModel):
    config_class = CaptionerConfig
    config: CaptionerConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _is_stateful = True  # an LSTM/GRU state cannot be rolled back: assisted decoding is refused cleanly

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            init.normal_(module.in_proj_weight, mean=0.0, std=std)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, (nn.LSTMCell, nn.GRUCell)):
            bound = 1.0 / math.sqrt(module.hidden_size)
            for name, param in module.named_parameters():
                init.uniform_(param, -bound, bound)
                if isinstance(module, nn.LSTMCell) and name == "bias_hh":
                    init.constant_(param[module.hidden_size : 2 * module.hidden_size], 1.0)  # forget gate open


class CaptionerForConditionalGeneration(CaptionerPreTrainedModel, GenerationMixin):
    """Image captioner: a CNN grid encoder and an attention LSTM/GRU decoder; caption with `generate()`."""

    _tied_weights_keys = {"decoder.lm_head.weight": "decoder.embed_tokens.weight"}

    def __init__(self, config: CaptionerConfig):
        super().__init__(config)
        self.encoder = CaptionerGridEncoder(config)
        region_dim = self.encoder.num_channels
        self.region_encoder = None
        if config.region_encoder_layers:
            self.region_encoder = CaptionerRegionEncoder(config, region_dim)
            region_dim = self.region_encoder.out_dim
        self.decoder = DECODER_CLASSES[config.decoder_type](config, region_dim=region_dim)
        # hard attention's moving averages of the reward and of the advantage's square, and the last sampled batch's
        # diagnostics: per process, not saved (they restart on resume)
        self.reward_baseline: torch.Tensor | None = None
        self.advantage_variance: torch.Tensor | None = None
        self.hard_attention_stats: dict[str, torch.Tensor] = {}
        self.post_init()
        # captions are short: 3 beams and at most 30 words (+ </s>) by default; never emit <pad> or <s>
        self.generation_config.num_beams = 3
        self.generation_config.max_new_tokens = 31
        self.generation_config.suppress_tokens = [config.pad_token_id, config.bos_token_id]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the recurrent state lives in CaptionerCache, built by forward

    @classmethod
    def from_vision_pretrained(
        cls, vision_model_name_or_path: str, vision_kwargs: dict | None = None, **config_kwargs
    ) -> CaptionerForConditionalGeneration:
        """Start the encoder from pretrained weights; the decoder is new. `config_kwargs` go to [`CaptionerConfig`].

        - a transformers backbone: "microsoft/resnet-101" or a local folder (`vision_kwargs` to `from_pretrained`);
        - timm: "timm:resnet101" (ImageNet weights from the Hub), "timm/resnet101.a1h_in1k", or an offline file with
          `vision_kwargs={"checkpoint_path": ...}`;
        - torchvision: "torchvision:resnet101", with `vision_kwargs={"weights": "IMAGENET1K_V2"}` (default DEFAULT).
        """
        vision_kwargs = dict(vision_kwargs or {})
        name = vision_model_name_or_path
        if is_backbone_name(name):
            spec, source = pretrained_source(name)
            config = CaptionerConfig(vision_backbone=spec, **config_kwargs)  # bad settings end before any download
            check_output_stride(spec, config.vision_output_stride)
            pretrained = "checkpoint_path" not in vision_kwargs
            backbone, _ = build_backbone(source, pretrained=pretrained, **vision_kwargs)
            model = cls(config)
            model.encoder.backbone.load_state_dict(backbone.state_dict())
            return model
        # the concrete backbone class, not AutoBackbone.from_pretrained, which asks the Hub even for a local folder
        vision_config = AutoConfig.from_pretrained(name)
        if type(vision_config) not in MODEL_FOR_BACKBONE_MAPPING:
            raise ValueError(f"{name} is a {vision_config.model_type} model, which has no transformers backbone")
        backbone = MODEL_FOR_BACKBONE_MAPPING[type(vision_config)].from_pretrained(name, **vision_kwargs)
        model = cls(CaptionerConfig(vision_config=backbone.config, **config_kwargs))
        model.encoder.backbone.load_state_dict(backbone.state_dict())
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> CaptionerForConditionalGeneration:
        """As `PreTrainedModel.from_pretrained`; then re-applies the encoder freezing of the config, because loading
        materialises fresh parameters (all trainable) after `__init__` froze them, and refuses weights that are not
        finite (a corrupted file otherwise loads silently and captions nonsense)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        broken = [
            name
            for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not torch.isfinite(tensor).all()
        ]
        if broken:
            raise ValueError(
                f"{pretrained_model_name_or_path}: {len(broken)} weight tensor(s) hold NaN or infinite values "
                f"(e.g. {', '.join(broken[:3])}): the weights file is corrupt"
            )
        model.encoder.set_trainable_stages(model.config.encoder_trainable_stages)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also map `AutoModelForImageTextToText` in `auto_map`, and the pipeline tasks to the captioner's pipeline
        class (pipeline_captioner.py), when the code is saved for `trust_remote_code`."""
        if self._auto_class is not None:
            class_path = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModelForImageTextToText", class_path)
            self.config.auto_map = auto_map
            self.config.custom_pipelines = CUSTOM_PIPELINES
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """As in `GenerationMixin`, except that the encoder outputs keep one row per image: the beams (or returned
        sequences) of an image share its regions, so they are neither copied per beam nor reordered at every step,
        and a caller's `encoder_outputs` are left as they were given."""
        encoder_outputs = model_kwargs.pop("encoder_outputs", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, False, input_ids, **model_kwargs)
        if encoder_outputs is not None:
            model_kwargs["encoder_outputs"] = encoder_outputs
        return input_ids, model_kwargs

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.decoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.decoder.lm_head = value

    def shift_labels_right(self, labels: torch.LongTensor) -> torch.LongTensor:
        """Teacher-forcing inputs: the start token, then the labels without their last position (-100 -> pad)."""
        start = labels.new_full((labels.shape[0], 1), self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        frozen_features: torch.FloatTensor | None = None,
        image_index: torch.LongTensor | None = None,
        cache: CaptionerCache | None = None,
        past_key_values: CaptionerCache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        sample_regions: bool | None = None,
        attention_targets: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CaptionerOutput | tuple:
        r"""
        pixel_values: (B, 3, H, W) images, or pass `encoder_outputs` (e.g. cached region features (B, k, C)).
        frozen_features: instead of the images, the output of the encoder's frozen bottom when its last stages
            fine-tune (`encoder.frozen_features`, as a feature store caches it): only the top stages run.
        image_index: (R,) which of the images each caption row reads, when a batch holds several captions of an image
            (the collator's doing): the encoder then runs once per image, not once per caption.
        decoder_input_ids: (B, T) inputs; built from `labels` (shifted right) when only labels are given.
        labels: (B, T) target ids, -100 where there is no target (padding).
        cache: a [`CaptionerCache`] to continue from; `decoder_input_ids` then holds only the new tokens.
        past_key_values: the same, under the name transformers before 5.24 gives it.
        decoder_attention_mask: accepted for API compatibility; decoding is causal and padding is on the right, so
            padded steps never influence real ones and the mask is not needed.
        sample_regions: each word reads one region drawn from its attention weights (hard attention) instead of their
            expectation. Default: in training with `config.hard_attention`, on a batch with probability
            1 - `hard_attention_expectation_prob`; otherwise never (generation reads the expectation unless
            `generate(..., sample_regions=True)`). A sampled training batch with labels reads each caption
            `hard_attention_draws` times: its logits and attentions have that many rows per caption.
        attention_targets: (B, T, k) where each target word should look (the cells of its phrase's boxes; rows of
            zeros for words without boxes), for the attention supervision loss (`config.attention_supervision_weight`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        use_cache = use_cache if use_cache is not None else not self.training

        cache = self.one_cache(cache, past_key_values)
        if cache is not None and cache.regions is not None:  # generation's later steps: computed by the first
            regions = cache.regions  # (B, k, C)
        else:
            regions = self.regions(pixel_values, encoder_outputs, frozen_features, image_index)  # (R or B, k, C)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("CaptionerForConditionalGeneration needs `decoder_input_ids` or `labels`")
            decoder_input_ids = self.shift_labels_right(labels)
        self.check_rows(decoder_input_ids, regions)
        sampling = self.samples_regions(sample_regions)
        lengths = None if labels is None else (labels != -100).sum(dim=1)  # padding is on the right
        expected_logits = None
        if sampling and labels is not None and self.config.hard_attention_baseline == "expected_context":
            # deterministic, so the same for each of a caption's draws: read once per caption
            expected_logits = self.expected_context_logits(decoder_input_ids, regions, lengths)
        if sampling and labels is not None and cache is None:  # training: each caption read hard_attention_draws times
            decoder_input_ids, labels, lengths, regions, attention_targets, expected_logits = (
                self.repeat_for_draws(rows)
                for rows in (decoder_input_ids, labels, lengths, regions, attention_targets, expected_logits)
            )
        noise = torch.rand(decoder_input_ids.shape, device=self.device) if sampling else None  # (R, T): the draws
        runner = DECODER_RUNNERS[self.config.decoder_implementation]
        logits, cross_attentions, self_attentions, cache = runner(
            self.decoder, decoder_input_ids, regions, cache, lengths, noise, use_cache
        )
        sentinel_attentions = None
        if self.config.visual_sentinel:
            cross_attentions, sentinel_attentions = self.split_sentinel(cross_attentions)
        token_loss = attention_loss = supervision_loss = None
        self.hard_attention_stats = {}  # filled by a batch that samples its regions
        if labels is not None:
            token_loss, attention_loss = self.losses(logits, labels, cross_attentions, noise, expected_logits)
            supervision_loss = self.attention_supervision(cross_attentions, sentinel_attentions, attention_targets)

        output = CaptionerOutput(
            loss=None if labels is None else token_loss + attention_loss + supervision_loss,
            logits=logits,
            **{CACHE_NAME: cache if use_cache else None},
            decoder_attentions=self_attentions if output_attentions else None,
            cross_attentions=cross_attentions if output_attentions else None,
            sentinel_attentions=sentinel_attentions if output_attentions else None,
            encoder_last_hidden_state=regions,
            token_loss=token_loss,
            attention_loss=attention_loss,
            supervision_loss=supervision_loss,
        )
        return output if return_dict else output.to_tuple()

    def regions(
        self,
        pixel_values: torch.FloatTensor | None,
        encoder_outputs: BaseModelOutput | tuple | torch.Tensor | None,
        frozen_features: torch.Tensor | None,
        image_index: torch.LongTensor | None,
    ) -> torch.Tensor:
        """The region features (B, k, C) from whichever input was given, one row per caption (R, k, C) when
        `image_index` says which image each caption reads."""
        if encoder_outputs is None:
            if pixel_values is None and frozen_features is None:
                raise ValueError(
                    "CaptionerForConditionalGeneration needs `pixel_values`, `encoder_outputs` or `frozen_features`"
                )
            encoder_outputs = self.encoder(pixel_values=pixel_values, frozen_features=frozen_features)
        elif isinstance(encoder_outputs, torch.Tensor):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs)
        elif isinstance(encoder_outputs, (tuple, list)):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        regions = encoder_outputs.last_hidden_state  # (B, k, C)
        if self.region_encoder is not None:
            regions = self.region_encoder(regions)  # (B, k, H)
        if image_index is not None:
            regions = regions.index_select(0, image_index.to(regions.device))  # (R, k, C)
        return regions

    @staticmethod
    def check_rows(decoder_input_ids: torch.LongTensor, regions: torch.Tensor) -> None:
        """Generation runs n consecutive rows per image (beams, returned sequences): any other count is an error."""
        rows_per_image, remainder = divmod(decoder_input_ids.shape[0], regions.shape[0])
        if remainder or not rows_per_image:
            raise ValueError(
                f"{decoder_input_ids.shape[0]} caption rows for {regions.shape[0]} images: every image needs the "
                "same whole number of consecutive rows"
            )

    @staticmethod
    def one_cache(cache: CaptionerCache | None, past_key_values: CaptionerCache | None) -> CaptionerCache | None:
        """The decoding cache, under its name from transformers 5.24 on (`cache`) or before (`past_key_values`)."""
        if past_key_values is None:
            return cache
        if cache is not None:
            raise ValueError("Pass the decoding cache as `cache` or as `past_key_values`, not both")
        return past_key_values

    def samples_regions(self, sample_regions: bool | None) -> bool:
        """Whether each word reads one drawn region (hard attention). By default a training batch of a
        `hard_attention` model does, with probability 1 - `hard_attention_expectation_prob`; the draws' uniform numbers
        are made before the steps, so that every runner reads the same regions."""
        if sample_regions is not None:
            return sample_regions
        return (
            self.training
            and self.config.hard_attention
            and (torch.rand(()).item() >= self.config.hard_attention_expectation_prob)
        )

    def repeat_for_draws(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Each row `hard_attention_draws` times in a row (caption i's draws are rows i*K .. i*K + K - 1), for a
        sampled training batch; the outputs (logits, attentions) then have that many rows per caption."""
        draws = self.config.hard_attention_draws
        return rows if rows is None or draws == 1 else rows.repeat_interleave(draws, dim=0)

    def losses(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        cross_attentions: torch.Tensor,
        noise: torch.Tensor | None,
        expected_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The token cross-entropy (padding ignored) and the attention loss (penalty, plus hard attention's surrogate
        when the regions were sampled), reported apart; the loss is their sum."""
        token_loss = F.cross_entropy(
            logits.float().flatten(0, 1),
            labels.flatten(),
            ignore_index=-100,
            label_smoothing=self.config.label_smoothing,
        )
        attention_loss = self.attention_penalty(cross_attentions, labels != -100)
        if noise is not None:
            surrogate = self.hard_attention_loss(logits, labels, cross_attentions, noise, expected_logits)
            attention_loss = attention_loss + surrogate
        return token_loss, attention_loss

    @staticmethod
    def split_sentinel(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over k regions and the sentinel (B, T, k + 1) -> the image's share renormalised (B, T, k) and the
        sentinel's share (B, T). Steps that did not run (all zeros) stay zeros."""
        sentinel, on_image = weights[..., -1], weights[..., :-1]
        total = on_image.sum(dim=-1, keepdim=True)  # (B, T, 1) = 1 - sentinel, 0 where the step did not run
        return on_image / total.clamp(min=torch.finfo(total.dtype).tiny), sentinel

    def attention_supervision(
        self,
        cross_attentions: torch.Tensor,
        sentinel_attentions: torch.Tensor | None,
        attention_targets: torch.Tensor | None,
    ) -> torch.Tensor:
        """lambda times the mean over supervised words of -sum_i z_i log alpha_ti (Liu et al., AAAI 2017): z the word's
        target map (B, T, k), normalised to sum 1; alpha the attention over the regions, times the image's share
        (1 - the sentinel's) when there is a sentinel, so a named thing is also looked at rather than recalled."""
        weight = self.config.attention_supervision_weight
        if attention_targets is None or weight == 0:
            return cross_attentions.new_zeros(())
        if attention_targets.shape != cross_attentions.shape:
            raise ValueError(
                f"attention_targets has shape {tuple(attention_targets.shape)}; the captions' attention has "
                f"{tuple(cross_attentions.shape)} (batch, caption tokens, grid cells)"
            )
        totals = attention_targets.sum(dim=-1)  # (B, T)
        supervised = totals > 0
        if not supervised.any():
            return cross_attentions.new_zeros(())
        tiny = torch.finfo(cross_attentions.dtype).tiny
        log_weights = cross_attentions.float().clamp(min=tiny).log()  # (B, T, k)
        if sentinel_attentions is not None:
            log_weights = log_weights + (1 - sentinel_attentions.float()).clamp(min=tiny).log().unsqueeze(-1)
        targets = attention_targets.float() / totals.clamp(min=tiny).unsqueeze(-1)  # (B, T, k)
        return weight * -(targets * log_weights).sum(dim=-1)[supervised].mean()

    def attention_penalty(self, cross_attentions: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """lambda times how unevenly a caption's attention covers the image, over real steps, batch mean.

        "coverage": the chi-square divergence from uniform of the caption's mean attention map c (c_i = sum_t
        alpha_ti / T over its T words and k regions), k sum_i c_i^2 - 1. It is 0 when every region gets the same
        total and does not change when each region is split into equal parts sharing its mass, so lambda weighs the
        same attention on a 7 x 7 and a 14 x 14 grid alike. "doubly_stochastic" (Show, Attend and Tell):
        sum_i (1 - sum_t alpha_ti)^2 = k - 2T + (T^2 / k) (chi-square + 1), the same pull scaled by T^2 / k: it
        grows with the square of the caption's length and shrinks on finer grids.
        """
        attention_per_region = (cross_attentions * target_mask.unsqueeze(-1)).sum(dim=1)  # (B, k)
        if self.config.attention_penalty_form == "doubly_stochastic":
            penalty = ((1.0 - attention_per_region) ** 2).sum(dim=-1)
        else:
            mean_map = attention_per_region / target_mask.sum(dim=1, keepdim=True).clamp(min=1)
            penalty = (mean_map.shape[-1] * (mean_map**2).sum(dim=-1) - 1.0).clamp(min=0)
        return self.config.attention_penalty * penalty.mean()

    def hard_attention_loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        cross_attentions: torch.Tensor,
        noise: torch.Tensor,
        expected_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What hard attention adds to the token loss (SAT section 4.1, eq. 10-12) for captions whose steps read regions
        s drawn with `noise`: the token loss's gradient is the bound's log p(y | s, a) term; this surrogate's gradient
        adds lambda_r (R_t - b_t) d log p(s_t | a) (REINFORCE) and lambda_e times the gradient of the entropy of alpha.

        The reward R_t of step t's draw (`hard_attention_reward`): "caption", log p(y | s, a) of the whole caption (the
        paper's); "remaining", the log-likelihood of the words from t on, which are all the draw can change: the
        words before it do not depend on it, so leaving them out removes noise and no signal (unbiased too). b_t is a
        moving average of R_t (per step for "remaining"), taken before this batch moves it; with `expected_logits`
        (the same captions read with the expected context, `hard_attention_baseline: expected_context`), b_t is that
        reading's reward plus a moving average of the gap: a baseline per caption, which knows how hard the caption
        is, and still independent of this batch's draws (unbiased); with `other_draws`, the mean reward of the
        caption's other draws (`hard_attention_draws` >= 2; unbiased, per caption). With lambda_r = 1 the
        estimator is unbiased for the bound's gradient; lambda_r < 1 (arctic-captions' effective 0.1) and
        `hard_attention_normalize_advantage` (dividing R_t - b_t by its running standard deviation) rescale the
        score-function term against the token loss's gradient: biased, on purpose, for a smaller variance.
        Summed over the batch's real steps and divided by their number, as the token loss is. Updates the baseline
        and leaves the batch's diagnostics in `hard_attention_stats`."""
        config = self.config
        targets = (labels != -100).float()  # (B, T)
        rewards = self.draw_rewards(logits, labels)  # (B, 1) or (B, T)
        control = self.draw_rewards(expected_logits, labels) if expected_logits is not None else 0.0
        if config.hard_attention_baseline == "other_draws":
            baseline = self.other_draws_mean(rewards)
        elif config.hard_attention_reward == "caption":
            baseline = control + self.moving_reward_baseline((rewards - control).mean())
        else:
            steps_present = targets.sum(dim=0)  # (T,) captions long enough to have step t
            batch_mean = ((rewards - control) * targets).sum(dim=0) / steps_present.clamp(min=1)
            baseline = control + self.moving_reward_baseline(batch_mean, steps_present > 0)
        advantages = (rewards - baseline) * targets  # (B, T)
        spread = (advantages.square().sum() / targets.sum().clamp(min=1)).detach()  # mean square about the baseline
        if config.hard_attention_normalize_advantage:
            previous = self.advantage_variance if self.advantage_variance is not None else spread
            decay = config.hard_attention_baseline_decay
            self.advantage_variance = (decay * previous + (1 - decay) * spread).detach()
            advantages = advantages / previous.sqrt().clamp(min=1e-6)
        choices = chosen_regions(cross_attentions.detach(), noise)  # (B, T): the regions the steps read
        log_weights = cross_attentions.clamp(min=torch.finfo(cross_attentions.dtype).tiny).log()  # (B, T, k)
        step_log_prob = log_weights.gather(-1, choices.unsqueeze(-1)).squeeze(-1)  # (B, T) log p(s_t | a)
        reinforce = -(advantages * step_log_prob).sum()
        step_entropy = -(cross_attentions * log_weights).sum(dim=-1)  # (B, T)
        entropy = (step_entropy * targets).sum()
        self.hard_attention_stats = self.attention_diagnostics(
            cross_attentions.detach(), step_entropy.detach(), targets
        )
        self.hard_attention_stats["reward_std"] = spread.sqrt()
        surrogate = config.hard_attention_reinforce_weight * reinforce - config.hard_attention_entropy_weight * entropy
        return surrogate / targets.sum().clamp(min=1)

    @torch.no_grad()
    def expected_context_logits(self, decoder_input_ids, regions, lengths) -> torch.Tensor:
        """Hard attention's control variate: the same captions read with the expected context, without dropout (a
        deterministic reading: dropout's noise is not what the baseline should track)."""
        runner, training = DECODER_RUNNERS[self.config.decoder_implementation], self.decoder.training
        self.decoder.eval()
        try:
            return runner(self.decoder, decoder_input_ids, regions, None, lengths, None, False)[0]
        finally:
            self.decoder.train(training)

    def draw_rewards(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What each step's draw is credited with (`hard_attention_reward`): the caption's log-likelihood (B, 1), or
        that of the words from each step on (B, T); padding adds nothing."""
        logits = logits.detach().float().transpose(1, 2)  # (B, V, T)
        word_log_likelihood = -F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")  # (B, T)
        if self.config.hard_attention_reward == "caption":
            return word_log_likelihood.sum(dim=1, keepdim=True)
        return word_log_likelihood.flip(1).cumsum(dim=1).flip(1)

    def other_draws_mean(self, rewards: torch.Tensor) -> torch.Tensor:
        """Each draw's baseline from its caption's other draws (leave one out, `hard_attention_baseline:
        other_draws`): their mean reward, per step for "remaining". Independent of the draw it is subtracted from, so
        unbiased, and per caption, so it knows how hard the caption is, without an extra pass."""
        draws = self.config.hard_attention_draws
        per_caption = rewards.unflatten(0, (-1, draws))  # (B, K, 1 or T)
        others = (per_caption.sum(dim=1, keepdim=True) - per_caption) / (draws - 1)
        return others.flatten(0, 1)

    def moving_reward_baseline(self, batch_mean: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """The baseline to subtract now, then moved towards this batch's mean reward (decay
        `hard_attention_baseline_decay`): the previous average, so that it does not depend on this batch's draws (the
        first batch, and a step no earlier caption had, start from the batch's own mean). `batch_mean`: a scalar, or
        one per step (T,) with `present` (T,) marking the steps some caption has (the others keep their average)."""
        decay, previous = self.config.hard_attention_baseline_decay, self.reward_baseline
        if batch_mean.dim() == 0:
            baseline = previous if previous is not None else batch_mean
            self.reward_baseline = (decay * baseline + (1 - decay) * batch_mean).detach()
            return baseline
        steps = batch_mean.shape[0]
        if previous is None:
            previous = batch_mean
        elif previous.dim() == 0:  # one average for every step (set by hand, or a caption-reward run's)
            previous = previous.expand(steps)
        if previous.shape[0] < steps:
            previous = torch.cat([previous, batch_mean[previous.shape[0] :]])
        baseline = previous[:steps]
        moved = torch.where(present, decay * baseline + (1 - decay) * batch_mean, baseline)
        self.reward_baseline = torch.cat([moved, previous[steps:]]).detach()
        return baseline

    @staticmethod
    def attention_diagnostics(
        cross_attentions: torch.Tensor, step_entropy: torch.Tensor, targets: torch.Tensor
    ) -> dict:
        """How sharp and how mobile a batch's attention is, over its real steps: the entropy over log k (1: uniform)
        and the share of consecutive words whose most-attended region differs (a map stuck on one cell: 0)."""
        real = targets.sum().clamp(min=1)
        uniform = math.log(cross_attentions.shape[-1]) if cross_attentions.shape[-1] > 1 else 1.0  # one region: 0
        entropy = (step_entropy * targets).sum() / (real * uniform)
        peaks = cross_attentions.argmax(dim=-1)  # (B, T)
        pairs = targets[:, 1:] * targets[:, :-1]
        moves = ((peaks[:, 1:] != peaks[:, :-1]).float() * pairs).sum() / pairs.sum().clamp(min=1)
        return {"attention_entropy": entropy, "peak_moves": moves}


CaptionerForConditionalGeneration.register_for_auto_class("AutoModel")  # saved: auto_map (see the config's file)
if __name__.startswith("hf_captioner."):
    AutoModel.register(CaptionerConfig, CaptionerForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(CaptionerConfig, CaptionerForConditionalGeneration, exist_ok=True)

__all__ = [
    "CaptionerCache",
    "CaptionerForConditionalGeneration",
    "CaptionerOutput",
    "CaptionerPreTrainedModel",
]
