"""Train the embedding head: `python -m safety.train`.

Logistic regression (scikit-learn, multinomial, balanced class weights) over
the all-MiniLM-L6-v2 embeddings of the labelled set's training split (the
folded text, as the checker sees it), written to safety/data/head.npz as
plain arrays (no pickle): weights [C, D], bias [C], the labels, and
flag/block thresholds per label and for the attack score (injection +
jailbreak), calibrated on out-of-fold predictions of the training split. Prints the held-out split's figures; the full table
per category is `python -m bench.safety`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ATTACK = ("prompt_injection", "jailbreak")

# Thresholds on the head's probability of a category are calibrated on the
# training split only, from out-of-fold predictions (5-fold): a category
# flags just above the highest score any benign training item got for it
# (within FLAG_RANGE), and blocks BLOCK_MARGIN higher (within BLOCK_RANGE).
FLAG_RANGE = (0.3, 0.6)
BLOCK_RANGE = (0.5, 0.85)
FLAG_MARGIN, BLOCK_MARGIN = 0.02, 0.2


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    os.environ.setdefault("LOAD_MODELS", "0")
    sys.path.insert(0, str(ROOT))
    # Imported here: Django is configured by the environment set just above.
    import django

    django.setup()


def _thresholds(model, x, y, labels: list[str]) -> dict:
    """Per label (flag_at, block_at), and the same for the attack score (the
    sum of injection and jailbreak: an attack the head splits between the two
    is still one attack), from out-of-fold probabilities of the training split."""
    # sklearn: imported with the rest of training, in train().
    from sklearn.model_selection import cross_val_predict

    oof = cross_val_predict(model, x, y, cv=5, method="predict_proba")  # [N, C]
    benign = oof[y == labels.index("benign")]  # [B, C]
    flag_at = np.clip(benign.max(axis=0) + FLAG_MARGIN, *FLAG_RANGE)  # [C]
    attack = benign[:, [labels.index(c) for c in ATTACK]].sum(axis=1)  # [B]
    attack_flag_at = float(np.clip(attack.max() + FLAG_MARGIN, *FLAG_RANGE))
    return {
        "flag_at": flag_at, "block_at": np.clip(flag_at + BLOCK_MARGIN, *BLOCK_RANGE),
        "attack_flag_at": np.float32(attack_flag_at),
        "attack_block_at": np.float32(np.clip(attack_flag_at + BLOCK_MARGIN, *BLOCK_RANGE)),
    }


def train(c: float, out: Path) -> None:
    # Imported after django.setup(): the embedding service reads settings.
    from sklearn.linear_model import LogisticRegression

    from retrieval.services import embed
    from safety import labelled
    from safety.normalize import fold
    from safety.taxonomy import HEAD_LABELS

    training, held_out = labelled.split(labelled.load())
    labels = [label for label in HEAD_LABELS if any(i.label == label for i in training)]
    x = np.asarray(embed([fold(i.text) for i in training]), dtype=np.float32)  # [N, D]
    y = np.asarray([labels.index(i.label) for i in training])
    model = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(x, y)
    thresholds = _thresholds(LogisticRegression(C=c, max_iter=2000, class_weight="balanced"), x, y, labels)
    np.savez(
        out,
        labels=np.asarray(labels),
        weights=model.coef_.astype(np.float32),  # [C, D]
        bias=model.intercept_.astype(np.float32),  # [C]
        **{name: np.asarray(value, dtype=np.float32) for name, value in thresholds.items()},
    )
    for label, f, b in zip(labels, thresholds["flag_at"], thresholds["block_at"]):
        print(f"  {label:18s} flag at {f:.2f}, block at {b:.2f}")
    print(f"  {'attack (sum)':18s} flag at {thresholds['attack_flag_at']:.2f}, "
          f"block at {thresholds['attack_block_at']:.2f}")
    test_x = np.asarray(embed([fold(i.text) for i in held_out]), dtype=np.float32)
    predicted = [labels[k] for k in model.predict(test_x)]
    correct = sum(p == i.label for p, i in zip(predicted, held_out))
    print(f"trained on {len(training)} items, {len(labels)} labels; wrote {out}")
    print(f"held-out accuracy: {correct}/{len(held_out)} = {correct / len(held_out):.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--c", type=float, default=4.0, help="inverse regularisation strength")
    parser.add_argument("--out", type=Path, default=ROOT / "safety" / "data" / "head.npz")
    args = parser.parse_args(argv)
    _setup_django()
    train(args.c, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
