"""The aging world: a procedural face world with ground truth (issue 10).

:func:`render` draws identity I at any age; :mod:`agingnet.world.data` writes actor and population folders;
``python -m agingnet.world {actor,population,pretrain}`` is the command line.
"""

from agingnet.world.render import (
    ACTOR_BASE,
    RENDERER_VERSION,
    Traits,
    age_cues,
    check_identity,
    identity_traits,
    render,
)

__all__ = ["ACTOR_BASE", "RENDERER_VERSION", "Traits", "age_cues", "check_identity", "identity_traits", "render"]
