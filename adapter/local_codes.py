"""A site's own procedure codes, mapped to SNOMED CT and/or CPT by a FHIR ConceptMap in config/
(docs/input-contract.md, local-code), and the words that make an unmapped code worth a coder's look.

Loaded and validated at start: a file that is not a usable ConceptMap is a configuration error (exit 3) naming
the file and what is wrong. A mapping is used when its `equivalence` says the target means the local code or
more (equivalent, equal, wider, subsumes): a Procedure coded with the local code is then coded as if it carried
the target codings too. Other equivalences (narrower, specializes, inexact, relatedto, unmatched, disjoint) map
nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir.resources.R4B.conceptmap import ConceptMap
from pydantic import ValidationError

from adapter.errors import ConfigError

LOCAL_CODES_FILE = "local-codes.json"
SNOMED = "http://snomed.info/sct"
USED_EQUIVALENCES = frozenset({"equivalent", "equal", "wider", "subsumes"})
"""The target means the source concept or more: coding the source like the target is right."""
R4_EQUIVALENCES = USED_EQUIVALENCES | {"relatedto", "narrower", "specializes", "inexact", "unmatched", "disjoint"}

Target = tuple[str, str, str]
"""(system, code, display) of a mapped target coding."""


@dataclass(frozen=True)
class LocalCodes:
    """What config/local-codes.json maps, and the words of `config/input.yaml fna_text_words`."""

    targets: dict[tuple[str, str], tuple[Target, ...]] = field(default_factory=dict)
    source: str = ""
    """`ConceptMap.url|version` (or the file name): named in every explanation of a mapped code."""
    words: tuple[str, ...] = ()
    _pattern: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def mapped(self, concept: Any) -> list[tuple[dict[str, Any], Target]]:
        """(local coding, target) for each coding of a CodeableConcept the map knows."""
        if not self.targets or not isinstance(concept, dict):
            return []
        return [(c, t) for c in concept.get("coding") or [] if isinstance(c, dict)
                for t in self.targets.get((str(c.get("system", "")), str(c.get("code", ""))), ())]

    def fna_word(self, text: Any) -> str | None:
        """The first FNA word (whole words, any case) in `text`, or None."""
        if self._pattern is None or not isinstance(text, str):
            return None
        found = self._pattern.search(text)
        return found.group(0) if found else None


def load_local_codes(base: Path, cpt_system: str, read_yaml: Callable[[Path], dict[str, Any]]) -> LocalCodes:
    """`base/local-codes.json` (optional) and `fna_text_words` of `base/input.yaml` (optional), validated."""
    words = _words(base / "input.yaml", read_yaml) if (base / "input.yaml").exists() else ()
    pattern = re.compile("|".join(rf"(?<!\w){re.escape(w)}(?!\w)" for w in words), re.I) if words else None
    path = base / LOCAL_CODES_FILE
    if not path.exists():
        return LocalCodes(words=words, _pattern=pattern)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", f"cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict) or data.get("resourceType") != "ConceptMap":
        raise ConfigError(str(path), "resourceType", "must be a FHIR R4 ConceptMap")
    try:
        ConceptMap.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ConfigError(str(path), where or "ConceptMap", f"not a valid ConceptMap: {first.get('msg')}") from None
    targets: dict[tuple[str, str], list[Target]] = {}
    allowed = {SNOMED: "SNOMED CT", cpt_system: "CPT"}
    for g, group in enumerate(data.get("group") or []):
        where = f"group[{g}]"
        source, target_system = group.get("source"), group.get("target")
        if not source:
            raise ConfigError(str(path), f"{where}.source", "names no code system: the site's local code system URL")
        if source in allowed:
            raise ConfigError(str(path), f"{where}.source", f"{source} is {allowed[source]}, not a local code system")
        if target_system not in allowed:
            raise ConfigError(str(path), f"{where}.target", f"{target_system!r} is neither SNOMED CT ({SNOMED}) nor "
                                                            f"CPT ({cpt_system}): a local code maps to those only")
        for e, element in enumerate(group.get("element") or []):
            code = element.get("code")
            if not code:
                raise ConfigError(str(path), f"{where}.element[{e}].code", "is missing: the local code")
            for t, target in enumerate(element.get("target") or []):
                at = f"{where}.element[{e}].target[{t}]"
                equivalence = target.get("equivalence")
                if equivalence not in R4_EQUIVALENCES:
                    raise ConfigError(str(path), f"{at}.equivalence", f"{equivalence!r} is not an R4 "
                                                                      "ConceptMapEquivalence")
                if equivalence not in USED_EQUIVALENCES:
                    continue
                if not target.get("code"):
                    raise ConfigError(str(path), f"{at}.code", f"is missing for equivalence {equivalence}")
                targets.setdefault((source, str(code)), []).append(
                    (target_system, str(target["code"]), str(target.get("display") or "")))
    name = data.get("url") or path.name
    version = data.get("version")
    return LocalCodes({k: tuple(v) for k, v in targets.items()}, f"{name}|{version}" if version else str(name),
                      words, pattern)


def _words(path: Path, read_yaml: Callable[[Path], dict[str, Any]]) -> tuple[str, ...]:
    raw = read_yaml(path).get("fna_text_words") or []
    if not isinstance(raw, list) or not all(isinstance(w, str) and w.strip() for w in raw):
        raise ConfigError(str(path), "fna_text_words", "must be a list of words or phrases")
    return tuple(w.strip() for w in raw)
