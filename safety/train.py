"""Train the embedding head: `python -m safety.train`.

Logistic regression (scikit-learn, multinomial, balanced class weights) over
the vectors of the labelled set's training split (the folded text, as the
checker sees it) by one featurizer (safety.featurizer; `--featurizer
minilm`, the default, `minilm2` or `static`), written to
safety/data/head-NAME.npz as plain arrays (no pickle): weights [C, D], bias [C], the
labels, the featurizer's name, and flag/block thresholds per label and for
the attack score (injection + jailbreak), and the risk below which it clears
a text as the first stage of the "cascade" head. The regularisation and the thresholds are chosen on out-of-fold
predictions of the training split only (never the held-out split). Prints
the held-out split's accuracy; the full table per category is
`python -m bench.safety`.
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
# training split only, from out-of-fold predictions (5-fold). The attack score
# (injection + jailbreak) flags above all but ATTACK_BENIGN_FLAGGED of the
# benign training items' scores; each harm category flags above every benign
# training item's score. Both flag FLAG_MARGIN above that score (within
# FLAG_RANGE), and block BLOCK_MARGIN higher (within BLOCK_RANGE). The target
# is at most 2% of benign chat flagged: 1% out of fold leaves room for the
# held-out texts being new to the head. (The range's top used to be 0.6,
# which flagged 4% of benign training items out of fold.)
ATTACK_BENIGN_FLAGGED = 0.01
# The regularisation is chosen the same way, on the training split: of this
# grid's values whose out-of-fold share of benign items flagged (at their
# thresholds) meets the target, MAX_BENIGN_FLAGGED, the C whose out-of-fold
# attack recall is highest. The grid reaches 256: with 32 at its top, the best
# C of both featurizers was that top; beyond it the probabilities saturate,
# the attack threshold reaches FLAG_RANGE's top and more benign items pass it.
C_GRID = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
MAX_BENIGN_FLAGGED = 0.02
FLAG_RANGE = (0.3, 0.9)
BLOCK_RANGE = (0.5, 0.95)
FLAG_MARGIN, BLOCK_MARGIN = 0.02, 0.2


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    os.environ.setdefault("LOAD_MODELS", "0")
    sys.path.insert(0, str(ROOT))
    # Imported here: Django is configured by the environment set just above.
    import django

    django.setup()


def _above(scores: np.ndarray, share: float) -> float:
    """A score above all but `share` of `scores` (all of them when the share
    rounds to no item), FLAG_MARGIN higher, within FLAG_RANGE."""
    allowed = int(share * len(scores))
    return float(np.clip(np.sort(scores)[::-1][allowed] + FLAG_MARGIN, *FLAG_RANGE))


def _out_of_fold(c: float, x, y) -> np.ndarray:
    """Probabilities [N, C] of the training items, each from a model that did not see it."""
    # sklearn: imported with the rest of training, in train().
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return cross_val_predict(_model(c), x, y, cv=folds, method="predict_proba")


def _model(c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=3000, class_weight="balanced")


def _choose_c(x, y, labels: list[str]) -> tuple[float, np.ndarray]:
    """(C, its out-of-fold probabilities): of the C_GRID values whose
    out-of-fold share of benign items flagged meets MAX_BENIGN_FLAGGED, the
    one with the best out-of-fold attack recall (the lowest share when none
    meets it)."""
    best = None
    for c in C_GRID:
        oof = _out_of_fold(c, x, y)
        recall, benign = _out_of_fold_rates(oof, y, labels, _thresholds(oof, y, labels))
        print(f"  C={c:g}: out of fold, attack recall {recall:.2f}, {benign:.1%} of benign items flagged")
        meets = benign <= MAX_BENIGN_FLAGGED
        key = (meets, recall if meets else -benign)
        if best is None or key > best[0]:
            best = (key, c, oof)
    return best[1], best[2]


def _thresholds(oof, y, labels: list[str]) -> dict:
    """Per label (flag_at, block_at), and the same for the attack score (the
    sum of injection and jailbreak: an attack the head splits between the two
    is still one attack), from out-of-fold probabilities of the training split."""
    benign = oof[y == labels.index("benign")]  # [B, C]
    flag_at = np.asarray([_above(benign[:, k], 0.0) for k in range(len(labels))])  # [C]
    attack_index = [labels.index(c) for c in ATTACK]
    attack_flag_at = _above(benign[:, attack_index].sum(axis=1), ATTACK_BENIGN_FLAGGED)
    return {
        "flag_at": flag_at, "block_at": np.clip(flag_at + BLOCK_MARGIN, *BLOCK_RANGE),
        "attack_flag_at": np.float32(attack_flag_at),
        "attack_block_at": np.float32(np.clip(attack_flag_at + BLOCK_MARGIN, *BLOCK_RANGE)),
    }


def _clear_below(oof, y, labels: list[str]) -> tuple[float, float]:
    """(the lowest out-of-fold risk, 1 - P(benign), of any harmful training
    item; the share of benign training items below it). As the first stage of
    the "cascade" head, this head clears a text whose risk is below it, and
    every other text goes to the next head: no harmful training item would
    have been cleared."""
    risk = 1.0 - oof[:, labels.index("benign")]
    benign = y == labels.index("benign")
    threshold = float(risk[~benign].min())
    return threshold, float((risk[benign] < threshold).mean())


def _out_of_fold_rates(oof, y, labels, thresholds) -> tuple[float, float]:
    """(attack recall, share of benign items flagged) of the head alone at
    `thresholds`, on out-of-fold probabilities of the training split."""
    attack_index = [labels.index(c) for c in ATTACK]
    harm = [k for k, label in enumerate(labels) if label != "benign" and label not in ATTACK]
    flagged = ((oof[:, attack_index].sum(axis=1) >= thresholds["attack_flag_at"])
               | (oof[:, harm] >= thresholds["flag_at"][harm]).any(axis=1))
    return float(flagged[np.isin(y, attack_index)].mean()), float(flagged[y == labels.index("benign")].mean())


def train(c: float | None, featurizer_name: str, out: Path) -> None:
    # Imported after django.setup(): the embedding service reads settings.
    from safety import labelled
    from safety.featurizer import vectors
    from safety.normalize import fold
    from safety.taxonomy import HEAD_LABELS

    training, held_out = labelled.split(labelled.load())
    labels = [label for label in HEAD_LABELS if any(i.label == label for i in training)]
    x = vectors([fold(i.text) for i in training], featurizer_name)  # [N, D]
    y = np.asarray([labels.index(i.label) for i in training])
    if c is None:
        c, oof = _choose_c(x, y, labels)
    else:
        oof = _out_of_fold(c, x, y)
    model = _model(c).fit(x, y)
    thresholds = _thresholds(oof, y, labels)
    recall, benign = _out_of_fold_rates(oof, y, labels, thresholds)
    print(f"  out of fold at C={c:g}: {benign:.1%} of benign items flagged, attack recall {recall:.2f}")
    clear_below, cleared = _clear_below(oof, y, labels)
    print(f"  as a cascade's first stage: clears below risk {clear_below:.3f}, {cleared:.0%} of benign items out of fold")
    np.savez(
        out,
        labels=np.asarray(labels),
        featurizer=np.asarray(featurizer_name),
        weights=model.coef_.astype(np.float32),  # [C, D]
        bias=model.intercept_.astype(np.float32),  # [C]
        **{name: np.asarray(value, dtype=np.float32) for name, value in thresholds.items()},
        clear_below=np.float32(clear_below),
    )
    for label, f, b in zip(labels, thresholds["flag_at"], thresholds["block_at"]):
        print(f"  {label:18s} flag at {f:.2f}, block at {b:.2f}")
    print(f"  {'attack (sum)':18s} flag at {thresholds['attack_flag_at']:.2f}, "
          f"block at {thresholds['attack_block_at']:.2f}")
    test_x = vectors([fold(i.text) for i in held_out], featurizer_name)
    predicted = [labels[k] for k in model.predict(test_x)]
    correct = sum(p == i.label for p, i in zip(predicted, held_out))
    print(f"trained on {len(training)} {featurizer_name} vectors, {len(labels)} labels, C={c:g}; wrote {out}")
    print(f"held-out accuracy: {correct}/{len(held_out)} = {correct / len(held_out):.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--c", type=float, default=None,
                        help="inverse regularisation strength (default: chosen from C_GRID out of fold)")
    parser.add_argument("--featurizer", choices=("static", "minilm", "minilm2"), default="minilm",
                        help="the vectors the head reads (safety.featurizer; default: minilm)")
    parser.add_argument("--out", type=Path, default=None, help="default: the featurizer's head in safety/data/")
    args = parser.parse_args(argv)
    _setup_django()
    # Imported after django.setup(), as in train().
    from safety.featurizer import HEAD_PATHS

    train(args.c, args.featurizer, args.out or HEAD_PATHS[args.featurizer])
    return 0


if __name__ == "__main__":
    sys.exit(main())
