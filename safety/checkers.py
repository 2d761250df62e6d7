"""The checkers the pipeline runs, named by dotted path in SAFETY_CHECKERS.

A checker scores a batch of texts: `check(texts, source)` returns, for each
text, its verdicts (one per category it scores). `source` is "input",
"output" or "passage": a detector of prompt injection has nothing to say
about a reply. Checkers are plain, synchronous and CPU-bound; the pipeline
runs them on its threads with a timeout.

- RulesChecker       the admin's rules, SAFETY_BLOCKED_TERMS and the
                     built-in injection patterns, on folded text (safety.rules)
- ProfanityChecker   alt-profanity-check: a linear SVM over TF-IDF, in its wheel
- GuardrailChecker   prompt-guardrail: logistic regression over TF-IDF, in its wheel
- EmbeddingHeadChecker  a logistic-regression head over text vectors
                     (safety.featurizer: the first 2 layers of
                     all-MiniLM-L6-v2, static embeddings distilled from it,
                     or the whole of it), trained by `python -m safety.train`
                     on the labelled set (safety/data/head-*.npz)

The libraries are imported on first use, with a comment at each: a process
that never moderates does not load sklearn. (The Celery worker judges chunks
at ingestion: it loads what SAFETY_CHECKERS names, and the head embeds there
with documents' numpy MiniLM through `embedding`, never torch.)
"""
from __future__ import annotations

import contextvars
import hashlib
import threading
from functools import lru_cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
from django.conf import settings

from safety import featurizer, rules
from safety.normalize import fold
from safety.taxonomy import ALLOW, BENIGN, BLOCK, FLAG, HEAD_LABELS, JAILBREAK, PROMPT_INJECTION
from safety.verdicts import Verdict

INJECTION_CATEGORIES = (PROMPT_INJECTION, JAILBREAK)

# Long texts are scored in windows: the classifiers read ~256 tokens (MiniLM)
# or dilute one bad sentence in a page of TF-IDF; an injection in the middle
# of a document must still count.
WINDOW_CHARS = 1000
MAX_WINDOWS = 16


def windows(text: str) -> list[str]:
    """Overlapping windows over `text`, at most MAX_WINDOWS spread evenly."""
    if len(text) <= WINDOW_CHARS:
        return [text]
    step = WINDOW_CHARS * 3 // 4
    starts = list(range(0, len(text) - WINDOW_CHARS // 4, step))
    if len(starts) > MAX_WINDOWS:
        starts = [starts[round(i * (len(starts) - 1) / (MAX_WINDOWS - 1))] for i in range(MAX_WINDOWS)]
    return [text[s:s + WINDOW_CHARS] for s in starts]


# What the embedding head's MiniLM vectors come from, when not
# `retrieval.services.embed` (torch): the Celery worker cannot import torch,
# so its ingestion screens with documents' numpy MiniLM, the same model
# (`services.judge_passages`). Kept in safety.featurizer, which reads it.
embedding: contextvars.ContextVar = featurizer.embedding


@lru_cache(maxsize=8)
def file_digest(path: Path, mtime_ns: int, size: int) -> str:
    """A model file's digest (cached per path, modification time and size)."""
    return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()


def grade(score: float, flag_at: float, block_at: float) -> str:
    return BLOCK if score >= block_at else FLAG if score >= flag_at else ALLOW


class Checker:
    name = ""
    categories: tuple[str, ...] = ()  # what a failure of this checker leaves unchecked
    sources = ("input", "output", "passage")
    cacheable = True  # same text, same verdicts: the pipeline may remember them
    model_package = ""  # the distribution whose bundled model it runs (its version is in `policy_key`)

    @classmethod
    def policy_key(cls) -> str:
        """What decides this checker's verdicts, for `safety.policy.version`
        (no model is loaded): its class, thresholds and model's version."""
        parts = [f"{cls.__module__}.{cls.__qualname__}", repr(getattr(cls, "flag_at", None)),
                 repr(getattr(cls, "block_at", None)), ",".join(cls.sources)]
        if cls.model_package:
            try:
                parts.append(package_version(cls.model_package))
            except PackageNotFoundError:
                parts.append("missing")
        return "|".join(parts)

    def warm(self) -> None:
        """Load what the first check would (called once, when the pipeline
        builds the checker, outside the checks' deadline)."""

    def check(self, texts: list[str], source: str) -> list[list[Verdict]]:
        raise NotImplementedError

    def _windowed(self, texts: list[str], score_many) -> list[float]:
        """The highest window score of each text, scoring all windows in one batch."""
        spans, flat = [], []
        for text in texts:
            parts = windows(text)
            spans.append((len(flat), len(flat) + len(parts)))
            flat += parts
        scores = score_many(flat) if flat else []
        return [float(max(scores[a:b])) for a, b in spans]


class RulesChecker(Checker):
    name = "rules"
    cacheable = False  # rules change in the admin

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple({rule.category for rule in rules.current().rules})

    def check(self, texts, source):
        ruleset = rules.current()
        out = []
        for text in texts:
            hits = rules.matches(ruleset, text, output=source == "output")
            out.append([Verdict(rule.category, 1.0, rule.action, f"rules:{rule.source}",
                                "It matches a rule of this deployment.") for rule in hits])
        return out


class ProfanityChecker(Checker):
    """Toxic language, scored as harassment. It flags and does not block by
    default: swearing at a compiler is not harassment, and the bench shows
    the model cannot tell the two apart."""
    name = "profanity"
    categories = ("harassment",)
    model_package = "alt-profanity-check"
    flag_at, block_at = 0.8, 1.01

    def __init__(self):
        # sklearn loads with the model, on first use (see the module docstring).
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def check(self, texts, source):
        scores = self._windowed(texts, lambda parts: list(self._predict_prob(parts)))
        return [[Verdict("harassment", s, grade(s, self.flag_at, self.block_at), self.name,
                         "It reads as abusive language.")] for s in scores]


class GuardrailChecker(Checker):
    """prompt-guardrail's model (guardify), read through its own classes."""
    name = "prompt_guardrail"
    categories = (PROMPT_INJECTION,)
    model_package = "prompt-guardrail"
    sources = ("input", "passage")
    flag_at, block_at = 0.5, 0.9

    def __init__(self):
        import warnings

        from guardify.guardrails.logistic_regression import LogisticRegressionGuardrail
        from sklearn.exceptions import InconsistentVersionWarning

        # Its wheel pickled the model with scikit-learn 1.7.2, and
        # alt-profanity-check pins the 1.9.1 we install. Loaded under both,
        # the model gave identical probabilities on ten prompts (checked
        # 2026-12-05); tests/safety/test_default_checkers.py holds it to
        # clear cases, so a scikit-learn that breaks it fails there, not
        # in a warning on every start.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InconsistentVersionWarning)
            model = LogisticRegressionGuardrail()
        self._classifier, self._vectorizer = model._clf, model._vectorizer
        self._injection = list(self._classifier.classes_).index(1)

    def _scores(self, parts: list[str]) -> list[float]:
        return list(self._classifier.predict_proba(self._vectorizer.transform(parts))[:, self._injection])

    def check(self, texts, source):
        if source == "output":
            return [[] for _ in texts]
        scores = self._windowed(texts, self._scores)
        return [[Verdict(PROMPT_INJECTION, s, grade(s, self.flag_at, self.block_at), self.name,
                         "It reads as a prompt-injection attempt.")] for s in scores]


class EmbeddingHead:
    """A softmax layer over text vectors: weights [C, D], bias [C], trained on
    the vectors of `featurizer` (the head file says which)."""

    def __init__(self, featurizer_name: str):
        path = featurizer.HEAD_PATHS.get(featurizer_name)
        if path is None:
            raise ValueError(f"SAFETY_HEAD_FEATURIZER={featurizer_name!r}: use one of {sorted(featurizer.HEAD_PATHS)}")
        data = np.load(path, allow_pickle=False)
        trained_on = str(data["featurizer"]) if "featurizer" in data else "minilm"
        if trained_on != featurizer_name:
            raise ValueError(f"{path} was trained on {trained_on!r} vectors, not {featurizer_name!r}: "
                             f"run python -m safety.train --featurizer {featurizer_name}")
        self.featurizer = featurizer_name
        self.labels = [str(label) for label in data["labels"]]
        self.weights, self.bias = data["weights"], data["bias"]  # [C, D], [C]
        self.flag_at, self.block_at = data["flag_at"], data["block_at"]  # [C], [C]
        self.attack_flag_at, self.attack_block_at = float(data["attack_flag_at"]), float(data["attack_block_at"])
        # As a cascade's first stage it clears texts whose risk is below this
        # (safety.train); 0 (a head trained before it existed) clears none.
        self.clear_below = float(data["clear_below"]) if "clear_below" in data else 0.0

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """[N, C] of `texts` (folded already)."""
        logits = featurizer.vectors(texts, self.featurizer) @ self.weights.T + self.bias  # [N, C]
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)


_heads: dict[str, EmbeddingHead] = {}
_head_lock = threading.Lock()


def head(name: str | None = None) -> EmbeddingHead:
    """The head on `name`'s vectors (default: SAFETY_HEAD_FEATURIZER's, the
    final one for "cascade"), loaded once per process."""
    name = name or settings.SAFETY_HEAD_FEATURIZER
    if name == featurizer.CASCADE:
        name = featurizer.CASCADE_FINAL
    with _head_lock:
        if name not in _heads:
            _heads[name] = EmbeddingHead(name)
        return _heads[name]


class EmbeddingHeadChecker(Checker):
    """The trained head on the vectors of SAFETY_HEAD_FEATURIZER (safety.featurizer).
    Every category of the labelled set but benign.

    "cascade" (the default) scores a prompt with the cheap `minilm2` head
    first and clears it when its risk (1 - P(benign)) is below the lowest
    that head gave any harmful training item out of fold (`clear_below`);
    every other prompt is scored by the `minilm` head, whose verdicts stand.
    So it flags and blocks what `minilm` does, less any harmful text that
    `minilm2` finds safer than every harmful training item, and a prompt it
    clears costs the shallow pass only. Only prompts ("input") go through
    the first stage: its threshold was set on prompts, and replies and
    passages are off the first token's path (and a Celery worker screening
    passages must not load torch)."""
    name = "embedding_head"
    categories = tuple(label for label in HEAD_LABELS if label != BENIGN)

    @property
    def head(self) -> EmbeddingHead:
        # Looked up on each use (a dict read): the checker follows
        # SAFETY_HEAD_FEATURIZER as the other settings are followed.
        return head()

    @classmethod
    def policy_key(cls) -> str:
        # The head's file holds its weights and thresholds; its vectors come
        # from SAFETY_HEAD_FEATURIZER, whose MiniLM is whatever EMBEDDING_MODEL
        # names (the bundled one if unset).
        name = settings.SAFETY_HEAD_FEATURIZER
        names = (featurizer.CASCADE_FIRST, featurizer.CASCADE_FINAL) if name == featurizer.CASCADE else (name,)
        digests = []
        for head_name in names:
            path = featurizer.HEAD_PATHS.get(head_name)
            stat = path.stat() if path is not None and path.exists() else None
            digests.append(file_digest(path, stat.st_mtime_ns, stat.st_size) if stat else "missing")
        return "|".join((super().policy_key(), name, *digests, settings.EMBEDDING_MODEL or "bundled"))

    def warm(self) -> None:
        # Not where MiniLM comes from a stand-in (the Celery worker, which
        # must not load torch): it screens passages, never the first stage.
        if settings.SAFETY_HEAD_FEATURIZER == featurizer.CASCADE and featurizer.embedding.get() is None:
            head(featurizer.CASCADE_FIRST).probabilities(["warm up"])
        self.head.probabilities(["warm up"])  # loads the featurizer's model (once per process)

    def check(self, texts, source):
        spans, flat = [], []
        for text in texts:
            # Folded as in training: homoglyphs and zero-width characters
            # would otherwise move the embedding away from the words they spell.
            parts = windows(fold(text))
            spans.append((len(flat), len(flat) + len(parts)))
            flat += parts
        final = self.head
        if settings.SAFETY_HEAD_FEATURIZER == featurizer.CASCADE and source == "input" and flat:
            return self._cascade(final, flat, spans, source)
        probabilities = final.probabilities(flat) if flat else np.zeros((0, len(final.labels)))
        return [self._verdicts(final, probabilities[a:b].max(axis=0), source) for a, b in spans]

    def _cascade(self, final: EmbeddingHead, flat: list[str], spans, source) -> list[list[Verdict]]:
        first = head(featurizer.CASCADE_FIRST)
        shallow = first.probabilities(flat)  # [W, C]
        risk = 1.0 - shallow[:, first.labels.index(BENIGN)]  # [W]
        onward = [i for i, (a, b) in enumerate(spans) if risk[a:b].max() >= first.clear_below]
        deep = final.probabilities([part for i in onward for part in flat[slice(*spans[i])]]) if onward else None
        onward = set(onward)
        out, row = [], 0
        for i, (a, b) in enumerate(spans):
            if i in onward:
                out.append(self._verdicts(final, deep[row:row + b - a].max(axis=0), source))
                row += b - a
            else:
                out.append(self._verdicts(first, shallow[a:b].max(axis=0), source, cleared=True))
        return out

    def _verdicts(self, head: EmbeddingHead, best, source, cleared: bool = False) -> list[Verdict]:
        """Verdicts of `head`'s probabilities [C]; all allow when a cascade's
        first stage `cleared` the text (its scores are reported as they are)."""
        verdicts = []
        for i, label in enumerate(head.labels):
            if label == BENIGN or label in INJECTION_CATEGORIES:
                continue
            score = float(best[i])
            action = ALLOW if cleared else grade(score, float(head.flag_at[i]), float(head.block_at[i]))
            verdicts.append(Verdict(label, score, action, self.name, f"It reads as {label.replace('_', ' ')}."))
        if source != "output":
            verdicts.append(self._attack(head, best, cleared))
        return verdicts

    def _attack(self, head: EmbeddingHead, best, cleared: bool = False) -> Verdict:
        """Injection and jailbreak scored as one attack (their sum), named after
        the likelier of the two: an attack the head splits between them is
        still an attack."""
        scores = {label: float(best[head.labels.index(label)]) for label in INJECTION_CATEGORIES}
        label = max(scores, key=scores.get)
        score = min(1.0, sum(scores.values()))
        action = ALLOW if cleared else grade(score, head.attack_flag_at, head.attack_block_at)
        return Verdict(label, score, action, self.name, f"It reads as {label.replace('_', ' ')}.")
