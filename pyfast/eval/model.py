"""The LM API of pyfast.eval and its Hugging Face backend.

Two calls, as in lm-evaluation-harness: ``loglikelihood(requests) -> [(logprob, is_greedy)]`` and
``generate_until(requests) -> [str]`` (see :meth:`HFLM.generate_until`). The HF backend scores
exactly like lm-eval 0.4.x's HF backend (same tokenisation of context/continuation pairs, same
truncation) but computes faster:

- requests whose model inputs share the same context tokens form a *group*; its context tokens
  run once for all its continuations;
- the inputs of a batch's requests (context, then each continuation but its last token) form
  a *token trie*: every distinct token sequence prefix is one position, whatever number of
  requests share it (a few-shot prefix, MMLU's "The following are multiple choice questions
  ... about", a question's context, the first words two choices have in common). Positions are
  laid out depth first, position ids are each token's depth, and every token sees exactly its
  ancestors, so each hidden state equals the one of the plain causal pass. On transformers'
  "sdpa" attention a batch is one unpadded row of up to ``batch_size`` x ``row_tokens`` tokens
  and attention runs over the whole trie (:func:`pyfast.ops.segments.trie_attention`: on the
  CPU one compiled kernel call per layer, elsewhere one SDPA call per subtree); on eager
  attention tries are packed into rows of about ``row_tokens`` tokens, padded to the longest
  of ``batch_size`` rows, under a dense 4-D mask. Models whose attention takes no custom mask
  (flash-attention kernels, sliding windows, ALiBi) run each batch of contexts once and expand
  their KV cache over the continuations instead;
- only hidden states at scored positions reach the lm_head, each once however many targets
  it has (:func:`pyfast.eval.scoring.shared_target_logprobs`).
  Results do not depend on the batch size (up to float rounding of differently shaped matmuls).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pyfast.eval.generation import GenKwargs, cut_at_stop, normalize_gen_kwargs
from pyfast.eval.scoring import shared_target_logprobs, target_logprobs
from pyfast.hf.head import apply_logit_map, check_head
from pyfast.hf.packing import (
    SegmentsNotTaken,
    decoder_hidden,
    packing_unsupported,
    prepare_segments,
)
from pyfast.ops.packed_linear import PackedLinears, packing_plan
from pyfast.ops.segments import trie_attention

_TOKENIZER_INFINITY = 1000000000000000019884624838656
_DEFAULT_MAX_LENGTH = 2048


class LM:
    """Interface every evaluation backend implements."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): (sum of log p(continuation tokens), all greedy)."""
        raise NotImplementedError

    def generate_until(
        self, requests: Sequence[tuple[str, dict]], callback: Callable | None = None
    ) -> list[str]:
        """For each (context, {until: [...], max_gen_toks: N, ...}): the generated text.

        `callback(index, text)`, if given, is called as soon as request `index` is finished
        (in any order), so callers can persist results of long runs incrementally.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement generate_until")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders [{role, content}, ...] with the model's chat template (as text)."""
        raise NotImplementedError(f"{type(self).__name__} has no chat template")


@dataclass
class _Group:
    """Requests sharing one context: prefix (P,) token ids, continuations, request indices."""

    prefix: list[int]
    conts: list[list[int]]
    index: list[int]

    @property
    def cost(self) -> int:
        return len(self.prefix) + max(len(c) for c in self.conts)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _new_tokens(g: _Group, before: list[int] | None) -> tuple[int, int]:
    """(tokens `g` adds to a trie whose last group's context is `before`, shared context)."""
    shared = _common_prefix(before, g.prefix) if before is not None else 0
    own = {tuple(c[:k]) for c in g.conts for k in range(1, len(c))}
    return len(g.prefix) - shared + len(own), shared


def _packs(groups: list[_Group], budget: int) -> list[list[_Group]]:
    """Groups in context order, cut into packs whose token tries stay within `budget` tokens,
    or twice the context shared with the pack when that is longer (a long few-shot prefix is
    worth a longer pass: it runs once for all the pack's groups). A group larger than the
    budget is a pack of its own.

    Where a pack is full, the cut goes at its weakest link rather than just before the group
    that does not fit: the groups after the pack's last boundary sharing fewer tokens than that
    group shares with its predecessor (e.g. where one MMLU subject's five examples give way to
    the next's) move on with it, so that a long shared prefix is not split across two packs
    and run twice."""
    packs: list[list[_Group]] = []
    links: list[list[int]] = []  # per pack, the context its i-th group shares with the previous
    size = 0

    def tokens(pack: list[_Group], shared: list[int]) -> int:
        return sum(_new_tokens(g, None)[0] - (s if i else 0)
                   for i, (g, s) in enumerate(zip(pack, shared, strict=True)))  # fmt: skip

    for g in sorted(groups, key=lambda g: g.prefix):
        new, shared = _new_tokens(g, packs[-1][-1].prefix if packs else None)
        if packs and size + new <= max(budget, 2 * shared):
            packs[-1].append(g)
            links[-1].append(shared)
            size += new
            continue
        pack, pack_links = [g], [0]
        if packs and len(packs[-1]) > 1:
            k = min(range(1, len(packs[-1])), key=lambda i: (links[-1][i], -i))
            if links[-1][k] < shared:
                tail, tail_links = [*packs[-1][k:], g], [0, *links[-1][k + 1 :], shared]
                if tokens(tail, tail_links) <= max(budget, 2 * min(tail_links[1:])):
                    pack, pack_links = tail, tail_links
                    del packs[-1][k:], links[-1][k:]
        packs.append(pack)
        links.append(pack_links)
        size = tokens(pack, pack_links)
    return packs


@dataclass
class _Layout:
    """A pack of groups as one token trie in depth-first order: every distinct input sequence
    prefix (context, then each continuation but its last token) is one position.

    ids, pos (the token's depth: its position id in the plain pass) and end (where the
    position's subtree ends) per position; per scored (position, target token) pair its
    position ``at`` and ``target``; per request its pairs ``pairs[r]`` and index ``index[r]``."""

    ids: list[int]
    pos: list[int]
    end: list[int]
    at: list[int]
    target: list[int]
    pairs: list[list[int]]
    index: list[int]


def _layout(groups: list[_Group]) -> _Layout:
    root: dict = {}  # token -> [children, layout position]
    paths = []  # per request: the trie nodes predicting its continuation's tokens
    for g in groups:
        node = None
        level = root
        for tok in g.prefix:
            node = level.setdefault(tok, [{}, -1])
            level = node[0]
        ctx_node, ctx_level = node, level
        for i, c in zip(g.index, g.conts, strict=True):
            node, level, path = ctx_node, ctx_level, [ctx_node]
            for tok in c[:-1]:
                node = level.setdefault(tok, [{}, -1])
                level = node[0]
                path.append(node)
            paths.append((i, path, c))
    ids: list[int] = []
    pos: list[int] = []
    end: list[int] = []
    stack = [(tok, node, 0) for tok, node in reversed(root.items())]
    closing: list[tuple[int, int]] = []  # (layout position, depth) of open subtrees
    while stack:
        tok, node, depth = stack.pop()
        while closing and closing[-1][1] >= depth:
            end[closing.pop()[0]] = len(ids)
        node[1] = len(ids)
        closing.append((len(ids), depth))
        ids.append(tok)
        pos.append(depth)
        end.append(-1)
        stack.extend((t, n, depth + 1) for t, n in reversed(node[0].items()))
    for t, _ in closing:
        end[t] = len(ids)
    pair_of: dict[tuple[int, int], int] = {}
    at: list[int] = []
    target: list[int] = []
    pairs, index = [], []
    for i, path, c in paths:
        mine = []
        for node, tok in zip(path, c, strict=True):
            key = (node[1], tok)
            if key not in pair_of:
                pair_of[key] = len(at)
                at.append(node[1])
                target.append(tok)
            mine.append(pair_of[key])
        pairs.append(mine)
        index.append(i)
    return _Layout(ids, pos, end, at, target, pairs, index)


def _per_request(lp: torch.Tensor, greedy: torch.Tensor, owner: torch.Tensor, index: list[int]):
    """[(request index, summed logprob, all greedy)] from per-token log-probs and greedy flags
    and each token's owner (its position in `index`)."""
    total = torch.zeros(len(index), dtype=torch.float64, device=lp.device)
    total.index_add_(0, owner, lp.double())
    n_miss = torch.zeros(len(index), dtype=torch.long, device=lp.device)
    n_miss.index_add_(0, owner, (~greedy).long())
    return list(zip(index, total.tolist(), (n_miss == 0).tolist(), strict=True))


class HFLM(LM):
    """Hugging Face causal-LM backend.

    Args:
        model: a loaded ``PreTrainedModel`` (causal LM) or a spec for :func:`pyfast.models.
            load_model` ('default', folder, file.gguf); tokenizer required with a model object.
        batch_size: rows per forward pass (packed rows of up to `row_tokens` tokens; contexts
            without packing), or 'auto' (largest that fits, probed on CUDA; 32 on CPU).
        max_length: context window; default from the config like lm-eval.
        packing: score packed token tries (None: wherever the model's attention takes a
            custom 4-D mask); False: context pass + KV cache expanded over the continuations.
        segments: pack each batch into one unpadded row and run attention per subtree
            (:func:`pyfast.ops.segments.trie_attention`); None: wherever packing is on and the
            model runs transformers' "sdpa" attention. False: rows of `row_tokens` padded to
            the longest in the batch, under one dense 4-D mask.
        row_tokens: tokens per packed row (a longer group gets a row of its own); default 128
            on CPU, where the masked attention over a row costs in proportion to its length
            (measured: 128-token rows 10-15% faster than 512 on ARC and HellaSwag), 512 elsewhere.
            With segments, a forward pass takes up to `batch_size` x `row_tokens` tokens.
        subtree_tokens: with segments where the compiled trie kernel does not serve the model
            (CUDA, no extension), a subtree of at most this many tokens attends in one SDPA
            call under its mask; larger ones are cut at their branches (see
            :func:`pyfast.ops.segments.trie_attention`).
        fuse_blocks: when loading `model` by name, run its RMSNorm and SwiGLU-MLP modules through
            pyfast's fused ops (see :func:`pyfast.models.load_model`); an in-memory model is used
            as given.
        pack_weights: run the model's float32 CPU linear layers on oneDNN-packed copies of their
            weights while scoring and generating (:class:`pyfast.ops.packed_linear.
            PackedLinears`: ~10% faster evaluation here, one more copy of those weights in
            memory); None: wherever oneDNN serves and the copies fit in half the available
            memory; True: insist (ValueError where it cannot serve); False: torch's F.linear.
            ``identity["linear_weights"]`` says which.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        batch_size: int | str = 16,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        packing: bool | None = None,
        segments: bool | None = None,
        row_tokens: int | None = None,
        subtree_tokens: int = 256,
        fuse_blocks: bool = True,
        pack_weights: bool | None = None,
    ):
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from pyfast.models import load_model

            model, tokenizer, self.identity = load_model(
                model, device=device or "cpu", dtype=dtype or "float32", fuse_blocks=fuse_blocks
            )
        else:
            if tokenizer is None:
                raise TypeError("HFLM: an in-memory model needs its tokenizer too")
            self.identity = {
                "spec": "<in-memory>",
                "kind": "object",
                "architecture": type(model).__name__,
                "parameters": sum(p.numel() for p in model.parameters()),
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            }
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        pack, self.identity["linear_weights"] = packing_plan(model, pack_weights)
        self._linears = PackedLinears(model) if pack else None
        self.body = getattr(model, model.base_model_prefix, None)
        self.head = model.get_output_embeddings()
        if self.body is None or self.head is None:
            raise TypeError(f"HFLM: {type(model).__name__} is not a supported causal LM")
        # the model's transform of its head's output (softcap, scale), checked on a few tokens
        self.logit_map = check_head(model)
        # transformers 5 renamed the ``past_key_values`` argument to ``cache``.
        params = inspect.signature(self.body.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.max_length = max_length or self._default_max_length()
        supported = self._packing_supported()
        if packing and not supported:
            raise ValueError(f"HFLM: packing is not supported for this model: {self._no_packing}")
        self.packed = supported if packing is None else packing
        impl = getattr(model.config, "_attn_implementation", None)
        if segments and impl != "sdpa":
            raise ValueError(f"HFLM: segments need 'sdpa' attention, the model runs {impl!r}")
        self.segmented = self.packed and segments is not False and prepare_segments(model) is None
        self.row_tokens = row_tokens or (128 if self.device.type == "cpu" else 512)
        if (
            isinstance(subtree_tokens, bool)
            or not isinstance(subtree_tokens, int)
            or subtree_tokens < 0
        ):
            raise ValueError(
                f"HFLM: subtree_tokens must be an integer >= 0, got {subtree_tokens!r}"
            )
        self.subtree_tokens = subtree_tokens
        if batch_size == "auto":
            batch_size = self._auto_batch_size()
        if int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1 or 'auto', got {batch_size}")
        self.batch_size = int(batch_size)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix_token_id = bos if bos is not None else eos
        self._prefix_str = tokenizer.decode(self.prefix_token_id)
        self.stats = {"requests": 0, "forward_passes": 0, "seconds": 0.0}

    def _weights(self):
        """The context the model's forward runs in: its linear layers on packed weights where
        :func:`pyfast.ops.packed_linear.packing_plan` chose them, else as they are."""
        return self._linears if self._linears is not None else contextlib.nullcontext()

    def _packing_supported(self) -> bool:
        """Whether the body takes position ids and a custom additive 4-D attention mask."""
        self._no_packing = packing_unsupported(self.model)
        return self._no_packing is None

    def _default_max_length(self) -> int:
        cfg = getattr(self.model.config, "text_config", None) or self.model.config
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            if getattr(cfg, attr, None) is not None:
                return int(getattr(cfg, attr))
        mml = getattr(self.tokenizer, "model_max_length", None)
        if mml is not None and mml != _TOKENIZER_INFINITY:
            return int(mml)
        return _DEFAULT_MAX_LENGTH

    def _auto_batch_size(self) -> int:
        if self.device.type != "cuda":
            return 32
        for bs in (512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
            try:
                ids = torch.zeros((bs, min(self.max_length, 512)), dtype=torch.long)
                with torch.inference_mode():
                    h = self.body(input_ids=ids.to(self.device)).last_hidden_state
                    self.head(h[:, -8:])
                torch.cuda.empty_cache()
                return bs
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
        return 1

    # -- tokenisation, exactly as lm-eval's HFLM.tok_encode / _encode_pair -------------------
    def _encode(self, text: str) -> list[int]:
        if text.startswith(self._prefix_str) and self._prefix_str:
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) the way lm-eval 0.4.x's HF backend splits them."""
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx) :]

    def _groups(self, requests) -> list[_Group]:
        groups: dict[tuple[int, ...], _Group] = {}
        for i, (context, continuation) in enumerate(requests):
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:
                raise ValueError(f"request {i}: the continuation {continuation!r} has no tokens")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens exceeds max_length "
                    f"{self.max_length}"
                )
            # lm-eval's input: (ctx + cont)[-(max_length + 1):][:-1]; the prefix is the part
            # before the continuation's first predicted position.
            tokens = (ctx + cont)[-(self.max_length + 1) :]
            prefix = tokens[: len(tokens) - len(cont)]
            key = tuple(prefix)
            if key not in groups:
                groups[key] = _Group(list(prefix), [], [])
            groups[key].conts.append(cont)
            groups[key].index.append(i)
        return list(groups.values())

    def _batches(self, groups: list[_Group]) -> list[list[_Group]]:
        """Longest first, `batch_size` groups (rows of the context pass) per batch.

        With sliding-window attention a batch holds contexts of one length only: transformers
        puts the window at index distances, so a right-padded context followed by its
        continuation would see a window shifted by its padding (wrong log-likelihoods)."""
        groups = sorted(groups, key=lambda g: (-g.cost, g.prefix))
        if not (self._no_packing or "").startswith("sliding-window"):
            n = self.batch_size
            return [groups[i : i + n] for i in range(0, len(groups), n)]
        by_length: dict[int, list[_Group]] = {}
        for g in groups:
            by_length.setdefault(len(g.prefix), []).append(g)
        return [
            same[i : i + self.batch_size]
            for same in by_length.values()
            for i in range(0, len(same), self.batch_size)
        ]

    @torch.inference_mode()
    def _score_batch(self, batch: list[_Group]) -> list[tuple[int, float, bool]]:
        """Scores one batch; returns (request index, logprob, is_greedy) per request."""
        dev = self.device
        plen = [len(g.prefix) for g in batch]
        P = max(plen)
        ids = torch.zeros((len(batch), P), dtype=torch.long)  # (G, P), right-padded
        for r, g in enumerate(batch):
            ids[r, : len(g.prefix)] = torch.tensor(g.prefix)
        rows = [(r, c, g.index[k]) for r, g in enumerate(batch) for k, c in enumerate(g.conts)]
        C = max(len(c) for _, c, _ in rows) - 1  # tokens fed after the prefix
        out = self.body(input_ids=ids.to(dev), use_cache=C > 0)
        self.stats["forward_passes"] += 1
        h_prefix = out.last_hidden_state  # (G, P, H)
        # First continuation token of every row is predicted at the prefix's last position.
        g_idx = torch.tensor([r for r, _, _ in rows])
        last = torch.tensor([plen[r] - 1 for r, _, _ in rows])
        hidden = [h_prefix[g_idx, last]]  # (R, H)
        targets = [torch.tensor([c[0] for _, c, _ in rows])]
        owner = [torch.arange(len(rows))]
        if C > 0:
            cache = getattr(out, "cache", None) or out.past_key_values
            # Multi-token continuations, longest first, cut into passes of at most the context
            # pass's token count (G * P): padding stays small when choice lengths vary, and
            # there are few passes.
            multi = sorted((j for j, (_, c, _) in enumerate(rows) if len(c) > 1),
                           key=lambda j: -len(rows[j][1]))  # fmt: skip
            budget = max(len(batch) * P, self.batch_size)
            chunks: list[list[int]] = []
            for j in multi:
                if chunks and (len(chunks[-1]) + 1) * (len(rows[chunks[-1][0]][1]) - 1) <= budget:
                    chunks[-1].append(j)
                else:
                    chunks.append([j])
            for n, chunk in enumerate(chunks):
                h, t, o = self._continuation_pass(
                    rows, chunk, plen, P, cache if n == len(chunks) - 1 else copy.deepcopy(cache)
                )
                hidden.append(h)
                targets.append(t)
                owner.append(o)
        lp, greedy = target_logprobs(
            torch.cat(hidden),
            self.head.weight,
            torch.cat(targets).to(dev),
            self.head.bias,
            logit_map=self.logit_map,
        )
        return _per_request(lp, greedy, torch.cat(owner).to(dev), [i for _, _, i in rows])

    def _padded_batches(self, groups: list[_Group]) -> list[list[list[_Group]]]:
        """Packs of about `row_tokens` tokens (one padded row each), longest first, in batches
        of `batch_size` rows."""
        rows = sorted(_packs(groups, self.row_tokens), key=lambda p: -sum(
            len(g.prefix) + sum(map(len, g.conts)) for g in p))  # fmt: skip
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    @torch.inference_mode()
    def _score_packed(
        self, batch: list[list[_Group]], segmented: bool = False
    ) -> list[tuple[int, float, bool]]:
        """Scores packs of groups, one token trie per row (:func:`_layout`), in one forward pass;
        returns (request, logprob, is_greedy) per request.

        Rows are right-padded to the longest and attend under one dense 4-D mask (position i
        sees j when j <= i < end[j]); with `segmented` the batch is a single unpadded row whose
        attention runs over the trie (:func:`pyfast.ops.segments.trie_attention`)."""
        dev = self.device
        layouts = [_layout(pack) for pack in batch]
        L = max(len(lay.ids) for lay in layouts)
        ids = torch.zeros((len(batch), L), dtype=torch.long)
        pos = torch.zeros((len(batch), L), dtype=torch.long)
        end = torch.arange(1, L + 1).repeat(len(batch), 1)  # padding: a subtree of its own
        for b, lay in enumerate(layouts):
            n = len(lay.ids)
            ids[b, :n], pos[b, :n], end[b, :n] = map(torch.tensor, (lay.ids, lay.pos, lay.end))
        self.stats["forward_passes"] += 1
        # Scored positions of all rows, then each (position, target) pair once.
        at = torch.cat([torch.tensor(lay.at) + b * L for b, lay in enumerate(layouts)])
        targets = torch.cat([torch.tensor(lay.target) for lay in layouts])
        rows, where = torch.unique(at, return_inverse=True)
        if segmented:
            try:
                h = decoder_hidden(
                    self.model, ids[0].to(dev), pos[0].to(dev),
                    trie_attention(end[0], self.subtree_tokens, dev),
                    "scoring on padded rows with a dense mask instead", rows.to(dev),
                )  # (R, H)  # fmt: skip
            except SegmentsNotTaken as exc:
                # score this pack on padded rows under a dense mask, and every later batch
                name = type(self.model).__name__
                warnings.warn(f"HFLM: {name} did not run segmented attention in every layer: {exc}",
                              stacklevel=2)  # fmt: skip
                self.segmented = False
                return [
                    x for rows in self._padded_batches(batch[0]) for x in self._score_packed(rows)
                ]
        else:
            j = torch.arange(L)
            seen = (j[None, None, :] <= j[None, :, None]) & (j[None, :, None] < end[:, None, :])
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)
            hidden = self.body(
                input_ids=ids.to(dev),
                attention_mask=mask.unsqueeze(1).to(dev),
                position_ids=pos.to(dev),
                use_cache=False,
            ).last_hidden_state  # (B, L, H)
            h = hidden.reshape(-1, hidden.shape[-1])[rows.to(dev)]
        lp, greedy = shared_target_logprobs(
            h,
            self.head.weight,
            where.to(dev),
            targets.to(dev),
            self.head.bias,
            logit_map=self.logit_map,
        )
        flat, owner, index, offset = [], [], [], 0
        for lay in layouts:
            for i, mine in zip(lay.index, lay.pairs, strict=True):
                flat += [offset + k for k in mine]
                owner += [len(index)] * len(mine)
                index.append(i)
            offset += len(lay.at)
        flat_t = torch.tensor(flat, device=dev)
        return _per_request(lp[flat_t], greedy[flat_t], torch.tensor(owner, device=dev), index)

    def _continuation_pass(self, rows, chunk, plen, P, cache):
        """Runs continuation tokens but the last of rows[chunk] on the expanded context cache.

        Returns hidden (N, H) at every position that predicts a continuation token (all but
        the first, which the context pass predicts), its targets (N,) and owning rows (N,).
        """
        dev = self.device
        C = max(len(rows[j][1]) for j in chunk) - 1
        g_idx = torch.tensor([rows[j][0] for j in chunk])
        cache.reorder_cache(g_idx.to(dev))  # (G, ...) -> (R, ...): expand over the choices
        inp = torch.zeros((len(chunk), C), dtype=torch.long)  # (R, C), right-padded
        mask = torch.zeros((len(chunk), P + C), dtype=torch.long)  # context pads are masked
        for i, j in enumerate(chunk):
            r, c, _ = rows[j]
            inp[i, : len(c) - 1] = torch.tensor(c[:-1])
            mask[i, : plen[r]] = 1
            mask[i, P : P + len(c) - 1] = 1
        pos = torch.tensor(plen)[g_idx].unsqueeze(1) + torch.arange(C)  # (R, C)
        h_cont = self.body(
            input_ids=inp.to(dev),
            attention_mask=mask.to(dev),
            position_ids=pos.to(dev),
            use_cache=False,
            **{self._cache_arg: cache},
        ).last_hidden_state  # (R, C, H)
        self.stats["forward_passes"] += 1
        sel = [(i, k) for i, j in enumerate(chunk) for k in range(len(rows[j][1]) - 1)]
        ii = torch.tensor([i for i, _ in sel])
        kk = torch.tensor([k for _, k in sel])
        targets = torch.tensor([rows[chunk[i]][1][k + 1] for i, k in sel])
        return h_cont[ii, kk], targets, torch.tensor(chunk)[ii]

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], progress: Callable | None = None
    ) -> list[tuple[float, bool]]:
        """Scores (context, continuation) pairs; returns [(logprob, is_greedy)] in input order.

        `progress(requests, tokens)` is called after each forward batch with its number of
        requests and of input tokens (context + continuation tokens of its groups).

        Raises ValueError for a continuation with no tokens or longer than max_length.
        """
        start = time.perf_counter()
        requests = [tuple(r) for r in requests]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        was_training = self.model.training  # evaluation during training: no dropout, then back
        self.model.eval()
        try:
            with self._weights():
                groups = self._groups(requests)
                if self.packed and self.segmented:
                    # One unpadded row per forward pass, up to batch_size * row_tokens tokens.
                    packs = _packs(groups, self.batch_size * self.row_tokens)
                    batches = [[pack] for pack in packs]
                    score = lambda b: self._score_packed(b, self.segmented)  # noqa: E731
                elif self.packed:
                    batches, score = self._padded_batches(groups), self._score_packed
                else:
                    batches, score = [[[g] for g in b] for b in self._batches(groups)], None
                for batch in batches:
                    if score is None:
                        batch_scores = self._score_batch([row[0] for row in batch])
                    else:
                        batch_scores = score(batch)
                    for i, lp, greedy in batch_scores:
                        results[i] = (lp, greedy)
                    if progress is not None:
                        n = sum(len(g.prefix) + sum(map(len, g.conts)) for r in batch for g in r)
                        progress(len(batch_scores), n)
        finally:
            self.model.train(was_training)
        self.stats["requests"] += len(requests)
        self.stats["seconds"] += time.perf_counter() - start
        return results  # type: ignore[return-value]

    # -- generation -------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders [{role, content}, ...] with the tokenizer's chat template, as text.

        As lm-eval does: with ``add_generation_prompt`` the assistant header is appended,
        otherwise the last (assistant) message is left open to be continued; a template that
        rejects the system role is retried without the system messages.

        Raises ValueError if the tokenizer has no chat template.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of model {self.identity.get('spec')!r} has no chat template "
                "(drop --apply-chat-template)"
            )
        import jinja2

        kw = {"tokenize": False, "add_generation_prompt": add_generation_prompt,
              "continue_final_message": not add_generation_prompt}  # fmt: skip
        try:
            return self.tokenizer.apply_chat_template(messages, **kw)
        except jinja2.exceptions.TemplateError:
            if not any(m.get("role") == "system" for m in messages):
                raise
            return self.tokenizer.apply_chat_template(
                [m for m in messages if m.get("role") != "system"], **kw
            )

    def _encode_context(self, context: str) -> list[int]:
        """Context tokens as lm-eval's tok_batch_encode makes them (no extra BOS if present)."""
        bos = self.tokenizer.bos_token
        if bos and context.startswith(bos):
            return self.tokenizer(context, add_special_tokens=False)["input_ids"]
        return self.tokenizer(context)["input_ids"]

    def _eos_ids(self) -> set[int]:
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    def generate_until(
        self, requests: Sequence[tuple[str, dict]], callback: Callable | None = None
    ) -> list[str]:
        """Generates a continuation of each context; returns the texts in input order.

        Each request is ``(context, gen_kwargs)`` (keys in :mod:`pyfast.eval.generation`).
        Like lm-eval 0.4.x's HF backend: the context is left-truncated to ``max_length -
        max_gen_toks`` tokens, a row ends at the model's EOS token or after ``max_gen_toks``
        tokens, the decoded text (special tokens skipped) is cut at the first stop string of
        ``until`` (plus the EOS string).

        All requests are length-sorted (longest first) and decoded with continuous batching
        over one KV cache of up to ``batch_size`` rows, whatever their settings (each row keeps
        its own temperature, top_p/top_k, stop strings and max_gen_toks, so greedy and sampled
        requests share batches): each prompt is
        prefilled on its own (no padding: the causal attention fast path), its cache joins the
        left-padded batch cache, then the batch decodes one token per step; a row leaves the
        batch as soon as it hits EOS, a stop string or max_gen_toks, and the next request takes
        its place, so short answers never wait for the longest one. Greedy results do not
        depend on the batch size (up to float rounding of padded matmuls); sampled rows draw
        from their own generator seeded with the request's ``seed`` (default 1234 + its index
        in `requests`).

        `callback(index, text)` is called for every request as soon as it is finished.
        """
        start = time.perf_counter()
        items = []
        for i, req in enumerate(requests):
            if not (isinstance(req, (tuple, list)) and len(req) == 2 and isinstance(req[0], str)):
                raise ValueError(f"generation request {i} must be (context: str, gen_kwargs: dict)")
            g = normalize_gen_kwargs(req[1])
            if g.max_gen_toks >= self.max_length:
                raise ValueError(
                    f"generation request {i}: max_gen_toks {g.max_gen_toks} must be smaller "
                    f"than the model's max_length {self.max_length}"
                )
            ids = self._encode_context(req[0])[-(self.max_length - g.max_gen_toks) :]
            items.append((i, ids or [self.prefix_token_id], g))
        results: list[str | None] = [None] * len(items)

        def finish(i: int, text: str) -> None:
            results[i] = text
            if callback is not None:
                callback(i, text)

        was_training = self.model.training
        self.model.eval()
        try:
            with self._weights():
                if items:
                    items.sort(key=lambda it: (-len(it[1]), it[0]))
                    self._generate_group(items, finish)
        finally:
            self.model.train(was_training)
        self.stats["generation_requests"] = self.stats.get("generation_requests", 0) + len(items)
        self.stats["generate_seconds"] = (
            self.stats.get("generate_seconds", 0.0) + time.perf_counter() - start
        )
        return results  # type: ignore[return-value]

    def _pick(self, logits: torch.Tensor, settings: list, generators: list) -> torch.Tensor:
        """Next token per row from float32 logits (A, V): argmax for greedy rows, a seeded
        sample under the row's own settings for the others."""
        tok = logits.argmax(-1)
        for a, g in enumerate(settings):
            if g.do_sample:
                tok[a] = self._sample(logits[a : a + 1], g, generators[a])
        return tok

    @staticmethod
    def _sample(logits: torch.Tensor, g: GenKwargs, gen: torch.Generator) -> torch.Tensor:
        """One token from float32 logits (1, V): temperature, top_k, top_p, then the draw."""
        logits = logits / g.temperature
        if g.top_k:
            kth = torch.topk(logits, min(g.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if g.top_p < 1.0:
            srt, order = logits.sort(dim=-1, descending=True)
            probs = srt.softmax(-1)
            drop = (probs.cumsum(-1) - probs) >= g.top_p  # mass before the token already >= p
            drop[:, 0] = False
            logits = logits.scatter(-1, order, srt.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1).cpu()
        return torch.multinomial(probs[0], 1, generator=gen).to(logits.device)

    def _stops(self, g: GenKwargs) -> list[str]:
        until = list(g.until)
        if self.tokenizer.eos_token_id is not None:  # lm-eval adds the EOS string to the stops
            eos_text = self.tokenizer.decode([self.tokenizer.eos_token_id])
            if eos_text not in until:
                until.append(eos_text)
        return until

    def _forward(self, ids: torch.Tensor, **kw):
        """Body pass -> (last-position float32 logits (B, V), cache)."""
        out = self.body(input_ids=ids, use_cache=True, **kw)
        self.stats["forward_passes"] += 1
        cache = getattr(out, "cache", None) or out.past_key_values
        logits = apply_logit_map(self.head(out.last_hidden_state[:, -1]), self.logit_map)
        return logits.float(), cache

    @torch.inference_mode()
    def _generate_group(self, group: list, finish: Callable[[int, str], None]) -> None:
        """Continuous batching of (index, context ids, GenKwargs), each row on its settings."""
        from transformers.cache_utils import DynamicLayer

        dev = self.device
        eos_ids = self._eos_ids()
        queue = deque(group)
        capacity = self.batch_size
        # [request index, generated ids, generator, GenKwargs, stop strings, stop window] per row
        rows: list[list] = []
        cache = mask = next_pos = logits = None  # mask (A, L) left-padded; next_pos (A, 1)
        while queue or rows:
            while queue and len(rows) < capacity:  # admit: prefill one prompt, unpadded
                i, ids, gk = queue.popleft()
                row_logits, row_cache = self._forward(torch.tensor([ids], device=dev))
                if any(type(layer) is not DynamicLayer for layer in row_cache.layers):
                    capacity = 1  # caches that cannot be padded and joined: one row at a time
                gen = torch.Generator()
                gen.manual_seed(gk.seed if gk.seed is not None else 1234 + i)
                until = self._stops(gk)
                window = max(len(s.encode("utf-8")) for s in until) + 2  # tokens holding a stop
                rows.append([i, [], gen, gk, until, window])
                n = len(ids)
                if cache is None:
                    cache, logits = row_cache, row_logits
                    mask = torch.ones((1, n), dtype=torch.long, device=dev)
                    next_pos = torch.full((1, 1), n, dtype=torch.long, device=dev)
                    continue
                width = max(mask.shape[1], n)
                for layer, new in zip(cache.layers, row_cache.layers, strict=True):
                    layer.keys = torch.cat(
                        [_left_pad(layer.keys, width), _left_pad(new.keys, width)]
                    )
                    layer.values = torch.cat(
                        [_left_pad(layer.values, width), _left_pad(new.values, width)]
                    )
                ones = torch.ones((1, n), dtype=torch.long, device=dev)
                mask = torch.cat([_left_pad(mask, width, dim=1), _left_pad(ones, width, dim=1)])
                next_pos = torch.cat([next_pos, torch.full((1, 1), n, device=dev)])
                logits = torch.cat([logits, row_logits])
            tok = self._pick(logits, [r[3] for r in rows], [r[2] for r in rows])  # (A,)
            keep = []
            for a, (row, t) in enumerate(zip(rows, tok.tolist(), strict=True)):
                _, ids, _, gk, until, window = row
                if t not in eos_ids:
                    ids.append(t)
                    tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=True)
                    if len(ids) < gk.max_gen_toks and not any(s and s in tail for s in until):
                        keep.append(a)
                        continue
                self.stats["generated_tokens"] = self.stats.get("generated_tokens", 0) + len(row[1])
                text = self.tokenizer.decode(row[1], skip_special_tokens=True)
                finish(row[0], cut_at_stop(text, until))
            if not keep:
                rows, cache = [], None
                continue
            if len(keep) < len(rows):  # finished rows leave the batch and the cache
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask, next_pos, tok = mask[idx], next_pos[idx], tok[idx]
                rows = [rows[a] for a in keep]
                first = int(mask.any(0).long().argmax())  # columns that are padding everywhere
                if first:
                    mask = mask[:, first:]
                    for layer in cache.layers:
                        layer.keys = layer.keys[..., first:, :]
                        layer.values = layer.values[..., first:, :]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            logits, cache = self._forward(
                tok[:, None], attention_mask=mask, position_ids=next_pos, **{self._cache_arg: cache}
            )
            next_pos = next_pos + 1


def _left_pad(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """Zero-pads `t` on the left of `dim` to `width` entries."""
    dim = dim % t.dim()
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
