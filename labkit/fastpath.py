"""Notebook 03's topic: the encoder fastpath of ``torch.nn.TransformerEncoder``, a converter that puts BERT-family
encoders on it, and today's other ways to skip padding.

In eval mode, without gradient tracking and with a key padding mask, ``nn.TransformerEncoder`` packs the batch into a
nested tensor (padding dropped) and runs each layer as one fused op, ``aten::_transformer_encoder_layer_fwd``. This
is what optimum's BetterTransformer did for encoders; :func:`to_fastpath` rebuilds it for today's stack.
:func:`why_not_fastpath` and :func:`why_not_fused` name the condition that turns each shortcut off, in the order
torch 2.11-2.13 (``torch/nn/modules/transformer.py``) checks them. The notebook's cells hold the experiments (the
loops, the timed calls, the formulas, the conclusions); this module holds what is too long for a cell.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from labkit import compat, models, probes, timing
from labkit.errors import BadParameter, LabkitError, check_sizes
from labkit.results import metric_name

FASTPATH_OPS = ("aten::_transformer_encoder_layer_fwd", "aten::_nested_tensor_from_mask")
SUPPORTED_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}  # relative error, and similarities
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "xpu")  # the fastpath's own list (plus a privateuse1 backend)
# the sweep's implementations (labkit.report reads "transformers sdpa" and "fastpath" from the sweep table)
IMPLEMENTATIONS = ("transformers eager", "transformers sdpa", "fastpath")
QUICK_IMPLEMENTATIONS = IMPLEMENTATIONS[1:]  # a quick run compares the two that matter
# today's ways to skip padding (section 5), the padded batch they are compared with first
WAYS = ("padded sdpa", "packed sdpa block mask", "packed varlen", "packed flex document mask")
# the sizes of a full run on a GPU (the reference runs' sizes)
GPU_SIZES = {"batch_sizes": [16, 64, 128], "lengths": [128, 256, 512]}


def speedup_metric(batch: int, length: int, padding: float) -> str:
    """The headline metric of one sweep point (transformers sdpa's median time over the fastpath's), named as the
    reference runs name it: ``speedup_fastpath_vs_sdpa_b128_n512_pad75``."""
    return metric_name("speedup_fastpath_vs_sdpa", f"b{batch}", f"n{length}", f"pad{round(100 * padding)}")


def padding_free_metric(way: str, batch: int, length: int, padding: float) -> str:
    """The headline metric of one padding-free way: the padded batch's median time over the way's."""
    return metric_name("padding_free_speedup", way, f"b{batch}", f"n{length}", f"pad{round(100 * padding)}")


class UnsupportedModel(LabkitError, ValueError):
    """A model (or an option of it) that the fastpath converter cannot carry over exactly."""


# --------------------------------------------------------------------------- the notebook's parameters

@dataclass
class Parameters:
    """Notebook 03's parameters cell (the same names and defaults); :meth:`resolve` checks and sizes them."""

    dtype: Any = "auto"
    model_id: str = "minilm-l6"
    sweep_model: str = "auto"
    padding_fractions: list = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    batch_sizes: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    model_problem: str = field(init=False, default="")  # why model_id cannot load here ('' when it can)
    sweep_problem: str = field(init=False, default="")
    repeats: int = field(init=False, default=5)
    tolerance: float = field(init=False, default=1e-4)  # relative error allowed in this dtype
    implementations: tuple = field(init=False, default=IMPLEMENTATIONS)

    def resolve(self, *, device: str, quick: bool) -> str:
        fractions = self.padding_fractions if isinstance(self.padding_fractions, (list, tuple)) else None
        if not fractions or any(isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1
                                for p in fractions):
            raise BadParameter(f"padding_fractions={self.padding_fractions!r}: give fractions in [0, 1), "
                               "for example [0.0, 0.5, 0.75].")
        for label in ("batch_sizes", "lengths"):
            sizes = getattr(self, label)
            if not isinstance(sizes, (list, tuple)):
                raise BadParameter(f"{label}={sizes!r}: give a list of whole numbers, or [] for this device's sizes.")
            check_sizes(1, **{f"{label}[{i}]": size for i, size in enumerate(sizes)})
        if self.batch_sizes and min(self.batch_sizes) < 2 and max(fractions) > 0:
            raise BadParameter(f"batch_sizes={list(self.batch_sizes)!r}: padding needs a batch of 2 or more "
                               "(one sequence of each batch is the longest).")
        on_gpu = device.startswith("cuda")
        self.dtype = probes.resolve_dtype("float16" if self.dtype == "auto" and on_gpu else self.dtype, device)
        probes.check_dtype(device, self.dtype)
        if self.sweep_model == "auto":
            self.sweep_model = "random-bert-base" if on_gpu else "minilm-l6"
        if on_gpu:
            sizes = {k: v[:2] for k, v in GPU_SIZES.items()} if quick else GPU_SIZES
        else:
            sizes = {"batch_sizes": [8] if quick else [4, 8], "lengths": [128]}
        self.batch_sizes = sorted(set(self.batch_sizes or sizes["batch_sizes"]))
        self.lengths = sorted(set(self.lengths or sizes["lengths"]))
        self.padding_fractions = sorted(set(fractions))
        self.model_problem = models.check_model(self.model_id) or ""  # a wrong name stops here
        self.sweep_problem = models.check_model(self.sweep_model) or ""
        self.repeats = 3 if quick else 5
        self.tolerance = TOLERANCE[str(self.dtype).removeprefix("torch.")]
        self.implementations = QUICK_IMPLEMENTATIONS if quick else IMPLEMENTATIONS
        return (f"Sweep on {self.sweep_model}: batches {self.batch_sizes}, lengths {self.lengths}, "
                f"padding {self.padding_fractions}.")


# --------------------------------------------------------------------------- the conditions, in torch's order

# What both of torch's checks read from a layer's build, as (test, what the layer was built with when the test is
# true). The encoder's check when it is built and the layer's check at each forward read them in different orders.
_LAYER_BUILD = {
    "batch_first": (lambda layer: not layer.self_attn.batch_first, lambda layer: "batch_first=False"),
    "kdim": (lambda layer: layer.self_attn.kdim != layer.self_attn.embed_dim
             or layer.self_attn.vdim != layer.self_attn.embed_dim, lambda layer: "kdim/vdim different from d_model"),
    "bias": (lambda layer: layer.self_attn.in_proj_bias is None, lambda layer: "bias=False"),
    "activation": (lambda layer: not layer.activation_relu_or_gelu,
                   lambda layer: "an activation other than relu or gelu"),
    "eps": (lambda layer: layer.norm1.eps != layer.norm2.eps, lambda layer: "two layer norms of different eps"),
    "heads": (lambda layer: layer.self_attn.num_heads % 2,
              lambda layer: f"an odd number of heads ({layer.self_attn.num_heads})"),
}


def _built_with(layer: nn.Module, order: tuple[str, ...]) -> str:
    """What ``layer`` was built with that fails the first of ``order``'s conditions ('' when none fails)."""
    for key in order:
        test, says = _LAYER_BUILD[key]
        if test(layer):
            return says(layer)
    return ""


def _unsupported_layer(layer: nn.Module) -> str:
    """Why PyTorch's encoder turns its nested-tensor path off for ``layer`` when it is built ('' when it does not)."""
    if not isinstance(layer, nn.TransformerEncoderLayer):
        return "its layers are not nn.TransformerEncoderLayer"
    if layer.norm_first:
        return "its layers are pre-norm (norm_first=True)"
    built = _built_with(layer, ("batch_first", "kdim", "bias", "activation", "eps", "heads"))
    return f"its layers were built with {built}" if built else ""


def _weights(layer: nn.Module) -> list[torch.Tensor]:
    attn = layer.self_attn
    return [attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias, layer.norm1.weight,
            layer.norm1.bias, layer.norm2.weight, layer.norm2.bias, layer.linear1.weight, layer.linear1.bias,
            layer.linear2.weight, layer.linear2.bias]


def _device_and_grad(tensors: list[torch.Tensor | None]) -> str:
    present = [t for t in tensors if t is not None]
    other = sorted({t.device.type for t in present} - set(SUPPORTED_DEVICE_TYPES))
    if other:
        return (f"a weight or the input is on the {other[0]} device "
                f"(the fastpath runs on {', '.join(SUPPORTED_DEVICE_TYPES)})")
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return ("gradients are tracked and a weight requires grad (torch.no_grad(), torch.inference_mode() or "
                "requires_grad_(False) avoid it)")
    return ""


def why_not_fastpath(encoder, src, src_key_padding_mask=None, mask=None) -> str:
    """Why ``encoder(src, src_key_padding_mask=...)`` would NOT pack the batch into a nested tensor and skip the
    padding ('' when it would): ``nn.TransformerEncoder.forward``'s conditions, in its order, in plainer words.

    Whether each layer also runs as one fused op is :func:`why_not_fused`'s question (a hook, say, stops the fused
    layer but not the packing). The profiler tells what ran: :func:`fastpath_ran`, :func:`padding_skipped`.
    """
    original = compat.compiled_original(encoder)
    module = original if original is not None else encoder
    layer = module.layers[0]
    if not torch.backends.mha.get_fastpath_enabled():
        return "torch.backends.mha.get_fastpath_enabled() is False"
    if not getattr(module, "use_nested_tensor", False):
        built = _unsupported_layer(layer)
        built = built or "enable_nested_tensor=False"
        return f"the encoder turned its nested-tensor path off when it was built: {built}"
    if layer.training:
        return "the model is in training mode (call model.eval())"
    if src.dim() != 3:
        return f"the input is not batched: it has {src.dim()} dimensions, not 3"
    if src_key_padding_mask is None:
        return "no key padding mask was given, so there is no padding to skip"
    if getattr(module, "mask_check", True) and (original is not None or torch.compiler.is_compiling()):
        return ("it runs under torch.compile, which skips the packing (PyTorch cannot check where the padding is "
                "while compiling)")
    if getattr(module, "mask_check", True) and not compat.padding_is_right_aligned(src, src_key_padding_mask):
        return "the padding is not on the right (the fastpath needs each sequence's tokens first, then padding)"
    if src.is_nested:
        return "the input is already a nested tensor"
    if mask is not None:
        return "an attention mask was given beside the key padding mask"
    if torch.is_autocast_enabled():
        return "autocast is enabled"
    return _device_and_grad([src, *_weights(layer)])


def _why_layer_not_fused(layer: nn.Module, src) -> str:
    """``nn.TransformerEncoderLayer.forward``'s conditions for its fused op, in its order ('' when they hold)."""
    if not isinstance(layer, nn.TransformerEncoderLayer):
        return "it is not an nn.TransformerEncoderLayer"
    if not torch.backends.mha.get_fastpath_enabled():
        return "torch.backends.mha.get_fastpath_enabled() is False"
    if src.dim() != 3:
        return f"the input has {src.dim()} dimensions, not 3"
    if layer.training:
        return "the model is in training mode (call model.eval())"
    built = _built_with(layer, ("batch_first", "bias", "kdim", "activation", "eps", "heads"))
    if built:
        return f"it was built with {built}"
    if torch.is_autocast_enabled():
        return "autocast is enabled"
    if compat.has_forward_hooks(layer):
        return "a forward hook or pre-hook is registered on it or inside it (register_forward_hook)"
    return _device_and_grad([src, *_weights(layer)])


def why_not_fused(encoder, src, src_key_padding_mask=None) -> str:
    """Why some layer of ``encoder`` would NOT run as one fused op ('' when every layer would): each layer's
    reason, with the layers it applies to ("layer 0: a forward hook ...")."""
    original = compat.compiled_original(encoder)
    module = original if original is not None else encoder
    reasons: dict[str, list[int]] = {}
    for i, layer in enumerate(module.layers):
        reason = _why_layer_not_fused(layer, src)
        if reason:
            reasons.setdefault(reason, []).append(i)
    return "; ".join(f"layer{'s' * (len(ids) > 1)} {', '.join(map(str, ids))}: {reason}"
                     for reason, ids in reasons.items())


def fastpath_ran(ops) -> bool:
    """True when the profiler recorded the fused encoder-layer op (each layer in one op)."""
    return any(op.startswith(FASTPATH_OPS[0]) for op in ops)


def padding_skipped(ops) -> bool:
    """True when the profiler recorded the batch being packed into a nested tensor (padding dropped)."""
    return FASTPATH_OPS[1] in ops  # exactly: the left-alignment check is another op with a longer name


# --------------------------------------------------------------------------- section 1: situations

@dataclass
class Situation:
    """One way of calling an encoder: the module, its padding mask, the mode and the gradient state."""

    name: str
    encoder: nn.Module
    src: torch.Tensor
    mask: torch.Tensor | None
    training: bool = False
    grad: bool = False
    warned: str = ""  # what PyTorch warned when this encoder was built

    def __str__(self) -> str:
        return self.name

    @contextlib.contextmanager
    def _state(self):
        self.encoder.train(self.training)
        try:
            with torch.enable_grad() if self.grad else torch.no_grad():
                yield
        finally:
            self.encoder.eval()

    def __call__(self):
        with self._state():
            return self.encoder(self.src, src_key_padding_mask=self.mask)

    def reasons(self) -> tuple[str, str]:
        """labkit's reasons, in this situation's mode: (why the padding is not skipped, why a layer is not fused)."""
        with self._state():
            return why_not_fastpath(self.encoder, self.src, self.mask), why_not_fused(self.encoder, self.src, self.mask)


def rebuilt(encoder: nn.TransformerEncoder, **changes: Any) -> tuple[nn.TransformerEncoder, str]:
    """An encoder of the same sizes as ``encoder`` built with ``changes`` (norm_first=True, bias=False), and the
    warning PyTorch gave while building it."""
    layer = encoder.layers[0]
    parameter = next(encoder.parameters())
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        built = nn.TransformerEncoderLayer(layer.self_attn.embed_dim, layer.self_attn.num_heads,
                                           dim_feedforward=layer.linear1.out_features, dropout=0.0, batch_first=True,
                                           **changes)
        variant = nn.TransformerEncoder(built, num_layers=len(encoder.layers), enable_nested_tensor=True)
    warned = next((str(w.message).partition(" because ")[2] for w in said if "use_nested_tensor" in str(w.message)),
                  "")
    return variant.to(parameter.device, parameter.dtype).eval(), warned


def situation_reasons(cases: dict[str, Situation]) -> dict[str, dict[str, str]]:
    """What exercise 03.1 is given: each situation's reason not to skip the padding, and not to fuse a layer."""
    reasons = {name: case.reasons() for name, case in cases.items()}
    return {"cases": {name: why[0] for name, why in reasons.items()},
            "unfused": {name: why[1] for name, why in reasons.items()}}


def what_ran(call: Callable[[], Any], device: str) -> dict[str, Any]:
    """Run ``call`` once under the profiler: whether the batch was packed (padding skipped) and how many layers ran
    as the fused op."""
    seen = timing.ops_that_ran(call, device)
    return {"padding skipped": padding_skipped(seen.ops), "fused layers": seen.counts.get(FASTPATH_OPS[0], 0)}


# --------------------------------------------------------------------------- section 2: the converter

def _check_supported(model) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModel(f"to_fastpath supports BERT-family encoders ({', '.join(SUPPORTED_TYPES)}); "
                               f"this model's type is {model_type!r}.")
    problems = []
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        problems.append("it is configured as a decoder (is_decoder/add_cross_attention)")
    position = getattr(config, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        problems.append(f"position_embedding_type={position!r} (only 'absolute' is carried over)")
    if getattr(config, "hidden_act", None) not in ACTIVATIONS:
        problems.append(f"hidden_act={getattr(config, 'hidden_act', None)!r} (the fastpath runs gelu or relu)")
    embedding_size = getattr(config, "embedding_size", None)
    if embedding_size not in (None, config.hidden_size):
        problems.append(f"embedding_size={embedding_size} differs from hidden_size={config.hidden_size} "
                        "(the projection between them is not carried over)")
    if config.num_attention_heads % 2:
        problems.append(f"num_attention_heads={config.num_attention_heads} is odd (the fastpath needs an even count)")
    base = getattr(model, "base_model", model)
    if not hasattr(base, "embeddings") or not hasattr(getattr(base, "encoder", None), "layer"):
        problems.append("it has no embeddings + encoder.layer structure")
    if problems:
        raise UnsupportedModel(f"to_fastpath cannot convert this {model_type} model: " + "; ".join(problems) + ".")


def convert_layer(hf_layer, config):
    """One BERT-family layer as an nn.TransformerEncoderLayer with the same weights (post-norm, batch first)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    attention = hf_layer.attention
    layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=config.intermediate_size, dropout=0.0,
                                       activation=ACTIVATIONS[config.hidden_act], layer_norm_eps=config.layer_norm_eps,
                                       batch_first=True, norm_first=False)
    with torch.no_grad():
        q, k, v = attention.self.query, attention.self.key, attention.self.value
        layer.self_attn.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        layer.self_attn.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        layer.self_attn.out_proj.weight.copy_(attention.output.dense.weight)
        layer.self_attn.out_proj.bias.copy_(attention.output.dense.bias)
        layer.norm1.load_state_dict(attention.output.LayerNorm.state_dict())
        layer.linear1.load_state_dict(hf_layer.intermediate.dense.state_dict())
        layer.linear2.load_state_dict(hf_layer.output.dense.state_dict())
        layer.norm2.load_state_dict(hf_layer.output.LayerNorm.state_dict())
    return layer


class FastpathEncoder(nn.Module):
    """A BERT-family encoder whose layers run on ``nn.TransformerEncoderLayer``'s fastpath.

    ``forward(input_ids, attention_mask, token_type_ids=None)`` returns an object with ``last_hidden_state`` like the
    transformers model; padded positions are exactly zero when the nested-tensor path ran.
    """

    def __init__(self, embeddings, layers, source: str):
        super().__init__()
        self.embeddings = embeddings
        self.encoder = nn.TransformerEncoder(layers[0], num_layers=len(layers), enable_nested_tensor=True)
        self.encoder.layers = nn.ModuleList(layers)  # the converted layers, not copies of the first
        self.source = source

    def _hidden(self, input_ids, token_type_ids):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        padding = None if attention_mask is None else attention_mask == 0
        output = self.encoder(self._hidden(input_ids, token_type_ids), src_key_padding_mask=padding)
        return SimpleNamespace(last_hidden_state=output)

    def why_not(self, input_ids, attention_mask=None, token_type_ids=None) -> str:
        """Why a call with these inputs, in the current mode and grad state, would not skip the padding."""
        padding = None if attention_mask is None else attention_mask == 0
        return why_not_fastpath(self.encoder, self._hidden(input_ids, token_type_ids), padding)


def to_fastpath(model) -> FastpathEncoder:
    """A copy of a transformers BERT-family encoder whose layers run on the ``nn.TransformerEncoderLayer``
    fastpath, with the original weights copied in (same dtype and device, eval mode).

    Raises :class:`UnsupportedModel`, naming what is unsupported, for other architectures or options.
    """
    _check_supported(model)
    base = getattr(model, "base_model", model)
    config = model.config
    parameter = next(model.parameters())
    layers = [convert_layer(hf_layer, config).to(device=parameter.device, dtype=parameter.dtype)
              for hf_layer in base.encoder.layer]
    embeddings = copy.deepcopy(base.embeddings)
    converted = FastpathEncoder(embeddings, layers, source=f"{config.model_type}, {len(layers)} layers")
    return converted.to(device=parameter.device, dtype=parameter.dtype).eval()




# --------------------------------------------------------------------------- section 4: the sweep

def padded_batch(tokenizer, *, batch: int, length: int, padding_fraction: float, seed: int = 0,
                 device: str = "cpu") -> dict[str, Any]:
    """Random token ids (batch, length), right-padded as a tokenizer pads a batch to its longest sequence: one
    sequence fills ``length``, the others' lengths are spread evenly so that about ``padding_fraction`` of all
    positions are padding. Returns input_ids, attention_mask and the padding fraction actually made."""
    check_sizes(1, batch=batch, length=length)
    if not 0 <= padding_fraction < 1:
        raise BadParameter(f"padding_fraction={padding_fraction}: use a fraction in [0, 1).")
    if padding_fraction > 0 and batch < 2:
        raise BadParameter(f"padding_fraction={padding_fraction} needs a batch of 2 or more "
                           "(one sequence is the longest).")
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.full((batch,), length)
    if padding_fraction > 0:
        others = batch - 1
        target = min(max(round(batch * length * (1 - padding_fraction)) - length, others), others * length)
        mean_other = target / others
        half = min(mean_other - 1, length - mean_other)
        spread = torch.linspace(mean_other - half, mean_other + half, others) if others > 1 \
            else torch.tensor([mean_other])
        spread = spread.round().long().clamp(1, length)
        for i in range(abs(int(target - spread.sum()))):  # make the total exact, one token at a time
            step = 1 if target > spread.sum() else -1
            candidates = [j for j in range(others) if 1 <= int(spread[j]) + step <= length]
            spread[candidates[i % len(candidates)]] += step
        lengths = torch.cat([torch.tensor([length]), spread])[torch.randperm(batch, generator=generator)]
    ids = torch.randint(1000, len(tokenizer), (batch, length), generator=generator)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    made = 1 - float(mask.sum()) / mask.numel()
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "padding_fraction": made}




def forward(model, batch: dict[str, Any], implementation: str = "") -> Callable[[], Any]:
    """The call to time: one forward pass of ``model`` (a transformers model, or the converted
    :class:`FastpathEncoder`) on a padded ``batch``, without gradients. ``implementation`` ("transformers sdpa",
    "transformers eager") sets a transformers model's attention first, untimed."""
    ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if implementation.startswith("transformers "):
        model.set_attn_implementation(implementation.removeprefix("transformers "))

    def call():
        with torch.inference_mode():
            if isinstance(model, FastpathEncoder):
                return model(ids, attention_mask)
            return model(input_ids=ids, attention_mask=attention_mask)
    return call


def timed(call: Callable[[], Any], device: str, repeats: int) -> dict[str, Any]:
    """``call`` timed by the workbook's rule: ``{"status": "ok", "median_ms", "p10_ms", "p90_ms"}``, or the status
    and reason of an out-of-memory or a kernel failure (a row, not a crash)."""
    outcome = timing.attempt(lambda: timing.measure(call, device=device, warmup=1, repeats=repeats), device)
    if outcome["status"] != "ok":
        return {"status": outcome["status"], "reason": outcome["reason"]}
    t = outcome["value"]
    return {"status": "ok", "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms}


def recheck(rows: list[dict[str, Any]], remeasure: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """The timing rule's trend recheck (:func:`labkit.timing.recheck_trend`) for each (implementation, batch, length)
    series, work = real tokens: the fastpath's time must not rise as padding grows (less work). A padded model's
    time must stay flat, so its series is also checked the other way (time falling as the padding grows). A padded
    model's point without padding is left out: transformers then passes no mask at all, so SDPA may run another
    kernel. Every row gets ``noisy`` (True where a re-measured point stayed against the trend)."""
    rows = [{**r, "noisy": False, "padding_tokens": r["batch"] * r["length"] - r["real_tokens"]} for r in rows]
    series: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        if r.get("status") == "ok" and (r["implementation"] == "fastpath" or r["padding"] > 0):
            series.setdefault((r["implementation"], r["batch"], r["length"]), []).append(i)
    for (implementation, _, _), indices in series.items():
        points = [rows[i] for i in indices]
        if implementation == "fastpath":
            points = timing.recheck_trend(points, work="real_tokens", remeasure=remeasure)
        else:
            points = _recheck_flat(points, remeasure)
        for i, point in zip(indices, points, strict=True):
            rows[i] = point
    return rows


def _recheck_flat(points: list[dict[str, Any]], remeasure: Callable[[dict[str, Any]], dict[str, Any]]):
    """:func:`labkit.timing.recheck_trend` for a series whose time must not change with the padding: the points
    against the trend either way (time rising with the padding, or falling) are measured again once; those still
    against it get ``noisy=True``."""
    def against() -> set[int]:
        return {*timing.against_the_trend(points, work="real_tokens"),
                *timing.against_the_trend(points, work="padding_tokens")}

    for i in sorted(against()):
        points[i] = {**points[i], **remeasure(points[i]), "remeasured": True}
    still = against()
    return [{**point, "noisy": i in still} for i, point in enumerate(points)]


def encoder_flops(config, *, tokens: int, pairs: int) -> dict[str, int]:
    """Forward FLOPs of a BERT-family encoder's layers over ``tokens`` tokens whose sequences hold ``pairs`` (query,
    key) pairs in all: 2 per weight per token in the linear layers (query, key, value and output projections, the
    two feed-forward layers), and 4 x hidden per pair in attention (Q.K and P.V), in every layer. The embeddings
    are look-ups, not arithmetic."""
    h, layers = config.hidden_size, config.num_hidden_layers
    weights = 4 * h * h + 2 * h * config.intermediate_size  # one layer's linear weights
    return {"linear": 2 * weights * layers * tokens, "attention": 4 * h * layers * pairs}




# --------------------------------------------------------------------------- section 5: skipping padding today

MAX_DENSE_MASK = 2**26  # elements of a (T, T) boolean mask a packed batch may build: 64 MiB
# ways whose kernel is compiled for each shape: measured at the most padding only (a second shape compiles again)
COMPILED_WAYS = ("packed flex document mask",)


def pack(batch: dict[str, Any]) -> dict[str, Any]:
    """The real tokens of a padded batch packed into one row, as transformers' ``DataCollatorWithFlattening``
    packs them: ``input_ids`` and ``position_ids`` (restarting at 0 for each sequence) of shape (1, T), and the
    sequence boundaries FlashAttention's varlen kernels read (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``)."""
    from transformers import DataCollatorWithFlattening

    device = batch["input_ids"].device
    pairs = zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), strict=True)
    sequences = [ids[m.bool()].tolist() for ids, m in pairs]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(
        [{"input_ids": s} for s in sequences])
    packed.pop("labels", None)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in packed.items()}


def sequence_ids(cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """For each packed token, the number of the sequence it belongs to (from the cumulative lengths)."""
    sizes = cu_seq_lens[1:] - cu_seq_lens[:-1]
    return torch.repeat_interleave(torch.arange(len(sizes), device=cu_seq_lens.device), sizes.long())


def block_diagonal_mask(cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """A (1, 1, T, T) boolean mask, True where two packed tokens belong to the same sequence (an SDPA attn_mask)."""
    ids = sequence_ids(cu_seq_lens)
    return (ids[:, None] == ids[None, :])[None, None]


def document_block_mask(cu_seq_lens: torch.Tensor):
    """FlexAttention's block mask for the same rule: a token attends only to tokens of its own sequence."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = sequence_ids(cu_seq_lens)

    def same_sequence(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    return create_block_mask(same_sequence, None, None, len(ids), len(ids), device=ids.device)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function (``AttentionInterface``) running PyTorch's own varlen kernel on a packed
    row: (1, heads, T, d) in, (1, T, heads, d) out; the boundaries come from ``pack``'s ``cu_seq_lens``."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (T, heads, d)
    out = varlen_attn(q, k, v, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"],
                      kwargs["max_length_k"], scale=scaling)
    return out.unsqueeze(0), None


def varlen_problem(device: str, dtype) -> str:
    """'' when ``torch.nn.attention.varlen.varlen_attn`` runs on ``device`` in ``dtype``, else the first line of why."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen ({err})"
    q = torch.randn(6, 2, 64, device=device, dtype=dtype)
    cu = torch.tensor([0, 2, 6], device=device, dtype=torch.int32)
    try:
        varlen_attn(q, q, q, cu, cu, 4, 4)
    except (RuntimeError, ValueError) as err:  # NotImplementedError is a RuntimeError
        first = str(err).strip().splitlines()[0].split(". ")[0][:160]
        dtype_name = str(dtype).removeprefix("torch.")
        return f"varlen_attn does not run on {device} in {dtype_name}: {type(err).__name__}: {first}"
    return ""


def ways_available(device: str, dtype, quick: bool, tokens: int) -> dict[str, str]:
    """Each way of section 5 with '' where it can run here, else one line saying why not (``tokens``: the longest
    packed row)."""
    dense = "" if tokens**2 <= MAX_DENSE_MASK else (
        f"a dense mask for {tokens:,} packed tokens would hold {tokens**2:,} entries: varlen or FlexAttention keep the "
        "sequences apart without it")
    flex = "" if not (quick and device == "cpu") else (
        "FlexAttention compiles its kernel for each shape before its first call; on a CPU that takes longer than a "
        "quick run allows (quick=False runs it)")
    return {"padded sdpa": "", "packed sdpa block mask": dense, "packed varlen": varlen_problem(device, dtype),
            "packed flex document mask": flex}


# A packed row on sdpa with no mask: with position_ids restarting at each sequence (transformers 5.25 and newer build
# the block-diagonal mask from them, compat.encoder_mask_from_position_ids), and with none at all.
UNMASKED_WAYS = ("packed sdpa, no mask", "packed sdpa, no mask, no position_ids")


def measure_way(make_call: Callable[[], Callable[[], torch.Tensor]], device: str,
                repeats: int) -> tuple[dict[str, Any], Any]:
    """One way of section 5 timed: ``make_call()`` builds its call (masks, attention implementation), whose first
    call (which compiles, where it compiles) is the warm-up; its output is returned beside the timing. A way whose
    kernels are missing here gives a failed row (``status``, ``why``) instead of stopping the notebook."""
    try:
        call = make_call()
        start = time.perf_counter()
        out = call()
        timing.synchronize(device)
        first_s = time.perf_counter() - start
        outcome = timing.attempt(lambda: timing.measure(call, device=device, warmup=0, repeats=repeats), device)
    except Exception as err:  # a GPU-only kernel, a compiler missing: said in the row, the notebook goes on
        return {"status": "failed", "why": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"}, None
    if outcome["status"] != "ok":
        return {"status": outcome["status"], "why": outcome["reason"]}, None
    t = outcome["value"]
    return {"status": "ok", "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
            "first call s": first_s}, out


PADDING_FREE_COLUMNS = ["way", "padding", "tokens computed", "median_ms", "p10_ms", "p90_ms", "speed-up over padded",
                        "relative error", "first call s", "status"]
