"""CLI verbs for the training pipeline: collect, train, evaluate."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..attribution.grounding import HEAD_RIDGE, HEAD_TARGET_CAP
from ..errors import InvalidInputError
from ..evaluation.report import BUDGETS
from ..evidence.layout import SOURCE_KINDS, TARGET_KINDS
from ..models import device_argument
from .refinement import STRENGTHS
from .runtime_settings import CONVERSATION_CHOICES

logger = logging.getLogger(__name__)

# `evaluate` options of the single-turn evaluation alone (None unless given), and their defaults there
SINGLE_TURN_ONLY = ("merge", "part", "cache", "metrics", "plot", "curve", "budgets", "seed")
SINGLE_TURN_DEFAULTS: dict[str, Any] = {
    "plot": Path("evaluation.png"), "curve": Path("evaluation-budget.png"), "budgets": list(BUDGETS), "seed": 1,
}


def _attributor(args: argparse.Namespace, estimator: Any = None, shipped: bool = True) -> Any:
    """The model of `--model` (default: the embedded one) with `estimator`, else its shipped estimator (what
    `evaluate` measures), or with `shipped=False` uniform weights (collection needs no trained estimator)."""
    from ..attribution.estimator import ScoreEstimator
    from ..attributor import Attributor
    from ..capture.attention import model_shape
    from ..model_families import load_any_model
    from ..models import load_default_model
    from .collect import process_split

    _, _, launched_device = process_split()
    device = getattr(args, "device", None)
    if device is not None and launched_device is not None:
        raise InvalidInputError(
            f"--device {device} conflicts with the accelerate launch, which gives each process its own device "
            f"({launched_device} here): drop --device"
        )
    device = device if device is not None else launched_device
    if args.model:  # a folder, Hub id, GGUF file or optional family's short name (at2_rag.model_families)
        model, tokenizer = load_any_model(args.model, device=device)
    else:
        model, tokenizer = load_default_model(device=device)
    if estimator is None and not shipped:
        layers, heads = model_shape(model)
        estimator = ScoreEstimator.uniform(layers, heads, model_id=model.config.name_or_path)
    return Attributor(model, tokenizer, estimator=estimator)


def _budget(text: str) -> int:
    """An ablation budget of the curve: a positive integer."""
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a budget is a positive integer of ablation passes, got {text!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"a budget is a positive integer of ablation passes, got {k}")
    return k


def cmd_collect(args: argparse.Namespace) -> int:
    from .collect import SKIP_HINT, collect, prepare_output_dir
    from .data import scan_examples

    # the checks that need no model come before loading it: a bad file fails in a second, not after the load
    scanned = scan_examples(args.examples, args.limit)
    if scanned.invalid and not args.skip_invalid:
        raise scanned.error(SKIP_HINT)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        prepare_output_dir(args.output)  # raises, naming the problem
    summary = collect(
        args.examples,
        args.output,
        _attributor(args, shipped=False),
        num_masks=args.num_masks,
        keep_prob=args.keep_prob,
        sources=args.sources,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        shard_size=args.shard_size,
        targets_of=args.targets,
        batch_size=args.batch_size,
        limit=args.limit,
        skip_invalid=args.skip_invalid,
        leave_one_out=args.leave_one_out,
    )
    print(json.dumps(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..attribution.estimator import ScoreEstimator
    from ..models import DEFAULT_MODEL_ID
    from .collect import recorded_settings
    from .data import SHARD_GLOB, load_collected, merge_collected
    from .runtime_settings import fit_runtime_settings
    from .train import report_summary, train_estimator

    groups = []
    for folder in args.data:
        if not folder.is_dir():
            raise InvalidInputError(f"{folder} is not a folder of collected shards (the output of `collect`)")
        group = load_collected(folder)
        if not group:
            raise InvalidInputError(f"no collected shards ({SHARD_GLOB}) in {folder}")
        groups.append(group)
    d = groups[0][0].features.shape[-1]
    for folder, group in zip(args.data, groups):
        if group[0].features.shape[-1] != d:
            raise InvalidInputError(
                f"{folder} has {group[0].features.shape[-1]} features per source, {args.data[0]} has {d}: "
                "shards collected with different models cannot train one estimator"
            )
    # the model the shards were collected with (collect.json) names the estimator; two models cannot train one
    models = {str(folder): settings["model"] for folder in args.data
              if (settings := recorded_settings(folder)) is not None and settings.get("model")}
    if len(set(models.values())) > 1 or (args.model and models and set(models.values()) != {args.model}):
        raise InvalidInputError(f"the shards were collected with other models than one estimator can serve: {models}"
                                + (f" (--model {args.model})" if args.model else ""))
    model_id = args.model or next(iter(models.values()), None) or DEFAULT_MODEL_ID
    # a folder of leave-one-out masks for examples of an earlier folder adds them to those examples
    groups = merge_collected(groups, [str(folder) for folder in args.data])
    examples = groups[0]
    if args.weights_from is not None:  # the weights of an existing estimator: only the runtime settings are fitted
        estimator = ScoreEstimator.from_pretrained(args.weights_from)
        if estimator.weights.numel() != d:
            raise InvalidInputError(f"{args.weights_from} has {estimator.weights.numel()} head weights, the shards "
                                    f"have {d} features per source: collected with another model")
        report: dict[str, Any] = {"weights_from": str(args.weights_from)}
    else:
        num_layers, num_heads = _feature_grid(args, model_id, d)
        estimator, report = train_estimator(
            examples,
            num_layers,
            num_heads,
            model_id=model_id,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            heldout_fraction=args.heldout_fraction,
            patience=args.patience,
            seed=args.seed,
            more_examples=groups[1:],
            **({} if args.leave_one_out_weight is None else {"loo_weight": args.leave_one_out_weight}),
        )
    runtime = fit_runtime_settings(
        groups, estimator.weights.detach(), heldout_fraction=args.heldout_fraction, seed=args.seed,
        conversations=args.groundedness_conversations, ridge=args.groundedness_ridge, cap=args.groundedness_cap,
        strengths=args.refinement_strengths,
    )
    for key in ("groundedness", "refinement"):  # a setting not fitted now is not kept from --weights-from either
        estimator.metadata.pop(key, None)
    estimator.metadata.update(runtime.metadata)
    report["runtime_settings"] = runtime.summary()
    for key, text in report["runtime_settings"].items():  # said on the console too, never silently
        if text != "fitted":
            print(f"at2-rag train: {key} {text}", file=sys.stderr)
    if args.training_data or args.weights_from is None:
        estimator.metadata["training_data"] = args.training_data or ", ".join(map(str, args.data))
    estimator.save_pretrained(args.output)
    (args.output / "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report_summary(report), indent=2))
    return 0


def _feature_grid(args: argparse.Namespace, model_id: str, num_features: int) -> tuple[int, int]:
    """(layers, heads) of the estimator to train: --num-layers/--num-heads, else the shape `collect` recorded in
    collect.json, else the known shape of the embedded model or an optional family; checked against the shards'
    features, since a wrong grid would train an estimator that no model of this shape can load."""
    from ..model_families import KNOWN_SHAPES
    from .collect import recorded_settings

    given = (args.num_layers, args.num_heads)
    if given != (None, None):
        if None in given:
            raise InvalidInputError("pass both --num-layers and --num-heads, or neither (collect.json records them)")
        shape, origin = (int(args.num_layers), int(args.num_heads)), "--num-layers/--num-heads"
    else:
        recorded = [(int(s["num_layers"]), int(s["num_heads"])) for folder in args.data
                    if (s := recorded_settings(folder)) is not None and "num_layers" in s and "num_heads" in s]
        if recorded:
            shape, origin = recorded[0], "collect.json"
        elif model_id in KNOWN_SHAPES:
            shape, origin = KNOWN_SHAPES[model_id], f"the known shape of {model_id}"
        elif fits := [(known, grid) for known, grid in KNOWN_SHAPES.items() if grid[0] * grid[1] == num_features]:
            # e.g. a fine-tuned SmolLM2 collected before collect.json recorded the shape
            (known, shape), origin = fits[0], f"the shape of {fits[0][0]}, the known model with this many features"
            logger.warning("%s is not a known model: training on %s's grid (%d x %d), which has the shards' %d "
                           "features; pass --num-layers/--num-heads otherwise", model_id, known, *shape, num_features)
        else:
            raise InvalidInputError(
                f"the shards do not record the model's shape (collected before collect.json did) and {model_id} is "
                "not a known model: pass --num-layers and --num-heads (its attention layers and query heads)"
            )
    if shape[0] * shape[1] != num_features:
        raise InvalidInputError(
            f"{shape[0]} layers x {shape[1]} heads (from {origin}) is {shape[0] * shape[1]} features per source, "
            f"but the shards have {num_features}"
        )
    return shape


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..attribution.estimator import ScoreEstimator
    from ..evaluation.report import evaluate, write_report
    from ..evaluation.report_files import merge_reports, record_evaluation

    if args.record and (not args.estimator or not Path(args.estimator).is_dir()):
        raise SystemExit("--record needs --estimator FOLDER (an at2-rag estimator folder to update)")
    if args.conversations and args.groundedness:
        raise InvalidInputError("--conversations and --groundedness are two evaluations: run one at a time")
    if args.conversations or args.groundedness:  # an option it would ignore is an error, not a silent other run
        flag = "--conversations" if args.conversations else "--groundedness"
        given = [f"--{name.replace('_', '-')}" for name in SINGLE_TURN_ONLY if getattr(args, name) is not None]
        if given:
            raise InvalidInputError(f"{', '.join(given)}: single-turn evaluation options, not used by {flag}")
    for name, default in SINGLE_TURN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.merge:
        report = merge_reports(args.merge)
        write_report(report, args.output, args.plot, args.curve)
        if args.record:
            record_evaluation(Path(args.estimator), report, args.examples or "merged parts")
        print(json.dumps(report["summary"], indent=2))
        return 0
    if not args.examples:
        raise SystemExit("evaluate needs a JSONL of examples (or --merge PART.json ...)")
    if args.conversations:
        return _evaluate_conversations(args)
    if args.groundedness:
        return _evaluate_groundedness(args)
    if args.baseline:
        raise InvalidInputError("--baseline needs --conversations (the single-turn evaluation compares estimators "
                                "through its own methods)")
    part = None
    if args.part:
        try:
            k, n = (int(x) for x in args.part.split("/"))
        except ValueError:
            raise InvalidInputError(f"--part must be K/N (two integers, 0 <= K < N), got {args.part!r}") from None
        if not 0 <= k < n:
            raise InvalidInputError(f"--part must be K/N with 0 <= K < N, got {args.part!r}")
        part = (k, n)
    from ..evaluation.registry import metrics
    from ..examples import read_examples

    # before the model loads: a bad file or an unknown metric fails at once
    metrics(args.metrics)
    examples = read_examples(args.examples, limit=args.limit or None)
    estimator = ScoreEstimator.from_pretrained(args.estimator) if args.estimator else None
    attributor = _attributor(args, estimator)
    estimators = {"at2": attributor.estimator} if estimator is not None or attributor.estimator.trained else {}
    estimators["average_attention"] = ScoreEstimator.uniform(attributor.num_layers, attributor.num_heads)
    report = evaluate(
        examples,
        attributor,
        estimators,
        output=args.output,
        plot=args.plot,
        limit=args.limit,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        batch_size=64 if args.batch_size is None else args.batch_size,
        part=part,
        cache_dir=args.cache,
        metric_names=args.metrics,
        budgets=args.budgets,
        curve=args.curve,
    )
    if args.record:  # a limited or partial run is recorded as what it measured, not as the whole file
        described = str(args.examples)
        if args.limit:
            described = f"examples 0-{len(examples) - 1} of {described}"
        if part:
            described = f"part {part[0]}/{part[1]} (every {part[1]}th example from {part[0]}) of {described}"
        record_evaluation(Path(args.estimator), report, described)
    print(json.dumps(report["summary"], indent=2))
    return 0


def _evaluate_groundedness(args: argparse.Namespace) -> int:
    """`evaluate --groundedness`: both groundedness modes against the measured label; rows go to OUTPUT.jsonl
    (resumable), the summary to OUTPUT."""
    from ..attribution.estimator import ScoreEstimator
    from ..evaluation.groundedness import evaluate_groundedness, mismatched_ids, record_groundedness
    from ..examples import read_examples

    examples = read_examples(args.examples, limit=args.limit or None)
    estimator = ScoreEstimator.from_pretrained(args.estimator) if args.estimator else None
    attributor = _attributor(args, estimator)
    summary = evaluate_groundedness(
        attributor, examples, args.output, max_new_tokens=args.max_new_tokens, mismatched=mismatched_ids(args.examples)
    )
    if args.record:
        described = str(args.examples)
        if args.limit and args.limit < len(read_examples(args.examples)):
            described = f"examples 0-{len(examples) - 1} of {described}"
        record_groundedness(Path(args.estimator), summary, described)
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate_conversations(args: argparse.Namespace) -> int:
    """`evaluate --conversations`: each example becomes a conversation; rows go to OUTPUT.jsonl (resumable),
    the summary to OUTPUT."""
    from ..attribution.estimator import ScoreEstimator
    from ..evaluation.conversations import evaluate_conversations, record_conversations
    from ..examples import read_examples
    from ..storage.files import atomic_path

    names = [Path(b).name for b in args.baseline or []]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"--baseline folders must have different names (they name the results): {names}")
    examples = read_examples(args.examples)  # all: follow-ups are picked from the whole file, --limit or not
    baselines = {name: ScoreEstimator.from_pretrained(b) for name, b in zip(names, args.baseline or [])}
    estimator = ScoreEstimator.from_pretrained(args.estimator) if args.estimator else None
    attributor = _attributor(args, estimator)
    rows = args.output.with_suffix(".jsonl")
    summary = evaluate_conversations(
        attributor, examples, rows, max_new_tokens=args.max_new_tokens, baselines=baselines, limit=args.limit or None,
        batch_size=8 if args.batch_size is None else args.batch_size,
    )
    with atomic_path(args.output) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    if args.record:
        evaluated = min(args.limit or len(examples), len(examples))
        described = str(args.examples)
        if evaluated < len(examples):
            described = f"examples 0-{evaluated - 1} of {described}"
        record_conversations(Path(args.estimator), summary, described)
    print(json.dumps(summary, indent=2))
    return 0


EXAMPLES_EPILOG = """\
EXAMPLES JSONL: one example per line, an object with
  id         the example's id in shards and reports (string or integer; default: its position)
  query      the question (required, non-empty)
  documents  the retrieved documents (required, at least one): strings or objects with text (required),
             id, title, url, metadata
  history    earlier turns (optional): [{"role": "user" | "assistant", "content": "..."}, ...]
Other fields (e.g. relevant_ids, answer_hint) are ignored.
"""
MODEL_HELP = ("local folder, Hub id, GGUF file, or gemma3-270m (the optional gemma extra) "
              "(default: embedded SmolLM2-135M)")
DEVICE_HELP = "torch device to run the model on, e.g. cpu, cuda, cuda:1 (default: cpu; under an accelerate launch, " \
    "each process's own device)"


def add_training_commands(sub: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    c = sub.add_parser("collect", help="collect ablation data for training an estimator (resumable)",
                       epilog=EXAMPLES_EPILOG, formatter_class=raw)
    c.add_argument("examples", help="JSONL of {id, query, documents, history} (see below)")
    c.add_argument("output", help="folder of shards (rerun to resume)")
    c.add_argument("--model", help=MODEL_HELP)
    c.add_argument("--device", type=device_argument, help=DEVICE_HELP)
    c.add_argument("--num-masks", type=int, default=32)
    c.add_argument("--keep-prob", type=float, default=0.5)
    c.add_argument("--leave-one-out", action="store_true", help="also one mask per source removing it alone (what "
                   "leave-one-out top-1 agreement measures; with --num-masks 0, only these: `train` adds them to the "
                   "same examples collected with random masks in an earlier folder)")
    c.add_argument(
        "--sources",
        choices=list(SOURCE_KINDS),
        default="documents",
        help="what to ablate: documents, their sentences, documents + earlier turns, system prompt and question, "
        "or every document token on its own (as the reference AT2 trains; one more pass per example)",
    )
    c.add_argument("--targets", choices=list(TARGET_KINDS), default="sentences", help="what a training target "
                   "is: each answer sentence (default), or the whole answer")
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--shard-size", type=int, default=16)
    c.add_argument("--batch-size", type=int, default=33, help="ablation masks per forward pass (default: all 1 + 32 "
                   "of an example, so every shared prompt prefix is computed once; lower it if memory is short)")
    c.add_argument("--limit", type=int)
    c.add_argument("--skip-invalid", action="store_true", help="skip bad examples (no documents, empty query, "
                   "not JSON, too long, ...) and report them in the summary, instead of refusing to start")
    c.set_defaults(func=cmd_collect)

    t = sub.add_parser("train", help="fit the linear estimator on collected shards")
    t.add_argument("data", type=Path, nargs="+", help="folder(s) of shards from `collect` (e.g. single-turn and "
                   "multi-turn); each is split into training and held-out examples on its own; a folder holding "
                   "examples of an earlier one (e.g. their leave-one-out masks) adds its masks to them")
    t.add_argument("output", type=Path, help="estimator folder to write")
    t.add_argument("--model", help="model id the data was collected with (default: embedded SmolLM2-135M)")
    t.add_argument("--num-layers", type=int)
    t.add_argument("--num-heads", type=int)
    t.add_argument("--epochs", type=int, default=300)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--heldout-fraction", type=float, default=0.15)
    t.add_argument("--patience", type=int, default=30)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--leave-one-out-weight", type=float, help="weight of the correlation over leave-one-out masks "
                   "(`collect --leave-one-out`, in a later data folder) beside the random masks' (default: 1)")
    t.add_argument("--training-data", help="description of the training data for the model card")
    t.add_argument("--weights-from", type=Path, metavar="ESTIMATOR", help="take the weights of this estimator "
                   "folder instead of training them, and fit only the runtime settings (groundedness, refinement "
                   "prior) on the data: e.g. to recalibrate an estimator after collecting conversations")
    t.add_argument("--groundedness-conversations", choices=CONVERSATION_CHOICES, default="all",
                   help="which examples of the multi-turn sets (collect --sources context) fit the groundedness "
                   "head: all of them (default: their held-out evaluation is `evaluate --conversations` on another "
                   "file), or their training split only (their held-out split then measures the head too)")
    t.add_argument("--groundedness-ridge", type=float, default=HEAD_RIDGE,
                   help=f"ridge penalty of the groundedness head on standardized features (default: {HEAD_RIDGE:g})")
    t.add_argument("--groundedness-cap", type=float, default=HEAD_TARGET_CAP, help="the head's training targets "
                   f"(log-odds drops) are clipped to [-cap, cap] nats (default: {HEAD_TARGET_CAP:g})")
    t.add_argument("--refinement-strengths", type=float, nargs="+", default=list(STRENGTHS), metavar="S",
                   help="grid of prior strengths and scale strengths the refinement prior is chosen from "
                   f"(default: {' '.join(f'{x:g}' for x in STRENGTHS)})")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="LDS and top-k drop of AT2 vs baselines on held-out examples",
                       epilog=EXAMPLES_EPILOG, formatter_class=raw)
    e.add_argument("examples", nargs="?", help="JSONL of held-out {id, query, documents, history} (see below)")
    e.add_argument("--part", help="K/N: evaluate every N-th example starting at K (run N processes, then --merge)")
    e.add_argument("--merge", nargs="+", help="merge part reports into --output/--plot instead of evaluating")
    e.add_argument("--model", help=MODEL_HELP)
    e.add_argument("--device", type=device_argument, help=DEVICE_HELP)
    e.add_argument("--estimator", help="estimator to evaluate (default: the model's shipped one)")
    e.add_argument("--output", type=Path, default=Path("evaluation.json"))
    e.add_argument("--plot", type=Path, help="plot of the metrics (default: evaluation.png)")
    e.add_argument("--curve", type=Path, help="plot of LDS and top-1 drop vs extra forward passes: AT2 + k "
                   "ablations, ContextCite-k, leave-one-out, average attention (default: evaluation-budget.png)")
    e.add_argument("--budgets", type=_budget, nargs="+", metavar="K",
                   help=f"ablation budgets of the curve (default: {' '.join(map(str, BUDGETS))})")
    e.add_argument("--limit", type=int)
    e.add_argument("--seed", type=int, help="seed of the ablation masks (default: 1)")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, help="ablation masks per forward pass (default: 64, with "
                   "--conversations 8; lower it if memory is short: the prefix cache holds this many rows)")
    e.add_argument("--cache", type=Path, help="folder keeping each example's ablations: rerun with another "
                   "estimator measures only its new top-k masks (resumable)")
    e.add_argument("--metrics", nargs="+", metavar="NAME", help="evaluate with these registered metrics only "
                   "(default: all of them; built in: lds, top_k_drop; see at2_rag.evaluation.registry)")
    e.add_argument("--baseline", action="append", metavar="ESTIMATOR", help="with --conversations: also the "
                   "top-1 agreement of this estimator (e.g. an earlier one) on the same runs; repeatable")
    e.add_argument("--groundedness", action="store_true", help="evaluate groundedness instead: per answer "
                   "sentence, measured and estimated `grounded` against the label (log-probability drops by >= 1 nat "
                   "with every document masked out): AUROC, supported precision/recall, standard errors over "
                   "examples; examples marked \"mismatched\": true are also reported apart")
    e.add_argument("--conversations", action="store_true", help="evaluate attribution in conversations instead: "
                   "each example becomes a multi-turn one (the model's own first answer as history, then a follow-up "
                   "that repeats, builds on or doubts it, or that the documents cannot answer); reports top-1 "
                   "agreement with leave-one-out over documents and context sources, groundedness AUROC and "
                   "supported precision/recall, with standard errors (rows in OUTPUT.jsonl, resumable)")
    e.add_argument("--record", action="store_true", help="write the summary into the --estimator folder's "
                   "config.json and model card")
    e.set_defaults(func=cmd_evaluate)
