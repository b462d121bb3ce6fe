"""Notebook 03's topic: the encoder fastpath of ``torch.nn.TransformerEncoder``, a converter that puts BERT-family
encoders on it, and today's other ways to skip padding.

In eval mode, without gradient tracking and with a key padding mask, ``nn.TransformerEncoder`` packs the batch into a
nested tensor (padding dropped) and runs each layer as one fused op, ``aten::_transformer_encoder_layer_fwd``. This
is what optimum's BetterTransformer did for encoders; :func:`to_fastpath` rebuilds it for today's stack.
:func:`why_not_fastpath` and :func:`why_not_fused` name the condition that turns each shortcut off, in the order
torch 2.11-2.13 (``torch/nn/modules/transformer.py``) checks them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from labkit import attention, compat, models, probes, timing
from labkit.errors import BadParameter, LabkitError, check_sizes
from labkit.metrics import encoder as names
from labkit.results import reference_runs

FASTPATH_OPS = ("aten::_transformer_encoder_layer_fwd", "aten::_nested_tensor_from_mask")
SUPPORTED_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}  # relative error, and similarities
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "xpu")  # the fastpath's own list (plus a privateuse1 backend)


class UnsupportedModel(LabkitError, ValueError):
    """A model (or an option of it) that the fastpath converter cannot carry over exactly."""


# --------------------------------------------------------------------------- the notebook's plan

def notebook_plan(*, device: str, quick: bool, dtype: Any = "auto", model_id: str = "minilm-l6",
                  sweep_model: str = "auto", padding_fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
                  batch_sizes: Sequence[int] = (), lengths: Sequence[int] = ()) -> dict[str, Any]:
    """Notebook 03's parameters, checked (one sentence for a bad one) and sized for ``device``."""
    fractions = padding_fractions if isinstance(padding_fractions, (list, tuple)) else None
    if not fractions or any(isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1
                            for p in fractions):
        raise BadParameter(f"padding_fractions={padding_fractions!r}: give fractions in [0, 1), "
                           "for example [0.0, 0.5, 0.75].")
    for label, sizes in (("batch_sizes", batch_sizes), ("lengths", lengths)):
        if not isinstance(sizes, (list, tuple)):
            raise BadParameter(f"{label}={sizes!r}: give a list of whole numbers, or [] for this device's sizes.")
        check_sizes(1, **{f"{label}[{i}]": size for i, size in enumerate(sizes)})
    if batch_sizes and min(batch_sizes) < 2 and max(fractions) > 0:
        raise BadParameter(f"batch_sizes={list(batch_sizes)!r}: padding needs a batch of 2 or more "
                           "(one sequence of each batch is the longest).")
    on_gpu = device.startswith("cuda")
    dtype = probes.resolve_dtype("float16" if dtype == "auto" and on_gpu else dtype, device)
    probes.check_dtype(device, dtype)
    sweep_model = sweep_model if sweep_model != "auto" else ("random-bert-base" if on_gpu else "minilm-l6")
    if on_gpu:
        sizes = {"batch_sizes": [16, 64] if quick else [16, 64, 128],
                 "lengths": [128, 256] if quick else [128, 256, 512]}
    else:
        sizes = {"batch_sizes": [8] if quick else [4, 8], "lengths": [128]}
    batch_sizes = sorted(set(batch_sizes or sizes["batch_sizes"]))
    lengths = sorted(set(lengths or sizes["lengths"]))
    fractions = sorted(set(fractions))
    problems = {name: models.check_model(name) for name in (model_id, sweep_model)}  # a wrong name stops here
    dtype_name = str(dtype).removeprefix("torch.")
    return {"dtype": dtype, "model_problem": problems[model_id], "sweep_model": sweep_model,
            "sweep_problem": problems[sweep_model], "batch_sizes": batch_sizes, "lengths": lengths,
            "padding_fractions": fractions, "repeats": 3 if quick else 5, "tolerance": TOLERANCE[dtype_name],
            "implementations": names.QUICK_IMPLEMENTATIONS if quick else names.IMPLEMENTATIONS,
            "line": f"Sweep on {sweep_model}: batches {batch_sizes}, lengths {lengths}, padding {fractions}."}


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


def _variant(encoder: nn.TransformerEncoder, **changes: Any) -> tuple[nn.TransformerEncoder, str]:
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


def situations(encoder: nn.TransformerEncoder, src: torch.Tensor, padding: torch.Tensor) -> dict[str, Situation]:
    """The situations section 1 tries: the fastpath's own case, and each condition that turns a part of it off.
    ``padding`` is the key padding mask (True at padding, on the right); the variants are copies."""
    frozen = copy.deepcopy(encoder).requires_grad_(False)
    hooked = copy.deepcopy(encoder)
    hooked.layers[0].register_forward_hook(lambda module, args, output: None)  # as a tool capturing activations does
    pre_norm, pre_norm_warned = _variant(encoder, norm_first=True)
    no_bias, no_bias_warned = _variant(encoder, bias=False)
    compiled = torch.compile(copy.deepcopy(encoder), backend="eager")  # dynamo decides the path; no kernels built
    cases = [Situation("eval, torch.no_grad(), right padding", encoder, src, padding),
             Situation("training mode", encoder, src, padding, training=True),
             Situation("gradients tracked", encoder, src, padding, grad=True),
             Situation("gradients tracked, weights frozen", frozen, src, padding, grad=True),
             Situation("left padding", encoder, src, padding.flip(1)),
             Situation("no padding mask", encoder, src, None),
             Situation("a forward hook on layer 0", hooked, src, padding),
             Situation("norm_first=True", pre_norm, src, padding, warned=pre_norm_warned),
             Situation("bias=False", no_bias, src, padding, warned=no_bias_warned),
             Situation("torch.compile", compiled, src, padding)]
    return {case.name: case for case in cases}


def situation_reasons(cases: dict[str, Situation]) -> dict[str, dict[str, str]]:
    """What exercise 03.1 is given: each situation's reason not to skip the padding, and not to fuse a layer."""
    reasons = {name: case.reasons() for name, case in cases.items()}
    return {"cases": {name: why[0] for name, why in reasons.items()},
            "unfused": {name: why[1] for name, why in reasons.items()}}


def try_situations(cases: dict[str, Situation], device: str) -> list[dict[str, Any]]:
    """Run each situation (a first call, for torch.compile's tracing), then once under the profiler: a row of what
    ran beside labkit's reasons."""
    rows = []
    for case in cases.values():
        why_padding, why_fused = case.reasons()
        out = case()
        seen = attention.ops_that_ran(case, device)
        original = compat.compiled_original(case.encoder)
        layers = len((case.encoder if original is None else original).layers)
        right = case.mask is not None and compat.padding_is_right_aligned(case.src, case.mask)
        zeros = bool((out[case.mask] == 0).all()) if right else None
        rows.append({"situation": case.name, "padding skipped": padding_skipped(seen.ops),
                     "fused layers": seen.counts.get(FASTPATH_OPS[0], 0), "layers": layers,
                     "exact zeros at padding": zeros, "why the padding is not skipped": why_padding or "-",
                     "why a layer is not fused": why_fused or "-",
                     "warned": f"when built: {case.warned}" if case.warned else "no"})
    return rows


SITUATION_COLUMNS = ["situation", "padding skipped", "fused layers", "why the padding is not skipped",
                     "why a layer is not fused", "warned"]


def situation_findings(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Section 1's claims: the profiler proves the fastpath; labkit names every fallback, of either part."""
    by = {r["situation"]: r for r in rows}
    first = rows[0]
    agree = all((r["why the padding is not skipped"] == "-") == r["padding skipped"]
                and (r["why a layer is not fused"] == "-") == (r["fused layers"] == r["layers"]) for r in rows)
    hook = by.get("a forward hook on layer 0")
    frozen = by.get("gradients tracked, weights frozen")
    return {"metrics": {"fastpath_situations": len(rows),
                        "fastpath_situations_skipping_padding": sum(r["padding skipped"] for r in rows)},
            "checks": {"fastpath_proven_by_profiler_and_zeros": first["padding skipped"]
                       and first["exact zeros at padding"] and first["fused layers"] == first["layers"],
                       "labkit_names_every_fallback": (agree, "a reason is given exactly when the profiler shows "
                                                              "no nested tensor, or fewer fused layers"),
                       "no_grad_or_frozen_weights_suffice": bool(frozen and frozen["padding skipped"]),
                       "a_hook_turns_off_the_fused_layer_only": bool(hook and hook["padding skipped"]
                                                                     and hook["fused layers"] < hook["layers"])}}


def under_accelerate(encoder: nn.TransformerEncoder, src: torch.Tensor, padding: torch.Tensor,
                     device: str) -> list[dict[str, Any]]:
    """The encoder dispatched by accelerate as ``device_map`` loading does (one hook per layer), and with its last
    layer offloaded to disk: torch hooks counted, what the profiler saw, or the error."""
    from accelerate import dispatch_model

    rows = []
    last = f"layers.{len(encoder.layers) - 1}"
    # accelerate says "offloaded to the cpu" for any cpu entry, offloaded or not
    with tempfile.TemporaryDirectory() as folder, compat.quiet_logger("accelerate"):
        maps = {"every layer dispatched to its device": {f"layers.{i}": device for i in range(len(encoder.layers))},
                "the last layer offloaded to disk": {**{f"layers.{i}": device for i in range(len(encoder.layers) - 1)},
                                                     last: "disk"}}
        for label, device_map in maps.items():
            dispatched = dispatch_model(copy.deepcopy(encoder), device_map=device_map, offload_dir=folder,
                                        force_hooks=True)
            row = {"accelerate": label, "modules with an accelerate hook": compat.accelerate_hooks(dispatched),
                   "torch forward hooks": compat.has_forward_hooks(dispatched)}
            try:
                with torch.no_grad():
                    seen = attention.ops_that_ran(functools.partial(dispatched, src, src_key_padding_mask=padding),
                                                  device)
                row.update({"padding skipped": padding_skipped(seen.ops),
                            "fused layers": seen.counts.get(FASTPATH_OPS[0], 0), "error": "-"})
            except (RuntimeError, AssertionError) as err:
                row.update({"padding skipped": None, "fused layers": None,
                            "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:150]}"})
            rows.append(row)
    return rows


def accelerate_findings(rows: list[dict[str, Any]], layers: int) -> dict[str, Any]:
    """The claim about accelerate: its dispatch hooks are not torch hooks, so the fastpath keeps running."""
    first = rows[0]
    return {"checks": {"accelerate_dispatch_keeps_the_fastpath": (
        not first["torch forward hooks"] and first["modules with an accelerate hook"] > 0
        and bool(first["padding skipped"])
        and first["fused layers"] == layers, str(first))}}


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


def compare_with_transformers(model, fast: FastpathEncoder, batch: dict[str, Any], device: str,
                              tolerance: float) -> dict[str, Any]:
    """The converted model against the transformers model (eager) on a padded batch, at the real positions, and
    what the profiler saw each of them run: ``{"rows", "relative_error", "max_abs_difference", "findings"}``."""
    ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        got = fast(ids, attention_mask).last_hidden_state
        seen = attention.ops_that_ran(lambda: fast(ids, attention_mask), device)
        seen_hf = attention.ops_that_ran(lambda: model(input_ids=ids, attention_mask=attention_mask), device)
    real = attention_mask.bool()
    difference = float((got[real].float() - expected[real].float()).abs().max())
    relative = attention.relative_error(got[real], expected[real])
    rows = [{"model": f"transformers ({compat.attn_implementation(model)})",
             "fused layer op": fastpath_ran(seen_hf.ops), "padding skipped": padding_skipped(seen_hf.ops)},
            {"model": "to_fastpath", "fused layer op": fastpath_ran(seen.ops),
             "padding skipped": padding_skipped(seen.ops)}]
    findings = {"metrics": {"to_fastpath_max_abs_difference": difference, "to_fastpath_relative_error": relative},
                "checks": {"to_fastpath_matches_transformers": (relative <= tolerance, f"{relative:.2e}"),
                           "to_fastpath_skips_padding": padding_skipped(seen.ops) and bool((got[~real] == 0).all()),
                           "transformers_bert_neither_fuses_nor_skips_padding":
                               not fastpath_ran(seen_hf.ops) and not padding_skipped(seen_hf.ops)}}
    return {"rows": rows, "relative_error": relative, "max_abs_difference": difference, "findings": findings}


def refusal(name: str, device: str) -> str:
    """The sentence :func:`to_fastpath` gives for a model it cannot convert ('' if it converted it)."""
    model, _ = models.load_model(name, device=device)
    try:
        to_fastpath(model)
    except UnsupportedModel as err:
        return str(err)
    return ""


# --------------------------------------------------------------------------- section 3: sentence embeddings

def masked_mean(last_hidden_state, attention_mask):
    """Sentence embeddings: the mean of the token vectors of the real (non-padding) tokens."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)


def embedding_findings(embed: dict[str, Callable[[], torch.Tensor]], sentences: Sequence[str], attention_mask,
                       device: str, repeats: int, tolerance: float) -> dict[str, Any]:
    """Cosine similarities from each embedding function (the same up to ``tolerance``), their speeds and each
    sentence's nearest neighbour: ``{"rows", "neighbours", "gap", "padding_share", "findings"}``."""
    padding_share = 1 - attention_mask.float().mean().item()
    similarities = {}
    for label, fn in embed.items():
        vectors = torch.nn.functional.normalize(fn().float(), dim=-1)
        similarities[label] = vectors @ vectors.T
    first, last = list(similarities.values())[0], list(similarities.values())[-1]
    gap = float((last - first).abs().max())
    speed = {label: timing.measure(fn, device=device, warmup=1, repeats=repeats) for label, fn in embed.items()}
    closest = last.clone().fill_diagonal_(-1).argmax(1).tolist()
    neighbours = [{"sentence": s[:60], "closest other sentence": sentences[j][:60]}
                  for s, j in zip(sentences, closest, strict=True)]
    rows = [{"model": label, "median ms": t.median_ms, "p10-p90 ms": f"{t.p10_ms:.1f}-{t.p90_ms:.1f}",
             "sentences/s": len(sentences) / (t.median_ms / 1e3)} for label, t in speed.items()]
    times = [t.median_ms for t in speed.values()]
    findings = {"metrics": {"embedding_similarity_max_difference": gap,
                            "embedding_fastpath_speedup": times[0] / times[-1],
                            "embedding_padding_percent": 100 * padding_share},
                "checks": {"similarities_identical": (gap <= tolerance, f"{gap:.2e}")}}
    return {"rows": rows, "neighbours": neighbours, "gap": gap, "padding_share": padding_share, "findings": findings}


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


SWEEP_COLUMNS = ["implementation", "batch", "length", "padding", "median_ms", "p10_ms", "p90_ms", "real tokens/s",
                 "status"]


def _caller(model, fast: FastpathEncoder, implementation: str, batch: dict[str, Any]) -> Callable[[], Any]:
    """The timed call of one implementation on ``batch`` (the attention implementation is set before, untimed)."""
    ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if implementation == "fastpath":
        def call():
            with torch.inference_mode():
                return fast(ids, attention_mask)
        return call
    model.set_attn_implementation(implementation.removeprefix("transformers "))

    def call():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=attention_mask)
    return call


def _timed(call: Callable[[], Any], device: str, repeats: int) -> dict[str, Any]:
    outcome = timing.attempt(lambda: timing.measure(call, device=device, warmup=1, repeats=repeats), device)
    if outcome["status"] != "ok":
        return {"status": outcome["status"], "reason": outcome["reason"]}
    t = outcome["value"]
    return {"status": "ok", "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms}


def padding_sweep(model, tokenizer, *, batch_sizes: Sequence[int], lengths: Sequence[int],
                  padding_fractions: Sequence[float], device: str, repeats: int = 5,
                  implementations: Sequence[str] = names.IMPLEMENTATIONS,
                  on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Padding fraction x batch x length: ``implementations`` (transformers eager and sdpa, and the fastpath
    converted from ``model``), the same batch for each. Then each series is checked against its cost model and its
    offending points re-measured once (:func:`recheck`). Returns ``{"rows", "floor_ms"}``; ``on_row`` sees each
    row."""
    fast = to_fastpath(model)
    tiny = padded_batch(tokenizer, batch=1, length=8, padding_fraction=0.0, device=device)
    floor = timing.measure(_caller(model, fast, "fastpath", tiny), device=device, warmup=2, repeats=repeats)
    batches, rows = {}, []
    for b in batch_sizes:
        for n in lengths:
            for p in padding_fractions:
                batch = batches[b, n, p] = padded_batch(tokenizer, batch=b, length=n, padding_fraction=p, device=device)
                real = int(batch["attention_mask"].sum())
                pairs = int((batch["attention_mask"].sum(1) ** 2).sum())  # (query, key) pairs of real tokens
                for implementation in implementations:
                    row = {"implementation": implementation, "batch": b, "length": n, "asked": p,
                           "padding": round(batch["padding_fraction"], 3), "real_tokens": real, "real_pairs": pairs,
                           **_timed(_caller(model, fast, implementation, batch), device, repeats)}
                    _rate(row)
                    rows.append(row)
                    if on_row:
                        on_row(row)

    def remeasure(point: dict[str, Any]) -> dict[str, Any]:
        batch = batches[point["batch"], point["length"], point["asked"]]
        again = {**point, **_timed(_caller(model, fast, point["implementation"], batch), device, repeats)}
        _rate(again)
        if on_row:
            on_row({**again, "status": "re-measured"})
        return {k: again[k] for k in ("status", "median_ms", "p10_ms", "p90_ms", "real tokens/s") if k in again}

    model.set_attn_implementation("sdpa")
    return {"rows": recheck(rows, remeasure), "floor_ms": floor.p10_ms}


def _rate(row: dict[str, Any]) -> None:
    if row.get("status") == "ok":
        row["real tokens/s"] = row["real_tokens"] / (row["median_ms"] / 1e3)


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


def _point(rows: list[dict[str, Any]], implementation: str, b: int, n: int, padding: float) -> dict[str, Any] | None:
    return next((r for r in rows if r["implementation"] == implementation and r["batch"] == b and r["length"] == n
                 and r.get("status") == "ok" and abs(r["padding"] - padding) < 0.05), None)


def speedup_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """transformers sdpa's time over the fastpath's at each point (above 1: the fastpath is faster), median and
    fastest-10% (p10) ratios; ``noisy`` when either point is."""
    out = []
    for r in rows:
        sdpa = _point(rows, "transformers sdpa", r["batch"], r["length"], r["padding"]) \
            if r["implementation"] == "fastpath" and r.get("status") == "ok" else None
        if sdpa:
            out.append({"batch": r["batch"], "length": r["length"], "padding": r["padding"],
                        "fastpath vs sdpa": sdpa["median_ms"] / r["median_ms"],
                        "fastest 10% ratio": sdpa["p10_ms"] / r["p10_ms"], "ideal": 1 / (1 - r["padding"]),
                        "noisy": "noisy" if r["noisy"] or sdpa["noisy"] else ""})
    return out


def headline_speedup(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The speed-up at the largest batch, length and padding of the sweep (what exercise 03.3 predicts)."""
    speedups = speedup_rows(rows)
    return max(speedups, key=lambda s: (s["batch"] * s["length"], s["padding"]), default=None)


def sweep_panels(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list, list, list]]]:
    """The figure's data: one panel per batch x length, one line per implementation of real tokens/s against the
    padding fraction, with each point's noisy flag."""
    data: dict[str, dict[str, tuple[list, list, list]]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        line = data.setdefault(f"batch {r['batch']}, length {r['length']}", {}).setdefault(
            r["implementation"], ([], [], []))
        line[0].append(r["padding"])
        line[1].append(r["real tokens/s"])
        line[2].append(r["noisy"])
    return data


def sweep_findings(sweep: dict[str, Any]) -> dict[str, Any]:
    """The sweep's metrics (each point, noisy points flagged, the speed-ups, the floor) and its claim: the
    fastpath's time falls with padding where the work outweighs the floor (skipped where it does not, or where
    the points are noisy)."""
    rows, floor = sweep["rows"], sweep["floor_ms"]
    metrics: dict[str, float] = {"fastpath_floor_ms": floor, "sweep_noisy_points": sum(r["noisy"] for r in rows)}
    for r in rows:
        if r.get("status") == "ok":
            metrics[names.sweep(r["implementation"], r["batch"], r["length"], r["padding"])] = r["median_ms"]
        if r["noisy"]:
            metrics[names.sweep(r["implementation"], r["batch"], r["length"], r["padding"], "noisy")] = 1
    for s in speedup_rows(rows):
        metrics[names.speedup(s["batch"], s["length"], s["padding"])] = s["fastpath vs sdpa"]
    findings: dict[str, Any] = {"metrics": metrics, "timing": {}, "skipped": {}}
    ok = [r for r in rows if r.get("status") == "ok" and r["implementation"] == "fastpath"]
    if not ok:
        return findings
    b, n = max((r["batch"], r["length"]) for r in ok)
    least, most = min(r["padding"] for r in ok), max(r["padding"] for r in ok)
    fast_0, fast_most = _point(rows, "fastpath", b, n, least), _point(rows, "fastpath", b, n, most)
    what = "fastpath time falls with padding"
    if most < 0.5 or least > 0 or not (fast_0 and fast_most):
        findings["skipped"][what] = f"batch {b} x length {n} did not run at no padding and at 50% or more"
    elif fast_0["noisy"] or fast_most["noisy"]:
        findings["skipped"][what] = (f"batch {b} x length {n}: its points stayed noisy after a re-measurement, so "
                                     "they support no conclusion")
    elif fast_0["p10_ms"] < 2 * floor:
        findings["skipped"][what] = (f"even batch {b} x length {n} takes only {fast_0['p10_ms'] / floor:.1f}x the "
                                     f"floor ({fast_0['p10_ms']:.2f} vs {floor:.2f} ms): the time is issuing kernels, "
                                     "which skipping padding cannot shorten")
    else:
        ratio = fast_most["p10_ms"] / fast_0["p10_ms"]
        findings["timing"]["fastpath_time_falls_with_padding"] = (ratio < 0.9, f"batch {b}, length {n}: x{ratio:.2f}")
    return findings


def sweep_lines(sweep: dict[str, Any]) -> list[str]:
    """What each batch x length showed, in words: its time against the floor, and how each implementation's time
    changed from the least to the most padding (noisy points named, not read)."""
    rows, floor, lines = sweep["rows"], sweep["floor_ms"], []
    fractions = sorted({r["padding"] for r in rows})
    for b, n in sorted({(r["batch"], r["length"]) for r in rows}):
        points = {i: (_point(rows, i, b, n, fractions[0]), _point(rows, i, b, n, fractions[-1]))
                  for i in ("fastpath", "transformers sdpa")}
        if not all(a and z for a, z in points.values()) or len(fractions) < 2:
            continue
        if any(a["noisy"] or z["noisy"] for a, z in points.values()):
            lines.append(f"batch {b}, length {n}: noisy (re-measured, still against the trend): no conclusion")
            continue
        (f0, f1), (s0, s1) = points["fastpath"], points["transformers sdpa"]
        lines.append(f"batch {b}, length {n}: {f0['p10_ms'] / floor:.1f}x the floor without padding; from "
                     f"{fractions[0]:.0%} to {fractions[-1]:.0%} padding the fastpath's time "
                     f"x{f1['p10_ms'] / f0['p10_ms']:.2f}, transformers sdpa's x{s1['p10_ms'] / s0['p10_ms']:.2f}")
    return lines


def encoder_flops(config, *, tokens: int, pairs: int) -> dict[str, int]:
    """Forward FLOPs of a BERT-family encoder's layers over ``tokens`` tokens whose sequences hold ``pairs`` (query,
    key) pairs in all: 2 per weight per token in the linear layers (query, key, value and output projections, the
    two feed-forward layers), and 4 x hidden per pair in attention (Q.K and P.V), in every layer. The embeddings
    are look-ups, not arithmetic."""
    h, layers = config.hidden_size, config.num_hidden_layers
    weights = 4 * h * h + 2 * h * config.intermediate_size  # one layer's linear weights
    return {"linear": 2 * weights * layers * tokens, "attention": 4 * h * layers * pairs}


def ceiling_findings(sweep: dict[str, Any], config, *, flops_per_s: float, dtype: Any) -> dict[str, Any]:
    """The sweep's headline point (:func:`headline_speedup`) against the machine's limit: the real work of its
    sequences (:func:`encoder_flops` over the real tokens) over each implementation's time, as a fraction of the
    matmul ceiling ``flops_per_s``. Work on padding does not count: nobody asked for it."""
    found: dict[str, Any] = {"lines": [], "metrics": {}}
    best = headline_speedup(sweep["rows"])
    if best is None:
        return found
    b, n, p = best["batch"], best["length"], best["padding"]
    rates = []
    for implementation in ("fastpath", "transformers sdpa"):
        row = _point(sweep["rows"], implementation, b, n, p)
        flops = encoder_flops(config, tokens=row["real_tokens"], pairs=row["real_pairs"])
        total = flops["linear"] + flops["attention"]
        rate = total / (row["median_ms"] / 1e3)
        rates.append(f"{implementation} {rate / 1e9:.3g} GFLOP/s ({100 * rate / flops_per_s:.0f}%)")
        if implementation == "fastpath":
            found["metrics"][names.FASTPATH_FRACTION_OF_CEILING] = rate / flops_per_s
            work = (f"At batch {b} x length {n}, {p:.0%} padding, the real tokens need {total / 1e9:.3g} GFLOP "
                    f"(attention {100 * flops['attention'] / total:.0f}% of it, the linear layers the rest)")
    found["lines"].append(f"{work}; in real work per second: {', '.join(rates)} of this machine's matmul ceiling in "
                          f"{str(dtype).removeprefix('torch.')}, {flops_per_s / 1e9:.3g} GFLOP/s"
                          + (" (a noisy point: not to be read)" if best["noisy"] else ""))
    return found


def _largest(metrics: dict[str, float], padding: int) -> tuple[float, str] | None:
    """The fastpath's speed-up at the largest batch x length of a run, at ``padding`` percent, and its sizes."""
    found = [(_sizes(k), v) for k, v in metrics.items() if k.startswith("speedup_fastpath_vs_sdpa_")]
    found = [((b, n), v) for (b, n, pad), v in found if pad == padding]
    if not found:
        return None
    (b, n), value = max(found, key=lambda item: item[0][0] * item[0][1])
    return value, f"batch {b} x length {n}"


def beside_reference_runs(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """This run's speed-ups beside the stored reference runs' (``reference/<device>/``). Each run is read at its own
    largest batch x length (a GPU's sizes are not a CPU's), named in the table."""
    runs = {"this machine": metrics, **{d: run["metrics"] for d, run in reference_runs("03_encoder_fastpath").items()}}
    paddings = sorted({_sizes(k)[2] for k in metrics if k.startswith("speedup_fastpath_vs_sdpa_")})
    rows = [{"measured": "sentence embeddings: the fastpath's speed-up over transformers sdpa",
             **{who: m.get("embedding_fastpath_speedup") for who, m in runs.items()}}]
    for pad in paddings:
        cells = {who: _largest(m, pad) for who, m in runs.items()}
        rows.append({"measured": f"the fastpath's speed-up at {pad}% padding, largest batch x length",
                     **{who: f"{c[0]:.2f} ({c[1]})" if c else None for who, c in cells.items()}})
    rows.append({"measured": "the fastpath's real work as a fraction of the matmul ceiling (headline point)",
                 **{who: m.get(names.FASTPATH_FRACTION_OF_CEILING) for who, m in runs.items()}})
    return rows


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


def _way_call(model, way: str, padded: dict[str, Any], packed: dict[str, Any]) -> Callable[[], torch.Tensor]:
    """The call of one way, returning the hidden states of the real tokens in packed order, (T, hidden)."""
    real = padded["attention_mask"].bool()
    row = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    if way == "padded sdpa":
        model.set_attn_implementation("sdpa")
        inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    elif way == "packed sdpa block mask":
        model.set_attn_implementation("sdpa")
        inputs = {**row, "attention_mask": block_diagonal_mask(packed["cu_seq_lens_q"])}
    elif way == "packed varlen":
        from transformers import AttentionInterface

        AttentionInterface.register("labkit_varlen", varlen_attention)
        model.set_attn_implementation("labkit_varlen")
        inputs = {**row, **{k: packed[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}}
    elif way == "packed flex document mask":
        model.set_attn_implementation("flex_attention")
        inputs = {**row, "attention_mask": document_block_mask(packed["cu_seq_lens_q"])}
    elif way == "packed sdpa, no mask":  # only the restarting position_ids say where sequences end
        model.set_attn_implementation("sdpa")
        inputs = row
    elif way == "packed sdpa, no mask, no position_ids":  # nothing says where sequences end
        model.set_attn_implementation("sdpa")
        inputs = {"input_ids": packed["input_ids"]}
    else:
        raise BadParameter(f"no way {way!r}; there are {', '.join(names.WAYS)}.")

    def call():
        with torch.inference_mode():
            hidden = model(**inputs).last_hidden_state
        return hidden[real] if way == "padded sdpa" else hidden[0]
    return call


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


def padding_free(model, tokenizer, *, batch: int, length: int, padding_fractions: Sequence[float], device: str,
                 dtype, quick: bool, repeats: int, tolerance: float) -> dict[str, Any]:
    """Today's ways to skip padding, on the same sequences: the padded batch (transformers sdpa) against the
    packed row with a block-diagonal mask (sdpa), PyTorch's varlen kernel and a FlexAttention document mask (at
    the most padding only: :data:`COMPILED_WAYS`).
    Returns ``{"rows", "skipped", "mixing", "tolerance"}``: one row per way and padding (time, speed-up over the
    padded batch, difference from its output at the real tokens), one line per way that cannot run here, and how
    far a packed row drifts from the padded batch on sdpa without a mask (``mixing``: way -> relative error, for
    each of :data:`UNMASKED_WAYS`)."""
    batches = {p: padded_batch(tokenizer, batch=batch, length=length, padding_fraction=p, device=device)
               for p in padding_fractions}
    packed = {p: pack(b) for p, b in batches.items()}
    longest = max(int(x["input_ids"].shape[1]) for x in packed.values())
    available = ways_available(device, dtype, quick, longest)
    rows, mixing = [], None
    try:
        for p, padded in batches.items():
            reference, baseline = None, None
            for way in names.WAYS:
                if available[way] or (way in COMPILED_WAYS and p != max(padding_fractions)):
                    continue
                row = {"way": way, "batch": batch, "length": length, "padding": round(padded["padding_fraction"], 3),
                       "tokens computed": int(padded["input_ids"].numel() if way == "padded sdpa"
                                              else packed[p]["input_ids"].shape[1])}
                measured, out = _measure_way(model, way, padded, packed[p], device, repeats)
                if way == "padded sdpa":
                    reference, baseline = out, measured.get("median_ms")
                if out is not None and reference is not None:
                    measured["relative error"] = attention.relative_error(out, reference)
                    measured["max abs difference"] = float((out.float() - reference.float()).abs().max())
                if measured["status"] == "ok" and baseline:
                    measured["speed-up over padded"] = baseline / measured["median_ms"]
                rows.append({**row, **measured})
            if mixing is None and p > 0 and reference is not None:
                mixing = {way: attention.relative_error(_way_call(model, way, padded, packed[p])(), reference)
                          for way in UNMASKED_WAYS}
    finally:
        model.set_attn_implementation("sdpa")
    return {"rows": rows, "skipped": {w: why for w, why in available.items() if why}, "mixing": mixing,
            "tolerance": tolerance}


def transformers_masks_packed_encoder_rows() -> bool:
    """Whether the installed transformers builds an encoder's block-diagonal mask from restarting ``position_ids``
    when it is given no attention mask (5.25 and newer; read from its source by :mod:`labkit.compat`)."""
    return compat.encoder_mask_from_position_ids()


# A packed row on sdpa with no mask: with position_ids restarting at each sequence (transformers 5.25 and newer build
# the block-diagonal mask from them, compat.encoder_mask_from_position_ids), and with none at all.
UNMASKED_WAYS = ("packed sdpa, no mask", "packed sdpa, no mask, no position_ids")


def _measure_way(model, way: str, padded, packed, device: str, repeats: int) -> tuple[dict[str, Any], Any]:
    """One way timed: its first call (which compiles, where it compiles) is the warm-up, and its output is returned
    beside the timing. A way whose kernels are missing here gives a failed row instead of stopping the notebook."""
    try:
        call = _way_call(model, way, padded, packed)
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


def padding_free_findings(result: dict[str, Any]) -> dict[str, Any]:
    """Section 5's metrics and claims: every way that ran matches the padded batch; a packed row with neither a mask
    nor restarting position_ids does not; with position_ids alone it does where transformers builds the mask from
    them (5.25 and newer), and does not before."""
    metrics, ok = {}, [r for r in result["rows"] if r["status"] == "ok"]
    for r in ok:
        metrics[names.padding_free(r["way"], r["batch"], r["length"], r["padding"])] = r["median_ms"]
        metrics[names.padding_free(r["way"], r["batch"], r["length"], r["padding"], "max_abs_difference")] = \
            r["max abs difference"]
        if r["way"] != "padded sdpa":
            metrics[names.padding_free_speedup(r["way"], r["batch"], r["length"], r["padding"])] = \
                r["speed-up over padded"]
    worst = max((r["relative error"] for r in ok), default=0.0)
    checks: dict[str, Any] = {"padding_free_ways_match_the_padded_batch": (
        bool(ok) and worst <= result["tolerance"], f"largest relative error {worst:.2e}")}
    if result["mixing"] is not None:
        # far beyond rounding: five times the worst error of the ways that keep the sequences apart
        floor = 5 * max(worst, result["tolerance"] / 100)
        positions, nothing = (result["mixing"][w] for w in UNMASKED_WAYS)
        metrics["packed_sdpa_without_mask_relative_error"] = positions
        metrics["packed_sdpa_without_position_ids_relative_error"] = nothing
        checks["packed_row_without_position_ids_mixes_its_sequences"] = (
            nothing > floor, f"{nothing:.2e} without position_ids or a mask, {worst:.2e} with a mask")
        if transformers_masks_packed_encoder_rows():
            checks["restarting_position_ids_keep_packed_sequences_apart"] = (
                positions <= result["tolerance"], f"{positions:.2e} with position_ids and no mask")
        else:
            checks["packed_rows_need_a_mask_on_bidirectional_sdpa"] = (
                positions > floor, f"{positions:.2e} with position_ids and no mask, {worst:.2e} with a mask")
    failed = {f"{r['way']} at {r['padding']:.0%} padding": r["why"] for r in result["rows"] if r["status"] != "ok"}
    return {"metrics": metrics, "checks": checks, "skipped": {**result["skipped"], **failed}}


# --------------------------------------------------------------------------- what you measured

def what_you_measured(results: dict[str, Any]) -> list[str]:
    """Notebook 03's results in a few sentences, from what this run recorded (parts skipped are left out)."""
    m, lines = results["metrics"], []
    if "fastpath_situations" in m:
        lines.append(f"Of {m['fastpath_situations']:.0f} ways of calling nn.TransformerEncoder, "
                     f"{m['fastpath_situations_skipping_padding']:.0f} packed the batch and skipped the padding; "
                     "PyTorch said nothing when a call fell back, the profiler showed it.")
    if "to_fastpath_relative_error" in m:
        lines.append(f"The converted encoder matched transformers to a relative error of "
                     f"{m['to_fastpath_relative_error']:.1e}, with exact zeros at the padding.")
    if "embedding_fastpath_speedup" in m:
        lines.append(f"Sentence embeddings ({m.get('embedding_padding_percent', 0):.0f}% padding): the fastpath ran "
                     f"{m['embedding_fastpath_speedup']:.2f}x the speed of transformers sdpa, with the same "
                     "similarities.")
    speedups = [(k, v) for k, v in m.items() if k.startswith("speedup_fastpath_vs_sdpa_")]
    if speedups:
        key, value = max(speedups, key=lambda kv: _sizes(kv[0]))
        b, n, p = _sizes(key)
        noisy = m.get("sweep_noisy_points", 0)
        doubtful = any(names.sweep(i, b, n, p / 100, "noisy") in m for i in ("fastpath", "transformers sdpa"))
        lines.append(f"At batch {b} x length {n} with {p}% padding the fastpath ran {value:.2f}x transformers sdpa"
                     + (" (a noisy point: not to be read)" if doubtful else "")
                     + f", where a time proportional to the tokens computed would give {1 / (1 - p / 100):.2f}x"
                     + (f"; {noisy:.0f} sweep point{'s' * (noisy != 1)} stayed noisy after a re-measurement and "
                        "support no conclusion." if noisy else "."))
    if names.FASTPATH_FRACTION_OF_CEILING in m:
        lines.append(f"At the sweep's headline point the fastpath did the real tokens' work at "
                     f"{100 * m[names.FASTPATH_FRACTION_OF_CEILING]:.0f}% of this machine's matmul ceiling.")
    if "fastpath_floor_ms" in m:
        lines.append(f"The floor, one 8-token sequence through the fastpath, took {m['fastpath_floor_ms']:.2f} ms: "
                     "a batch that takes little more than that is bound by issuing kernels, not by padding.")
    packed = [(k, v) for k, v in m.items() if k.startswith("padding_free_speedup_")]
    if packed:
        key, value = max(packed, key=lambda kv: (_sizes(kv[0])[2], kv[1]))
        way = _SIZES.match(key)["what"].removeprefix("padding_free_speedup_").replace("_", " ")
        lines.append(f"Packing the same sequences into one row without padding ({way}) ran {value:.2f}x the padded "
                     f"batch at {_sizes(key)[2]}% padding.")
    return lines


_SIZES = re.compile(r"^(?P<what>.*)_b(?P<b>\d+)_n(?P<n>\d+)_pad(?P<pad>\d+)$")


def _sizes(metric: str) -> tuple[int, int, int]:
    """(batch, length, padding %) from a metric name built by labkit.metrics.encoder."""
    found = _SIZES.match(metric)
    return (int(found["b"]), int(found["n"]), int(found["pad"])) if found else (0, 0, 0)

