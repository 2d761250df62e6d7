"""What checkers say about a text, and what the pipeline decides from it."""
from __future__ import annotations

from dataclasses import dataclass, field

from safety.taxonomy import ALLOW, BLOCK, FLAG, worse


@dataclass(frozen=True)
class Verdict:
    """One checker's view of one category of one text."""
    category: str = ""
    score: float = 0.0  # 0..1, how sure the checker is that the text is in the category
    action: str = ALLOW  # allow | flag (noted, let through) | block
    checker: str = ""
    reason: str = ""
    # Stands in for a checker that failed or timed out, blocking what
    # SAFETY_FAIL_CLOSED says to (safety.pipeline): nothing judged the text.
    unchecked: bool = False

    @property
    def blocked(self) -> bool:
        return self.action == BLOCK

    @property
    def flagged(self) -> bool:
        """Anything but allow: a flag or a block."""
        return self.action != ALLOW


ALLOWED = Verdict()


@dataclass
class Decision:
    """Every checker's verdicts on one text, and the worst of them."""
    verdicts: list[Verdict] = field(default_factory=list)
    # False when a checker failed or timed out and the policy's fallback
    # stands in for it: a verdict to act on now, never one to store.
    complete: bool = True

    @property
    def action(self) -> str:
        action = ALLOW
        for verdict in self.verdicts:
            action = worse(action, verdict.action)
        return action

    @property
    def blocked(self) -> bool:
        return self.action == BLOCK

    @property
    def flagged(self) -> bool:
        return self.action in (FLAG, BLOCK)

    @property
    def unchecked(self) -> bool:
        """Blocked only by stand-ins for checkers that failed or timed out: the
        text was held back because it could not be checked, not judged harmful."""
        blocking = [v for v in self.verdicts if v.blocked]
        return bool(blocking) and all(v.unchecked for v in blocking)

    @property
    def top(self) -> Verdict:
        """The verdict that decided: the worst action, then a checker's own
        verdict over a stand-in for one that failed, then the highest score."""
        ranked = sorted(self.verdicts, key=lambda v: ({BLOCK: 2, FLAG: 1}.get(v.action, 0), not v.unchecked, v.score),
                        reverse=True)
        return ranked[0] if ranked and ranked[0].flagged else ALLOWED

    def scores(self) -> dict[str, float]:
        """The highest score per category."""
        best: dict[str, float] = {}
        for verdict in self.verdicts:
            if verdict.category:
                best[verdict.category] = max(best.get(verdict.category, 0.0), verdict.score)
        return best
