"""FIELDS.toml for ``jizhictl import``: what each input of a foreign model is
(docs/formats.md, "Importing a model"), read and checked; and ``refuse``, the
one way every step of the import says no.

Runs in the importing process. ``read_fields`` checks what the file alone can
tell; what needs the model (do the inputs exist, are they ids, ...) is
checked by ``jizhi.tools.importer.lookups.analyse``.
"""
import dataclasses
import os
import re
import tomllib

from jizhi.bundle import KINDS
from jizhi.errors import BundleError

_FIELD_KEYS = {"name", "id", "side", "kind", "max_len", "input", "padding_idx", "indices", "offsets", "index", "axis"}
_DENSE_KEYS = {"input", "side", "features"}
_TOP_KEYS = {"output", "dense", "fields"}
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# --- FIELDS.toml -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One ``[[fields]]`` entry of FIELDS.toml, checked."""
    name: str
    id: int
    side: str
    kind: str
    max_len: int
    input: str | None = None          # padded ids [B] or [B, max_len]
    padding_idx: int | None = None    # the row short padded bags are filled with
    indices: str | None = None        # EmbeddingBag: flat ids [N]
    offsets: str | None = None        # EmbeddingBag: bag starts [B] (or [B+1])
    index: int | None = None          # a stacked input: this field is slot ``index`` of axis ``axis``
    axis: int | None = None           # the stacking axis (None: found from the input's shape)

    @property
    def inputs(self):
        return (self.input,) if self.input is not None else (self.indices, self.offsets)

    @property
    def stacked(self):
        return self.index is not None


@dataclasses.dataclass(frozen=True)
class Spec:
    """FIELDS.toml: the dense input, the output and the fields, in file order."""
    path: str
    dense_input: str | None
    dense_features: int | None
    output: str | None
    fields: tuple


def refuse(message):
    raise BundleError(message)


def _int(where, key, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        refuse(f"{where}: {key} must be an integer >= {low}, not {value!r}")
    return value


def _str(where, key, value):
    if not isinstance(value, str) or not value:
        refuse(f"{where}: {key} must be a non-empty string, not {value!r}")
    return value


def read_fields(path):
    """Parse and check FIELDS.toml (docs/formats.md, "Importing a model"); a ``Spec``.

    Checks what the file alone can tell: known keys, types, unique names, ids
    and inputs, one ids form per field, onehot fields of max_len 1, a
    user-side dense input. Raises BundleError naming the entry.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        refuse(f"{path}: no such file")
    except tomllib.TOMLDecodeError as e:
        refuse(f"{path}: not valid TOML: {e}")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        refuse(f"{path}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(_TOP_KEYS))})")
    output = doc.get("output")
    if output is not None:
        _str(path, "output", output)

    dense_input = dense_features = None
    if "dense" in doc:
        dense = doc["dense"]
        where = f"{path}: [dense]"
        if not isinstance(dense, dict):
            refuse(f"{where} must be a table")
        unknown = sorted(set(dense) - _DENSE_KEYS)
        if unknown:
            refuse(f"{where}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(_DENSE_KEYS))})")
        dense_input = _str(where, "input", dense.get("input"))
        side = dense.get("side", "user")
        if side == "item":
            refuse(f"{where}: side = \"item\": jizhi bundles carry dense features per user only "
                   f"([dense] user_features, profiles/users/dense.npy); an item-side dense input cannot be "
                    f"served. Feed item features as sparse fields, or fold them into the item embeddings")
        if side != "user":
            refuse(f"{where}: side must be \"user\", not {side!r}")
        if "features" in dense:
            dense_features = _int(where, "features", dense["features"], 1)

    raw_fields = doc.get("fields")
    if not isinstance(raw_fields, list) or not raw_fields:
        refuse(f"{path}: no [[fields]] (one per sparse feature of the model)")
    fields, names, ids, claimed = [], set(), {}, {}
    if dense_input is not None:
        claimed[(dense_input, None)] = "[dense]"
    for position, f in enumerate(raw_fields, 1):
        where = f"{path}: [[fields]] #{position}"
        if not isinstance(f, dict):
            refuse(f"{where} must be a table")
        name = _str(where, "name", f.get("name"))
        where = f"{path}: field {name!r}"
        if not NAME.match(name):
            refuse(f"{where}: a field name is a file name in the profiles: letters, digits, _ . - only")
        unknown = sorted(set(f) - _FIELD_KEYS)
        if unknown:
            refuse(f"{where}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(_FIELD_KEYS))})")
        if name in names:
            refuse(f"{where}: two fields have this name")
        names.add(name)
        field_id = _int(where, "id", f.get("id", position), 1)
        if field_id >= 2 ** 31:
            refuse(f"{where}: id must be < 2**31")
        if field_id in ids:
            refuse(f"{where}: id {field_id} is also field {ids[field_id]!r}'s")
        ids[field_id] = name
        side = f.get("side")
        if side not in ("user", "item"):
            refuse(f"{where}: side must be \"user\" or \"item\", not {side!r}")
        kind = f.get("kind")
        if kind not in KINDS:
            refuse(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
        max_len = _int(where, "max_len", f.get("max_len", 1), 1)
        if kind == "onehot" and max_len != 1:
            refuse(f"{where}: a onehot field has max_len = 1, not {max_len}")
        has_input, has_bag = "input" in f, ("indices" in f or "offsets" in f)
        if has_input == has_bag:
            refuse(f"{where}: give either input (padded ids) or indices and offsets (an EmbeddingBag), "
                   f"not {'both' if has_input else 'neither'}")
        if has_bag and not ("indices" in f and "offsets" in f):
            refuse(f"{where}: an EmbeddingBag field needs both indices and offsets")
        index = axis = None
        if "index" in f:
            index = _int(where, "index", f["index"], 0)
        if "axis" in f:
            if index is None:
                refuse(f"{where}: axis goes with index (the slot of a stacked input this field is)")
            axis = _int(where, "axis", f["axis"], 0)
        padding_idx = None
        if "padding_idx" in f:
            if not has_input:
                refuse(f"{where}: padding_idx goes with padded ids (input); EmbeddingBag bags are not padded")
            padding_idx = _int(where, "padding_idx", f["padding_idx"], 0)
        spec = FieldSpec(name, field_id, side, kind, max_len,
                         input=_str(where, "input", f["input"]) if has_input else None,
                         padding_idx=padding_idx,
                         indices=_str(where, "indices", f["indices"]) if has_bag else None,
                         offsets=_str(where, "offsets", f["offsets"]) if has_bag else None,
                         index=index, axis=axis)
        for graph_input in spec.inputs:
            # A whole input is claimed once; a stacked one once per slot (index).
            clash = next((who for (other, slot), who in claimed.items() if other == graph_input
                          and (slot is None or index is None or slot == index)), None)
            if clash is not None:
                hint = ("" if index is not None else
                        f"; if {graph_input!r} stacks several fields, give each field its slot with index = k "
                        f"(and axis = the stacking axis when the input's shape does not tell)")
                slot_text = f" slot {index}" if index is not None else ""
                refuse(f"{where}: graph input {graph_input!r}{slot_text} is also claimed by {clash}{hint}")
            claimed[(graph_input, index)] = f"field {name!r}"
        fields.append(spec)
    return Spec(path, dense_input, dense_features, output, tuple(fields))
