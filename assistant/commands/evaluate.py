"""`bedside eval retrieval | qa | answers` and `bedside compare`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from assistant.commands import settings_from_args
from assistant.errors import BedsideError


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    evaluate = subparsers.add_parser("eval", help="measure retrieval, yes/no/maybe QA and cited answers")
    actions = evaluate.add_subparsers(dest="eval_command", metavar="ACTION", required=True)

    retrieval = actions.add_parser(
        "retrieval", parents=[common], help="recall@1/5/10, MRR and nDCG@10 of dense, BM25 and hybrid search",
        description="Build (or reuse) an index of the dataset's passages and score every retrieval mode. "
                    "pubmedqa: FILE is the PubMedQA folder; every abstract is one document of context "
                    "paragraphs and a question's gold document is its own abstract. jsonl: FILE holds "
                    '{"query": "...", "gold": ["doc-id", ...]} lines and --passages names the corpus '
                    "(any files `bedside index rebuild` reads, e.g. JSONL with id, title, text, source).")
    retrieval.add_argument("--dataset", choices=["pubmedqa", "jsonl"], required=True, help="evaluation set kind")
    retrieval.add_argument("file", nargs="?", type=Path, metavar="FILE",
                           help="PubMedQA folder (default: $BEDSIDE_PUBMEDQA_DIR or data/pubmedqa) or query JSONL")
    retrieval.add_argument("--passages", nargs="+", type=Path, metavar="PATH",
                           help="corpus files or folders for --dataset jsonl")
    retrieval.add_argument("--limit", type=int, default=0, metavar="N",
                           help="score N questions spread evenly over the set (default: all)")
    retrieval.add_argument("--modes", default="dense,bm25,hybrid", help="comma-separated retrieval modes")
    retrieval.add_argument("--cache-dir", type=Path, metavar="DIR",
                           help="where the evaluation index is kept (default: the bedside cache folder)")
    retrieval.add_argument("--out", type=Path, default=Path("eval-results"), metavar="DIR",
                           help="folder for retrieval.json and retrieval.md (default: eval-results)")
    retrieval.set_defaults(func=run_eval_retrieval)

    qa = actions.add_parser(
        "qa", parents=[common], help="PubMedQA yes/no/maybe accuracy and macro-F1, with and without retrieval",
        description="Score the PubMedQA test split by constrained decoding: the model's log-likelihood of "
                    "yes, no and maybe as its first word; the highest wins. The majority-class baseline "
                    "(the training split's most common answer) is printed beside every score.")
    qa.add_argument("--dataset", choices=["pubmedqa"], default="pubmedqa", help="evaluation set")
    qa.add_argument("file", nargs="?", type=Path, metavar="FOLDER",
                    help="PubMedQA folder (default: $BEDSIDE_PUBMEDQA_DIR or data/pubmedqa)")
    qa.add_argument("--adapter", metavar="NAME_OR_DIR", help="registered adapter name or PEFT adapter folder")
    qa.add_argument("--no-retrieval", action="store_true", help="score only the question-alone setting")
    qa.add_argument("--limit", type=int, default=0, metavar="N",
                    help="score N test questions spread evenly over the split (default: all 500)")
    qa.add_argument("--first", action="store_true",
                    help="with --limit, take the first N test ids in file order instead (all 'yes' for N <= 276)")
    qa.add_argument("--top-k", type=int, default=3, help="retrieved passages put in the prompt (default: 3)")
    qa.add_argument("--index-scope", choices=["all", "evaluated"], default="all",
                    help="index every abstract (all, default) or only the evaluated questions' (faster, "
                         "fewer distractors)")
    qa.add_argument("--cache-dir", type=Path, metavar="DIR", help="where the evaluation index is kept")
    qa.add_argument("--out", type=Path, default=Path("eval-results"), metavar="DIR",
                    help="folder for qa.json and qa.md (default: eval-results)")
    qa.set_defaults(func=run_eval_qa)

    answers = actions.add_parser(
        "answers", parents=[common], help="citation validity, supported sentences and abstention of `ask`",
        description="Ask each question through the full answer pipeline (index from --index) and report "
                    "the share of citation markers that name a real source, the share of sentences a "
                    "source supports, and the abstention rate for in-corpus and out-of-corpus questions.")
    answers.add_argument("--questions", type=Path, required=True, metavar="FILE",
                         help='JSONL of {"question": "...", "in_corpus": true|false, "doc_id"?: "..."}')
    answers.add_argument("--limit", type=int, default=0, metavar="N", help="ask the first N questions only")
    answers.add_argument("--max-new-tokens", type=int, help="generation budget per answer (default: setting)")
    answers.add_argument("--out", type=Path, default=Path("eval-results"), metavar="DIR",
                         help="folder for answers.json and answers.md (default: eval-results)")
    answers.set_defaults(func=run_eval_answers)

    compare = subparsers.add_parser(
        "compare", parents=[common], help="full fine-tuning vs LoRA/QLoRA on one data set and budget",
        description="Train each method with the `bedside train` recipe on the same data, seed and token "
                    "budget, then measure held-out quality, forgetting, cost, artifact size and canary "
                    "memorization; writes report.md, report.json and PNG plots into --out.")
    compare.add_argument("--data", required=True, metavar="FILE",
                         help="training JSONL, or `pubmedqa` to convert the PubMedQA training split")
    compare.add_argument("--eval", metavar="FILE", help="held-out JSONL (default with --data pubmedqa: test split)")
    compare.add_argument("--pubmedqa-dir", type=Path, metavar="DIR", help="PubMedQA folder for --data pubmedqa")
    compare.add_argument("--methods", default="full,lora", help="comma-separated: full, lora, qlora (CUDA only)")
    compare.add_argument("--base", dest="model", metavar="MODEL", help="base model (same as --model)")
    compare.add_argument("--max-steps", type=int, default=60, help="optimizer steps per method (default: 60)")
    compare.add_argument("--seed", type=int, default=42, help="seed for every method (default: 42)")
    compare.add_argument("--batch-size", type=int, default=4, help="examples per step (default: 4)")
    compare.add_argument("--max-seq-length", type=int, default=512, help="tokens per example (default: 512)")
    compare.add_argument("--lr", action="append", default=[], metavar="METHOD=RATE",
                         help="learning rate of one method, e.g. full=1e-5 (default: 2e-5 full, 2e-4 adapters)")
    compare.add_argument("--lora-r", type=int, default=16, help="LoRA rank r (default: 16)")
    compare.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default: 32)")
    compare.add_argument("--eval-limit", type=int, default=0, metavar="N",
                         help="score N held-out examples spread evenly over the file (default: all)")
    compare.add_argument("--general-text", type=Path, metavar="FILE",
                         help="plain-text file for forgetting (default: corpora/general/general_english.txt)")
    compare.add_argument("--canary-repeats", type=int, default=10, help="copies of each canary (default: 10)")
    compare.add_argument("--canary-candidates", type=int, default=1000,
                         help="candidates each canary is ranked among for exposure (default: 1000)")
    compare.add_argument("--max-new-tokens", type=int, default=96,
                         help="answer length for ROUGE-L on free-text data (default: 96)")
    compare.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    compare.add_argument("--overwrite", action="store_true", help="delete earlier artifacts in --out first")
    compare.set_defaults(func=run_compare)


# shared helpers

def _write_outputs(out: Path, name: str, result: dict[str, Any], table: str) -> None:
    from assistant.fileio import atomic_write_json, atomic_write_text

    atomic_write_json(out / f"{name}.json", result)
    atomic_write_text(out / f"{name}.md", table + "\n")
    print(f"\nwrote {out / (name + '.json')} and {out / (name + '.md')}")


def _cache_root(args: argparse.Namespace, name: str) -> Path:
    from assistant import models

    return Path(args.cache_dir) if args.cache_dir else models.cache_dir() / "eval-index" / name


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise BedsideError(f"--limit {limit} is invalid; use 0 (all) or a positive number")


# eval retrieval

def run_eval_retrieval(args: argparse.Namespace) -> int:
    from assistant import models
    from assistant.corpus import load_corpus
    from assistant.evaluation.datasets import (
        RetrievalQuery,
        load_pubmedqa,
        load_retrieval_queries,
        pubmedqa_documents,
        spread,
    )
    from assistant.evaluation.retrieval import (
        MODES,
        evaluate_retrieval,
        index_key,
        open_eval_index,
        retrieval_table,
    )

    _check_limit(args.limit)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        raise BedsideError(f"--modes {args.modes!r} is invalid; use a comma-separated subset of {', '.join(MODES)}")
    settings = settings_from_args(args)

    # the dataset: passages to index and queries with gold document ids
    if args.dataset == "pubmedqa":
        data = load_pubmedqa(args.file)
        documents = pubmedqa_documents(data)
        queries = [RetrievalQuery(data.items[i].question, {i}) for i in data.items]
        source = str(data.folder)
    else:
        if args.file is None or not args.passages:
            raise BedsideError("--dataset jsonl needs the query FILE and --passages PATH (the corpus to index)")
        queries = load_retrieval_queries(args.file)
        report = load_corpus(args.passages)
        for path, reason in report.problems:
            print(f"bedside: skipped {path}: {reason}", file=sys.stderr)
        documents = report.documents
        known = {d.doc_id for d in documents}
        unknown = sorted({g for q in queries for g in q.gold} - known)
        if unknown:
            raise BedsideError(f"{len(unknown)} gold id(s) are not documents of --passages (first: {unknown[0]!r}); "
                               "gold ids must match the corpus document ids")
        source = str(args.file)
    queries = [queries[i] for i in spread(list(range(len(queries))), args.limit)] if args.limit else queries

    # index (cached by content) and scoring
    key = index_key(documents, models.embedder_fingerprint(models.resolve_embedder(settings.embedder)), settings)
    retriever = open_eval_index(documents, _cache_root(args, f"{args.dataset}-{key}"), settings, progress=True)
    result = evaluate_retrieval(retriever, queries, modes)
    result.update(dataset=args.dataset, source=source, documents=len(documents), chunks=retriever.index.size,
                  index_version=retriever.index.version)
    table = retrieval_table(result)
    print(f"{args.dataset}: {len(queries)} queries, {len(documents)} documents, {retriever.index.size} chunks\n")
    print(table)
    _write_outputs(args.out, "retrieval", result, table)
    return 0


# eval qa

def resolve_adapter(adapter: str, settings: Any, spec: Any) -> Path:
    """Find a registered adapter (checked against the base fingerprint) or accept an adapter folder."""
    from assistant import models
    from assistant.tuning.loading import check_adapter_files, check_base_fingerprint
    from assistant.tuning.registry import AdapterRegistry

    folder = Path(adapter)
    if not folder.is_dir():
        registry = AdapterRegistry(settings.adapters_dir)
        entry = registry.get(adapter)
        folder = registry.folder(entry)
        check_base_fingerprint(entry, models.model_fingerprint(spec))
    check_adapter_files(folder)
    return folder


def run_eval_qa(args: argparse.Namespace) -> int:
    from assistant import models
    from assistant.corpus.text import markdown_table
    from assistant.evaluation.datasets import load_pubmedqa, pubmedqa_documents, spread
    from assistant.evaluation.qa import OptionScorer, evaluate_pubmedqa, training_majority
    from assistant.evaluation.retrieval import index_key, open_eval_index

    _check_limit(args.limit)
    if args.top_k < 1:
        raise BedsideError(f"--top-k {args.top_k} is invalid; use at least 1")
    settings = settings_from_args(args)
    data = load_pubmedqa(args.file)
    ids = data.test_ids[: args.limit] if args.first and args.limit else spread(data.test_ids, args.limit)
    majority = training_majority(data)

    # model (and adapter), then one scorer for every setting
    spec = models.resolve_model(settings.model)
    adapter_folder = resolve_adapter(args.adapter, settings, spec) if args.adapter else None
    model, tokenizer = models.load_base_model(spec, settings.dtype, settings.device)
    if adapter_folder is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_folder), adapter_name="evaluated", is_trainable=False)
        model.eval()
    scorer = OptionScorer(model, tokenizer)

    results = [evaluate_pubmedqa(scorer, data, ids)]
    if not args.no_retrieval:
        documents = pubmedqa_documents(data, ids if args.index_scope == "evaluated" else None)
        key = index_key(documents, models.embedder_fingerprint(models.resolve_embedder(settings.embedder)), settings)
        retriever = open_eval_index(documents, _cache_root(args, f"pubmedqa-{key}"), settings, progress=True)
        results.append(evaluate_pubmedqa(scorer, data, ids, retriever, top_k=args.top_k))

    rows = [["setting", "questions", "accuracy", "macro-F1", f"majority ({majority}) accuracy",
             "majority macro-F1", "gold abstract retrieved", "seconds"]]
    metrics = []
    for result in results:
        m = result.metrics(majority)
        metrics.append(m)
        retrieved = m.get("gold_abstract_retrieved")
        rows.append([m["mode"], str(m["questions"]), f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}",
                     f"{m['majority_accuracy']:.3f}", f"{m['majority_macro_f1']:.3f}",
                     "—" if retrieved is None else f"{retrieved:.3f}", f"{m['seconds']:.1f}"])
    table = markdown_table(rows)
    print(f"PubMedQA test split: {len(ids)} questions, model {spec.display_name}"
          f"{', adapter ' + args.adapter if args.adapter else ''}\n")
    print(table)
    output = {"dataset": "pubmedqa", "source": str(data.folder), "model": spec.display_name,
              "model_fingerprint": models.model_fingerprint(spec), "adapter": args.adapter,
              "adapter_folder": str(adapter_folder) if adapter_folder else None,
              "selection": "first" if args.first and args.limit else "spread", "ids": ids,
              "index_scope": args.index_scope, "top_k": args.top_k, "results": metrics,
              "predictions": {r.mode: r.predictions for r in results}}
    _write_outputs(args.out, "qa", output, table)
    return 0


# eval answers

def run_eval_answers(args: argparse.Namespace) -> int:
    from assistant.answer.pipeline import build_assistant
    from assistant.corpus.text import markdown_table
    from assistant.evaluation.answers import evaluate_answers
    from assistant.evaluation.datasets import load_answer_questions

    _check_limit(args.limit)
    questions = load_answer_questions(args.questions)
    questions = questions[: args.limit] if args.limit else questions
    settings = settings_from_args(args, max_new_tokens=args.max_new_tokens)
    assistant = build_assistant(settings, with_audit=False)
    result = evaluate_answers(assistant, questions)
    summary = result["summary"]

    def show(value: Any) -> str:
        if value is None:
            return "—"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    names = ["questions", "in_corpus", "out_of_corpus", "answered", "citation_validity", "markers",
             "answers_without_markers", "supported_sentence_rate", "auto_cited_sentence_rate",
             "abstention_rate_in_corpus", "abstention_rate_out_of_corpus", "gold_retrieved_rate",
             "gold_cited_rate", "seconds"]
    table = markdown_table([["measure", "value"]] + [[name, show(summary[name])] for name in names])
    print(table)
    result.update(questions_file=str(args.questions), index_version=assistant.index_version,
                  model=assistant.generator.model_name, max_new_tokens=settings.max_new_tokens)
    _write_outputs(args.out, "answers", result, table)
    return 0


# compare

def parse_learning_rates(values: list[str]) -> dict[str, float]:
    rates = {}
    for value in values:
        method, _, rate = value.partition("=")
        try:
            rates[method.strip()] = float(rate)
        except ValueError as err:
            raise BedsideError(f"--lr {value!r} is invalid; write METHOD=RATE, e.g. full=2e-5") from err
    return rates


def run_compare(args: argparse.Namespace) -> int:
    from assistant.evaluation.compare import DEFAULT_GENERAL_TEXT, CompareConfig, remove_artifacts
    from assistant.evaluation.compare import run_compare as compare
    from assistant.evaluation.datasets import load_pubmedqa, write_pubmedqa_training
    from assistant.evaluation.report import results_table

    settings = settings_from_args(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    data, eval_file = args.data, args.eval
    if data == "pubmedqa":
        train_path, test_path = write_pubmedqa_training(load_pubmedqa(args.pubmedqa_dir), args.out / "data")
        data, eval_file = str(train_path), eval_file or str(test_path)
    if not eval_file:
        raise BedsideError("no held-out set given; pass --eval FILE (a JSONL file in the training format)")
    if args.overwrite:
        remove_artifacts(args.out, methods)
    config = CompareConfig(
        data=data, eval=eval_file, out=str(args.out), methods=methods, base=settings.model,
        max_steps=args.max_steps, seed=args.seed, batch_size=args.batch_size, max_seq_length=args.max_seq_length,
        learning_rates=parse_learning_rates(args.lr), lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        eval_limit=args.eval_limit, general_text=str(args.general_text or DEFAULT_GENERAL_TEXT),
        canary_repeats=args.canary_repeats, canary_candidates=args.canary_candidates,
        max_new_tokens=args.max_new_tokens, command="bedside " + shlex.join(sys.argv[1:]),
    )
    report = compare(config, settings)
    print(results_table(report))
    print(f"\nreport: {Path(config.out) / 'report.md'} (every number in report.json)")
    return 0
