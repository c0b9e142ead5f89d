"""The paper scoreboard's two steps in shell/paper.mk (the work is in ssae_common/eval/paper.py):
  paper_page.py split FILE OUT [--label toxic]      a labelled collection as seeds, test and in-domain text
  paper_page.py score ROOT OUT --domains ... --seeds ... [...]   OUT/index.html; the verdicts on stdout
Bad input: one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import sys

from ssae_common.core.errors import BadInput
from ssae_common.eval.paper import scoreboard, split_domain


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="paper_page.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    split = sub.add_parser("split")
    split.add_argument("file")
    split.add_argument("out")
    split.add_argument("--label", default="toxic")
    split.add_argument("--n-seeds", type=int, default=200)
    score = sub.add_parser("score")
    score.add_argument("root")
    score.add_argument("out")
    score.add_argument("--domains", nargs="+", required=True)
    score.add_argument("--seeds", nargs="+", type=int, required=True)
    score.add_argument("--terms", nargs="*", default=[])
    score.add_argument("--recipes", nargs="*", default=[])
    score.add_argument("--recipe", required=True)
    score.add_argument("--long-term", default=None)
    score.add_argument("--ks", nargs="*", type=int, default=[])
    args = parser.parse_args(argv)
    try:
        if args.step == "split":
            counts = split_domain(args.file, args.out, label=args.label, n_seeds=args.n_seeds)
            print(", ".join(f"{k} {v}" for k, v in counts.items()), file=sys.stderr)
        else:
            lines = scoreboard(args.root, args.domains, args.seeds, args.out, terms=args.terms,
                               recipes=args.recipes, recipe=args.recipe, long_term=args.long_term or None,
                               ks=args.ks)
            print("\n".join(lines))
    except BadInput as e:
        print(f"paper_page.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
