"""Step-by-step reasoning text for a Knights & Knaves puzzle (usable as a ``gt_cot`` hint).

The text follows a depth-first search over people in the listed order with forward deduction:
after each assumption, any statement whose mentioned people all have roles fixes its speaker's
role, and a speaker with a known role whose statement mentions exactly one open person forces
that person's role when only one choice fits.  A statement that cannot have the value its
speaker's role requires is a contradiction, and the search backtracks.  For a puzzle with one
solution this ends at that solution, and the last line states it in the answer format
(``Alice is a knight, Bob is a knave, …``).
"""

from __future__ import annotations

from rlcsd_jax.data.knights_knaves.puzzles import answer_text, evaluate, referenced, render

_INTRO = (
    "Let's reason step by step. A knight's statement is always true and a knave's "
    "statement is always false. We assume a role for one person at a time, deduce what "
    "follows, and drop any assumption that leads to a contradiction."
)


def _role(is_knight: bool) -> str:
    return "knight" if is_knight else "knave"


def _truth(value: bool) -> str:
    return "true" if value else "false"


class _Reasoner:
    """Builds the text; ``lines`` grows as the search runs."""

    def __init__(self, names, statements):
        self.names = names
        self.statements = statements
        self.refs = [referenced(s) for s in statements]
        self.lines: list[str] = [_INTRO]

    def _quote(self, i: int) -> str:
        return f'{self.names[i]}\'s statement "{render(self.statements[i], self.names)}"'

    def _propagate(self, assign: dict[int, bool]) -> bool:
        """Applies deductions in place until nothing changes; False on a contradiction."""
        names = self.names
        changed = True
        while changed:
            changed = False
            for i, stmt in enumerate(self.statements):
                open_refs = [j for j in self.refs[i] if j not in assign]
                if i not in assign:
                    if not open_refs:
                        value = bool(evaluate(stmt, assign))
                        assign[i] = value
                        self.lines.append(
                            f"{self._quote(i)} is {_truth(value)} given these roles, so "
                            f"{names[i]} is a {_role(value)}."
                        )
                        changed = True
                    continue
                need = assign[i]
                if not open_refs:
                    if bool(evaluate(stmt, assign)) != need:
                        self.lines.append(
                            f"{names[i]} is a {_role(need)}, so {self._quote(i)} must be "
                            f"{_truth(need)}, but it is {_truth(not need)}. Contradiction."
                        )
                        return False
                elif len(open_refs) == 1:
                    j = open_refs[0]
                    fits = [
                        r for r in (True, False) if bool(evaluate(stmt, {**assign, j: r})) == need
                    ]
                    if not fits:
                        self.lines.append(
                            f"{names[i]} is a {_role(need)}, so {self._quote(i)} must be "
                            f"{_truth(need)}, which is impossible whatever {names[j]} is. "
                            "Contradiction."
                        )
                        return False
                    if len(fits) == 1:
                        assign[j] = fits[0]
                        self.lines.append(
                            f"{names[i]} is a {_role(need)}, so {self._quote(i)} must be "
                            f"{_truth(need)}; this makes {names[j]} a {_role(fits[0])}."
                        )
                        changed = True
        return True

    def search(self, assign: dict[int, bool]) -> dict[int, bool] | None:
        if not self._propagate(assign):
            return None
        if len(assign) == len(self.names):
            return assign
        person = next(p for p in range(len(self.names)) if p not in assign)
        for is_knight in (True, False):
            self.lines.append(f"Assume {self.names[person]} is a {_role(is_knight)}.")
            found = self.search({**assign, person: is_knight})
            if found is not None:
                return found
            self.lines.append(f"So {self.names[person]} cannot be a {_role(is_knight)}.")
        return None


def reasoning_text(names, statements) -> str:
    """The reasoning for a puzzle with a unique solution, ending with the answer sentence."""
    reasoner = _Reasoner(tuple(names), tuple(statements))
    found = reasoner.search({})
    if found is None:
        raise ValueError("the puzzle has no solution, so there is nothing to explain")
    solution = [found[i] for i in range(len(names))]
    reasoner.lines.append(
        "Every statement is consistent with these roles, and every other "
        "option led to a contradiction."
    )
    reasoner.lines.append(f"Conclusion: {answer_text(names, solution)}.")
    return "\n".join(reasoner.lines)
