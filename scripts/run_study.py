"""Run the quality study of docs/quality.md (MoBA vs full attention vs the hybrid, continued pretraining,
sparse-loss recall) on one GPU within a time budget; see moba_train/study.py.

    python scripts/run_study.py --work-dir runs/study --results-dir bench/results/quality --budget-minutes 8.5

Rerunning with the same --work-dir continues where the last run stopped. Overrides after the flags
(section.key=value) apply to every arm's recipe.
"""

import argparse
import os
import sys
from pathlib import Path

from moba_train.cli import positive, run_entry

SITE, STDLIB = "site-packages", "stdlib"


def _list(kind):
    return lambda text: tuple(kind(x) for x in text.split(","))


def _mix(text):
    shares = {"copy_mix": 0.0, "passkey_mix": 0.0, "recall_mix": 0.0}  # a share not given is none
    for part in text.split(","):
        name, _, share = part.partition("=")
        if name not in ("copy", "passkey", "recall") or not share:
            raise argparse.ArgumentTypeError(f"{part!r} is not copy=SHARE, passkey=SHARE or recall=SHARE")
        shares[f"{name}_mix"] = float(share)
    if sum(shares.values()) > 1 or min(shares.values()) < 0:
        raise argparse.ArgumentTypeError(f"the shares {text!r} must be at least 0 and sum to at most 1")
    return tuple(shares.items())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/study"),
                        help="corpus, checkpoints and the study state (default: runs/study)")
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results/quality"),
                        help="study.json, study.md and the plots, rewritten after every stage")
    parser.add_argument("--budget-minutes", type=positive(float, "number of minutes"), default=8.5,
                        help="wall-clock budget of this run; stages that would end later are not started")
    parser.add_argument("--tokens-per-arm", type=int, default=None,
                        help="training tokens of each pretraining arm (default: sized to the budget by calibration)")
    parser.add_argument("--recall-fraction", type=float, default=0.25,
                        help="arm 5's steps as a share of a pretraining arm's (default: 0.25)")
    parser.add_argument("--arms", type=_list(str), default=None,
                        help="comma-separated arms to run (default: arms 1-5, full,moba,hybrid,cpt,recall_full,"
                             "recall_moba,recall_hybrid; hybrid_probed also runs the hybrid with its full layers "
                             "where the shared start copies most, recall_hybrid_probed arm 5 with them where arm "
                             "1 copies)")
    parser.add_argument("--corpus-mb", type=float, default=96.0, help="corpus source text in MiB (default: 96)")
    parser.add_argument("--corpus-source", choices=[SITE, STDLIB], default=SITE,
                        help="every installed package (default) or the standard library only")
    parser.add_argument("--vocab-size", type=int, default=32768, help="tokenizer vocabulary (default: 32768)")
    parser.add_argument("--valid-fraction", type=float, default=0.03, help="share held out by package (0.03)")
    parser.add_argument("--tokenizer-mb", type=float, default=24.0, help="tokenizer training text in MiB (24)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="corpus worker processes")
    parser.add_argument("--eval-windows", type=int, default=64, help="validation windows per evaluation (64)")
    parser.add_argument("--bucket", type=int, default=1024, help="position bucket and trailing tokens (1024)")
    parser.add_argument("--passkey-lengths", type=_list(int), default=(2048, 4096, 8192),
                        help="passkey context lengths (2048,4096,8192)")
    parser.add_argument("--passkey-depths", type=_list(float), default=(0.0, 0.25, 0.5, 0.75, 1.0),
                        help="needle depths, 0 = start of the context (0,0.25,0.5,0.75,1)")
    parser.add_argument("--passkey-samples", type=int, default=20, help="prompts per passkey cell (20)")
    parser.add_argument("--recall-documents", type=int, default=32, help="recall documents per arm-5 model (32)")
    parser.add_argument("--copy-documents", type=int, default=32,
                        help="copy documents per pretraining arm, when its recipe mixes copies (32)")
    parser.add_argument("--short-tokens", type=int, default=0,
                        help="tokens of a start on short sequences shared by arms 1-3 (default 0: none)")
    parser.add_argument("--short-seq-length", type=int, default=512, help="the shared start's sequence length (512)")
    parser.add_argument("--short-mix", type=_mix, default=None,
                        help="the shared start's mix, e.g. copy=0.5,passkey=0.25,recall=0 (the rest is text; "
                             "default: moba_train.study.StudySettings.short_mix)")
    parser.add_argument("--eval-batch-size", type=int, default=4, help="sequences per evaluation forward (4)")
    parser.add_argument("--track-passkey", type=int, default=0,
                        help="passkey prompts of an in-training retrieval check at every eighth of arms 1-4 (0: off)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every arm's recipe")
    args = parser.parse_args(argv)

    # after argument parsing: imports take seconds
    from moba_train.config import ConfigError
    from moba_train.study import ARMS, DEFAULT_ARMS, Study, StudySettings

    names = [arm.name for arm in ARMS]
    unknown = [name for name in args.arms or () if name not in names]
    if unknown:
        raise ConfigError(f"--arms names unknown arm(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    settings = StudySettings(
        work_dir=args.work_dir, results_dir=args.results_dir, budget_s=60 * args.budget_minutes,
        tokens_per_arm=args.tokens_per_arm, recall_fraction=args.recall_fraction,
        arms=tuple(args.arms or DEFAULT_ARMS), overrides=tuple(args.overrides), corpus_mb=args.corpus_mb,
        corpus_site_packages=args.corpus_source == SITE, vocab_size=args.vocab_size,
        valid_fraction=args.valid_fraction, tokenizer_mb=args.tokenizer_mb, workers=max(1, args.workers),
        eval_windows=args.eval_windows, bucket_size=args.bucket, passkey_lengths=args.passkey_lengths,
        passkey_depths=args.passkey_depths, passkey_samples=args.passkey_samples,
        recall_documents=args.recall_documents, copy_documents=args.copy_documents,
        eval_batch_size=args.eval_batch_size, short_tokens=args.short_tokens, short_seq_length=args.short_seq_length,
        track_passkey=args.track_passkey,
        **({"short_mix": args.short_mix} if args.short_mix else {}),
    )
    failed = Study(settings).run()
    if failed:
        print(f"error: stage(s) {', '.join(failed)} failed; their errors are in {args.results_dir / 'study.md'}",
              file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    run_entry(lambda: main(sys.argv[1:]))
