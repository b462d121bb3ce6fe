"""The encoder fastpath of ``torch.nn.TransformerEncoder``, and a converter that puts BERT-family encoders on it.

In eval mode, without gradients and with a key padding mask, ``nn.TransformerEncoder`` packs the batch into a
nested tensor (padding dropped) and runs each layer as one fused op, ``aten::_transformer_encoder_layer_fwd``.
This is what optimum's BetterTransformer did for encoders; :func:`to_fastpath` rebuilds it for today's stack.
"""

from __future__ import annotations

from typing import Any

from labkit import compat
from labkit.errors import BadParameter, LabkitError

FASTPATH_OPS = ("aten::_transformer_encoder_layer_fwd", "aten::_nested_tensor_from_mask")
SUPPORTED_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}


class UnsupportedModel(LabkitError, ValueError):
    """A model (or an option of it) that the fastpath converter cannot carry over exactly."""


def why_not_fastpath(encoder, src, src_key_padding_mask=None) -> str:
    """Why ``encoder(src, src_key_padding_mask=...)`` would NOT skip the padding with a nested tensor ('' when
    it would): the conditions ``nn.TransformerEncoder.forward`` checks, in its order, in plainer words.

    Some of these cases still run each layer as one fused op (left padding, no mask); training mode and
    gradients turn the fused layer off too. The profiler tells which: :func:`fastpath_ran`, :func:`padding_skipped`.
    """
    import torch

    layer = encoder.layers[0]
    if not torch.backends.mha.get_fastpath_enabled():
        return "torch.backends.mha.get_fastpath_enabled() was not True"
    if not getattr(encoder, "use_nested_tensor", False):
        return ("the encoder was built with enable_nested_tensor=False, or with layers the nested path cannot take "
                "(PyTorch warned why when it was built)")
    if layer.training:
        return "the model is in training mode (call model.eval())"
    if src.dim() != 3:
        return f"input not batched; expected 3 dimensions, got {src.dim()}"
    if src_key_padding_mask is None:
        return "no key padding mask was given, so there is no padding to skip"
    if not compat.padding_is_right_aligned(src, src_key_padding_mask):
        return "the padding is not on the right (the fastpath needs each sequence's tokens first, then padding)"
    if torch.is_autocast_enabled():
        return "autocast is enabled"
    weights = [p for p in layer.parameters()]
    if torch.is_grad_enabled() and any(p.requires_grad for p in weights):
        return "gradients are enabled (use torch.inference_mode() or torch.no_grad())"
    return ""


def fastpath_ran(ops) -> bool:
    """True when the profiler recorded the fused encoder-layer op (each layer in one op)."""
    return any(op.startswith(FASTPATH_OPS[0]) for op in ops)


def padding_skipped(ops) -> bool:
    """True when the profiler recorded the batch being packed into a nested tensor (padding dropped)."""
    return FASTPATH_OPS[1] in ops  # exactly: the left-alignment check is another op with a longer name


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
    import torch
    from torch import nn

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


def _module_class():
    import torch
    from torch import nn

    class _FastpathEncoder(nn.Module):
        """A BERT-family encoder whose layers run on ``nn.TransformerEncoderLayer``'s fastpath.

        ``forward(input_ids, attention_mask, token_type_ids=None)`` returns an object with
        ``last_hidden_state`` like the transformers model; padded positions are exactly zero when the
        nested-tensor path ran.
        """

        def __init__(self, embeddings, layers, source: str):
            super().__init__()
            self.embeddings = embeddings
            self.encoder = nn.TransformerEncoder(layers[0], num_layers=len(layers), enable_nested_tensor=True)
            self.encoder.layers = nn.ModuleList(layers)  # the converted layers, not copies of the first
            self.source = source

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            from types import SimpleNamespace

            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            padding = None if attention_mask is None else attention_mask == 0
            output = self.encoder(hidden, src_key_padding_mask=padding)
            return SimpleNamespace(last_hidden_state=output)

        def why_not(self, input_ids, attention_mask=None, token_type_ids=None) -> str:
            """Why a call with these inputs, in the current mode and grad state, would not skip the padding."""
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            return why_not_fastpath(self.encoder, hidden, None if attention_mask is None else attention_mask == 0)

    return _FastpathEncoder


def to_fastpath(model):
    """A copy of a transformers BERT-family encoder whose layers run on the ``nn.TransformerEncoderLayer``
    fastpath, with the original weights copied in (same dtype and device, eval mode).

    Raises :class:`UnsupportedModel`, naming what is unsupported, for other architectures or options.
    """
    import copy

    _check_supported(model)
    base = getattr(model, "base_model", model)
    config = model.config
    parameter = next(model.parameters())
    layers = [convert_layer(hf_layer, config).to(device=parameter.device, dtype=parameter.dtype)
              for hf_layer in base.encoder.layer]
    embeddings = copy.deepcopy(base.embeddings)
    converted = _module_class()(embeddings, layers, source=f"{config.model_type}, {len(layers)} layers")
    return converted.to(device=parameter.device, dtype=parameter.dtype).eval()


def masked_mean(last_hidden_state, attention_mask):
    """Sentence embeddings: the mean of the token vectors of the real (non-padding) tokens."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)


def padded_batch(tokenizer, *, batch: int, length: int, padding_fraction: float, seed: int = 0,
                 device: str = "cpu") -> dict[str, Any]:
    """Random token ids (batch, length), right-padded as a tokenizer pads a batch to its longest sequence: one
    sequence fills ``length``, the others' lengths are spread evenly so that about ``padding_fraction`` of all
    positions are padding. Returns input_ids, attention_mask and the padding fraction actually made."""
    import torch

    from labkit.errors import check_sizes

    check_sizes(1, batch=batch, length=length)
    if not 0 <= padding_fraction < 1:
        raise BadParameter(f"padding_fraction={padding_fraction}: use a fraction in [0, 1).")
    if padding_fraction > 0 and batch < 2:
        raise BadParameter(f"padding_fraction={padding_fraction} needs a batch of 2 or more (one sequence is the longest).")
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.full((batch,), length)
    if padding_fraction > 0:
        others = batch - 1
        target = min(max(round(batch * length * (1 - padding_fraction)) - length, others), others * length)
        mean_other = target / others
        half = min(mean_other - 1, length - mean_other)
        spread = torch.linspace(mean_other - half, mean_other + half, others) if others > 1 else torch.tensor([mean_other])
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
