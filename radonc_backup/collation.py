"""The order people read names in: ICU collation of the site's locale (``report_locale``), with
numbers in natural order ("Bob7" before "Bob15"). Å sorts with A in English and after Z in
Swedish, Ł with L, and so on, as the locale says; code-point order put them all after Z."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache


@lru_cache(maxsize=8)
def sort_key(locale_name: str) -> Callable[[str], bytes]:
    """A key function giving the ICU sort key of a string in ``locale_name`` (e.g. en_US)."""
    import icu

    collator = icu.Collator.createInstance(icu.Locale(locale_name))
    collator.setAttribute(icu.UCollAttribute.NUMERIC_COLLATION, icu.UCollAttributeValue.ON)
    return collator.getSortKey  # type: ignore[no-any-return]


def known_locale(locale_name: str) -> bool:
    """Whether ICU has collation data for this locale (or its language)."""
    import icu

    available = {str(name) for name in icu.Collator.getAvailableLocales()}
    return locale_name in available or locale_name.split("_")[0] in available
