"""Average the weights of two trained models of one architecture (a "model soup":
Wortsman et al., CVPR 2022, WiSE-FT): a fine-tuned model averaged with the model it was
fine-tuned from keeps much of what each learned.

    .venv/bin/python scripts/average_weights.py A B OUT [--alpha 0.5] [--storage int8]

OUT gets ``alpha * A + (1 - alpha) * B`` with B's card (its threshold, classes and
training record; the averaging is recorded under ``training.averaged``). Recalibrate the
threshold afterwards with ``tilscore eval --calibrate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from tilscore.errors import TilscoreError
    from tilscore.models import load_model, save_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("out", type=Path)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--storage", default="int8", choices=("float32", "float16", "int8"))
    args = ap.parse_args()
    try:
        net_a, card_a = load_model(args.a)
        net_b, card_b = load_model(args.b)
        if (card_a.architecture, card_a.architecture_kwargs, card_a.out_channels) != (
                card_b.architecture, card_b.architecture_kwargs, card_b.out_channels):
            raise TilscoreError(f"{args.a} and {args.b} differ in architecture or outputs")
        sa, sb = net_a.state_dict(), net_b.state_dict()
        net_b.load_state_dict({k: (args.alpha * sa[k].float() + (1 - args.alpha) * sb[k].float())
                               .to(sb[k].dtype) for k in sb})
        card = card_b.model_copy(update={"training": {
            **card_b.training, "averaged": {"a": str(args.a), "b": str(args.b),
                                            "alpha": args.alpha,
                                            "a_sha256": card_a.sha256,
                                            "b_sha256": card_b.sha256}}})
        save_model(net_b, card, folder=args.out, storage=args.storage)
    except TilscoreError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
