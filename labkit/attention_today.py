"""Notebook 01, section 8: attention beyond SDPA's backends, as the installed stack offers it (checked against
torch 2.13 and transformers 5.25): the FlashAttention versions behind torch's FLASH_ATTENTION backend, the stored
reference runs' fastest backend against Flash, FlexAttention measured against SDPA for a causal and a document
(packed sequences) mask, ``torch.nn.attention.varlen.varlen_attn``, and transformers' ``attn_implementation`` values.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from labkit import compat, probes, results
from labkit.attention import TOLERANCES, relative_error
from labkit.metrics import attention as names
from labkit.probes import BACKENDS
from labkit.timing import attempt, measure, synchronize


def flash_implementations() -> list[dict[str, Any]]:
    """The FlashAttention implementations torch's FLASH_ATTENTION backend can use on a GPU: its built-in one (the
    default; available where this torch has it compiled in, ``torch.backends.cuda.is_flash_attention_available()``)
    and those ``torch.nn.attention.list_flash_attention_impls`` registers (FA3, FA4; available where activating one
    works), each activated once to see whether this stack has what it needs, then the default restored."""
    attn = torch.nn.attention
    default = (attn.restore_flash_attention_impl.__doc__ or "").strip().splitlines()[0].strip()
    compiled_in = torch.backends.cuda.is_flash_attention_available()
    rows = [{"implementation": "built in (the default)", "available here": compiled_in,
             "what torch says": f"restore_flash_attention_impl: {default!r}; "
                                f"torch.backends.cuda.is_flash_attention_available() = {compiled_in}"}]
    for impl in attn.list_flash_attention_impls():
        try:
            attn.activate_flash_attention_impl(impl)
            active, said = attn.current_flash_attention_impl() == impl, "activated, then the default restored"
        except Exception as err:  # the missing package or GPU is the answer we report
            active, said = False, f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
        finally:
            if attn.current_flash_attention_impl() is not None:
                attn.restore_flash_attention_impl()
        rows.append({"implementation": impl, "available here": active, "what torch says": said})
    return rows


def reference_backend_rates(head_dim: int = 128) -> list[dict[str, Any]]:
    """Each reference run's fastest backend at its longest causal length beside FLASH_ATTENTION (``reference/``)."""
    rows = []
    for device, run in results.reference_runs("01_flash_attention").items():
        rates: dict[int, dict[str, float]] = {}
        for backend in BACKENDS:
            prefix = names.sweep(backend, head_dim, True, 0, "tflops").replace("_n0_tflops", "_n")
            for metric, value in run["metrics"].items():
                if metric.startswith(prefix) and metric.endswith("_tflops"):
                    seq = int(metric.removeprefix(prefix).removesuffix("_tflops"))
                    rates.setdefault(seq, {})[backend] = value
        if rates and "FLASH_ATTENTION" in rates[max(rates)]:
            seq = max(rates)
            fastest = max(rates[seq], key=rates[seq].get)
            rows.append({"reference run": device, "N": seq, "head size": head_dim, "fastest backend": fastest,
                         "its TFLOP/s": rates[seq][fastest], "FLASH_ATTENTION TFLOP/s": rates[seq]["FLASH_ATTENTION"],
                         "Flash only is slower by": rates[seq][fastest] / rates[seq]["FLASH_ATTENTION"]})
    return rows


def packed_lengths(n: int) -> list[int]:
    """Four documents packed into one sequence of ``n`` tokens: a half, a quarter and two eighths."""
    lengths = [n // 2, n // 4, n // 8]
    return [*lengths, n - sum(lengths)]


def document_ids(lengths: Sequence[int], device: str = "cpu") -> torch.Tensor:
    """Which document each position of a packed sequence belongs to (0, 0, ..., 1, 1, ..., 2, ...)."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


def quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with its warnings silenced (uncompiled FlexAttention warns that it is not compiled;
    :func:`flex_vs_sdpa` shows that warning once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _first_call(fn: Callable[[], Any], device: str) -> tuple[Any, float, list[str]]:
    """Run ``fn`` once: its output, its wall time (compilation included) and the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        out = fn()
        synchronize(device)
    return out, time.perf_counter() - start, [str(w.message).strip().splitlines()[0] for w in caught]


def _timed(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an uncompiled FlexAttention's warning was kept from its first call
        timing = measure(fn, device=device, warmup=warmup, repeats=repeats)
    return {"ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms}


FLEX_COLUMNS = ("mask", "implementation", "ms", "p10_ms", "p90_ms", "first call s", "blocks skipped %",
                "relative error", "status", "reason")


def flex_vs_sdpa(flex: Callable[..., Any], q, k, v, cases: dict[str, tuple[Any, dict[str, Any]]], *, device: str,
                 compiled: bool, warmup: int = 1, repeats: int = 5) -> list[dict[str, Any]]:
    """For each mask of ``cases`` (name -> (FlexAttention block mask, the SDPA keywords of the same mask)): SDPA and
    ``flex`` on the same inputs, timed by the workbook's rule (:func:`labkit.timing.measure`). The flex row carries
    its first call's time (compilation included), the share of blocks its block mask skips, and its error against
    SDPA's output; an out-of-memory or a kernel failure becomes the row's status."""
    implementation = "flex_compiled" if compiled else "flex_eager"
    tolerance = TOLERANCES[str(q.dtype).removeprefix("torch.")]
    rows = []
    for mask, (block_mask, sdpa_kwargs) in cases.items():
        def sdpa_row(kwargs=sdpa_kwargs):
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
            return out, _timed(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs), device, warmup, repeats)

        def flex_row(block_mask=block_mask):
            out, first_s, said = _first_call(lambda: flex(q, k, v, block_mask=block_mask), device)
            timed = _timed(lambda: flex(q, k, v, block_mask=block_mask), device, warmup, repeats)
            return out, {**timed, "first call s": first_s, "blocks skipped %": block_mask.sparsity(),
                         "warning": " ".join(said)}

        expected = None
        for name, run in (("sdpa", sdpa_row), (implementation, flex_row)):
            row = {"mask": mask, "implementation": name, "status": "ok", "reason": "", "warning": "",
                   **dict.fromkeys(("ms", "p10_ms", "p90_ms", "first call s", "blocks skipped %", "relative error",
                                    "within tolerance"))}
            outcome = attempt(run, device)
            if outcome["status"] != "ok":
                row.update(status=outcome["status"], reason=outcome["reason"])
            else:
                out, measured = outcome["value"]
                row.update(measured, status="")
                if name == "sdpa":
                    expected = out
                elif expected is not None:
                    row["relative error"] = relative_error(out, expected)
                    row["within tolerance"] = row["relative error"] <= tolerance
            rows.append(row)
    return rows


def flex_findings(rows: list[dict[str, Any]], *, compile_skipped: str = "") -> dict[str, Any]:
    """FlexAttention against SDPA in words, metrics and checks (the same output; the time of each)."""
    found: dict[str, Any] = {"lines": [], "metrics": {}, "checks": {}, "skipped": {}}
    if compile_skipped:
        found["skipped"]["FlexAttention compiled"] = compile_skipped
    for row in rows:
        if row["status"]:
            found["skipped"][f"{row['implementation']} with a {row['mask']} mask"] = row["reason"]
            continue
        found["metrics"][names.masked(row["mask"], row["implementation"])] = row["ms"]
        sdpa = next((r for r in rows if r["mask"] == row["mask"] and r["implementation"] == "sdpa"
                     and not r["status"]), None)
        if row["implementation"] == "sdpa" or sdpa is None:
            continue
        found["metrics"].update({names.masked(row["mask"], row["implementation"], "first_call_s"): row["first call s"],
                                 names.masked(row["mask"], row["implementation"], "blocks_skipped_percent"):
                                     row["blocks skipped %"]})
        found["checks"][f"flex_attention_matches_sdpa_{row['mask']}"] = (row["within tolerance"],
                                                                         f"{row['relative error']:.2e}")
        how = "compiled" if row["implementation"] == "flex_compiled" else "uncompiled"
        found["lines"].append(f"{row['mask']} mask: FlexAttention ({how}) {row['ms']:.3g} ms, SDPA {sdpa['ms']:.3g} ms "
                              f"({row['ms'] / sdpa['ms']:.2f}x SDPA's time); its block mask skips "
                              f"{row['blocks skipped %']:.0f}% of the blocks; its first call took "
                              f"{row['first call s']:.2f} s")
    warned = next((r["warning"] for r in rows if r["warning"]), "")
    if warned:
        found["lines"].append(f"PyTorch warned: {warned}")
    return found


def varlen_row(q, k, v, lengths: Sequence[int], *, device: str, warmup: int = 1, repeats: int = 5) -> dict[str, Any]:
    """``torch.nn.attention.varlen.varlen_attn`` on the documents packed in ``q, k, v`` (batch 1), causal inside
    each document, timed and compared with SDPA given the same mask as a tensor; or why it cannot run here."""
    from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10: imported where it is taught

    row = {"mask": "document", "implementation": "varlen_attn", "status": "", "reason": "", "ms": None,
           "relative error": None, "within tolerance": None}
    docs = document_ids(lengths, q.device)
    mask = (docs[:, None] == docs[None, :]) & torch.ones(len(docs), len(docs), dtype=torch.bool, device=q.device).tril()
    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # (tokens, heads, head size)
    starts = torch.tensor([0, *torch.tensor(list(lengths)).cumsum(0).tolist()], dtype=torch.int32, device=q.device)

    def run():
        return varlen_attn(*packed, starts, starts, max(lengths), max(lengths), window_size=(-1, 0))  # causal

    try:
        out = run()
        synchronize(device)
    except (RuntimeError, NotImplementedError) as err:
        said = str(err).strip().splitlines()[0].split(". ")[0]
        return {**row, "status": "skipped", "reason": f"it runs PyTorch's CUDA Flash Attention kernel, which refused "
                                                      f"here ({type(err).__name__}: {said})"}
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0].transpose(0, 1)
    timing = measure(run, device=device, warmup=warmup, repeats=repeats)
    error = relative_error(out, expected)
    return {**row, "ms": timing.median_ms, "relative error": error,
            "within tolerance": error <= TOLERANCES[str(q.dtype).removeprefix("torch.")]}


def varlen_findings(row: dict[str, Any], *, dtype: Any) -> dict[str, Any]:
    """varlen_attn's row in words, metrics and checks, or the one-line reason it was skipped."""
    if row["status"]:
        return {"lines": [], "skipped": {"torch.nn.attention.varlen.varlen_attn": row["reason"]}}
    return {"lines": [f"varlen_attn on the packed documents: {row['ms']:.3g} ms in "
                      f"{str(dtype).removeprefix('torch.')}, relative error {row['relative error']:.1e} against SDPA "
                      "with the same mask"],
            "metrics": {names.masked("document", "varlen_attn"): row["ms"]},
            "checks": {"varlen_attn_matches_sdpa_document": (row["within tolerance"], f"{row['relative error']:.2e}")}}


def attn_implementation_rows() -> list[dict[str, Any]]:
    """The ``attn_implementation=`` values this transformers accepts (:func:`labkit.probes.attn_implementations`),
    the Hub kernel transformers loads instead of a missing flash-attn package when the ``kernels`` package is
    installed, and a Hub kernel id tried as a value. Nothing is downloaded: the Hub id is only tried when ``kernels``
    is absent (it then fails before any download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_flash_attention_utils import FLASH_ATTN_KERNEL_FALLBACK

    rows = [{**r, "kernels fallback": FLASH_ATTN_KERNEL_FALLBACK.get(r["attn_implementation"], "")}
            for r in probes.attn_implementations()]
    hub_id = FLASH_ATTN_KERNEL_FALLBACK.get("flash_attention_2", "kernels-community/flash-attn2")
    if importlib.util.find_spec("kernels") is not None:
        rows.append({"attn_implementation": hub_id, "ok": None, "kernels fallback": "",
                     "reason": "the kernels package is installed: transformers would download this kernel from the "
                               "Hub, so it is not tried here"})
        return rows
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compat.build_model_class(LlamaForCausalLM, config, hub_id)
        ok, reason = True, ""
    except Exception as err:  # the error a learner would meet is the answer
        ok, reason = False, f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    rows.append({"attn_implementation": hub_id, "ok": ok, "reason": reason, "kernels fallback": ""})
    return rows
