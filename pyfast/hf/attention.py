"""The attention side of pyfast's transformers integration.

- :func:`fused_attention_forward`: transformers' Llama attention forward (and Mistral's, Qwen2's,
  Qwen3's, Granite's: the same statements but for a sliding window and q/k norms) with the rotary
  embedding fused (:func:`pyfast.ops.rotary`). It is swapped in (:mod:`pyfast.hf.swaps`) only
  where :func:`stock_attention_matches` finds the installed class's forward to be exactly these
  statements, and where the numeric self-check at swap time agrees with the stock forward.
- :func:`install_sdpa_dispatcher`: one dispatcher in front of transformers' "sdpa" attention
  function (registered through ``AttentionInterface.register``, transformers' public hook), for
  pyfast's packed rows (``pyfast_segments=``) and for grouped-query SDPA on the CPU; every other
  call goes to the stock function unchanged.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pyfast.ops.fused_blocks import rotary

Tensor = torch.Tensor

# Attention modules whose forward is Llama's but for a sliding window handed to the attention
# function and (Qwen3) q/k norms: see fused_attention_forward, checked against the installed
# source by stock_attention_matches (tests/hf/test_swaps.py asserts the verdict for each).
ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                     "GraniteAttention")  # fmt: skip

# What the allowlisted attention forwards add to Llama's: a sliding window handed to the attention
# function (the expression each stock forward passes) and q/k norms. stock_attention_matches()
# checks them against the installed source.
_SLIDING_WINDOW_SOURCE = {
    "MistralAttention": "getattr(self.config, 'sliding_window', None)",
    "Qwen2Attention": "self.sliding_window",
    "Qwen3Attention": "self.sliding_window",
}
_SLIDING_WINDOW = {  # the same expressions, compiled once into functions of the module
    name: eval(f"lambda self: {src}")  # noqa: S307 - our own constant source, above
    for name, src in _SLIDING_WINDOW_SOURCE.items()
}
_QK_NORM = ("Qwen3Attention",)
# Statements of fused_attention_forward that the stock forward lacks: its own bookkeeping.
_OWN_STATEMENTS = ("stock = ", "ALL_ATTENTION_FUNCTIONS = ", "eager_attention_forward = ",
                   "if cache is None:", "name = ", "extra = ")  # fmt: skip


def fused_attention_forward(
    self,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor] | None = None,
    attention_mask: Tensor | None = None,
    cache=None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """transformers' LlamaAttention.forward line for line (with Mistral's / Qwen2's / Qwen3's
    additions for those classes), the rotary embedding fused (:func:`rotary`)."""
    # the names the stock forward finds in its module (each family has its own eager function)
    stock = sys.modules[type(self).__module__]
    ALL_ATTENTION_FUNCTIONS = stock.ALL_ATTENTION_FUNCTIONS  # noqa: N806
    eager_attention_forward = stock.eager_attention_forward

    if cache is None:  # the stock forward's deprecated name for it
        cache = kwargs.pop("past_key_values", None)
    name = type(self).__name__
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    if name in _QK_NORM:
        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    else:
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = rotary(query_states, key_states, cos, sin)

    if cache is not None:
        key_states, value_states = cache.update(
            key_states, value_states, self.layer_idx, kwargs=kwargs
        )

    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward
    )
    extra = {"sliding_window": _SLIDING_WINDOW[name](self)} if name in _SLIDING_WINDOW else {}

    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )

    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


# keyword arguments of transformers' attention functions that ask for more than plain attention
_NOT_PLAIN = ("position_bias", "softcap", "sliding_window", "s_aux")


def _plain_attention(dropout: float, kwargs) -> bool:
    return (
        not dropout
        and all(kwargs.get(k) is None for k in _NOT_PLAIN)
        and not kwargs.get("output_attentions", False)
    )


def _gqa_sdpa_applies(module, query: Tensor, key: Tensor, value: Tensor, mask, kwargs) -> bool:
    """Where transformers' SDPA path would copy keys and values per query head and torch's CPU
    kernel takes them grouped instead: a marked module, several query heads per key/value head,
    a mask (without one transformers already passes ``enable_gqa``), more than one query (one
    query is regrouped without copies), CPU tensors, nothing but plain attention asked for."""
    return (
        getattr(module, "_pyfast_gqa", False)
        and query.device.type == "cpu"
        and mask is not None
        and query.shape[2] > 1
        and query.shape[1] != key.shape[1]
        and key.shape[-1] == value.shape[-1]
        and _plain_attention(0.0, kwargs)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


@functools.cache
def install_sdpa_dispatcher() -> None:
    """Puts a dispatcher in front of transformers' "sdpa" attention function, once per process:

    - a call given ``pyfast_segments=`` (a :class:`pyfast.ops.segments.SegmentedAttention` or
      :class:`~pyfast.ops.segments.TrieAttention`, for plain attention) runs it over the packed
      row;
    - modules marked by :func:`fuse_decoder_blocks` take the grouped path where it applies
      (:func:`_gqa_sdpa_applies`);
    - every other call (other models, other devices, other cases) goes to the stock function
      unchanged.
    """
    from transformers import AttentionInterface

    stock = AttentionInterface._global_mapping["sdpa"]

    def sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        segments = kwargs.get("pyfast_segments")
        if segments is not None and _plain_attention(dropout, kwargs):
            return segments(query, key, value, scaling), None
        if not _gqa_sdpa_applies(module, query, key, value, attention_mask, kwargs):
            return stock(module, query, key, value, attention_mask, dropout=dropout,
                         scaling=scaling, **kwargs)  # fmt: skip
        # transformers' own call with the mask given: not causal-flagged, (B, T, H, D) out
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            is_causal=False, enable_gqa=True,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    sdpa.stock = stock
    AttentionInterface.register("sdpa", sdpa)


def _statements(fn, branch: str | None = None) -> list[str]:
    """The body of `fn` as normalised source, one statement a line (docstring left out); with
    `branch` ("body" / "orelse"), the q/k-norm `if` of the fused forward is replaced by that
    branch's statements."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
    out = []
    for s in tree.body[0].body:
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):
            continue
        if branch and isinstance(s, ast.If) and "_QK_NORM" in ast.unparse(s.test):
            out += [ast.unparse(t) for t in getattr(s, branch)]
        else:
            out.append(ast.unparse(s))
    return out


def _is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(any(p == w for w in it) for p in part)


@functools.cache
def stock_attention_matches(cls: type) -> bool:
    """Whether the installed ``cls.forward`` (an attention class of ATTENTION_CLASSES) is the
    forward that :func:`fused_attention_forward` reproduces: every statement of it, in order,
    the same source once ``apply_rotary_pos_emb`` is read for :func:`rotary` and the sliding
    window for its ``**extra``; nothing added but the fused forward's own bookkeeping; the same
    parameters. transformers releases change these forwards (cache arguments, new keywords), so
    the swap is made only where this holds; elsewhere the stock forward stays."""
    name = cls.__name__
    try:
        stock = _statements(cls.forward)
        mine = _statements(fused_attention_forward, "body" if name in _QK_NORM else "orelse")
        same_params = list(inspect.signature(cls.forward).parameters) == list(
            inspect.signature(fused_attention_forward).parameters
        )
    except (OSError, TypeError, SyntaxError, IndexError):  # no source to read
        return False
    mine = [s.replace("= rotary(", "= apply_rotary_pos_emb(") for s in mine]
    if sum("apply_rotary_pos_emb(query_states, key_states, cos, sin)" in s for s in stock) != 1:
        return False
    if name in _SLIDING_WINDOW_SOURCE:
        arg = f"sliding_window={_SLIDING_WINDOW_SOURCE[name]}, "
        if sum(arg in s for s in stock) != 1:
            return False
        stock = [s.replace(arg, "**extra, ") for s in stock]
    else:
        mine = [s.replace("**extra, ", "") for s in mine]
    return (
        same_params
        and _is_subsequence(stock, mine)
        and all(s in stock or s.startswith(_OWN_STATEMENTS) for s in mine)
    )
