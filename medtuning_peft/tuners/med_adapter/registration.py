"""Registration of "MED_ADAPTER" with peft.

peft's ``register_peft_method`` only accepts names that are already members of its closed ``PeftType``
enum, and peft has no plugin entry points. We therefore add the member to the enum at import time
(the standard library has no public API for extending an enum; the steps below are what
``enum.Enum`` does when it creates a member, on CPython 3.11+) and then register through peft's own
function. Both steps are idempotent: importing the package twice, or reloading it, is safe.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "MED_ADAPTER"


def _extend_peft_type() -> PeftType:
    if NAME in PeftType.__members__:
        return PeftType[NAME]
    member = str.__new__(PeftType, NAME)
    member._name_ = NAME
    member._value_ = NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # Class attribute first (the enum metaclass refuses to reassign a name that is already a member).
    type.__setattr__(PeftType, NAME, member)
    PeftType._member_map_[NAME] = member
    PeftType._value2member_map_[NAME] = member
    PeftType._member_names_.append(NAME)
    return member


MED_ADAPTER: PeftType = _extend_peft_type()


def register(config_cls: type, model_cls: type, prefix: str) -> None:
    """Register the tuner with peft's mappings once (safe to call again)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(MED_ADAPTER) is config_cls:
        return
    # A reload of this package defines new classes: drop the stale entries before registering again.
    from peft.mapping import PEFT_TYPE_TO_MIXED_MODEL_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    for mapping in (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
    ):
        mapping.pop(MED_ADAPTER, None)
    register_peft_method(name=NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
