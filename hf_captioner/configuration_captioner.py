"""Configuration of the attention captioner.

This file is copied next to the weights by `save_pretrained` (for `trust_remote_code` loading), so it imports
nothing from `hf_captioner` except, relatively, its sibling files.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .backbones import NATIVE_OUTPUT_STRIDE, OUTPUT_STRIDES, parse_backbone

RNN_TYPES = ("lstm", "gru")
CROSS_ATTENTION_KINDS = ("additive", "dot", "scaled_dot")
NORM_STATISTICS = ("batch", "frozen")
DECODER_IMPLEMENTATIONS = ("packed", "reference")
ATTENTION_PENALTY_FORMS = ("coverage", "doubly_stochastic")
DECODER_TYPES = ("show_attend_tell", "top_down")
HARD_ATTENTION_REWARDS = ("caption", "remaining")
HARD_ATTENTION_BASELINES = ("moving_average", "expected_context", "other_draws")
CHOICES = {
    "hard_attention_baseline": HARD_ATTENTION_BASELINES,
    "hard_attention_reward": HARD_ATTENTION_REWARDS,
    "decoder_type": DECODER_TYPES,
    "rnn_type": RNN_TYPES,
    "cross_attention": CROSS_ATTENTION_KINDS,
    "decoder_implementation": DECODER_IMPLEMENTATIONS,
    "attention_penalty_form": ATTENTION_PENALTY_FORMS,
    "encoder_norm_statistics": NORM_STATISTICS,
}

# A ResNet-101 shaped backbone (random init unless started with `from_vision_pretrained`), last stage only.
DEFAULT_VISION_CONFIG = {
    "layer_type": "bottleneck",
    "depths": [3, 4, 23, 3],
    "hidden_sizes": [256, 512, 1024, 2048],
    "out_features": ["stage4"],
}


class CaptionerConfig(PreTrainedConfig):
    r"""Configuration of [`CaptionerForConditionalGeneration`]: a CNN grid encoder and a recurrent decoder mixing
    Bahdanau cross-attention over the regions with self-attention over its own earlier states.

    Example:
    ```python
    >>> from hf_captioner import CaptionerConfig, CaptionerForConditionalGeneration
    >>> config = CaptionerConfig(vocab_size=2000, rnn_type="gru", cross_attention="scaled_dot")
    >>> model = CaptionerForConditionalGeneration(config)
    ```
    """

    model_type = "hf_captioner"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet", init_kwargs=DEFAULT_VISION_CONFIG)
    }

    vision_config: dict | PreTrainedConfig | None = None  # a transformers backbone config; default ResNet-101 shape
    vision_backbone: str | None = None  # or a timm / torchvision network: "timm:NAME", "torchvision:NAME"
    # 16: the timm / torchvision backbone's last stride-2 stage dilates instead (same weights, a map twice as fine:
    # 14 x 14 at 224 px, as SAT's VGG conv5_4), at about 4x that stage's cost
    vision_output_stride: int = NATIVE_OUTPUT_STRIDE
    grid_size: int = 14  # the last feature map is average-pooled to grid_size x grid_size regions (14 as in SAT)
    encoder_trainable_stages: int = 0  # how many of the backbone's last stages fine-tune: 0 = frozen, -1 = all
    # BatchNorm of the fine-tuning stages in training: "batch" statistics, or the pretrained ones kept ("frozen": the
    # network sees the statistics it was trained with, whatever the batch; its scale and shift still train)
    encoder_norm_statistics: str = "batch"
    embed_dim: int = 512  # word embedding width
    hidden_size: int = 512  # recurrent state width
    attention_dim: int = 512  # width of the cross-attention scoring space
    rnn_type: str = "lstm"  # "lstm" | "gru"
    cross_attention: str = "additive"  # "additive" (Bahdanau) | "dot" | "scaled_dot"
    self_attention: bool = True  # attend over the decoder's earlier states; False gives the classic SAT decoder
    self_attention_heads: int = 8  # heads of the self-attention (must divide hidden_size)
    # Transformer encoder layers over the k regions (projected to hidden_size, with 2-D grid position embeddings)
    # between the encoder and the decoder: self-attention among the regions (AoA's refiner); 0 = none. They run on
    # the encoder's output, so cached features stay valid.
    region_encoder_layers: int = 0
    # "show_attend_tell": one LSTM/GRU that attends from h_{t-1}; "top_down" (Anderson et al. 2018): an attention
    # LSTM reads [language state, mean region, word] and queries the regions, a language LSTM reads [context,
    # attention state] and predicts the word
    decoder_type: str = "show_attend_tell"
    # an adaptive sentinel (Lu et al. 2017): the attention may go to a vector of the decoder's own memory instead of
    # the image; its share per word is returned as `sentinel_attentions`
    visual_sentinel: bool = False
    dropout: float = 0.5  # dropout before the output layer (deep output)
    decoder_implementation: str = "packed"  # "packed" (fast: packed_decoding.py) | "reference" (the paper's loop)
    attention_penalty: float = 0.0  # lambda of the attention penalty below; off by default (README: penalty sweep)
    attention_penalty_form: str = "coverage"  # "coverage" (grid-independent) | "doubly_stochastic" (the paper's)
    label_smoothing: float = 0.0  # label smoothing of the token cross-entropy
    # lambda of the attention supervision loss -sum_i z_i log alpha_ti on words of phrases with boxes (z: the boxes'
    # cells, normalised); needs `attention_targets` in the batch (training with --entities, or the sample set)
    attention_supervision_weight: float = 0.0
    # Hard (stochastic) attention, Show, Attend and Tell section 4.1: training reads one sampled region per word and
    # follows the REINFORCE estimator of the variational bound; the defaults are the paper's code's values.
    hard_attention: bool = False  # sample the region each word reads while training (False: soft attention)
    # lambda_r: weight of the sampled regions' score-function term; 1 is the bound's unbiased estimator, 0.1 what
    # arctic-captions effectively uses (its term's norm then matches the token loss's and no batch is clipped)
    hard_attention_reinforce_weight: float = 0.1
    hard_attention_entropy_weight: float = 0.002  # lambda_e: weight of the entropy bonus on alpha
    hard_attention_baseline_decay: float = 0.9  # moving-average baseline of the reward (and the advantage's square)
    # the reward of step t's draw: "caption" (log p(y | s, a), the paper's) or "remaining" (the words from t on)
    hard_attention_reward: str = "caption"
    # the reward's baseline: a moving average, or the reward of the same caption read with the expected context (plus
    # a moving average of the gap): one more forward pass, without gradients, per sampled batch
    hard_attention_baseline: str = "moving_average"
    # region draws per caption on a sampled batch: each caption is read this many times, independently drawn, and the
    # loss averages them (a sampled batch costs that many decoder passes); with 2 or more, the baseline
    # "other_draws" is the mean reward of the caption's other draws
    hard_attention_draws: int = 1
    hard_attention_normalize_advantage: bool = False  # divide reward - baseline by its running standard deviation
    hard_attention_expectation_prob: float = 0.5  # per batch, the chance of the expected (soft) context instead
    tie_word_embeddings: bool = False  # share the embedding matrix with the output layer
    vocab_size: int = 10000  # size of the SentencePiece vocabulary (special tokens included)
    pad_token_id: int = 0
    bos_token_id: int = 1  # also the decoder start token
    eos_token_id: int = 2
    unk_token_id: int = 3
    decoder_start_token_id: int = 1
    initializer_range: float = 0.02  # std of the normal init of the decoder's linear layers and embeddings
    is_encoder_decoder: bool = True

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A saved config must state its grid size: nothing in the weights does, so a missing one would silently
        load as the default (14 x 14 regions) for a model trained on another grid."""
        if "grid_size" not in config_dict and "grid_size" not in kwargs:
            raise ValueError(
                "CaptionerConfig: this config.json has no grid_size; nothing in the weights records it, "
                'so add the grid the model was trained with (e.g. "grid_size": 7)'
            )
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        """Reject bad values here, with the field named, rather than deep inside `forward`."""
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"CaptionerConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("grid_size", "embed_dim", "hidden_size", "attention_dim", "vocab_size", "self_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CaptionerConfig.{name} must be a positive integer, got {value!r}")
        layers = self.region_encoder_layers
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
            raise ValueError(f"CaptionerConfig.region_encoder_layers must be an integer >= 0, got {layers!r}")
        if (self.self_attention or layers) and self.hidden_size % self.self_attention_heads:
            raise ValueError(
                f"CaptionerConfig.self_attention_heads ({self.self_attention_heads}) must divide hidden_size "
                f"({self.hidden_size}): the self-attention and the region encoder's layers use them"
            )
        for name in ("dropout", "label_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"CaptionerConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("hard_attention_reinforce_weight", "hard_attention_entropy_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"CaptionerConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("hard_attention_baseline_decay", "hard_attention_expectation_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"CaptionerConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("attention_penalty", "attention_supervision_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"CaptionerConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        draws = self.hard_attention_draws
        if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
            raise ValueError(f"CaptionerConfig.hard_attention_draws must be a positive integer, got {draws!r}")
        if self.hard_attention_baseline == "other_draws" and draws < 2:
            raise ValueError(
                'CaptionerConfig.hard_attention_baseline "other_draws" needs hard_attention_draws >= 2 (the mean reward '
                f"of a caption's other draws), got hard_attention_draws={draws}"
            )
        if self.visual_sentinel and self.hard_attention:
            raise ValueError(
                "CaptionerConfig: hard_attention samples one region per word, and visual_sentinel is a soft mixture "
                "of the image and the decoder's memory; choose one of them"
            )
        if not isinstance(self.encoder_trainable_stages, int) or self.encoder_trainable_stages < -1:
            raise ValueError(
                "CaptionerConfig.encoder_trainable_stages must be -1 (all), 0 (frozen) or a number of final stages, "
                f"got {self.encoder_trainable_stages!r}"
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"CaptionerConfig.{name} must be a token id in [0, {self.vocab_size}), got {value!r}")
        if len({self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id}) != 4:
            raise ValueError("CaptionerConfig: pad, bos, eos and unk token ids must be distinct")
        self._validate_vision()

    def _validate_vision(self) -> None:
        if self.vision_output_stride not in OUTPUT_STRIDES:
            raise ValueError(
                f"CaptionerConfig.vision_output_stride must be one of {OUTPUT_STRIDES}, "
                f"got {self.vision_output_stride!r}"
            )
        if self.vision_output_stride != NATIVE_OUTPUT_STRIDE and self.vision_backbone is None:
            raise ValueError(
                "CaptionerConfig.vision_output_stride: only a timm / torchvision backbone "
                "(vision_backbone) can dilate its last stage; transformers backbones keep their stride"
            )
        if self.vision_backbone is not None:
            try:
                parse_backbone(self.vision_backbone)
            except ValueError as err:
                raise ValueError(f"CaptionerConfig.{err}") from None
            return
        if not hasattr(self.vision_config, "stage_names"):
            raise ValueError(
                f"CaptionerConfig.vision_config must be a backbone config (one AutoBackbone can build, with "
                f"stage_names), got {type(self.vision_config).__name__}"
            )
        stages = [name for name in getattr(self.vision_config, "stage_names", []) if name != "stem"]
        if stages and self.encoder_trainable_stages > len(stages):
            raise ValueError(
                f"CaptionerConfig.encoder_trainable_stages={self.encoder_trainable_stages} but the "
                f"{self.vision_config.model_type} backbone has only {len(stages)} stages"
            )


# Every saved folder carries this code and an `auto_map`, so it loads anywhere with `trust_remote_code`; inside this
# package the Auto factories also know the class directly (not when this file runs as a saved folder's copy, which
# would replace the package's class for the rest of the process).
CaptionerConfig.register_for_auto_class()
if __name__.startswith("hf_captioner."):
    AutoConfig.register(CaptionerConfig.model_type, CaptionerConfig, exist_ok=True)

__all__ = ["CaptionerConfig"]
