"""Writing TOML (tomllib only reads it): manifests, pipeline files, the tuner's overlays.

Standard library only (jizhictl imports it at start).
"""
import json
import math
import numbers
import re


def toml_key(k):
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, numbers.Integral):     # numpy's integers too
        return str(int(v))
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)   # JSON's escapes are TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise ValueError(f"cannot write {v!r} ({type(v).__name__}) as TOML")


def toml_text(doc, header=""):
    """``doc`` (a dict as tomllib reads it) as TOML text: top-level values,
    then ``[tables]``, then ``[[arrays of tables]]`` (a pipeline's stage and
    fuse entries); deeper structure is written inline."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    if lines:
        lines.append("")
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in doc.items()
              if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
    for k, v in doc.items():
        if k not in tables and k not in arrays:
            lines.append(f"{toml_key(k)} = {toml_value(v)}")
    for k, t in tables.items():
        lines += ["", f"[{toml_key(k)}]"] + [f"{toml_key(kk)} = {toml_value(vv)}" for kk, vv in t.items()]
    for k, entries in arrays.items():
        for e in entries:
            lines += ["", f"[[{toml_key(k)}]]"] + [f"{toml_key(kk)} = {toml_value(vv)}" for kk, vv in e.items()]
    text = "\n".join(lines).lstrip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)     # one blank line between blocks
