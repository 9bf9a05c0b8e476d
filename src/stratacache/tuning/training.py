"""How ``stratacache tune`` trains: the sentence-transformers trainers for the verifier (a
cross-encoder) and the embedder, their datasets and batching, checkpoints and ``--resume``, and
stopping early with a checkpoint (Ctrl-C, SIGTERM, ``--stop-after-steps``).

The training libraries (``datasets``, ``accelerate``, the trainers) are imported lazily: the
server never needs them.

The functions here read the ``stratacache tune`` flags from its parsed ``args`` (see
:func:`stratacache.tune.add_arguments`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from ..pairs import LabelledPair

log = logging.getLogger("stratacache.tune")

RECIPE_NAME = "stratacache-recipe.json"


def require_training_libraries() -> None:
    """Raises InvalidArgument (saying what to install) when ``datasets`` or ``accelerate`` is
    missing."""
    missing = []
    for module in ("datasets", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise InvalidArgument(
            f"stratacache tune needs {' and '.join(missing)}: pip install 'stratacache[tune]'")


# ------------------------------------------------------------------------------- batching


def _length_grouped_sampler_class() -> type:
    """A batch sampler (sentence-transformers' DefaultBatchSampler interface) that shuffles,
    then sorts each window of 64 batches by text length, so a batch pads little; batch order is
    shuffled again. Deterministic for a seed and epoch, so a resumed run skips the same
    batches."""
    import torch
    from sentence_transformers.base.sampler import DefaultBatchSampler

    class LengthGroupedBatchSampler(DefaultBatchSampler):  # type: ignore[misc]
        window_batches = 64

        def __init__(self, dataset: Any, batch_size: int, drop_last: bool,
                     valid_label_columns: list[str] | None = None,
                     generator: torch.Generator | None = None, seed: int = 0) -> None:
            super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                             valid_label_columns=valid_label_columns, generator=generator,
                             seed=seed)
            text_columns = [c for c in dataset.column_names
                            if c not in set(valid_label_columns or ()) | {"label"}]
            lengths = np.zeros(len(dataset), dtype=np.int64)
            for column in text_columns:
                lengths += np.fromiter((len(t) for t in dataset[column]), dtype=np.int64,
                                       count=len(dataset))
            self.lengths = lengths

        def __len__(self) -> int:
            n = len(self.lengths)
            return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

        def __iter__(self):  # type: ignore[no-untyped-def]
            g = torch.Generator()
            g.manual_seed(int(self.seed) + int(self.epoch))
            order = torch.randperm(len(self.lengths), generator=g).numpy()
            window = self.batch_size * self.window_batches
            batches = []
            for start in range(0, len(order), window):
                chunk = order[start:start + window]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                batches.extend(chunk[i:i + self.batch_size].tolist()
                               for i in range(0, len(chunk), self.batch_size))
            if self.drop_last and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            for i in torch.randperm(len(batches), generator=g).tolist():
                yield batches[i]

    return LengthGroupedBatchSampler


def length_grouped_batch_sampler(dataset: Any, batch_size: int, drop_last: bool,
                                 valid_label_columns: list[str] | None = None,
                                 generator: Any = None, seed: int = 0) -> Any:
    """The trainers' ``batch_sampler`` (a module-level function, so the training arguments
    pickle into checkpoints)."""
    global _SAMPLER_CLASS
    if _SAMPLER_CLASS is None:
        _SAMPLER_CLASS = _length_grouped_sampler_class()
    return _SAMPLER_CLASS(dataset, batch_size=batch_size, drop_last=drop_last,
                          valid_label_columns=valid_label_columns, generator=generator, seed=seed)


_SAMPLER_CLASS: type | None = None


# ------------------------------------------------------------------------------- stopping


class _Stopper:
    """Stops training with a checkpoint on the first Ctrl-C or SIGTERM (a second one aborts
    without one) or after ``--stop-after-steps``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop_after_steps: int) -> None:
        self.stop_after_steps = stop_after_steps
        self.reason: str | None = None
        self.exit_code = 3
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.reason = f"interrupted ({name})"
        self.exit_code = 128 + signum
        log.warning("%s: stopping after this step with a checkpoint (%s again aborts without "
                    "one)", name, name)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        stopper = self

        class StopCallback(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                if (stopper.reason is None and stopper.stop_after_steps
                        and state.global_step >= stopper.stop_after_steps):
                    stopper.reason = f"stopped after {state.global_step} steps (--stop-after-steps)"
                if stopper.reason is not None and state.global_step < state.max_steps:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopCallback()


# ---------------------------------------------------------------------------- checkpoints


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of ``folder`` (a trainer's output folder) with the most steps; None when
    it holds none."""
    if not folder.is_dir():
        return None
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def check_recipe(ckpt_dir: Path, args: argparse.Namespace, pairs_sha256: str, kind: str) -> None:
    """Records in ``ckpt_dir`` what its checkpoints depend on (data and flags).

    Raises:
        InvalidArgument: with ``--resume``, the checkpoints there were made with other data or
            flags (the message names them).
    """
    recipe = {"pairs_sha256": pairs_sha256, "limit": args.limit, "base": str(args.base),
              "batch_size": args.batch_size, "seed": args.seed,
              "transitive": args.transitive, "data_dir": str(args.data_dir)}
    if kind == "verifier":
        recipe.update(symmetric=args.symmetric, max_length=args.max_length)
    else:
        recipe.update(embedder_loss=args.embedder_loss)
    path = ckpt_dir / RECIPE_NAME
    if args.resume and path.is_file() and latest_checkpoint(ckpt_dir) is not None:
        old = json.loads(path.read_text())
        changed = sorted(k for k in recipe if old.get(k) != recipe[k])
        if changed:
            raise InvalidArgument(
                f"--resume: the checkpoints in {ckpt_dir} were made with other "
                f"{', '.join(changed)} ({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); "
                "rerun with the same data and flags, or use --overwrite to start again")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=2) + "\n")


# ------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Trained:
    """What one training run left."""

    model: Any  # the CrossEncoder or SentenceTransformer, trained
    loss: str  # the loss's class name
    examples: int  # training examples (pairs; both orders count twice)
    steps: int  # optimizer steps done in all (a resumed run counts the earlier ones)
    resumed_from: str | None  # the checkpoint's folder name
    stopped: tuple[str, int] | None  # (why it stopped early, exit status); None when finished
    seconds: float  # this run's training time
    epoch: float = 0.0  # passes over the training pairs done in all (fractional)


def train_verifier(args: argparse.Namespace, pairs: Sequence[LabelledPair], base_path: Path,
                   device: str, ckpt_dir: Path,
                   on_epoch: Callable[[Any, float, int], None] | None = None) -> Trained:
    """Trains a one-output cross-encoder from the model in ``base_path`` on ``pairs`` (both
    orders with ``--symmetric``) with a binary cross-entropy loss; ``on_epoch(model, epoch,
    step)`` is called at the end of every full epoch but the last (the caller measures the
    finished model anyway)."""
    from datasets import Dataset
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import set_seed

    set_seed(args.seed)
    model = CrossEncoder(str(base_path), num_labels=1, max_length=args.max_length,
                         device=device, local_files_only=True)
    a, b = [p.a for p in pairs], [p.b for p in pairs]
    y = [1.0 if p.duplicate else 0.0 for p in pairs]
    if args.symmetric:
        a, b, y = a + b, b + a, y + y
    dataset = Dataset.from_dict({"sentence1": a, "sentence2": b, "label": y})
    return _train("verifier", model, BinaryCrossEntropyLoss(model), dataset, args, device,
                  ckpt_dir, on_epoch)


def train_embedder(args: argparse.Namespace, pairs: Sequence[LabelledPair], model: Any,
                   device: str, ckpt_dir: Path) -> Trained:
    """Fine-tunes the SentenceTransformer ``model`` in place on ``pairs``: online contrastive
    loss on every pair, or (``--embedder-loss mnrl``) multiple negatives ranking on the
    duplicates."""
    from datasets import Dataset
    from sentence_transformers.sentence_transformer import losses
    from transformers import set_seed

    set_seed(args.seed)
    if args.embedder_loss == "mnrl":
        dup = [p for p in pairs if p.duplicate]
        dataset = Dataset.from_dict({"anchor": [p.a for p in dup],
                                     "positive": [p.b for p in dup]})
        loss = losses.MultipleNegativesRankingLoss(model)
    else:
        dataset = Dataset.from_dict({"sentence1": [p.a for p in pairs],
                                     "sentence2": [p.b for p in pairs],
                                     "label": [int(p.duplicate) for p in pairs]})
        loss = losses.OnlineContrastiveLoss(model)
    return _train("embedder", model, loss, dataset, args, device, ckpt_dir)


def _training_args(kind: str, args: argparse.Namespace, device: str, output_dir: Path,
                   n_train: int) -> Any:
    import torch

    if kind == "verifier":
        from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments as Args
    else:
        from sentence_transformers import SentenceTransformerTrainingArguments as Args
    on_cuda = device.startswith("cuda")
    # mixed precision on the GPU: bf16 where the device has it (Ampere and later), else fp16
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    fp16 = on_cuda and not bf16
    extra: dict[str, Any] = {}
    if kind == "embedder" and args.embedder_loss == "mnrl":
        from sentence_transformers.base.sampler import BatchSamplers

        extra["batch_sampler"] = BatchSamplers.NO_DUPLICATES
    else:
        extra["batch_sampler"] = length_grouped_batch_sampler
    batch = batch_size(args, device)
    steps_per_epoch = math.ceil(n_train / batch)
    return Args(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps > 0 else -1,
        per_device_train_batch_size=batch,
        learning_rate=args.learning_rate,
        warmup_steps=0.1,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=max(1, min(100, steps_per_epoch // 10)),
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not on_cuda,
        bf16=bf16,
        fp16=fp16,
        tf32=bf16 or None,  # TF32 matmuls where bf16 exists (same generation of devices)
        dataloader_num_workers=0,
        disable_tqdm=False,
        **extra,
    )


#: Pairs per optimizer step with ``--batch-size 0``: a MiniLM-sized cross-encoder at 128 tokens
#: uses a few GB of a GPU at 128.
AUTO_BATCH_CPU = 32
AUTO_BATCH_GPU = 128


def batch_size(args: argparse.Namespace, device: str) -> int:
    """Pairs per optimizer step: ``--batch-size``, or with 0 (auto) AUTO_BATCH_CPU on the CPU
    and AUTO_BATCH_GPU on a GPU."""
    if args.batch_size:
        return int(args.batch_size)
    return AUTO_BATCH_GPU if device.startswith("cuda") else AUTO_BATCH_CPU


def _epoch_callback(on_epoch: Callable[[Any, float, int], None], model: Any) -> Any:
    from transformers import TrainerCallback

    class EpochCallback(TrainerCallback):  # type: ignore[misc]
        def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step < state.max_steps:  # the last epoch is measured by the caller
                on_epoch(model, float(state.epoch or 0), int(state.global_step))
            return control

    return EpochCallback()


def _train(kind: str, model: Any, loss: Any, dataset: Any, args: argparse.Namespace,
           device: str, ckpt_dir: Path,
           on_epoch: Callable[[Any, float, int], None] | None = None) -> Trained:
    """Runs the trainer, from the latest checkpoint in ``ckpt_dir`` with ``--resume``."""
    if kind == "verifier":
        from sentence_transformers.cross_encoder import CrossEncoderTrainer as Trainer
    else:
        from sentence_transformers import SentenceTransformerTrainer as Trainer
    resume = latest_checkpoint(ckpt_dir) if args.resume else None
    if args.resume and resume is None:
        log.info("%s: no checkpoint in %s: starting from the beginning", kind, ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    training_args = _training_args(kind, args, device, ckpt_dir, len(dataset))
    stopper = _Stopper(args.stop_after_steps)
    callbacks = [stopper.callback()] + ([_epoch_callback(on_epoch, model)] if on_epoch else [])
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, loss=loss,
                      callbacks=callbacks)
    batch = training_args.per_device_train_batch_size
    steps_per_epoch = math.ceil(len(dataset) / batch)
    total = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.epochs)
    precision = ("bf16" if training_args.bf16 else "fp16" if training_args.fp16
                 else "fp32")
    log.info("%s: training on %d pairs, %d steps of %d (%.2f epochs), learning rate %g, on %s "
             "(%s)%s; checkpoints every %d steps in %s", kind, len(dataset), total, batch,
             total / max(1, steps_per_epoch), args.learning_rate, device, precision,
             f", resuming from {resume.name}" if resume else "", args.save_steps, ckpt_dir)
    started = time.perf_counter()
    with stopper:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    stopped = None if stopper.reason is None else (stopper.reason, stopper.exit_code)
    return Trained(model, type(loss).__name__, len(dataset), int(trainer.state.global_step),
                   resume.name if resume else None, stopped, time.perf_counter() - started,
                   float(trainer.state.epoch or 0.0))
