"""The fine-tuning recipe: ``Recipe(cfg).run()`` = setup(), train(), cleanup().

Subclass hooks (the alignment recipes build on these):

* :meth:`Recipe.load_model` -> (model, tokenizer); :meth:`Recipe.load_data` -> (train, held-out)
  lists of examples; :meth:`Recipe.collate` -> a batch dict of tensors.
* :meth:`Recipe.compute_loss` ``(model, batch) -> (mean loss, stats dict)``: the loss of one
  micro-batch, averaged over its :meth:`Recipe.batch_weight` units (target tokens for SFT,
  pairs for DPO). The loop weights each micro-batch by its units over the whole global batch
  (all accumulation steps and ranks), so the update equals the unit-mean loss of the global batch
  however it is split.

The loop: FusedAdamW with fused clipping and the freezing masks, warmup + cosine/linear schedule,
gradient accumulation, optional bf16 autocast, held-out loss/perplexity (and benchmark tasks) every
``eval.every`` steps, early stopping keeping the best model, a stop with a clear message on a
NaN/inf loss, checkpoints that ``--resume`` continues exactly, metrics.jsonl and a loss plot.
Under ``torchrun`` (WORLD_SIZE > 1) the same loop runs data-parallel with DDP (gloo on CPU), or
with ``distributed=fsdp`` sharded by torch's ``fully_shard`` (:mod:`pyfast.train.fsdp`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pyfast.hf.head import logit_map
from pyfast.hf.packing import decoder_hidden, prepare_segments
from pyfast.io import WriteError, atomic_write, write_json
from pyfast.ops import grad_mask_, linear_cross_entropy
from pyfast.ops.packed_linear import packed_for_inference, packed_frozen
from pyfast.ops.segments import SegmentedAttention
from pyfast.optim import FusedAdamW
from pyfast.train import checkpoint as ckpt
from pyfast.train.config import TrainConfig, to_dict
from pyfast.train.data import (
    IGNORE_INDEX,
    check_data_files,
    collate,
    epoch_order,
    load_examples,
    pad_id_of,
)
from pyfast.train.freeze import FreezePlan, apply_freeze
from pyfast.train.run_folder import FolderError, RunFolder
from pyfast.train.schedule import build_scheduler


class TrainingStopped(RuntimeError):
    """Raised when training must stop (non-finite loss); the best checkpoint is kept."""


class _LossModule(nn.Module):
    """Wraps the model so that DDP's forward computes the recipe's loss (gradient sync hooks);
    under FSDP it is the root unit, whose forward gathers the weights outside the blocks."""

    def __init__(self, recipe: Recipe, model: nn.Module):
        super().__init__()
        self.model = model
        self._recipe = [recipe]  # a list: not registered as a submodule

    def forward(self, batch: dict):
        return self._recipe[0].compute_loss(self.model, batch)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, t + 1] at position t (-100 at the end): the targets of next-token prediction."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_hidden(model: nn.Module, input_ids, attention_mask=None) -> torch.Tensor:
    """The decoder body's last hidden states (B, T, D): no logits are formed."""
    body = model.get_decoder()
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def padding_free_hidden(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch's rows run as one unpadded row: (hidden (N, D), next-token targets (N,)) at
    the positions with a target (the last layer's MLP runs only there).

    Each right-padded row is cut after the input position of its last target (with causal
    attention nothing later can change a loss term) and rows are laid end to end, position ids
    restarting at 0 and attention kept within each row by
    :class:`pyfast.ops.segments.SegmentedAttention` (the model must run transformers' "sdpa"
    attention through the dispatcher that :func:`pyfast.hf.packing.prepare_segments`
    installs). The mean loss over the targets equals the padded batch's. None when no row has
    a target or a row is not right-padded (the caller runs the padded batch).
    """
    targets = shifted_labels(labels)
    pos = torch.arange(targets.shape[1], device=targets.device)
    lengths = (torch.where(targets != IGNORE_INDEX, pos, -1).amax(1) + 1).tolist()
    if attention_mask is not None:
        real = attention_mask.sum(1).tolist()
        if not all(bool(attention_mask[i, : real[i]].all()) for i in range(len(real))):
            return None
        lengths = [min(n, r) for n, r in zip(lengths, real, strict=True)]
    rows = [i for i, n in enumerate(lengths) if n > 0]
    if not rows:
        return None
    targets = torch.cat([targets[i, : lengths[i]] for i in rows])
    scored = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if scored.numel() == targets.numel():
        scored = None  # a target everywhere: the last layer runs in full anyway
    hidden = decoder_hidden(
        model,
        torch.cat([input_ids[i, : lengths[i]] for i in rows]),
        torch.cat([pos[: lengths[i]] for i in rows]),
        SegmentedAttention.causal([lengths[i] for i in rows], input_ids.device),
        "set model.padding_free: false",
        scored,
    )
    return hidden, targets if scored is None else targets[scored]


class Recipe:
    """Supervised fine-tuning / transfer learning of a causal LM (see the module docstring).

    Args:
        cfg: the resolved :class:`TrainConfig`.
        resume: a checkpoint folder, or "latest" for the newest under ``output_dir``.
        overwrite: move what ``output_dir`` holds aside (``<out>.old-<time>``) and start anew.

    ``output_dir`` follows :mod:`pyfast.train.run_folder`'s rules: a new run needs a new or
    empty folder, ``resume`` continues the folder's own run (same config but for a few keys),
    and the folder is locked from :meth:`setup` to :meth:`cleanup`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        resume: str | os.PathLike | None = None,
        overwrite: bool = False,
    ):
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.folder: RunFolder | None = None  # rank 0: the locked output folder
        self.run_info: dict = {}  # rank 0: the run record (run.json)
        self.out = Path(cfg.output_dir)
        self.rank, self.world = 0, 1
        self.fsdp = False  # sharded with fully_shard (distributed=fsdp under torchrun)
        self.device = torch.device(cfg.device)
        self.history: list[dict] = []
        self.step = 0
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.stop_reason = ""
        self._since_best = 0
        self.padding_free = False  # set by setup() where the model supports it

    # -- hooks ---------------------------------------------------------------------------------
    def load_model(self, spec: str):
        """(model, tokenizer) for `spec`; default: :func:`pyfast.models.load_model`.

        Under FSDP the model is loaded on the CPU: ``fully_shard`` moves it to the rank's device
        one unit at a time, so the whole model never has to fit one device.
        """
        from pyfast.models import load_model

        model, tok, self.model_identity = load_model(
            spec,
            device="cpu" if self.fsdp else self.cfg.device,
            dtype=self.cfg.model.dtype,
            fuse_blocks=self.cfg.model.fused_blocks,
            recompute_mlp=self.cfg.model.recompute_mlp,
        )
        return model, tok

    def check_data(self) -> None:
        """Reads the local data files before the model loads: a missing file, malformed JSONL or
        a row without the format's fields fails here, in seconds, naming file and line."""
        check_data_files(self.cfg.data)

    def load_data(self):
        """(train examples, held-out examples); also sets ``self.data_stats``."""
        train, held, self.data_stats = load_examples(
            self.cfg.data, self.tokenizer, self.cfg.model.chat_template, self.cfg.seed
        )
        return train, held

    def collate(self, examples: list) -> dict:
        return collate(examples, pad_id_of(self.tokenizer))

    def batch_weight(self, batch: dict) -> int:
        """Loss units of a micro-batch: its next-token targets (labels != -100 after the shift)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def compute_loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """Mean next-token NLL over the batch's target tokens, through the fused head.

        The decoder body gives hidden states; :func:`pyfast.ops.linear_cross_entropy` takes them
        with the lm_head weight, so the (B, T, V) logits never exist.
        """
        unpadded = None
        with self.autocast():
            if self.padding_free:
                unpadded = padding_free_hidden(
                    model, batch["input_ids"], batch["labels"], batch["attention_mask"]
                )
            if unpadded is None:
                hidden = causal_lm_hidden(model, batch["input_ids"], batch["attention_mask"])
                targets = shifted_labels(batch["labels"])
            else:
                hidden, targets = unpadded
        head = model.get_output_embeddings()
        if hidden.dtype != head.weight.dtype:
            hidden = hidden.to(head.weight.dtype)
        m = logit_map(model)  # the model's softcap / scale of its head's output
        loss = linear_cross_entropy(
            hidden, head.weight, targets, getattr(head, "bias", None),
            scale=m.scale, softcap=m.softcap,
        )  # fmt: skip
        return loss, {}

    # -- setup ---------------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def _init_distributed(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.fsdp = self.cfg.distributed == "fsdp"
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)

    def _claim_output(self) -> Path | None:
        """Rank 0 locks ``output_dir`` and applies the folder rules (every rank gets the same
        verdict); returns the checkpoint to resume from, if any."""
        err, found = None, None
        if self.rank == 0:
            self.folder = RunFolder(self.out)
            try:
                self.run_info, found = self.folder.claim(
                    to_dict(self.cfg), self.resume, self.overwrite, self.log
                )
            except FolderError as exc:
                err = str(exc)
        if self.world > 1:
            box = [err, None if found is None else str(found)]
            dist.broadcast_object_list(box, src=0)
            err, found = box[0], None if box[1] is None else Path(box[1])
        if err:
            raise FolderError(err)
        return found

    def _release_output(self) -> None:
        if self.folder is not None:
            self.folder.release()

    def setup(self) -> None:
        """Claims ``output_dir``, checks the data files, then loads model, data, freezing
        policy, optimizer and schedule; restores a checkpoint."""
        cfg = self.cfg
        if cfg.threads:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(cfg.threads)
        self._init_distributed()
        torch.manual_seed(cfg.seed)
        resume_from = self._claim_output()
        try:
            self._setup(resume_from)
        except BaseException:
            self._release_output()
            raise

    def _setup(self, resume_from: Path | None) -> None:
        cfg = self.cfg
        if resume_from is not None:
            meta, blob = ckpt.read_state(resume_from)
        self.check_data()
        model, self.tokenizer = self.load_model(cfg.model.name)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.plan: FreezePlan = apply_freeze(model, cfg.freeze)
        self.model = self.plan.model if self.fsdp else self.plan.model.to(self.device)
        if resume_from is not None:
            ckpt.load_weights_into(self.model, resume_from)
        self.log(self.plan.summary())
        if cfg.model.padding_free:
            why = prepare_segments(self.model)
            self.padding_free = why is None
            if why:
                self.log(f"padding-free batches off for this model: {why}")
        if cfg.trim_heap_every:
            from pyfast.heap import HeapTrimmer

            self.heap_trimmer = HeapTrimmer(self.model, cfg.trim_heap_every)
        self.train_examples, self.eval_examples = self.load_data()
        self._log_data()

        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        self.steps_per_epoch = len(self.train_examples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(self.train_examples)} examples, fewer than one global "
                f"batch ({cfg.batch_size} x {cfg.grad_accum} accumulation x {self.world} ranks)"
            )
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.loss_module = _LossModule(self, self.model)
        if self.fsdp:
            from pyfast.train import fsdp

            names = {id(p): n for n, p in self.plan.params}
            masks = {names[id(p)]: m for p, m in self.plan.masks.items()}
            blocks = fsdp.shard(self.loss_module, self.model, self.device)
            # fully_shard replaced the parameters with sharded ones: the optimizer takes those
            self.plan.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            by_name = dict(self.plan.params)
            self.plan.masks = {by_name[n]: m for n, m in masks.items()}  # sliced by FusedAdamW
            local = sum(p.to_local().numel() for p in self.model.parameters())
            self.log(
                f"FSDP: {blocks} decoder blocks + root sharded over {self.world} ranks; rank 0 "
                f"holds {local:,} of {self.plan.total:,} parameters (and their gradients and "
                "optimizer moments)"
            )
        elif cfg.distributed == "fsdp":
            self.log("distributed=fsdp: a single process, nothing to shard")
        self.optimizer = self.build_optimizer()
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        if self.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.loss_module = DDP(self.loss_module, device_ids=ids)
        if resume_from is not None:
            if self.fsdp:
                fsdp.load_optimizer_state(self.optimizer, blob["optimizer"])
            else:
                self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
            ckpt.set_rng_state(blob["rng"])
            self.step = meta["step"]
            self.best_loss, self.best_step = meta.get("best_loss"), meta.get("best_step")
            self._since_best = meta.get("since_best", 0)
            self.history = [h for h in self._read_metrics() if h.get("step", 0) <= self.step]
            self.log(f"resumed from {resume_from} at step {self.step}")
        elif self.rank == 0:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if self.rank == 0:
            self.folder.write_run(self.run_info)
            self._rewrite_metrics()

    def _log_data(self) -> None:
        s = self.data_stats["train"]
        self.log(
            f"data: {s['examples']} training examples ({s['format']}, {s['target_tokens']:,} "
            f"target tokens), {len(self.eval_examples)} held-out; {s['truncated']} truncated to "
            f"max_length={self.cfg.data.max_length}"
            + (f", {s['empty_targets']} dropped (nothing to learn)" if s["empty_targets"] else "")
        )

    def build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = [p for _, p in self.plan.params]
        if o.update_in_backward:
            self._check_update_in_backward()
        if o.name == "fused_adamw":
            opt = FusedAdamW(
                params,
                lr=o.lr,
                betas=(o.beta1, o.beta2),
                eps=o.eps,
                weight_decay=o.weight_decay,
                max_grad_norm=o.max_grad_norm,
                masks=self.plan.masks,
                state_dtype=torch.bfloat16 if o.state_dtype == "bfloat16" else torch.float32,
            )
            opt.allocate_state()
            if o.update_in_backward:
                opt.update_in_backward()
            return opt
        # torch.optim.AdamW: masked params get no weight decay; grad_mask_ zeroes their frozen
        # rows' gradients, so those rows' moments and updates stay exactly zero.
        masked = [p for p in params if p in self.plan.masks]
        rest = [p for p in params if p not in self.plan.masks]
        groups = [{"params": rest}] + ([{"params": masked, "weight_decay": 0.0}] if masked else [])
        return torch.optim.AdamW(
            groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        )

    def _check_update_in_backward(self) -> None:
        cfg, why = self.cfg, None
        if cfg.optim.name != "fused_adamw":
            why = f"optim.name={cfg.optim.name} (it needs fused_adamw)"
        elif cfg.optim.max_grad_norm:
            why = (
                f"optim.max_grad_norm={cfg.optim.max_grad_norm} (clipping needs every gradient "
                "first; set it to null)"
            )
        elif cfg.grad_accum != 1:
            why = f"grad_accum={cfg.grad_accum} (accumulation needs gradients to persist)"
        elif self.world > 1:
            why = f"{self.world} processes (gradients must be all-reduced before the update)"
        if why:
            raise ValueError(f"optim.update_in_backward=true cannot be used with {why}")

    # -- the loop ------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[list]:
        """This rank's micro-batches (lists of examples) of global step `step`."""
        cfg = self.cfg
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_examples), epoch, cfg.seed, cfg.data.shuffle)
        chunk = order[pos * self.global_batch : (pos + 1) * self.global_batch]
        per_rank = cfg.batch_size * cfg.grad_accum
        mine = chunk[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [
            [self.train_examples[i] for i in mine[a * cfg.batch_size : (a + 1) * cfg.batch_size]]
            for a in range(cfg.grad_accum)
        ]

    def _all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics."""
        self.loss_module.train()
        batches = [self._to_device(self.collate(m)) for m in self.micro_batches(self.step)]
        weights = [self.batch_weight(b) for b in batches]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        total_w, total_tokens = self._all_sum([float(sum(weights)), float(tokens)])
        loss_sum = 0.0
        for i, (batch, w) in enumerate(zip(batches, weights, strict=True)):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext()
            if self.world > 1 and not last and not self.fsdp:  # FSDP reduce-scatters each one
                sync = self.loss_module.no_sync()
            with sync:
                loss, _ = self.loss_module(batch)
                # DDP and FSDP average gradients over ranks: * world makes it a sum over the
                # global batch
                (loss * (w * self.world / max(total_w, 1.0))).backward()
            loss_sum += float(loss.detach()) * w
        (loss_sum,) = self._all_sum([loss_sum])
        step_loss = loss_sum / max(total_w, 1.0)
        if not math.isfinite(step_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingStopped(
                f"non-finite training loss ({step_loss}) at step {self.step + 1}: stopped "
                + (
                    "(the update already ran inside backward: optim.update_in_backward)"
                    if getattr(self.optimizer, "updates_in_backward", False)
                    else "before the update"
                )
                + "; lower optim.lr, check the data, or use precision=float32"
                + (
                    f" (best checkpoint of step {self.best_step} kept in {self.out / 'best'})"
                    if self.best_step is not None
                    else ""
                )
            )
        grad_norm = self._optimizer_step()
        self.step += 1
        return {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "loss": step_loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens": int(total_tokens),
        }

    def _optimizer_step(self) -> float:
        opt = self.optimizer
        params = [p for _, p in self.plan.params]
        if isinstance(opt, FusedAdamW):
            opt.step()  # clipping and masks inside the fused update
            norm = float(opt.last_grad_norm) if opt.last_grad_norm is not None else 0.0
        else:
            with_grad = [p for p in params if p.grad is not None]
            masked = [p for p in with_grad if p in self.plan.masks]
            if masked:
                grad_mask_([p.grad for p in masked], [self.plan.masks[p] for p in masked])
            max_norm = self.cfg.optim.max_grad_norm or float("inf")
            total = torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
            if hasattr(total, "full_tensor"):  # sharded gradients (FSDP): a DTensor norm
                total = total.full_tensor()
            norm = float(total)
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def heldout_batches(self):
        """This rank's held-out micro-batches, as (batch, counted) pairs.

        Ranks take every world-th example. Under FSDP a forward pass is collective, so every rank
        runs the same number of batches: one with fewer examples runs uncounted padding batches.
        """
        bs = self.cfg.eval.batch_size
        mine = self.eval_examples[self.rank :: self.world]
        n = math.ceil(len(mine) / bs)
        if self.fsdp:
            n = math.ceil(math.ceil(len(self.eval_examples) / self.world) / bs)
        for i in range(n):
            chunk = mine[i * bs : (i + 1) * bs]
            yield self._to_device(self.collate(chunk or self.eval_examples[:1])), bool(chunk)

    def heldout_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """:meth:`compute_loss` of a held-out batch (through the FSDP root when sharded)."""
        if self.fsdp:
            return self.loss_module(batch)
        return self.compute_loss(self.model, batch)

    @torch.no_grad()
    def evaluate_heldout(self) -> dict:
        """Held-out loss (unit-weighted mean) and perplexity; benchmark scores if configured."""
        result: dict = {}
        if self.eval_examples:
            self.model.eval()
            loss_sum, weight = 0.0, 0.0
            with packed_for_inference(self.model, self._pack):  # float32 CPU: packed weights
                for batch, counted in self.heldout_batches():
                    w = self.batch_weight(batch) if counted else 0
                    if w == 0 and not self.fsdp:
                        continue
                    loss, _ = self.heldout_loss(batch)
                    if w:
                        loss_sum += float(loss) * w
                        weight += w
            loss_sum, weight = self._all_sum([loss_sum, weight])
            eval_loss = loss_sum / max(weight, 1.0)
            result["eval_loss"] = eval_loss
            result["eval_ppl"] = math.exp(min(eval_loss, 50.0))
            self.model.train()
        if self.cfg.eval.tasks:
            result.update(self.evaluate_tasks())
        return result

    @property
    def _pack(self) -> bool | None:
        """`want` for pyfast.ops.packed_linear's plans: None (decide by memory) or False (off)."""
        return None if self.cfg.model.pack_weights else False

    def evaluate_tasks(self) -> dict:
        """Benchmark scores of the current model through :func:`pyfast.eval.evaluate`."""
        from pyfast.eval import evaluate

        e = self.cfg.eval
        self.model.eval()
        out = evaluate(
            self.model,
            e.tasks,
            tokenizer=self.tokenizer,
            data_dir=e.tasks_data_dir,
            split=e.tasks_split,
            limit=e.tasks_limit,
            batch_size=e.batch_size,
            pack_weights=self._pack,
        )
        self.model.train()
        scores = {}
        for task, metrics in out["results"].items():
            for name, value in metrics.items():
                if name in ("acc", "acc_norm", "mc2"):
                    scores[f"{task}/{name}"] = value
        return scores

    def _improved(self, loss: float) -> bool:
        return (
            self.best_loss is None or loss < self.best_loss - self.cfg.eval.early_stopping_min_delta
        )

    def after_eval(self, metrics: dict) -> bool:
        """Tracks the best held-out loss (saving the best model); returns True to stop early."""
        loss = metrics.get("eval_loss")
        if loss is None:
            return False
        if not math.isfinite(loss):
            raise TrainingStopped(
                f"non-finite held-out loss ({loss}) at step {self.step}"
                + (
                    f" (best checkpoint of step {self.best_step} kept in {self.out / 'best'})"
                    if self.best_step is not None
                    else ""
                )
            )
        if self._improved(loss):
            self.best_loss, self.best_step, self._since_best = loss, self.step, 0
            best = {"step": self.step, **metrics}
            self.save_model_dir(
                self.out / "best", lambda tmp: write_json(tmp / "best_metrics.json", best)
            )
            self._barrier()
            return False
        self._since_best += 1
        patience = self.cfg.eval.early_stopping_patience
        if patience and self._since_best >= patience:
            self.stop_reason = (
                f"early stopping: held-out loss has not improved for {self._since_best} "
                f"evaluations (best {self.best_loss:.4f} at step {self.best_step})"
            )
            return True
        return False

    def save_model_dir(self, final: Path, extra=None) -> None:
        """Rank 0 writes the model folder `final` atomically (``extra(tmp)`` adds files).

        Under FSDP every rank must call it: the full state dict is gathered onto rank 0 first.
        """
        state = None
        if self.fsdp:
            from pyfast.train.fsdp import full_model_state

            state = full_model_state(self.model)
        if self.rank != 0:
            return

        def fill(tmp: Path) -> None:
            merge = self.cfg.freeze.lora.merge
            ckpt.save_model(self.model, self.tokenizer, tmp, merge, state_dict=state)
            if extra is not None:
                extra(tmp)

        ckpt.atomic_dir(final, fill)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def save_checkpoint(self) -> Path:
        path = self.out / "checkpoints" / f"step-{self.step:06d}"
        model_state = optimizer_state = None
        if self.fsdp:  # gathered full: the checkpoint is the same as a single process writes
            from pyfast.train import fsdp

            model_state = fsdp.full_model_state(self.model)
            optimizer_state = fsdp.full_optimizer_state(self.optimizer)
        if self.rank == 0:
            state = {
                "step": self.step,
                "epoch": self.step // self.steps_per_epoch,
                "batch_in_epoch": self.step % self.steps_per_epoch,
                "total_steps": self.total_steps,
                "best_loss": self.best_loss,
                "best_step": self.best_step,
                "since_best": self._since_best,
                "world_size": self.world,
                "run_id": self.run_info.get("run_id"),
            }
            ckpt.save_checkpoint(
                path,
                self.model,
                self.tokenizer,
                self.optimizer,
                self.scheduler,
                state,
                to_dict(self.cfg),
                model_state=model_state,
                optimizer_state=optimizer_state,
            )
            ckpt.prune_checkpoints(self.out / "checkpoints", self.cfg.keep_checkpoints)
        self._barrier()
        return path

    # -- metrics -------------------------------------------------------------------------------
    def _read_metrics(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]

    def _rewrite_metrics(self) -> None:
        text = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write(
            self.out / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text, encoding="utf-8")
        )

    def record(self, entry: dict) -> None:
        self.history.append(entry)
        if self.rank == 0:
            path = self.out / "metrics.jsonl"
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
            except OSError as exc:
                raise WriteError.of(path, exc) from exc

    def plot(self) -> Path | None:
        """Writes loss_curve.png (train loss per step, held-out loss per evaluation)."""
        if self.rank != 0:
            return None
        from pyfast.train.plot import plot_losses

        return plot_losses(self.history, self.out / "loss_curve.png")

    # -- run -----------------------------------------------------------------------------------
    def train(self) -> dict:
        """Runs the loop to max_steps / epochs (or an early stop); returns the summary."""
        cfg = self.cfg
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )
        t0, tokens_done = time.perf_counter(), 0
        if self.step == 0 and self.eval_examples and cfg.eval.every:
            entry = {"step": 0, **self.evaluate_heldout()}
            self.record(entry)
            self.after_eval(entry)
        try:
            with packed_frozen(self.model, self._pack):  # frozen bottom blocks: packed weights
                while self.step < self.total_steps:
                    m = self.train_step()
                    tokens_done += m["tokens"]
                    elapsed = time.perf_counter() - t0
                    m["tokens_per_s"] = tokens_done / max(elapsed, 1e-9)
                    stop = False
                    last = self.step == self.total_steps
                    if self.eval_examples or cfg.eval.tasks:
                        if (cfg.eval.every and self.step % cfg.eval.every == 0) or last:
                            m.update(self.evaluate_heldout())
                            stop = self.after_eval(m)
                    if self.step % cfg.log_every == 0 or "eval_loss" in m or last or stop:
                        self.record(m)
                    if bar is not None:
                        post = {"loss": f"{m['loss']:.4f}", "tok/s": f"{m['tokens_per_s']:.0f}"}
                        if "eval_loss" in m:
                            post["eval"] = f"{m['eval_loss']:.4f}"
                        bar.set_postfix(post)
                        bar.update(1)
                    if cfg.save_every and self.step % cfg.save_every == 0 and not last:
                        self.save_checkpoint()
                    if stop:
                        break
        except TrainingStopped as exc:
            self.stop_reason = str(exc)
            if bar is not None:
                bar.close()
            self.log(f"STOPPED: {exc}")
            self.plot()
            raise
        if bar is not None:
            bar.close()
        if self.stop_reason:
            self.log(self.stop_reason)
        return self.finish(time.perf_counter() - t0, tokens_done)

    def finish(self, seconds: float, tokens: int) -> dict:
        """Final checkpoint + model folder, loss plot and summary.json."""
        if self.cfg.save_final:
            self.save_checkpoint()
            self.save_model_dir(self.out / "final")
        self._barrier()
        train_losses = [h["loss"] for h in self.history if "loss" in h]
        summary = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "final_loss": train_losses[-1] if train_losses else None,
            "best_eval_loss": self.best_loss,
            "best_step": self.best_step,
            "stop_reason": self.stop_reason or "completed",
            "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "trainable_parameters": self.plan.trainable,
            "total_parameters": self.plan.total,
            "data": self.data_stats,
            "world_size": self.world,
            "output_dir": str(self.out),
        }
        if self.rank == 0:
            write_json(self.out / "summary.json", summary)
            self.plot()
        return summary

    def cleanup(self) -> None:
        """Releases ``output_dir``'s lock, restores the thread count, leaves the process group."""
        self._release_output()
        if getattr(self, "_threads_before", None):
            torch.set_num_threads(self._threads_before)
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def run(self) -> dict:
        """setup(), train(), cleanup() — the whole job."""
        try:
            self.setup()
            return self.train()
        finally:
            self.cleanup()
