"""``stratacache tune``: train a verifier (a cross-encoder that judges whether a cached prompt's
answer is right for a new prompt) and, optionally, a fine-tuned embedder, from labelled pairs.

Data: a labelled-pair file (:mod:`stratacache.pairs`), split text-disjointly with
:data:`~stratacache.pairs.STANDARD_PARTS`. Training uses the ``train`` part only (plus, with
``--data-dir``, the feedback rows the server stored); metrics are reported on ``calibrate``, the
held-back part that shares no text with ``train``; ``test`` is never touched (it is written out
for the benchmarks).

Output layout (``--out DIR``)::

    DIR/verifier/                      CrossEncoder(str(DIR / "verifier")) loads it
    DIR/verifier/stratacache-card.json what it was trained on, how, and how well it does
    DIR/embedder/                      with --embedder: SentenceTransformer(str(DIR / "embedder"))
    DIR/embedder/stratacache-card.json
    DIR/heldout-calibrate.jsonl.gz     the exact held-back parts, for `stratacache calibrate`
    DIR/heldout-test.jsonl.gz          and the benchmarks
    DIR/checkpoints/                   while training (resume with --resume); removed at the end
                                       unless --keep-checkpoints

A verifier whose card says ``"symmetric": true`` was trained on both orders of every pair and must
be scored as the mean of ``(cached, query)`` and ``(query, cached)``.

The training libraries (``datasets``, ``accelerate``) are imported lazily: the server never
needs them.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import operating_point
from .config import DEFAULT_MIN_SIMILARITY
from .curves import curve_metrics
from .errors import InvalidArgument
from .pairs import LabelledPair, write_pairs
from .tuning.card import (add_int8_scores, build_card, cosine_scores, decision_scores,
                          embedder_metrics, is_finished, metrics_line, verifier_metrics,
                          verifier_scores, write_card)
from .tuning.data import HELDOUT_PART, TRAIN_PART, Data, load_data
from .tuning.training import (Trained, check_recipe, latest_checkpoint,
                              require_training_libraries, train_embedder, train_verifier)
from .verify import HeldBack, Verifier

log = logging.getLogger("stratacache.tune")

#: For the subcommand's parser: ``description=DESCRIPTION, epilog=EPILOG``.
DESCRIPTION = (
    "Train a verifier (a cross-encoder that says whether a cached prompt's answer is right for "
    "a new prompt) and optionally a fine-tuned embedder from labelled pairs, split so that no "
    "text is in two parts: it learns from the 'train' part (plus the server's feedback rows "
    "with --data-dir) and reports metrics on the held-back 'calibrate' part. Nothing is "
    "downloaded.")
EPILOG = (
    "Writes OUT/verifier/ (CrossEncoder(OUT/verifier) loads it; stratacache-card.json inside "
    "says how it was made and how well it does, and whether to score both orders), "
    "OUT/embedder/ with --embedder, OUT/heldout-calibrate.jsonl.gz and "
    "OUT/heldout-test.jsonl.gz, and checkpoints in OUT/checkpoints/ while training. Exit "
    "status: 0 done, 2 bad input, 3 stopped by --stop-after-steps, 130 / 143 stopped by "
    "Ctrl-C / SIGTERM (the first one stops after the current step with a checkpoint); after "
    "3, 130 or 143 the same command with --resume continues from the checkpoint.")

DEFAULTS: dict[str, Any] = {
    "base": "default",
    "epochs": 1.0,
    "batch_size": 0,
    "max_steps": 0,
    "learning_rate": 5e-5,
    "max_length": 128,
    "save_steps": 200,
    "seed": 12,
    "device": "auto",
    "threads": 0,
    "symmetric": True,
    "transitive": True,
    "transitive_max_cluster": 8,
    "embedder_loss": "online-contrastive",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stratacache tune`` flags (use with ArgumentDefaultsHelpFormatter)."""
    d = DEFAULTS
    data = parser.add_argument_group("data")
    data.add_argument("--pairs", type=Path, required=True,
                      help="labelled-pair file (JSON lines, optionally .gz): "
                           '{"a": ..., "b": ..., "duplicate": true|false} per line')
    data.add_argument("--data-dir", type=Path, default=None,
                      help="a server data directory: its feedback rows (evidence.sqlite3, "
                           "source='feedback') are added to the training pairs")
    data.add_argument("--limit", type=int, default=0,
                      help="read only the first N pairs of --pairs (quick runs); 0 = all")
    data.add_argument("--symmetric", action=argparse.BooleanOptionalAction,
                      default=d["symmetric"],
                      help="train the verifier on both orders of every pair (the card then says "
                           "symmetric: score the mean of both orders)")
    data.add_argument("--transitive", action=argparse.BooleanOptionalAction,
                      default=d["transitive"],
                      help="add pairs implied by the train labels: duplicates closed under union "
                           "into clusters; a non-duplicate label extends to the members of both "
                           "clusters")
    data.add_argument("--transitive-max-cluster", type=int, default=d["transitive_max_cluster"],
                      help="most members of one duplicate cluster used for implied pairs (bounds "
                           "the quadratic growth of big clusters)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True,
                     help="output folder: verifier/, embedder/, held-out parts, checkpoints/")
    out.add_argument("--overwrite", action="store_true",
                     help="replace a finished model already in --out (and its checkpoints)")
    out.add_argument("--resume", action="store_true",
                     help="continue from the latest checkpoint in --out/checkpoints (same data "
                          "and recipe as the run that wrote it); a model already finished is "
                          "kept")
    out.add_argument("--save-steps", type=int, default=d["save_steps"],
                     help="write a checkpoint every N optimizer steps (Ctrl-C also writes one)")
    out.add_argument("--stop-after-steps", type=int, default=0,
                     help="stop with a checkpoint once this many optimizer steps are done (train "
                          "in slices; continue with --resume); 0 = run to the end")
    out.add_argument("--keep-checkpoints", action="store_true",
                     help="keep --out/checkpoints after a model is finished")

    model = parser.add_argument_group("model and training")
    model.add_argument("--base", default=d["base"],
                       help="sentence-transformers model folder to start from, or 'default' for "
                            "the bundled all-MiniLM-L6-v2; never downloaded")
    model.add_argument("--embedder", action="store_true",
                       help="also fine-tune the embedder (written to --out/embedder)")
    model.add_argument("--embedder-loss", choices=("online-contrastive", "mnrl"),
                       default=d["embedder_loss"],
                       help="embedder loss: online-contrastive (pairs with labels, hard "
                            "negatives) or mnrl (multiple negatives ranking on duplicates)")
    model.add_argument("--epochs", type=float, default=d["epochs"],
                       help="passes over the training pairs (with --symmetric, each pair "
                            "in both orders)")
    model.add_argument("--max-steps", type=int, default=d["max_steps"],
                       help="optimizer steps in all, overriding --epochs; 0 = full epochs")
    model.add_argument("--batch-size", type=int, default=d["batch_size"],
                       help="pairs per optimizer step; 0 = 32 on the CPU, 128 on a GPU")
    model.add_argument("--epoch-metrics", action=argparse.BooleanOptionalAction, default=None,
                       help="score the verifier on the held-back part after every full epoch "
                            "and write the curve per epoch into its card (a scoring pass over "
                            "the held-back part each: about 90 s on 2 CPU cores for 6,000 "
                            "pairs); default: on a GPU only")
    model.add_argument("--learning-rate", type=float, default=d["learning_rate"],
                       help="peak learning rate (linear warm-up over 10 %% of the steps, then "
                            "linear decay)")
    model.add_argument("--max-length", type=int, default=d["max_length"],
                       help="verifier tokens per pair (both texts together); longer pairs are "
                            "truncated")
    model.add_argument("--device", default=d["device"],
                       help="auto (cuda when torch sees a GPU), cpu, cuda or cuda:N")
    model.add_argument("--threads", type=int, default=d["threads"],
                       help="torch CPU threads; 0 = one per core (fastest on a host of its "
                            "own); 1 is several times faster on a host shared with other busy "
                            "processes")
    model.add_argument("--seed", type=int, default=d["seed"],
                       help="random seed (head initialisation, shuffling)")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")


def _measure_verifier(model: Any, held: list[LabelledPair], base_cosine: dict[str, Any],
                      device: str) -> dict[str, Any]:
    """The verifier card's metrics of ``model`` on the held-back pairs."""
    forward, backward = verifier_scores(model, held, batch_size=_score_batch(device))
    return verifier_metrics(forward, backward, base_cosine, held)


def _score_batch(device: str) -> int:
    return 512 if device.startswith("cuda") else 64


def _epoch_metrics(held: list[LabelledPair], base_cosine: dict[str, Any], device: str,
                   per_epoch: list[dict[str, Any]]) -> Callable[[Any, float, int], None]:
    """The ``on_epoch`` hook of ``train_verifier``: measures the model on the held-back part
    and appends the result to ``per_epoch``."""
    def measure(model: Any, epoch: float, step: int) -> None:
        log.info("verifier: epoch %g done (step %d); scoring the %d held-back pairs", epoch,
                 step, len(held))
        per_epoch.append(_epoch_row(_measure_verifier(model, held, base_cosine, device), epoch,
                                    step))
        log.info(metrics_line(f"epoch {epoch:g}, decision score", per_epoch[-1]["decision"]))

    return measure


def _epoch_row(metrics: dict[str, Any], epoch: float, step: int) -> dict[str, Any]:
    return {"epoch": round(epoch, 3), "step": step, "decision": metrics["decision"],
            "verifier": metrics["verifier"]}


def _write_verifier(args: argparse.Namespace, data: Data, trained: Trained, base_path: Path,
                    base_name: str, device: str, base_cosine: dict[str, Any],
                    per_epoch: list[dict[str, Any]] | None) -> None:
    """Scores the trained verifier on the held-back part; writes it and its card (with the
    per-epoch rows measured during training, and the finished model's as the last)."""
    out = args.out / "verifier"
    held = data.parts[HELDOUT_PART]
    log.info("verifier: trained %d steps in %.1f min; scoring the %d held-back pairs",
             trained.steps, trained.seconds / 60, len(held))
    metrics = _measure_verifier(trained.model, held, base_cosine, device)
    if per_epoch is not None:
        metrics["per_epoch"] = per_epoch + [_epoch_row(metrics, trained.epoch, trained.steps)]
    both = metrics["score_both_orders"]
    out.mkdir(parents=True, exist_ok=True)
    trained.model.save_pretrained(str(out))
    int8 = _int8_scores(out, held, both)
    if int8 is not None:
        add_int8_scores(metrics, int8)
    points = _default_operating_points(metrics)
    metrics["default_operating_point"] = points
    write_card(out, build_card(
        "verifier", args, data, base_path, base_name, device, trained, metrics,
        symmetric=bool(args.symmetric), score_both_orders=both, max_length=args.max_length,
        loss=trained.loss,
        score="mean of sigmoid(a, b) and sigmoid(b, a)" if both else "sigmoid(cached, query)"))
    log.info(metrics_line("verifier on the held-back part", metrics["verifier"]))
    log.info(metrics_line("base cosine on the held-back part", base_cosine))
    fused = metrics.get("fusion_with_base_cosine", {}).get("metrics")
    if fused:
        log.info(metrics_line("logistic fusion of cosine and verifier (out of fold)", fused))
    kind = metrics["decision"]["score"].split(":")[0]
    log.info(metrics_line(f"decision score ({kind}, what a server with the base model "
                          "thresholds)", metrics["decision"]))
    if "decision_int8" in metrics:
        log.info(metrics_line(f"decision score ({kind}, int8 verifier)",
                              metrics["decision_int8"]))
    for column, point in points.items():
        if column != "min_similarity":
            log.info("a server at --min-similarity %g with the %s scores serves with: %s",
                     DEFAULT_MIN_SIMILARITY, column, point["explanation"])
    log.info("verifier written to %s", out)


def _int8_scores(folder: Path, held: list[LabelledPair], both: bool) -> np.ndarray | None:
    """The held-back scores of the verifier in ``folder`` with dynamic int8 weights on the CPU,
    as a server with --verify-quantize int8 scores them; None where this torch cannot."""
    verifier = Verifier(folder, device="cpu", quantize="int8")
    if not verifier.quantized:
        return None
    log.info("verifier: scoring the %d held-back pairs in int8 on the CPU (the server's CPU "
             "default)", len(held))
    forward = verifier.own_scores([(p.a, p.b) for p in held], progress=len(held) > 2000)
    if not both:
        return forward
    return (forward + verifier.own_scores([(p.b, p.a) for p in held],
                                          progress=len(held) > 2000)) / 2


def _default_operating_points(metrics: dict[str, Any]) -> dict[str, Any]:
    """The gate and threshold a server with the base model and the default --min-similarity
    derives from these metrics (``stratacache.operating_point``), per held-back score column
    (full precision, int8), for the card and the log."""
    held = metrics["held_back"]
    cosine = np.asarray(held["base_cosine"])
    duplicate = np.asarray(held["duplicate"], dtype=bool)
    points: dict[str, Any] = {"min_similarity": DEFAULT_MIN_SIMILARITY}
    for column in ("verifier", "verifier_int8"):
        if column not in held:
            continue
        point = operating_point.choose(
            HeldBack(held["part"], duplicate, cosine, decision_scores(metrics, column), column),
            min_similarity=DEFAULT_MIN_SIMILARITY)
        points[column] = {"gate": point.gate, "threshold": point.threshold,
                          "source": point.source, "explanation": point.explanation}
    return points


def _write_embedder(args: argparse.Namespace, data: Data, trained: Trained, base_path: Path,
                    base_name: str, device: str, base_cosine: dict[str, Any]) -> None:
    """Scores the trained embedder on the held-back part; writes it and its card."""
    out = args.out / "embedder"
    held = data.parts[HELDOUT_PART]
    metrics = embedder_metrics(cosine_scores(trained.model, held), base_cosine, held)
    out.mkdir(parents=True, exist_ok=True)
    trained.model.save(str(out))
    write_card(out, build_card(
        "embedder", args, data, base_path, base_name, device, trained, metrics,
        loss=trained.loss,
        note="vectors differ from the base model's: a data directory built with the base "
             "model must be rebuilt"))
    log.info(metrics_line("embedder cosine on the held-back part", metrics["embedder_cosine"]))
    log.info("embedder written to %s", out)


def _prepare_out(args: argparse.Namespace) -> list[str]:
    """Checks --out against --resume/--overwrite; returns the models still to train."""
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"--out {str(out)!r} exists and is not a folder")
    wanted = ["verifier"] + (["embedder"] if args.embedder else [])
    if args.resume and args.overwrite:
        raise InvalidArgument("--resume and --overwrite contradict each other: pick one")
    finished = [k for k in wanted if is_finished(out / k)]
    if args.overwrite:
        for folder in [out / k for k in wanted] + [out / "checkpoints" / k for k in wanted]:
            if folder.is_dir():
                log.info("--overwrite: removing %s", folder)
                shutil.rmtree(folder)
        return wanted
    if args.resume:
        for k in finished:
            log.info("%s already finished in %s: kept", k, out / k)
        return [k for k in wanted if k not in finished]
    if finished:
        raise InvalidArgument(
            f"--out {str(out)!r} already holds a finished {' and '.join(finished)}: pass "
            "--overwrite to replace it, or --resume to finish what is missing")
    stale = [k for k in wanted if latest_checkpoint(out / "checkpoints" / k) is not None]
    if stale:
        raise InvalidArgument(
            f"--out {str(out)!r} holds checkpoints of an unfinished run "
            f"({', '.join(stale)}): pass --resume to continue it, or --overwrite to start again")
    return wanted


def _check_args(args: argparse.Namespace) -> None:
    for name in ("save_steps", "max_length"):
        if getattr(args, name) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("limit", "batch_size", "max_steps", "stop_after_steps", "threads"):
        if getattr(args, name) < 0:
            raise InvalidArgument(f"--{name.replace('_', '-')} must not be negative")
    if args.epochs <= 0 and args.max_steps <= 0:
        raise InvalidArgument("--epochs must be positive (or give --max-steps)")
    if not args.learning_rate > 0:
        raise InvalidArgument("--learning-rate must be positive")
    if args.transitive_max_cluster < 2:
        raise InvalidArgument("--transitive-max-cluster must be at least 2")


def tune(args: argparse.Namespace) -> int:
    """Does the work of :func:`run`; raises InvalidArgument for bad input."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _check_args(args)
    if not Path(args.pairs).is_file():
        raise InvalidArgument(f"--pairs file {str(args.pairs)!r} does not exist")
    todo = _prepare_out(args)
    if not todo:
        log.info("nothing to do: every requested model in %s is finished", args.out)
        return 0
    require_training_libraries()
    import torch

    from .embed import pick_device, resolve_model_path

    base_path = resolve_model_path(args.base)
    base_name = "all-MiniLM-L6-v2" if args.base == "default" else base_path.resolve().name
    device = pick_device(args.device)
    if device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    data = load_data(args.pairs, limit=args.limit, data_dir=args.data_dir,
                     transitive=args.transitive, max_cluster=args.transitive_max_cluster,
                     seed=args.seed)
    for kind in todo:
        check_recipe(args.out / "checkpoints" / kind, args, data.pairs_sha256, kind)
    for name in (HELDOUT_PART, "test"):
        target = args.out / f"heldout-{name}.jsonl.gz"
        write_pairs(target, data.parts[name])
        log.info("held-back part %r (%d pairs) written to %s", name, len(data.parts[name]), target)
    log.info("training pairs: %d from the train part + %d feedback + %d implied = %d%s",
             len(data.parts[TRAIN_PART]), len(data.feedback), data.implied, len(data.train),
             " (x2: both orders, for the verifier)" if args.symmetric else "")

    from sentence_transformers import SentenceTransformer

    held = data.parts[HELDOUT_PART]
    log.info("base model %s (%s) on %s; scoring its cosine on the %d held-back pairs",
             base_name, base_path, device, len(held))
    base_model = SentenceTransformer(str(base_path), device=device, local_files_only=True)
    base_scores = cosine_scores(base_model, held, batch_size=_score_batch(device))
    base_cosine = curve_metrics(base_scores, [p.duplicate for p in held])
    base_cosine["scores"] = base_scores  # for the fusion; not written to the card
    log.info(metrics_line("base cosine on the held-back part", base_cosine))
    if "embedder" not in todo:
        base_model = None

    for kind in todo:
        ckpt_dir = args.out / "checkpoints" / kind
        if kind == "verifier":
            epoch_metrics = (args.epoch_metrics if args.epoch_metrics is not None
                             else device.startswith("cuda"))
            per_epoch: list[dict[str, Any]] | None = [] if epoch_metrics else None
            hook = (None if per_epoch is None
                    else _epoch_metrics(held, base_cosine, device, per_epoch))
            trained = train_verifier(args, data.train, base_path, device, ckpt_dir, hook)
        else:  # trained in place: the base cosine was measured before
            trained = train_embedder(args, data.train, base_model, device, ckpt_dir)
        if trained.stopped:
            reason, code = trained.stopped
            log.warning("%s: %s at step %d; checkpoint in %s; continue with --resume", kind,
                        reason, trained.steps, latest_checkpoint(ckpt_dir))
            return code
        if kind == "verifier":
            _write_verifier(args, data, trained, base_path, base_name, device, base_cosine,
                            per_epoch)
        else:
            _write_embedder(args, data, trained, base_path, base_name, device, base_cosine)
        if not args.keep_checkpoints and ckpt_dir.is_dir():
            shutil.rmtree(ckpt_dir)
    ckpt_root = args.out / "checkpoints"
    if ckpt_root.is_dir() and not any(ckpt_root.iterdir()):
        ckpt_root.rmdir()
    log.info("done: %s", ", ".join(str(args.out / k) for k in todo))
    return 0


def run(args: argparse.Namespace) -> int:
    """``stratacache tune``: 0 when done, 2 for bad input (the message says what to change),
    3 when stopped by --stop-after-steps, 130 / 143 when stopped by Ctrl-C / SIGTERM (these
    leave a checkpoint that --resume continues)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return tune(args)
    except InvalidArgument as exc:
        log.error("%s", exc)
        print(f"stratacache tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted; the latest checkpoint (if any) in %s is what --resume "
                    "continues from", args.out / "checkpoints")
        return 130


def main(argv: list[str] | None = None) -> int:
    """``python -m stratacache.tune``: the same as ``stratacache tune``."""
    parser = argparse.ArgumentParser(
        prog="stratacache tune", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
