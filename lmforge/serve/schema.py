"""A JSON Schema as a regex whose every match validates, or a 400 naming the keyword that cannot be enforced.

outlines-core translates a schema into a regex, but reads only some keywords and only some combinations of
them: each schema object takes one path (properties > allOf > anyOf > oneOf > prefixItems > enum > const > $ref
> type) and that path reads its own few keywords, silently ignoring the rest (`minimum`, `multipleOf`,
`uniqueItems`, `pattern` beside `maxLength`, `type` beside `enum`, ...); it writes allOf as a concatenation and
oneOf as anyOf. So `SchemaRegex` first rewrites every schema object into the one shape outlines reads exactly:

- keywords it writes soundly stay (properties/required, items/minItems/maxItems, prefixItems, anyOf, $ref, type);
- what it cannot write is written here and spliced in (jsonregex.py): number ranges and multiples, string
  lengths and patterns, enum/const values (filtered by the rest of their schema object, checked by jsonschema
  itself), arrays of unique items drawn from a short list;
- everything else is refused, naming the keyword (not, if/then/else, contains, patternProperties, oneOf whose
  branches could overlap, minProperties on objects whose keys are free, ...).

The regex may allow fewer texts than the schema does (no exponents, strings without escape sequences, shallow
free-form values), never more: a 200 answer that ends with finish_reason "stop" validates. Some shapes make
outlines-core's automaton grow very large (it is built per tokenizer, once per schema), so counts are capped and
the estimated size of the whole is bounded.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from fractions import Fraction

import jsonschema
from outlines_core.json_schema import build_regex_from_schema

from lmforge.serve.jsonregex import (
    LIMIT,
    MAX_COUNT,
    SchemaKeywordError,
    alternation,
    literal,
    number_range,
    string_pattern,
)

ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "$comment",
    "$schema",
    "$id",
    "$anchor",
    "$dynamicAnchor",
    "$vocabulary",
    "deprecated",
    "readOnly",
    "writeOnly",
    "contentMediaType",
    "contentEncoding",
    "contentSchema",
    "$defs",
    "definitions",
}
REFUSED = {
    "not",
    "if",
    "then",
    "else",
    "contains",
    "minContains",
    "maxContains",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "unevaluatedItems",
    "unevaluatedProperties",
    "additionalItems",
    "$dynamicRef",
    "$recursiveRef",
    "$recursiveAnchor",
}
FAMILIES = {
    "object": {"properties", "required", "additionalProperties", "minProperties", "maxProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems", "uniqueItems"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
}
KNOWN = (
    ANNOTATIONS
    | REFUSED
    | set().union(*FAMILIES.values())
    | {"type", "enum", "const", "allOf", "anyOf", "oneOf", "$ref"}
)
FORMATS = {"date-time", "date", "uuid"}  # outlines-core's regex for each writes only valid JSON strings
STRING = r'"[^"\\\x00-\x1F\x7F-\x9F]{%d,%s}"'  # characters without escapes: a string's length is its characters
SCALARS = [{"type": "boolean"}, {"type": "null"}, {"type": "number"}, {"type": "string"}]
MAX_DEPTH = 32  # schema objects inside one another
MAX_NESTING = 3 * MAX_DEPTH  # JSON levels of the schema document
MAX_SIZE = 5000  # estimated automaton states; outlines-core's build time grows with states x vocabulary


def refuse(keyword: str, why: str, where: str = "") -> SchemaKeywordError:
    at = f" at {where}" if where else ""
    return SchemaKeywordError(
        f"response_format: the JSON schema keyword {keyword!r}{at} cannot be enforced during decoding: {why}", keyword
    )


def canonical(value) -> str:
    """A value's identity under JSON Schema equality (1 == 1.0, true != 1), for enum filtering and uniqueness."""

    def norm(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return [v] if isinstance(v, bool) else v  # keeps true apart from 1

    return json.dumps(norm(value), sort_keys=True)


def _check_value(schema) -> None:
    """No NaN or Infinity (Python's JSON reads them; JSON has none) and no nesting past MAX_NESTING, checked
    without recursion, before anything recursive (jsonschema's own checks included) reads the schema."""
    stack = [(schema, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_NESTING:
            raise SchemaKeywordError(
                f"response_format: the JSON schema nests deeper than {MAX_NESTING} levels", "response_format"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaKeywordError(
                f"response_format: the JSON schema holds {value} at {where or '/'}; JSON has no such number",
                "response_format",
            )
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack += [(child, f"{where}/{key}", depth + 1) for key, child in children]


class SchemaRegex:
    """One schema's translation: `regex()` returns it, raising SchemaKeywordError for what cannot be enforced."""

    def __init__(self, schema):
        _check_value(schema)
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as e:
            where = "/" + "/".join(map(str, e.absolute_path))
            raise SchemaKeywordError(
                f"response_format: the JSON schema is invalid at {where}: {e.message}",
                str(e.absolute_path[-1]) if e.absolute_path else "response_format",
            ) from None
        self.root, self.validator = schema, cls(schema)
        self.token = f"LMFORGE{uuid.uuid4().hex}X"
        self.spliced: dict[str, str] = {}

    def regex(self) -> str:
        rewritten, size = self.node(self.root, "", 0, top=True)
        if size > MAX_SIZE:
            raise refuse(
                "maxItems",
                f"the schema's automaton would hold about {size} states (at most {MAX_SIZE}); "
                f"lower maxItems, maxLength or minItems, or nest fewer bounded arrays",
            )
        try:
            regex = build_regex_from_schema(json.dumps(rewritten))
        except Exception as e:  # the Rust side raises plain exceptions (external $ref, unknown format, ...)
            raise SchemaKeywordError(
                f"response_format: the JSON schema cannot be enforced ({e})", "response_format"
            ) from e
        for key, piece in self.spliced.items():
            regex = regex.replace(f'"{key}"', f"(?:{piece})")
        return regex

    def splice(self, regex: str) -> dict:
        """A stand-in schema whose regex (a unique string literal) is replaced by `regex` afterwards."""
        key = f"{self.token}{len(self.spliced)}"
        self.spliced[key] = regex
        return {"const": key}

    # ---- one schema object
    def node(self, s, where: str, depth: int, top: bool = False) -> tuple[dict, int]:
        """(the rewritten schema object, its estimated automaton size)."""
        if depth > MAX_DEPTH:
            raise refuse(
                "$ref" if "$ref" in str(s) else "items", f"the schema nests deeper than {MAX_DEPTH} levels", where
            )
        if s is True or s == {}:
            return self.free(top)
        if s is False:
            raise refuse("false", "it admits no value, so no answer could be written", where)
        out, size = self.shape(s, where, depth, top)
        for key in ("$defs", "definitions"):  # rewritten in place, so $ref paths still lead to them
            if isinstance(s.get(key), dict):
                out[key] = {name: self.node(sub, f"{where}/{key}/{name}", depth + 1)[0] for name, sub in s[key].items()}
        return out, size

    def shape(self, s: dict, where: str, depth: int, top: bool) -> tuple[dict, int]:
        keys = set(s) & KNOWN - ANNOTATIONS
        refused = sorted(keys & REFUSED)
        if refused:
            raise refuse(
                refused[0],
                "only properties, items, prefixItems, anyOf, oneOf over disjoint types, $ref, "
                "enum/const and the type keywords are enforced",
                where,
            )
        if "$ref" in s:
            if keys - {"$ref"}:
                raise refuse(
                    sorted(keys - {"$ref"})[0],
                    "keywords beside $ref are not applied by the translation; move them into the referenced schema",
                    where,
                )
            return {"$ref": s["$ref"]}, 50
        if "enum" in s or "const" in s:
            values = self.values(s, where)
            return self.splice(
                alternation([literal(json.dumps(v, ensure_ascii=False, separators=(",", ":"))) for v in values])
            ), len(values) + 2
        if "allOf" in s:
            if len(s["allOf"]) != 1 or keys - {"allOf"}:
                raise refuse("allOf", "only a single subschema with nothing beside it is enforced", where)
            return self.node(s["allOf"][0], f"{where}/allOf/0", depth + 1, top)
        for key in ("anyOf", "oneOf"):
            if key in s:
                if keys - {key}:
                    raise refuse(
                        sorted(keys - {key})[0],
                        f"keywords beside {key} are not applied by the translation; move them into each branch",
                        where,
                    )
                if key == "oneOf":
                    self.check_disjoint(s["oneOf"], where)
                branches = [self.node(b, f"{where}/{key}/{i}", depth + 1) for i, b in enumerate(s[key])]
                return {"anyOf": [b for b, _ in branches]}, sum(n for _, n in branches)
        types = self.types(s)
        if types is None:
            return self.free(top)
        parts = [self.typed(s, t, where, depth, top) for t in types]
        if len(parts) == 1:
            return parts[0]
        return {"anyOf": [p for p, _ in parts]}, sum(n for _, n in parts)

    def free(self, top: bool) -> tuple[dict, int]:
        """Any JSON value: scalars, and objects and arrays of scalars (one level deeper at the top)."""
        depth = 1 if top else 0
        return {
            "anyOf": SCALARS + [{"type": "object", "depth": depth}, {"type": "array", "depth": depth}]
        }, 1000 if top else 100

    def types(self, s: dict) -> list[str] | None:
        """The JSON types a schema object asks for: its `type`, else the families its keywords belong to (None:
        any value)."""
        t = s.get("type")
        if t is not None:
            ts = [t] if isinstance(t, str) else list(dict.fromkeys(t))
            return [x for x in ts if not (x == "integer" and "number" in ts)]
        found = [family for family, words in FAMILIES.items() if words & set(s)]
        return found or None

    def values(self, s: dict, where: str) -> list:
        """The enum/const values that also satisfy the rest of their schema object (jsonschema decides)."""
        values = [s["const"]] if "const" in s else list(s["enum"])
        check = self.validator.evolve(schema=s)
        kept = list({canonical(v): v for v in values if check.is_valid(v)}.values())
        if not kept:
            raise refuse("enum" if "enum" in s else "const", "no value satisfies the schema's other keywords", where)
        return kept

    def check_disjoint(self, branches: list, where: str) -> None:
        """oneOf is written as anyOf, which is exact only when no value matches two branches: branches of
        different JSON types, or lists of values with none in common."""
        kinds = [self.kinds(b) for b in branches]
        for (i, a), (j, b) in itertools.combinations(enumerate(kinds), 2):
            if (
                a is None
                or b is None
                or (
                    a & b
                    and not (
                        isinstance(branches[i], dict)
                        and isinstance(branches[j], dict)
                        and self.value_sets_disjoint(branches[i], branches[j])
                    )
                )
            ):
                raise refuse(
                    "oneOf",
                    f"branches {i} and {j} could both match one value (only branches of different "
                    f"types, or of disjoint enum/const values, are enforced); use anyOf",
                    where,
                )

    def kinds(self, s, hops: int = 0) -> set[str] | None:
        if not isinstance(s, dict) or hops > 8:
            return None
        if "$ref" in s and isinstance(s["$ref"], str) and s["$ref"].startswith("#"):
            target = self.root
            for part in filter(None, s["$ref"][1:].split("/")):
                target = target.get(part) if isinstance(target, dict) else None
            return self.kinds(target, hops + 1)
        if "enum" in s or "const" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            return {_kind(v) for v in values}
        for key in ("anyOf", "oneOf"):
            if key in s:
                parts = [self.kinds(b, hops + 1) for b in s[key]]
                return None if None in parts else set().union(*parts)
        types = self.types(s)
        return None if types is None else {"number" if t == "integer" else t for t in types}

    @staticmethod
    def value_sets_disjoint(a: dict, b: dict) -> bool:
        def vals(s):
            return (
                None
                if not ("enum" in s or "const" in s)
                else {canonical(v) for v in ([s["const"]] if "const" in s else s["enum"])}
            )

        va, vb = vals(a), vals(b)
        return va is not None and vb is not None and not va & vb

    # ---- one type
    def typed(self, s: dict, t: str, where: str, depth: int, top: bool) -> tuple[dict, int]:
        if t in ("null", "boolean"):
            return {"type": t}, 2
        if t in ("integer", "number"):
            return self.number(s, t, where)
        if t == "string":
            return self.string(s, where)
        if t == "array":
            return self.array(s, where, depth)
        return self.object(s, where, depth, top)

    def number(self, s: dict, t: str, where: str) -> tuple[dict, int]:
        if not FAMILIES["number"] & set(s):
            return {"type": t}, 4
        lo, lo_excl = _bound(s, "minimum", "exclusiveMinimum", max)
        hi, hi_excl = _bound(s, "maximum", "exclusiveMaximum", min)
        multiple = Fraction(s["multipleOf"]) if "multipleOf" in s else None
        if isinstance(s.get("multipleOf"), float):  # jsonschema divides by a float: exact for small integers only
            lo = max(lo, Fraction(-LIMIT)) if lo is not None else Fraction(-LIMIT)
            hi = min(hi, Fraction(LIMIT)) if hi is not None else Fraction(LIMIT)
        try:
            regex = number_range(t, lo, lo_excl, hi, hi_excl, multiple)
        except SchemaKeywordError as e:
            raise refuse(e.keyword, str(e), where) from None
        return self.splice(regex), 4 + len(regex) // 8

    def string(self, s: dict, where: str) -> tuple[dict, int]:
        given = [k for k in ("minLength", "maxLength", "pattern", "format") if k in s]
        kinds = {"length" if k.endswith("Length") else k for k in given}
        if len(kinds) > 1:
            raise refuse(given[-1], f"it is enforced alone, not together with {given[0]}", where)
        if "pattern" in s:
            try:
                regex = string_pattern(s["pattern"])
            except SchemaKeywordError as e:
                raise refuse("pattern", str(e), where) from None
            return self.splice(regex), 4 + len(regex) // 4
        if "format" in s:
            if s["format"] not in FORMATS:
                raise refuse("format", f"only {', '.join(sorted(FORMATS))} are written exactly", where)
            return {"type": "string", "format": s["format"]}, 60
        if kinds:
            lo, hi = s.get("minLength", 0), s.get("maxLength")
            if max(lo, hi or 0) > MAX_COUNT:
                raise refuse(
                    "maxLength" if (hi or 0) > MAX_COUNT else "minLength",
                    f"lengths above {MAX_COUNT} characters are not enforced",
                    where,
                )
            return self.splice(STRING % (lo, "" if hi is None else hi)), 2 + (hi if hi is not None else lo + 1)
        return {"type": "string"}, 3

    def array(self, s: dict, where: str, depth: int) -> tuple[dict, int]:
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        if max(lo, hi or 0) > MAX_COUNT:
            raise refuse(
                "maxItems" if (hi or 0) > MAX_COUNT else "minItems",
                f"item counts above {MAX_COUNT} are not enforced",
                where,
            )
        unique = s.get("uniqueItems") is True and (hi is None or hi > 1)
        if "prefixItems" in s:
            n = len(s["prefixItems"])
            if not lo <= n <= (hi if hi is not None else n) or (unique and n > 1):
                raise refuse(
                    "minItems" if lo > n else "maxItems" if hi is not None and hi < n else "uniqueItems",
                    f"with prefixItems the array is written with exactly its {n} items",
                    where,
                )
            items = [self.node(p, f"{where}/prefixItems/{i}", depth + 1) for i, p in enumerate(s["prefixItems"])]
            return {"prefixItems": [p for p, _ in items]}, sum(n for _, n in items) + 2
        item_schema = s.get("items", True)
        if unique:
            return self.unique(item_schema, lo, hi, where)
        item, size = self.node(item_schema, f"{where}/items", depth + 1)
        out = {"type": "array", "items": item, "minItems": lo}
        if hi is not None:
            out["maxItems"] = hi
        return out, 2 + size * (hi if hi is not None else max(lo, 1) + 1)

    def unique(self, item_schema, lo: int, hi: int | None, where: str) -> tuple[dict, int]:
        """uniqueItems over items drawn from a short list of values: every arrangement, listed."""
        values = None
        if isinstance(item_schema, dict) and ("enum" in item_schema or "const" in item_schema):
            values = self.values(item_schema, f"{where}/items")
        elif isinstance(item_schema, dict) and item_schema.get("type") in ("boolean", "null") and len(item_schema) == 1:
            values = [True, False] if item_schema["type"] == "boolean" else [None]
        if values is None:
            raise refuse(
                "uniqueItems",
                "an automaton cannot remember which items came before; it is enforced with "
                "maxItems 1, or over items from a short enum",
                where,
            )
        top = len(values) if hi is None else min(hi, len(values))
        count = sum(math.perm(len(values), k) for k in range(lo, top + 1))
        if count > MAX_COUNT or lo > top:
            raise refuse(
                "uniqueItems",
                f"the distinct arrangements of its {len(values)} values number "
                f"{count if lo <= top else 0}; at most {MAX_COUNT} are written",
                where,
            )
        texts = [json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in values]
        arrays = ["[" + ",".join(p) + "]" for k in range(lo, top + 1) for p in itertools.permutations(texts, k)]
        return self.splice(alternation([literal(a) for a in arrays])), count + 2

    def object(self, s: dict, where: str, depth: int, top: bool) -> tuple[dict, int]:
        lo, hi = s.get("minProperties", 0), s.get("maxProperties")
        if "properties" not in s and "required" not in s:
            if lo or hi is not None:
                raise refuse(
                    "minProperties" if lo else "maxProperties",
                    "an object whose keys are free may repeat "
                    "a key, which JSON parsing collapses; declare its properties",
                    where,
                )
            extra = s.get("additionalProperties", True)
            if extra is False:
                return {"type": "object", "properties": {}}, 2
            if extra is True:
                return {"type": "object", "depth": 1 if top else 0}, 1000 if top else 100
            value, size = self.node(extra, f"{where}/additionalProperties", depth + 1)
            return {"type": "object", "additionalProperties": value}, 2 + 2 * size
        props = dict(s.get("properties", {}))
        required = list(dict.fromkeys(s.get("required", [])))
        for name in required:  # a required property the schema does not describe may hold any value
            props.setdefault(name, True)
        for name in props:
            if any(c in name for c in '"\\') or any(ord(c) < 0x20 for c in name):
                raise refuse(
                    "properties",
                    f"the property name {name!r} holds a quote, backslash or control "
                    f"character, which the translation writes unescaped",
                    where,
                )
        optional = [p for p in props if p not in required]
        required += optional[: max(0, lo - len(required))]  # minProperties: make the first optional ones required
        if len(required) < lo:
            raise refuse("minProperties", f"only {len(props)} properties are declared", where)
        if hi is not None:
            if len(required) > hi:
                raise refuse("maxProperties", f"{len(required)} properties are required", where)
            keep = set(required) | set([p for p in props if p not in required][: hi - len(required)])
            props = {k: v for k, v in props.items() if k in keep}
        rewritten = {name: self.node(sub, f"{where}/properties/{name}", depth + 1) for name, sub in props.items()}
        out = {"type": "object", "properties": {k: v for k, (v, _) in rewritten.items()}}
        if required:
            out["required"] = required
        return out, 2 + sum(n for _, n in rewritten.values())


def _kind(value) -> str:
    return {
        bool: "boolean",
        type(None): "null",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }[type(value)]


def _bound(s: dict, inclusive: str, exclusive: str, tighter) -> tuple[Fraction | None, bool]:
    """(bound, exclusive?) from minimum/exclusiveMinimum (or the maximums), draft 4's boolean form included."""
    bounds = []
    if inclusive in s:
        bounds.append((Fraction(s[inclusive]), s.get(exclusive) is True))
    if exclusive in s and not isinstance(s[exclusive], bool):
        bounds.append((Fraction(s[exclusive]), True))
    if not bounds:
        return None, False
    value = tighter(b for b, _ in bounds)
    return value, any(excl for b, excl in bounds if b == value)


def regex_for_schema(schema) -> str:
    """The regex of JSON texts that validate against `schema` (see the module docstring)."""
    return SchemaRegex(schema).regex()
