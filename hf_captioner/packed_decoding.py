"""The packed decoder path (`CaptionerConfig.decoder_implementation = "packed"`, the default).

It computes what the reference decoder (`CaptionerDecoder.step`) computes, arranged for speed; the equivalence tests
(tests/test_modeling.py) pin the two together in loss, logits, attention, gradients and captions:
- stacked products: the linear maps of a step that read the same vector (`CaptionerDecoder.linear_maps` says which)
  are one matrix product by their stacked weights (`StackedProduct`). h_{t-1} feeds the attention query, the beta
  gate, the self-attention query, the cell's hidden product (and, in teacher forcing, the self-attention key/value of
  h_{t-1}); the embedding's share of the self-attention query and of the cell's input product runs for all steps at
  once before the loop. The weights are stacked, and cast to autocast's dtype, once per forward (once per
  `generate()` call), not at every step;
- length packing (teacher forcing): captions run longest first and each step runs only on those not yet ended;
- deferred weight gradients (teacher forcing): the per-step products multiply by detached weights, and each stacked
  weight's gradient is summed in one matrix product after the loop (`DeferredWeightGradients`), instead of one outer
  product per step.

A decoder class without an entry in `PACKED_STEPS` runs its reference steps under this implementation too.
`save_pretrained` copies this file next to the weights with the model, so it imports nothing else from hf_captioner.
"""

from __future__ import annotations

import functools
import time
import typing
from collections.abc import Callable

import torch
import torch.nn.functional as F

if typing.TYPE_CHECKING:
    from .modeling_captioner import CaptionerCache, CaptionerDecoder, LinearPiece


def compute_dtype(reference: torch.Tensor) -> torch.dtype:
    """The dtype the products run in: autocast's when it is on for the tensor's device, else the weights' own."""
    device = reference.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else reference.dtype


# Up to this many rows (a beam-search step of up to 32 pictures at 3 beams), a float32 inference product may run as
# W x^T instead of x W^T, where this CPU runs it faster (`weight_first_pays`).
FEW_ROWS = 96


@functools.cache
def weight_first_pays() -> bool:
    """Whether this CPU multiplies a few float32 rows by a large weight faster as W x^T than as x W^T (what F.linear
    computes). Measured once per process (a few milliseconds): an AMD EPYC ran x W^T 2-7x slower at 3-96 rows, an
    Intel Xeon (AMX) ran W x^T 2x slower (docs/performance.md); a fixed choice was wrong on one of them."""
    generator = torch.Generator().manual_seed(0)
    weight, rows = torch.randn(4096, 512, generator=generator), torch.randn(8, 512, generator=generator)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(5):
        for first in (True, False):
            start = time.perf_counter()
            torch.mm(weight, rows.t()) if first else F.linear(rows, weight)
            best[first] = min(best[first], time.perf_counter() - start)
    return best[True] < best[False]


class StackedProduct:
    """Several linear maps that read the same input as one product y = x W^T + b, W their weights (or the columns of
    them that read this input) stacked row-wise, made once in the compute dtype; `split` names each map's share of y."""

    def __init__(self, pieces: list[LinearPiece], dtype: torch.dtype, deferred: bool = True):
        """deferred: the weight is detached (its gradient comes from `DeferredWeightGradients`); else autograd's."""
        self.pieces = pieces
        self.names = [piece.name for piece in pieces]
        self.sizes = [piece.weight.shape[0] for piece in pieces]
        weight = torch.cat([piece.weight[:, piece.columns] for piece in pieces]).to(dtype)
        self.weight = weight.detach() if deferred else weight
        # decided here, outside any compiled step (the probe times products: nothing to trace)
        self.few_rows_weight_first = weight.dtype == torch.float32 and weight.is_cpu and weight_first_pays()
        biases = [p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0]) for p in pieces]
        self.bias = torch.cat(biases)  # float32, with autograd: the biases' gradients are cheap sums

    def __call__(self, inputs: torch.Tensor, gradients: DeferredWeightGradients | None = None) -> torch.Tensor:
        inputs = inputs.to(self.weight.dtype)
        if self.weight_first(inputs) and gradients is None and not torch.is_grad_enabled():
            product = torch.mm(self.weight, inputs.t()).t()  # (rows, out), W streamed once
        else:
            product = F.linear(inputs, self.weight)
        if gradients is not None:
            gradients.record(self, inputs, product)
        return product.to(self.bias.dtype) + self.bias

    def weight_first(self, inputs: torch.Tensor) -> bool:
        """Whether W x^T beats x W^T here: float32 at up to FEW_ROWS rows on a CPU where the probe says so (bfloat16's
        kernels do not need it)."""
        return self.few_rows_weight_first and inputs.dim() == 2 and inputs.shape[0] <= FEW_ROWS

    def split(self, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, outputs.split(self.sizes, dim=-1), strict=True))


class PackedProducts:
    """The decoder's per-step linear maps as stacked products, for teacher forcing (`memory_in_hidden`: the
    self-attention key/value of h_{t-1} is computed by the step that first reads it) or for generation (after the
    cell, as the reference does, so that the cache holds the memory of every state it has)."""

    def __init__(self, decoder: CaptionerDecoder, dtype: torch.dtype, memory_in_hidden: bool):
        maps = decoder.linear_maps()
        self.dropout = decoder.dropout
        self.deep_hidden = self.deep_context = self.vocabulary = None
        if not memory_in_hidden:  # generation: the deep output's products too, made once with the others
            self.deep_hidden, self.deep_context, self.vocabulary = (
                StackedProduct(maps[name], dtype) for name in ("deep_hidden", "deep_context", "vocabulary")
            )
        if memory_in_hidden and "new_state" in maps:
            maps["hidden"] = maps["hidden"] + maps.pop("new_state")
        self.dtype = dtype
        self.hidden = StackedProduct(maps["hidden"], dtype)
        # one product over all steps of teacher forcing: autograd's gradient is already one outer product
        self.embedding = StackedProduct(maps["embedding"], dtype, deferred=False)
        self.reads = StackedProduct(maps["reads"], dtype)
        self.attended, self.new_state, self.sentinel_value, self.sentinel_key = (
            StackedProduct(maps[name], dtype) if name in maps else None
            for name in ("attended", "new_state", "sentinel_value", "sentinel_key")
        )
        # the top-down decoder's: its attention cell's state and new state, and the mean region (once per caption)
        self.attention_hidden, self.state = (
            StackedProduct(maps[name], dtype) if name in maps else None for name in ("attention_hidden", "state")
        )
        self.mean_region = StackedProduct(maps["mean_region"], dtype, deferred=False) if "mean_region" in maps else None
        self._regions: tuple[torch.Tensor, torch.Tensor] | None = None

    def output(self, embedded: torch.Tensor, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """`CaptionerDecoder.output` by stacked products (generation): (R, T, E), (R, T, H), (R, T, C) -> (R, T, V)."""
        rows, steps = hidden.shape[:2]
        deep = (
            embedded.flatten(0, 1) + self.deep_hidden(hidden.flatten(0, 1)) + self.deep_context(context.flatten(0, 1))
        )
        return self.vocabulary(self.dropout(deep)).view(rows, steps, -1)

    def per_step(self) -> list[StackedProduct]:
        """The products each step makes (their weight gradients are deferred)."""
        products = (self.hidden, self.reads, self.attended, self.new_state, self.sentinel_value, self.sentinel_key)
        return [p for p in (*products, self.attention_hidden, self.state) if p is not None]

    def regions(self, regions: torch.Tensor) -> torch.Tensor:
        """The regions in the compute dtype, cast once for all the steps that read them."""
        if regions.dtype == self.dtype:
            return regions
        if self._regions is None or self._regions[0] is not regions:
            self._regions = regions, regions.to(self.dtype)
        return self._regions[1]


def cell_update(
    input_gates: torch.Tensor, hidden_gates: torch.Tensor, hidden: torch.Tensor, memory: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One LSTM (memory: its cell) or GRU (memory None) update from the gates' input and hidden products (biases
    included): the equations of `nn.LSTMCell` / `nn.GRUCell`, written out because their products are stacked with
    others. Returns the new (hidden, memory), each (B, H)."""
    if memory is not None:
        i, f, g, o = (input_gates + hidden_gates).chunk(4, dim=-1)
        memory = torch.sigmoid(f) * memory + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(memory), memory
    input_r, input_z, input_n = input_gates.chunk(3, dim=-1)
    hidden_r, hidden_z, hidden_n = hidden_gates.chunk(3, dim=-1)
    reset, update = torch.sigmoid(input_r + hidden_r), torch.sigmoid(input_z + hidden_z)
    new = torch.tanh(input_n + reset * hidden_n)
    return (1 - update) * new + update * hidden, None


def update_cell(input_gates: torch.Tensor, hidden_gates: torch.Tensor, cache: CaptionerCache) -> None:
    """`cell_update` of the cache's (language) state."""
    cache.hidden, cache.cell = cell_update(input_gates, hidden_gates, cache.hidden, cache.cell)


def packed_step(
    decoder: CaptionerDecoder,
    products: PackedProducts,
    embedded: torch.Tensor,
    regions: torch.Tensor,
    cache: CaptionerCache,
    gradients: DeferredWeightGradients | None = None,
    scratch=None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`CaptionerDecoder.step` with stacked products. `embedded` is the step's embedding product (B, [H +] G·H) (see
    `PackedProducts.embedding`), not the embedding itself; `noise` (B,) draws the regions read (hard attention)."""
    attention = decoder.cross_attention
    from_hidden = products.hidden.split(products.hidden(cache.hidden, gradients))
    from_embedding = products.embedding.split(embedded)
    query = from_hidden["query"].view(regions.shape[0], -1, from_hidden["query"].shape[-1])  # (B, n rows each, A)
    sentinel, sentinel_key = packed_sentinel(products, from_embedding, from_hidden, cache, gradients)
    cross_weights = attention.weights(query, cache.projected_regions, scratch, sentinel_key)  # (B, n, k [+ 1])
    context = torch.sigmoid(from_hidden["gate"]) * attention.read(cross_weights, regions, noise, sentinel)  # (R, C)
    reads, self_weights = packed_memory_read(
        decoder, products, context, from_embedding, from_hidden, from_hidden, cache, gradients
    )
    input_gates = from_embedding["input_gates"] + products.reads(reads, gradients)  # (R, G·H)
    update_cell(input_gates, from_hidden["hidden_gates"], cache)
    packed_new_memory(decoder, products, cache)
    return context, cross_weights.flatten(0, 1), self_weights


def packed_sentinel(
    products: PackedProducts,
    from_embedding: dict[str, torch.Tensor],
    from_state: dict[str, torch.Tensor],
    cache: CaptionerCache,
    gradients: DeferredWeightGradients | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The visual sentinel (R, C) and its key (R, A), from the language memory before this step, its gate reading
    [embedding, the querying state]; (None, None) without one."""
    if products.sentinel_value is None:
        return None, None
    gate = torch.sigmoid(from_embedding["sentinel_gate"] + from_state["sentinel_gate"])  # (R, H)
    cell_memory = cache.cell if cache.cell is not None else cache.hidden  # (R, H)
    sentinel = products.sentinel_value(gate * torch.tanh(cell_memory), gradients)  # (R, C)
    return sentinel, products.sentinel_key(sentinel, gradients)


def packed_memory_read(
    decoder: CaptionerDecoder,
    products: PackedProducts,
    context: torch.Tensor,
    from_embedding: dict[str, torch.Tensor],
    from_hidden: dict[str, torch.Tensor],
    from_state: dict[str, torch.Tensor],
    cache: CaptionerCache,
    gradients: DeferredWeightGradients | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the cell reads besides its word: the context, and with self-attention what the query [embedding, the
    querying state] reads from the memory of earlier language states (in teacher forcing the memory of h_{t-1}
    comes from this step's product of it). Returns (reads (R, C [+ H]), self-attention weights or None)."""
    memory = decoder.self_attention
    if memory is None:
        return context, None
    if "key_value" in from_hidden:
        key, value = memory.split_memory(from_hidden["key_value"])
        cache.keys = key if cache.keys is None else torch.cat([cache.keys, key], dim=2)
        cache.values = value if cache.values is None else torch.cat([cache.values, value], dim=2)
    memory_query = from_embedding["memory_query"] + from_state["memory_query"]  # (R, H)
    attended, self_weights = memory.attend(memory_query, cache.keys, cache.values)
    return torch.cat([context, products.attended(attended, gradients)], dim=-1), self_weights


def packed_new_memory(decoder: CaptionerDecoder, products: PackedProducts, cache: CaptionerCache) -> None:
    """The step's end: in generation the memory of h_t, as the reference step makes it; one more token seen."""
    if products.new_state is not None:
        key, value = decoder.self_attention.split_memory(products.new_state(cache.hidden))
        cache.keys = torch.cat([cache.keys, key], dim=2)  # (R, heads, M + 1, d)
        cache.values = torch.cat([cache.values, value], dim=2)
    cache.seen_tokens += 1


def packed_top_down_step(
    decoder: CaptionerDecoder,
    products: PackedProducts,
    embedded: torch.Tensor,
    regions: torch.Tensor,
    cache: CaptionerCache,
    gradients: DeferredWeightGradients | None = None,
    scratch=None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`TopDownDecoder.step` with stacked products (the arguments as `packed_step`'s): the attention cell from the
    language state, the mean region (its product made once, kept in the cache) and the word; its new state queries
    the regions and, with the context (and the self-attended earlier language states), drives the language cell."""
    attention = decoder.cross_attention
    from_hidden = products.hidden.split(products.hidden(cache.hidden, gradients))
    from_embedding = products.embedding.split(embedded)
    if cache.mean_region_gates is None:
        rows_per_image = cache.hidden.shape[0] // regions.shape[0]
        mean_gates = products.mean_region(regions.mean(dim=1))  # (B, G·H)
        cache.mean_region_gates = mean_gates.repeat_interleave(rows_per_image, dim=0)  # (R, G·H)
    attention_gates = from_embedding["attention_gates"] + from_hidden["attention_gates"] + cache.mean_region_gates
    cache.attention_hidden, cache.attention_cell = cell_update(
        attention_gates,
        products.attention_hidden(cache.attention_hidden, gradients),
        cache.attention_hidden,
        cache.attention_cell,
    )
    from_state = products.state.split(products.state(cache.attention_hidden, gradients))
    query = from_state["query"].view(regions.shape[0], -1, from_state["query"].shape[-1])  # (B, n rows each, A)
    sentinel, sentinel_key = packed_sentinel(products, from_embedding, from_state, cache, gradients)
    cross_weights = attention.weights(query, cache.projected_regions, scratch, sentinel_key)  # (B, n, k [+ 1])
    context = torch.sigmoid(from_state["gate"]) * attention.read(cross_weights, regions, noise, sentinel)  # (R, C)
    reads, self_weights = packed_memory_read(
        decoder, products, context, from_embedding, from_hidden, from_state, cache, gradients
    )
    update_cell(from_state["input_gates"] + products.reads(reads, gradients), from_hidden["hidden_gates"], cache)
    packed_new_memory(decoder, products, cache)
    return context, cross_weights.flatten(0, 1), self_weights


PACKED_STEPS: dict[str, Callable] = {"CaptionerDecoder": packed_step, "TopDownDecoder": packed_top_down_step}


def packed_step_of(decoder: CaptionerDecoder) -> Callable | None:
    """The decoder's packed step, or None when its class has none (it runs its reference steps)."""
    return PACKED_STEPS.get(type(decoder).__qualname__)


class DeferredWeightGradients:
    """Weight gradients of the per-step stacked products of teacher forcing, each summed in one matrix product.

    Autograd would add an (out x in) outer product into each weight's gradient at every step: at a few dozen rows per
    step that is memory-bound and was most of the training step's backward. Here each step multiplies by a detached
    weight, keeps its input, and a hook keeps the gradient of its output; `attach` puts a node before the loop whose
    backward (it runs last: every step depends on the state it passes on) returns grad_W = sum_t G_t^T X_t, split
    back onto the layers' parameters, so optimisers, DDP and gradient accumulation see an ordinary gradient.
    """

    def __init__(self, products: list[StackedProduct]):
        self.products = products
        self.inputs: dict[int, list[torch.Tensor]] = {id(p): [] for p in products}
        self.output_grads: dict[int, dict[int, torch.Tensor]] = {id(p): {} for p in products}
        params = {id(piece.weight): piece.weight for p in products for piece in p.pieces if piece.weight.requires_grad}
        self.parameters = list(params.values())

    def attach(self, state: torch.Tensor) -> torch.Tensor:
        """`state` (the recurrence's initial state) passed through the node that will receive the weight gradients."""
        return _WeightGradientSink.apply(self, state, *self.parameters)

    def record(self, product: StackedProduct, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        kept, grads = self.inputs[id(product)], self.output_grads[id(product)]
        position = len(kept)
        kept.append(inputs.detach())
        outputs.register_hook(lambda grad: grads.__setitem__(position, grad))

    def weight_gradients(self) -> list[torch.Tensor | None]:
        if self.products and not self.inputs:  # freed by the first backward, which is why there is only one
            raise RuntimeError(
                "The packed decoder's weight gradients are taken once per forward (its step inputs are freed by the "
                "first backward): a second backward through the same graph (retain_graph=True) needs "
                "decoder_implementation='reference'"
            )
        gradients: dict[int, torch.Tensor] = {}
        for product in self.products:
            grads = self.output_grads[id(product)]
            positions = sorted(grads)  # steps whose output reached the loss
            if not positions:
                continue
            # in float32 (the master weights' dtype) even when the steps ran in bf16
            output_grad = torch.cat([grads[i] for i in positions]).float()  # (sum of rows, out)
            inputs = torch.cat([self.inputs[id(product)][i] for i in positions]).float()  # (sum of rows, in)
            full = output_grad.transpose(0, 1) @ inputs  # (out, in)
            for piece, block in zip(product.pieces, full.split(product.sizes), strict=True):
                if piece.weight.requires_grad:
                    gradient = gradients.setdefault(id(piece.weight), torch.zeros_like(piece.weight))
                    gradient[:, piece.columns] += block
        self.inputs.clear()
        self.output_grads.clear()
        return [gradients.get(id(weight)) for weight in self.parameters]


class _WeightGradientSink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, collector: DeferredWeightGradients, state: torch.Tensor, *weights: torch.Tensor):
        ctx.collector = collector
        return state.view_as(state)

    @staticmethod
    def backward(ctx, state_grad: torch.Tensor):
        return None, state_grad, *ctx.collector.weight_gradients()


def packed_decoding(
    decoder: CaptionerDecoder,
    input_ids: torch.LongTensor,
    regions: torch.Tensor,
    cache: CaptionerCache | None,
    lengths: torch.LongTensor | None = None,
    noise: torch.Tensor | None = None,
    keep_cache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, CaptionerCache | None]:
    """The "packed" runner (see `modeling_captioner.DECODER_RUNNERS` for the arguments): length-packed teacher forcing
    of whole captions, one per image, when no cache goes in or out; stacked-product steps for inference from a cache;
    the reference steps otherwise (a gradient through cached steps: the generation products' weights are detached)."""
    step = packed_step_of(decoder)
    if step is not None and cache is None and not keep_cache and input_ids.shape[0] == regions.shape[0]:
        return (*packed_teacher_forcing(decoder, step, input_ids, regions, lengths, noise), None)
    cache = cache if cache is not None else decoder.start(regions, input_ids.shape[0] // regions.shape[0])
    if step is None or torch.is_grad_enabled():
        return (*decoder(input_ids, regions, cache, noise), cache)
    return (*packed_generation(decoder, step, input_ids, regions, cache, noise), cache)


def packed_generation(
    decoder: CaptionerDecoder,
    step: Callable,
    input_ids: torch.LongTensor,
    regions: torch.Tensor,
    cache: CaptionerCache,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Steps of inference from `cache` by `step` over stacked products, made once per `generate()` call (they ride
    in the cache) and recast only when autocast changes the compute dtype."""
    dtype = compute_dtype(regions)
    if cache.products is None or cache.products.dtype != dtype:
        # made anew for every generate() call: a cache across calls would need to know when the weights change, and
        # fused optimizers update them in place without moving their version counters
        cache.products = PackedProducts(decoder, dtype, memory_in_hidden=False)
    products, step = cache.products, decoder.compiled(step)

    def stacked_step(embedded, regions, cache, noise):
        step_regions = products.regions(regions)
        return step(
            decoder, products, products.embedding(embedded), step_regions, cache, scratch=cache.scratch, noise=noise
        )

    return decoder(input_ids, regions, cache, noise, step=stacked_step, output=products.output)


def packed_teacher_forcing(
    decoder: CaptionerDecoder,
    step: Callable,
    input_ids: torch.LongTensor,
    regions: torch.Tensor,
    lengths: torch.LongTensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Teacher forcing of whole captions (B, T) from a fresh start, one caption per image. With `lengths` (B,), the
    number of real target tokens per caption, steps past a caption's end are skipped: their outputs are zeros.
    `noise` (B, T) draws the regions read (hard attention); `step` is the decoder's packed step. Returns what
    `CaptionerDecoder.forward` returns (logits, cross-attention, self-attention)."""
    batch, length = input_ids.shape
    embedded = decoder.embed_tokens(input_ids)  # (B, T, E)
    cache = decoder.start(regions)
    if decoder.self_attention is not None:
        cache.keys = cache.values = None  # each step adds the memory of the state it starts from
    order = active = None
    if lengths is not None and int(lengths.max()) > 0:
        order = lengths.argsort(descending=True, stable=True)  # (B,)
        active = (lengths[order][None, :] > torch.arange(length, device=lengths.device)[:, None]).sum(1).tolist()
        if torch.equal(order, torch.arange(batch, device=order.device)):
            order = None  # already longest first (as CaptionCollator batches them): nothing to move
        else:
            cache.reorder_cache(order)
            regions = regions.index_select(0, order)  # (B, k, C)
            noise = noise.index_select(0, order) if noise is not None else None  # (B, T)
    dtype = compute_dtype(regions)
    products = PackedProducts(decoder, dtype, memory_in_hidden=True)
    steps_embedded = embedded if order is None else embedded.index_select(0, order)  # (B, T, E)
    steps_input = products.embedding(steps_embedded)  # (B, T, [H +] G·H): the embedding's share, all steps at once
    step_regions = products.regions(regions)  # cast once, not by autocast at every step
    gradients = None
    if torch.is_grad_enabled():
        gradients = DeferredWeightGradients(products.per_step())
        if gradients.parameters:
            cache.hidden = gradients.attach(cache.hidden)
        else:
            gradients = None
    hiddens, contexts, cross_weights, self_weights = [], [], [], []
    for t in range(length):
        rows = batch if active is None else active[t]
        if rows == 0:
            break  # every caption has ended: the remaining steps are padding
        if rows < cache.hidden.shape[0]:
            keep_first_rows(cache, rows)  # captions that have ended drop out of the batch for good
        step_noise = None if noise is None else noise[:rows, t]
        context, cross, self_w = step(
            decoder, products, steps_input[:rows, t], step_regions[:rows], cache, gradients, noise=step_noise
        )
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
    real = None if lengths is None else torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]
    return decoder.output(embedded, hidden, context, real), cross, self_attention


def keep_first_rows(cache: CaptionerCache, rows: int) -> None:
    """Drop all but the first `rows` rows of the state (captions that ended, in length order)."""
    for name in (*cache.STATES, "projected_regions", "regions"):
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
