"""Entity swaps: more training sentences for extraction by renaming their entities.

Eight thousand sentences are few for a model that can copy but also remembers: it learns that 桐华 writes novels
and answers 桐华 where another author stands in the sentence. Replacing every subject and object of a sentence by
another entity seen in the same role (the subject of 作者 by another work, its object by another author), in the
sentence and in its triples alike, keeps the grammar and the relations and breaks the memory: the only way to
the answer is to copy it from the sentence.
"""
from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Iterable, Optional

Triple = tuple[str, str, str]


def role_pools(pairs: Iterable[tuple[str, list[Triple]]]) -> dict[tuple[str, int], list[str]]:
    """The entities seen in each role: (predicate, 0) for subjects, (predicate, 2) for objects."""
    pools: dict[tuple[str, int], set[str]] = defaultdict(set)
    for _, triples in pairs:
        for s, p, o in triples:
            pools[(p, 0)].add(s)
            pools[(p, 2)].add(o)
    return {k: sorted(v) for k, v in pools.items()}


def _roles(triples: list[Triple]) -> Optional[dict[str, tuple[str, int]]]:
    """Each entity's first role; None when one entity is a part of another (a swap would tear it)."""
    roles: dict[str, tuple[str, int]] = {}
    for s, p, o in triples:
        roles.setdefault(s, (p, 0))
        roles.setdefault(o, (p, 2))
    names = list(roles)
    if any(a != b and a in b for a in names for b in names):
        return None
    return roles


def swap_entities(text: str, triples: list[Triple], pools: dict[tuple[str, int], list[str]],
                  rng: random.Random) -> Optional[tuple[str, list[Triple]]]:
    """The sentence and triples with every entity renamed within its role, or None where no clean swap exists
    (an entity missing from the text, entities inside each other, or a role with no other name)."""
    roles = _roles(triples)
    if roles is None or not all(name in text for name in roles):
        return None
    new: dict[str, str] = {}
    taken = set(roles)
    for name, role in roles.items():
        choices = [c for c in pools.get(role, ()) if c not in taken]
        if not choices:
            return None
        new[name] = rng.choice(choices)
        taken.add(new[name])
    if any(a != b and a in b for a in new.values() for b in new.values()):
        return None
    pattern = re.compile("|".join(re.escape(n) for n in sorted(new, key=len, reverse=True)))
    return pattern.sub(lambda m: new[m.group(0)], text), [(new[s], p, new[o]) for s, p, o in triples]


def augment(pairs: list[tuple[str, list[Triple]]], copies: int, seed: int = 23333
            ) -> tuple[list[tuple[str, list[Triple]]], int]:
    """``copies`` renamed versions of each sentence (the pools come from ``pairs`` alone), and how many swaps
    found no clean renaming and were left out."""
    rng = random.Random(seed)
    pools = role_pools(pairs)
    out, failed = [], 0
    for _ in range(copies):
        for text, triples in pairs:
            swapped = swap_entities(text, triples, pools, rng)
            if swapped is None:
                failed += 1
            else:
                out.append(swapped)
    return out, failed
