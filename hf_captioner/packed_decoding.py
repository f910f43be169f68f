"""The fast teacher-forcing runner (`CaptionerConfig.decoder_implementation = "packed"`, the default for training).

It computes what `CaptionerDecoder.forward` computes from a fresh start, arranged for speed; the equivalence tests
(tests/test_modeling.py) pin the two together in loss, logits, attention and gradients:
- length packing: captions run longest first and each step runs only on those not yet ended;
- deferred weight gradients: the per-step products multiply by detached weights, and each weight's gradient is
  summed in one matrix product after the loop (`StepWeightGradients`), instead of one outer product per step.

`save_pretrained` copies this file next to the weights with the model, so it imports nothing else from hf_captioner.
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F
from torch import nn

if typing.TYPE_CHECKING:
    from .modeling_captioner import CaptionerCache, CaptionerDecoder


class StepWeightGradients:
    """Weight gradients of the per-step linear layers of teacher forcing, summed in one matrix product per weight.

    Autograd would add a (out x in) outer product into each weight's gradient at every step: at a few dozen rows per
    step that is memory-bound and was most of the training step's backward. Here each step multiplies by a detached
    weight, keeps its input, and a hook keeps the gradient of its output; `attach` puts a node before the loop whose
    backward (it runs last: every step depends on the state it passes on) returns grad_W = sum_t G_t^T X_t as the
    weights' gradient, so optimisers, DDP and gradient accumulation see an ordinary gradient.
    """

    def __init__(self):
        self.inputs: dict[nn.Parameter, list[torch.Tensor]] = {}
        self.output_grads: dict[nn.Parameter, dict[int, torch.Tensor]] = {}

    def attach(self, state: torch.Tensor, weights: list[nn.Parameter]) -> torch.Tensor:
        """`state` (the recurrence's initial state) passed through the node that will receive the weight gradients."""
        self.weights = weights
        return _WeightGradientSink.apply(self, state, *weights)

    def linear(self, inputs: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear`, with the weight's gradient left to `weight_gradients` (the bias's is cheap: autograd's)."""
        if not weight.requires_grad:
            return F.linear(inputs, weight, bias)
        outputs = F.linear(inputs, weight.detach(), bias)
        kept = self.inputs.setdefault(weight, [])
        grads = self.output_grads.setdefault(weight, {})
        position = len(kept)
        kept.append(inputs.detach())
        outputs.register_hook(lambda grad: grads.__setitem__(position, grad))
        return outputs

    def weight_gradients(self) -> list[torch.Tensor | None]:
        gradients = []
        for weight in self.weights:
            grads = self.output_grads.get(weight, {})
            positions = sorted(grads)  # steps whose output reached the loss
            if not positions:
                gradients.append(None)
                continue
            # in the weight's dtype: under bf16 autocast the steps ran in bf16, the sum is kept in float32
            output_grad = torch.cat([grads[i] for i in positions]).to(weight.dtype)  # (sum of rows, out)
            inputs = torch.cat([self.inputs[weight][i] for i in positions]).to(weight.dtype)  # (sum of rows, in)
            gradients.append(output_grad.transpose(0, 1) @ inputs)  # (out, in)
        self.inputs.clear()
        self.output_grads.clear()
        return gradients


class _WeightGradientSink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, collector: StepWeightGradients, state: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        ctx.collector = collector
        return state.view_as(state)

    @staticmethod
    def backward(ctx, state_grad: torch.Tensor):
        return None, state_grad, *ctx.collector.weight_gradients()


def step_weights(decoder: CaptionerDecoder) -> list[nn.Parameter]:
    """The trainable weights every step multiplies by (their gradients are deferred)."""
    layers = [decoder.cross_attention.query_proj, decoder.cross_attention.gate]
    if decoder.self_attention is not None:
        attention = decoder.self_attention
        layers += [attention.query, attention.key_value, attention.out]
    weights = [layer.weight for layer in layers] + [decoder.cell.weight_ih, decoder.cell.weight_hh]
    return [weight for weight in weights if weight.requires_grad]


def recur(cell: nn.LSTMCell | nn.GRUCell, cell_input: torch.Tensor, cache: CaptionerCache, linear) -> None:
    """One LSTM/GRU update of the cache's state: the equations of `nn.LSTMCell` / `nn.GRUCell` (whose parameters it
    uses), written out so that the weight products go through `linear`."""
    input_gates = linear(cell_input, cell.weight_ih, cell.bias_ih)  # (B, 4H | 3H)
    hidden_gates = linear(cache.hidden, cell.weight_hh, cell.bias_hh)  # (B, 4H | 3H)
    if cache.cell is not None:
        i, f, g, o = (input_gates + hidden_gates).chunk(4, dim=-1)
        cache.cell = torch.sigmoid(f) * cache.cell + torch.sigmoid(i) * torch.tanh(g)  # (B, H)
        cache.hidden = torch.sigmoid(o) * torch.tanh(cache.cell)  # (B, H)
    else:
        input_r, input_z, input_n = input_gates.chunk(3, dim=-1)
        hidden_r, hidden_z, hidden_n = hidden_gates.chunk(3, dim=-1)
        reset, update = torch.sigmoid(input_r + hidden_r), torch.sigmoid(input_z + hidden_z)
        new = torch.tanh(input_n + reset * hidden_n)
        cache.hidden = (1 - update) * new + update * cache.hidden  # (B, H)


def deferred_step(
    decoder: CaptionerDecoder, embedded: torch.Tensor, regions: torch.Tensor, cache: CaptionerCache, linear
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`CaptionerDecoder.step` with every product by a per-step weight going through `linear`."""
    attention = decoder.cross_attention
    query = linear(cache.hidden, attention.query_proj.weight, attention.query_proj.bias)  # (B, A)
    cross_weights = attention.weights(query.unsqueeze(1), cache.projected_regions).squeeze(1)  # (B, k)
    gate = torch.sigmoid(linear(cache.hidden, attention.gate.weight, attention.gate.bias))  # (B, C)
    context = gate * torch.bmm(cross_weights.unsqueeze(1), regions).squeeze(1)  # (B, C)
    inputs = [embedded, context]
    self_weights = None
    if decoder.self_attention is not None:
        memory = decoder.self_attention
        step_query = linear(torch.cat([embedded, cache.hidden], dim=-1), memory.query.weight, memory.query.bias)
        attended, self_weights = memory.attend(step_query, cache.keys, cache.values)  # (B, H), (B, heads, M)
        inputs.append(linear(attended, memory.out.weight, memory.out.bias))
    recur(decoder.cell, torch.cat(inputs, dim=-1), cache, linear)  # input (B, E + C [+ H])
    if decoder.self_attention is not None:
        key, value = memory.split_memory(linear(cache.hidden, memory.key_value.weight, memory.key_value.bias))
        cache.keys = torch.cat([cache.keys, key], dim=2)  # (B, heads, M + 1, d)
        cache.values = torch.cat([cache.values, value], dim=2)  # (B, heads, M + 1, d)
    cache.seen_tokens += 1
    return context, cross_weights, self_weights


def packed_teacher_forcing(
    decoder: CaptionerDecoder,
    input_ids: torch.LongTensor,
    regions: torch.Tensor,
    lengths: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Teacher forcing of whole captions (B, T) from a fresh start, one caption per image. With `lengths` (B,), the
    number of real target tokens per caption, steps past a caption's end are skipped: their outputs are zeros.
    Returns what `CaptionerDecoder.forward` returns (logits, cross-attention, self-attention)."""
    batch, length = input_ids.shape
    embedded = decoder.embed_tokens(input_ids)  # (B, T, E)
    cache = decoder.start(regions)
    order = active = None
    if lengths is not None and int(lengths.max()) > 0:
        order = lengths.argsort(descending=True, stable=True)  # (B,)
        active = (lengths[order][None, :] > torch.arange(length, device=lengths.device)[:, None]).sum(1).tolist()
        if torch.equal(order, torch.arange(batch, device=order.device)):
            order = None  # already longest first (as CaptionCollator batches them): nothing to move
        else:
            cache.reorder_cache(order)
            regions = regions.index_select(0, order)  # (B, k, C)
    steps_input = embedded if order is None else embedded.index_select(0, order)  # (B, T, E)
    weights = step_weights(decoder) if torch.is_grad_enabled() else []
    linear = F.linear
    if weights:
        collector = StepWeightGradients()
        cache.hidden = collector.attach(cache.hidden, weights)
        linear = collector.linear
    hiddens, contexts, cross_weights, self_weights = [], [], [], []
    for t in range(length):
        rows = batch if active is None else active[t]
        if rows == 0:
            break  # every caption has ended: the remaining steps are padding
        if rows < cache.hidden.shape[0]:
            keep_first_rows(cache, rows)  # captions that have ended drop out of the batch for good
        if weights:
            context, cross, self_w = deferred_step(decoder, steps_input[:rows, t], regions[:rows], cache, linear)
        else:  # nothing to defer: the reference step, with torch's own cell (fewer kernel launches)
            context, cross, self_w = decoder.step(steps_input[:rows, t], regions[:rows], cache)
        hiddens.append(_pad(cache.hidden, batch, 0))
        contexts.append(_pad(context, batch, 0))
        cross_weights.append(_pad(cross, batch, 0))
        self_weights.append(None if self_w is None else _pad(self_w, batch, 0))
    hidden = _pad(torch.stack(hiddens, dim=1), length, 1)  # (B, T, H)
    context = _pad(torch.stack(contexts, dim=1), length, 1)  # (B, T, C)
    cross = _pad(torch.stack(cross_weights, dim=1), length, 1)  # (B, T, k)
    self_attention = decoder.stack_self_attention(self_weights, length)  # (B, heads, steps run, T)
    if self_attention is not None:
        self_attention = _pad(self_attention, length, 2)  # (B, heads, T, T)
    if order is not None:  # back to the caller's order
        inverse = order.argsort()
        hidden, context, cross = hidden[inverse], context[inverse], cross[inverse]
        self_attention = self_attention[inverse] if self_attention is not None else None
    return decoder.output(embedded, hidden, context), cross, self_attention


def keep_first_rows(cache: CaptionerCache, rows: int) -> None:
    """Drop all but the first `rows` rows of the state (captions that ended, in length order)."""
    for name in ("hidden", "cell", "keys", "values", "projected_regions"):
        tensor = getattr(cache, name)
        if tensor is not None:
            setattr(cache, name, tensor[:rows])


def _pad(tensor: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Zeros appended along `dim` up to `size`: the rows of captions that have ended (dim 0), the steps after every
    caption has ended (dim 1)."""
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim)
