"""Notebook 03's topic: what is too long for a cell in skipping an encoder's padding, today and before.

Today a batch's real tokens are packed into one row and attention is told where each sequence ends; the notebook's
cells do it. :func:`varlen_attention` plugs PyTorch's varlen kernel into transformers, :func:`measure_way` times one
way beside its output. Before, in eval mode, without gradient tracking and with a key padding mask,
``nn.TransformerEncoder`` packed the batch into a nested tensor (padding dropped) and ran each layer as one fused op,
``aten::_transformer_encoder_layer_fwd``: what optimum's BetterTransformer did for encoders. :func:`to_fastpath`
rebuilds it for today's stack. :func:`why_not_fastpath` and :func:`why_not_fused` name the condition that turns each
shortcut off, in the order torch 2.11-2.13 (``torch/nn/modules/transformer.py``) checks them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from labkit import compat, models, probes, timing
from labkit.errors import BadParameter, LabkitError, check_sizes

FUSED_OP, PACKING_OP = "aten::_transformer_encoder_layer_fwd", "aten::_nested_tensor_from_mask"
SUPPORTED_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
ACTIVATIONS = ("gelu", "relu")
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}  # relative error, and similarities
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "xpu")  # the fastpath's own list (plus a privateuse1 backend)
# the sweep's padded implementations and the fastpath (labkit.report reads "transformers sdpa" and "fastpath" from
# the sweep table); the notebook adds its packed row beside them, which the stored reference runs predate
IMPLEMENTATIONS = ("transformers eager", "transformers sdpa", "fastpath")
QUICK_IMPLEMENTATIONS = IMPLEMENTATIONS[1:]  # a quick run compares the two that matter
# the sizes of a full run on a GPU (the reference runs' sizes)
GPU_SIZES = {"batch_sizes": [16, 64, 128], "lengths": [128, 256, 512]}


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

def _built_with(layer: nn.Module, order: str) -> str:
    """What ``layer`` was built with that fails the first of ``order``'s conditions ('' when none fails): the
    encoder's check when it is built and the layer's check at each forward read them in different orders."""
    attn = layer.self_attn
    fails = {"batch_first": (not attn.batch_first, "batch_first=False"),
             "kdim": (attn.kdim != attn.embed_dim or attn.vdim != attn.embed_dim, "kdim/vdim different from d_model"),
             "bias": (attn.in_proj_bias is None, "bias=False"),
             "activation": (not layer.activation_relu_or_gelu, "an activation other than relu or gelu"),
             "eps": (layer.norm1.eps != layer.norm2.eps, "two layer norms of different eps"),
             "heads": (attn.num_heads % 2, f"an odd number of heads ({attn.num_heads})")}
    return next((fails[key][1] for key in order.split() if fails[key][0]), "")


def _device_and_grad(src: torch.Tensor, layer: nn.Module) -> str:
    tensors = [src, *layer.parameters()]
    other = sorted({t.device.type for t in tensors} - set(SUPPORTED_DEVICE_TYPES))
    if other:
        return (f"a weight or the input is on the {other[0]} device "
                f"(the fastpath runs on {', '.join(SUPPORTED_DEVICE_TYPES)})")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return ("gradients are tracked and a weight requires grad (torch.no_grad(), torch.inference_mode() or "
                "requires_grad_(False) avoid it)")
    return ""


def why_not_fastpath(encoder, src, src_key_padding_mask=None, mask=None) -> str:
    """Why ``encoder(src, src_key_padding_mask=...)`` would NOT pack the batch into a nested tensor and skip the
    padding ('' when it would): ``nn.TransformerEncoder.forward``'s conditions, in its order, in plainer words.
    Whether each layer also runs as one fused op is :func:`why_not_fused`'s question (a hook, say, stops the fused
    layer but not the packing); the profiler tells what ran (:func:`what_ran`)."""
    original = compat.compiled_original(encoder)
    module = original if original is not None else encoder
    layer = module.layers[0]
    if not torch.backends.mha.get_fastpath_enabled():
        return "torch.backends.mha.get_fastpath_enabled() is False"
    if not getattr(module, "use_nested_tensor", False):
        if not isinstance(layer, nn.TransformerEncoderLayer):
            built = "its layers are not nn.TransformerEncoderLayer"
        elif layer.norm_first:
            built = "its layers are pre-norm (norm_first=True)"
        else:
            built = _built_with(layer, "batch_first kdim bias activation eps heads")
            built = f"its layers were built with {built}" if built else "enable_nested_tensor=False"
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
    return _device_and_grad(src, layer)


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
    built = _built_with(layer, "batch_first bias kdim activation eps heads")
    if built:
        return f"it was built with {built}"
    if torch.is_autocast_enabled():
        return "autocast is enabled"
    if compat.has_forward_hooks(layer):
        return "a forward hook or pre-hook is registered on it or inside it (register_forward_hook)"
    return _device_and_grad(src, layer)


def why_not_fused(encoder, src, src_key_padding_mask=None) -> str:
    """Why some layer of ``encoder`` would NOT run as one fused op ('' when every layer would): each layer's
    reason, with the layers it applies to ("layer 0: a forward hook ...")."""
    original = compat.compiled_original(encoder)
    reasons: dict[str, list[int]] = {}
    for i, layer in enumerate((original if original is not None else encoder).layers):
        reason = _why_layer_not_fused(layer, src)
        if reason:
            reasons.setdefault(reason, []).append(i)
    return "; ".join(f"layer{'s' * (len(ids) > 1)} {', '.join(map(str, ids))}: {reason}"
                     for reason, ids in reasons.items())


def what_ran(call: Callable[[], Any], device: str) -> dict[str, Any]:
    """Run ``call`` once under the profiler: whether the batch was packed into a nested tensor (padding skipped) and
    how many layers ran as the fused op."""
    seen = timing.ops_that_ran(call, device)  # the packing op exactly: the left-alignment check has a longer name
    return {"padding skipped": PACKING_OP in seen.ops, "fused layers": seen.counts.get(FUSED_OP, 0)}


# --------------------------------------------------------------------------- the converter

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
                                       activation=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
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

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # None: its type-0 vectors
        padding = None if attention_mask is None else attention_mask == 0
        return SimpleNamespace(last_hidden_state=self.encoder(hidden, src_key_padding_mask=padding))


def to_fastpath(model) -> FastpathEncoder:
    """A copy of a transformers BERT-family encoder whose layers run on the ``nn.TransformerEncoderLayer``
    fastpath, with the original weights copied in (same dtype and device, eval mode).

    Raises :class:`UnsupportedModel`, naming what is unsupported, for other architectures or options.
    """
    _check_supported(model)
    base = getattr(model, "base_model", model)
    layers = [convert_layer(hf_layer, model.config) for hf_layer in base.encoder.layer]
    converted = FastpathEncoder(copy.deepcopy(base.embeddings), layers,
                                source=f"{model.config.model_type}, {len(layers)} layers")
    parameter = next(model.parameters())
    return converted.to(device=parameter.device, dtype=parameter.dtype).eval()


# --------------------------------------------------------------------------- the batches and the timed calls

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
        spread = torch.linspace(mean_other - half, mean_other + half, others).round().long().clamp(1, length)
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


def timed(call: Callable[[], Any], device: str, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """``call`` timed by the workbook's rule: ``{"status": "ok", "median_ms", "p10_ms", "p90_ms"}``, or the status
    and reason (``why``) of an out-of-memory or a kernel failure: a row, not a crash."""
    outcome = timing.attempt(lambda: timing.measure(call, device=device, warmup=warmup, repeats=repeats), device)
    if outcome["status"] != "ok":
        return {"status": outcome["status"], "why": outcome["reason"]}
    t = outcome["value"]
    return {"status": "ok", "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms}


def measure_way(make_call: Callable[[], Callable[[], torch.Tensor]], device: str,
                repeats: int) -> tuple[dict[str, Any], Any]:
    """One way of skipping padding timed: ``make_call()`` builds its call (masks, attention implementation), whose
    first call (which compiles, where it compiles) is the warm-up; its output is returned beside the timing. A way
    whose kernels are missing here gives a failed row (``status``, ``why``) and no output."""
    try:
        call = make_call()
        start = time.perf_counter()
        out = call()
        timing.synchronize(device)
        first_s = time.perf_counter() - start
    except Exception as err:  # a GPU-only kernel, a compiler missing: said in the row, the notebook goes on
        first = (str(err).strip() or "no message").splitlines()[0].split(". ")[0][:160]  # torch's first sentence
        return {"status": "failed", "why": f"{type(err).__name__}: {first}"}, None
    measured = timed(call, device, repeats, warmup=0)
    return {**measured, "first call s": first_s}, out if measured["status"] == "ok" else None


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function (``AttentionInterface``) running PyTorch's own varlen kernel on a packed
    row: (1, heads, T, d) in, (1, T, heads, d) out; the boundaries are the packed row's ``cu_seq_lens``, as
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` returns them."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (T, heads, d)
    out = varlen_attn(q, k, v, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"],
                      kwargs["max_length_k"], scale=scaling)
    return out.unsqueeze(0), None
