"""``python -m agingnet.world {actor,population,pretrain}``: write world datasets, train the world networks.

Bad input (unknown identity type, negative identity, an existing output folder, bad ages) is one line on
stderr and exit status 1; nothing is left half-written (folders are built aside and renamed into place).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agingnet.world.data import write_actor, write_population


def _identity(text: str) -> int:
    """Parsed here rather than by argparse so that a bad value is one line (argparse adds a usage line)."""
    try:
        return int(text)
    except ValueError:
        raise TypeError(f"--identity: world identity must be a non-negative integer, got {text!r}") from None


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agingnet.world", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("actor", help="an actor's personal folders: DIR/train, DIR/test, DIR/world.json")
    a.add_argument("--identity", required=True, help="actor identity (>= 100000)")
    a.add_argument("--seed", type=int, default=0, help="chooses the photos (ages, nuisance), not the person")
    a.add_argument("--ages", type=int, nargs="+", default=None, help="training ages (default: random in 18-75)")
    a.add_argument("--test-ages", type=int, nargs="+", default=None, help="held-out ages (default: random)")
    a.add_argument("--n-train", type=int, default=24)
    a.add_argument("--n-test", type=int, default=8)
    a.add_argument("--size", type=int, default=256)
    a.add_argument("--out", required=True)
    q = sub.add_parser("population", help="FFHQ-aging layout: DIR/{train,test}/*.png + DIR/{train,test}_ages.json")
    q.add_argument("--n", type=int, required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--min-age", type=int, default=10)
    q.add_argument("--max-age", type=int, default=80)
    q.add_argument("--size", type=int, default=256)
    q.add_argument("--out", required=True)
    t = sub.add_parser("pretrain", help="train the world DEX, identity network and global aging model "
                                        "(package weights)")
    t.add_argument("--quick", action="store_true", help="a small run (<= 3 min) that shows the metrics improve")
    t.add_argument("--out", default=None, help="weights folder (default: the package's; --quick: "
                                               "outputs/world_quick)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--only", choices=["dex", "arcface", "sam"], default=None, help="train one network (the manifest "
                                                                           "keeps the others' entries)")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    t.add_argument("--from-run", default=None, help="ship the global model of this finished "
                                                    "`python -m agingnet.train experiment=world_global_age` run "
                                                    "folder (the second stage) instead of training it (--only sam)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    try:
        if args.cmd == "actor":
            out = write_actor(_identity(args.identity), args.out, seed=args.seed, ages=args.ages, n_train=args.n_train,
                              n_test=args.n_test, test_ages=args.test_ages, size=args.size)
            print(out)
        elif args.cmd == "population":
            print(write_population(args.n, args.out, seed=args.seed, min_age=args.min_age, max_age=args.max_age,
                                   size=args.size))
        else:
            import torch

            from agingnet.world import pretrain as pt
            from agingnet.world.weights import WEIGHTS_DIR

            if args.from_run and args.only != "sam":
                raise ValueError("--from-run ships a world_global_age run: use it with --only sam")
            if args.threads is not None:
                torch.set_num_threads(args.threads)
            out = args.out or ("outputs/world_quick" if args.quick else WEIGHTS_DIR)
            pt.pretrain(pt.QUICK if args.quick else pt.FULL, out=out, seed=args.seed,
                        command=" ".join(["python -m agingnet.world", *argv]),
                        nets=(args.only,) if args.only else pt.NETS, sam_from_run=args.from_run)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"agingnet.world: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
