"""``python -m agingnet.prep {align,filter,split,report}``: prepare one actor's photos for a personal run.

    python -m agingnet.prep align --input raw --out aligned [--ages ages.csv] [--size 1024] [--workers 2]
    python -m agingnet.prep filter aligned [--blur-threshold 60]
    python -m agingnet.prep split aligned --out data [--test-fraction 0.2] [--seed 0]
    python -m agingnet.prep report data

argparse subcommands rather than a Hydra app like train/infer: these are four steps over folders given as
positional paths, with a handful of flags each; Hydra's key=value overrides, run folders and config groups
add nothing here and would hide the folder arguments. Bad input stops with one line
``agingnet.prep: error: …`` naming the file or value (exit code 2); no input file is modified or deleted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agingnet.prep.filtering import FilterConfig

PROG = "agingnet.prep"


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{align,filter,split,report}")

    a = sub.add_parser("align", formatter_class=fmt, help="detect, choose and FFHQ-align one face per photo",
                       description="Detect faces, keep the actor's, align FFHQ-style, write {age}_{idx}.png and "
                                   "prep_summary.json (every input: kept, or why not). Resumable.")
    a.add_argument("--input", required=True, type=Path, help="folder of raw photos (read only; searched recursively)")
    a.add_argument("--out", required=True, type=Path, help="output folder (not inside --input)")
    a.add_argument("--ages", type=Path, default=None, help="CSV 'file,age' or 'file,birth_year,photo_year'")
    a.add_argument("--estimate-ages", action="store_true", help="estimate missing ages with DEX (needs --dex)")
    a.add_argument("--dex", type=Path, default=None, help="dex_age_classifier.pth for --estimate-ages")
    a.add_argument("--actor", type=Path, nargs="+", default=None,
                   help="reference photo(s) of the actor: in photos with several faces keep the nearest one")
    a.add_argument("--size", type=int, default=1024, help="output size in px")
    a.add_argument("--workers", type=int, default=1, help="parallel processes (each loads the models once)")
    a.add_argument("--landmarks", default="auto", choices=("auto", "dlib", "fan"),
                   help="68-point landmarks: auto = FAN when its weights are in the torch hub cache, else dlib")
    a.add_argument("--upsample", type=int, default=1, help="dlib detector pyramid upsampling (finds smaller faces)")

    f = sub.add_parser("filter", formatter_class=fmt, help="move blurry/small/duplicate/outlier faces aside",
                       description="Move rejects to ALIGNED/_rejected/<reason>/ and list them in "
                                   "ALIGNED/_rejected/filter_report.json. Nothing is deleted.")
    f.add_argument("aligned", type=Path, help="folder written by `prep align`")
    d = FilterConfig()
    f.add_argument("--min-face", type=float, default=d.min_face, help="min face crop side in the original (px)")
    f.add_argument("--blur-threshold", type=float, default=d.blur_threshold, help="min variance of Laplacian")
    f.add_argument("--dup-identity", type=float, default=d.dup_identity,
                   help="near-duplicate: max 128-d embedding distance")
    f.add_argument("--dup-pixels", type=float, default=d.dup_pixels,
                   help="near-duplicate: max mean |grey difference| at 64 px, in [0,1]")
    f.add_argument("--outlier-k", type=float, default=d.outlier_k, help="robust z-score (MAD) cut of outliers")
    f.add_argument("--outlier-floor", type=float, default=d.outlier_floor,
                   help="never call a face closer than this to the actor's centre an outlier")

    s = sub.add_parser("split", formatter_class=fmt, help="seeded train/test split stratified by 5-year bins",
                       description="Copy ALIGNED's faces into OUT/shot_train and OUT/shot_test.")
    s.add_argument("aligned", type=Path, help="folder of {age}_{idx}.png faces (after `prep filter`)")
    s.add_argument("--out", required=True, type=Path, help="data folder (gets shot_train/ and shot_test/)")
    s.add_argument("--test-fraction", type=float, default=0.2, help="fraction of each age bin in test")
    s.add_argument("--seed", type=int, default=0, help="split seed")

    r = sub.add_parser("report", formatter_class=fmt, help="counts per age bin, histogram, contact sheet",
                       description="Write DATA/report/{counts.md,age_histogram.png,contact_sheet.png}.")
    r.add_argument("data", type=Path, help="folder holding shot_train/ and shot_test/")
    return p


def run(args: argparse.Namespace) -> dict:
    if args.command == "align":
        from agingnet.prep.aligning import run_align

        summary = run_align(args.input, args.out, ages_csv=args.ages, size=args.size, workers=args.workers,
                            estimate_ages=args.estimate_ages, dex=args.dex, actor=args.actor,
                            landmarks=args.landmarks, upsample=args.upsample)
        c = summary["counts"]
        print(f"aligned into {args.out}: {c['kept']} of {c['inputs']} inputs kept, "
              f"{c['skipped_done']} skipped as already processed; " +
              ", ".join(f"{k}: {v}" for k, v in c.items() if k not in ("inputs", "kept", "skipped_done")) +
              f" — see {args.out / 'prep_summary.json'}")
        return summary
    if args.command == "filter":
        from agingnet.prep.filtering import run_filter

        cfg = FilterConfig(args.min_face, args.blur_threshold, args.dup_identity, args.dup_pixels,
                           args.outlier_k, args.outlier_floor)
        report = run_filter(args.aligned, cfg)
        print("filter: " + ", ".join(f"{k}: {v}" for k, v in report["counts"].items()))
        return report
    if args.command == "split":
        from agingnet.prep.splitting import run_split

        return run_split(args.aligned, args.out, args.test_fraction, args.seed)
    from agingnet.prep.reporting import run_report

    return run_report(args.data)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError, ImportError) as e:  # FileNotFoundError/FileExistsError are OSErrors
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
