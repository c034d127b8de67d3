"""The ``champion`` alias: which registered translator version is the best so far, and moving it safely.

A version's score counts only against scores measured on the same validation networks (the
``kt.val_digest`` tag); otherwise the current champion is re-scored on ours before they are compared.
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable, Dict, Optional, Tuple

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..errors import first_line
from .models import annotate_version

CHAMPION = "champion"
SCORE_TAG, VAL_DIGEST_TAG, PAIRS_DIGEST_TAG = "kt.sweep_score", "kt.val_digest", "kt.pairs_digest"


def current_champion(name: str):
    """The model version holding the ``champion`` alias, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide_champion(name: str, version: str, score: float, digest: str,
                    rescore: Optional[Callable[[str], float]] = None) -> Tuple[bool, str]:
    """Should ``version`` (score ``score`` on the networks ``digest``) become the champion?

    The current champion's score counts when it was measured on the same validation networks (same
    digest tag); otherwise ``rescore(model_uri)`` measures it on ours. Only a strictly higher score wins.
    """
    champ = current_champion(name)
    if champ is None:
        return True, f"no {CHAMPION} of {name} yet"
    if str(champ.version) == str(version):
        return False, f"version {version} already is the {CHAMPION}"
    theirs: Optional[float] = None
    if champ.tags.get(VAL_DIGEST_TAG) == digest and champ.tags.get(SCORE_TAG):
        theirs = float(champ.tags[SCORE_TAG])
        where = "its recorded score on the same validation networks"
    elif rescore is not None:
        try:
            theirs = float(rescore(f"models:/{name}/{champ.version}"))
            where = "re-scored on this sweep's validation networks"
        except Exception as e:
            return False, (f"the {CHAMPION} (version {champ.version}) was scored on other validation networks and "
                           f"cannot be re-scored on these ({first_line(e, 120)}); alias kept")
    if theirs is None or not math.isfinite(theirs):
        return False, f"the {CHAMPION} (version {champ.version}) has no comparable score; alias kept"
    if score > theirs:
        return True, f"{score:.2f}% beats the {CHAMPION} version {champ.version} ({theirs:.2f}%, {where})"
    return False, f"{score:.2f}% does not beat the {CHAMPION} version {champ.version} ({theirs:.2f}%, {where})"


def register_version(name: str, run_id: str, model_uri: str, tags: Dict[str, str]) -> str:
    """Register the translator of ``run_id`` as ``name`` once (a rerun finds the same version); returns it."""
    client = MlflowClient()
    existing = []
    try:
        existing = list(client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    except MlflowException:
        pass
    if existing:
        return str(min(int(v.version) for v in existing))
    version = str(mlflow.register_model(model_uri, name).version)
    annotate_version(name, version, tags)
    return version


def move_champion(name: str, version: str, score: float, digest: str,
                  rescore: Optional[Callable[[str], float]] = None, rounds: int = 4,
                  settle: Tuple[float, float] = (0.5, 1.5)) -> Tuple[bool, str]:
    """Point ``champion`` at ``version`` if it wins; returns (it holds the alias now, first decision's reason).

    Workers that finish together may all see the same old champion and write the alias at once (the
    server may also refuse one of two simultaneous writes). So each winner writes, waits a moment and
    decides again: a better version written meanwhile stops it; a worse one written over it is replaced.
    """
    client = MlflowClient()
    wins, reason = decide_champion(name, version, score, digest, rescore)
    first = reason
    for _ in range(rounds):
        if not wins:
            break
        try:
            client.set_registered_model_alias(name, CHAMPION, version)
        except MlflowException:
            pass                    # a concurrent write won this round; look again
        time.sleep(settle[0] + random.random() * (settle[1] - settle[0]))
        wins, reason = decide_champion(name, version, score, digest, rescore)
    champ = current_champion(name)
    return champ is not None and str(champ.version) == str(version), first
