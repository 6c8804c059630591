"""Profile stores: user and item profiles on their own clock, apart from model versions (issue 21).

A store is a directory of snapshots ``<store>/<N>/`` (N = 1, 2, ...), each
the columnar snapshot of docs/formats.md (``users/``, ``items/``) with its
``profiles.toml`` written last (``jizhictl profiles build --store``:
jizhi/tools/profilebuild.py builds it in ``<store>/.<N>.incoming-<pid>`` and
renames it into place whole). A snapshot is complete when its
``profiles.toml`` exists; one is never changed in place.

A model version reads a store instead of its own ``profiles/`` when its
manifest says so::

    [profiles]
    store = "ctr"      # the store's directory; a relative path is relative to the models directory

It then reads the newest snapshot that *fits* it (``fits``: built for the same
hashing, with the same fields, kinds, ``max_len`` and tables as its manifest);
a version without ``[profiles]`` keeps reading its own ``profiles/``, as
before.

In a worker, ``source(bundle)`` is the process's one ``ProfileSource`` of a
version: its current snapshot's ``Profiles``, which every stage of the version
reads. The first stage of the version to register (the data reader of a fused
plan) ``poll`` s it at its batch boundaries, at most every ``POLL_S``: a newer
snapshot that fits is opened and becomes current before the next batch, so no
batch mixes two snapshots in one worker; the stages that derive tables from
the item profiles (the cube stage's ``item_rows``, the dnn's item table)
follow ``items_generation`` and rebuild theirs when the items changed (a
snapshot that carried the items over, hard-linked, keeps them: no rebuild). The old snapshot's mappings are
released when the last stage drops its references (no copy is kept). No new
process, no reload, no validation child: the snapshot was checked when it was
built, and ``fits`` checks it against this version.
"""
import logging
import os
import time
import tomllib
from pathlib import Path

from jizhi.errors import BundleError
from jizhi.sharedtable import WAITING

POLL_S = 1.0
STEP_ITEMS = 128   # items a derived table (item rows, item table) builds per batch boundary before a switch
SNAPSHOT_FORMAT = 1
MANIFEST = "profiles.toml"
log = logging.getLogger("jizhi.profiles")


def store_of(bundle):
    """The store directory a version reads (``[profiles] store``), or None for its own profiles."""
    return bundle.profile_store


def snapshots(store):
    """Sorted numbers of the complete snapshots of ``store`` (a directory; [] if it does not exist)."""
    try:
        names = os.listdir(store)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if n.isascii() and n.isdigit()
                  and os.path.isfile(os.path.join(store, n, MANIFEST)))


def read_manifest(directory):
    """The ``profiles.toml`` of a snapshot directory (a dict). Raises BundleError."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BundleError(f"{path}: {e}")


def field_schema(bundle):
    """What a snapshot must agree with, per field of ``bundle``: {name: [side, kind, max_len, vocab, hash_id]}."""
    return {f.name: [f.side, f.kind, f.max_len, f.vocab, f.hash_id] for f in bundle.user_fields + bundle.item_fields}


def fits(directory, bundle):
    """None when the snapshot at ``directory`` can serve ``bundle``, else why not (one line)."""
    try:
        m = read_manifest(directory)
    except BundleError as e:
        return str(e)
    if m.get("format") != SNAPSHOT_FORMAT:
        return f"{directory}: format {m.get('format')!r} is not {SNAPSHOT_FORMAT}"
    if m.get("hash_seed") != bundle.hash_seed:
        return (f"{directory}: built with hash_seed {m.get('hash_seed')}, version {bundle.version} of {bundle.name} "
                f"hashes with {bundle.hash_seed}")
    have = m.get("fields", {})
    if not isinstance(have, dict):
        return f"{directory}: {MANIFEST} has no [fields] table"
    for name, want in field_schema(bundle).items():
        got = have.get(name)
        if got is None:
            return f"{directory}: no field {name!r} (model {bundle.name} version {bundle.version} reads it)"
        if not isinstance(got, list) or list(got) != want:
            return (f"{directory}: field {name!r} is {got} (side, kind, max_len, vocab, hash id), model "
                    f"{bundle.name} version {bundle.version} has {want}")
    if bundle.dense_features != m.get("dense_features"):
        return (f"{directory}: {m.get('dense_features')} dense features, model {bundle.name} version "
                f"{bundle.version} has {bundle.dense_features}")
    # sigs.npy is [items, item fields in the builder's order, its longest item max_len]: the same layout
    item_order = [f.name for f in bundle.item_fields]
    if list(m.get("item_order", [])) != item_order or m.get("item_len") != bundle.item_len:
        return (f"{directory}: item signatures laid out for item fields {m.get('item_order')} and bags of "
                f"{m.get('item_len')}, model {bundle.name} version {bundle.version} reads {item_order} and "
                f"{bundle.item_len}")
    rows = m.get("rows", {})
    if not isinstance(rows, dict) or not rows.get("users") or not rows.get("items"):
        return f"{directory}: no users or no items ({MANIFEST} rows: {rows!r})"
    for entry in m.get("files", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not isinstance(entry.get("size"), int):
            return f"{directory}: a [[files]] entry of {MANIFEST} lacks a path or a size: {entry!r}"
        p = os.path.join(directory, entry["path"])
        try:
            size = os.stat(p).st_size
        except OSError:
            return f"{directory}: {entry['path']} is listed in {MANIFEST} but missing"
        if size != entry["size"]:
            return f"{directory}: {entry['path']} has {size} bytes, {MANIFEST} says {entry['size']}"
    return None


def newest_fitting(store, bundle, after=0, skip=(), numbers=None):
    """(number, directory) of the newest snapshot of ``store`` newer than ``after`` that fits ``bundle``, or
    None; with the reasons of the newer ones that do not fit (``[(number, why)]``). ``skip``: numbers not to
    consider (refused already); ``numbers``: ``snapshots(store)`` if the caller has listed them already."""
    refused = []
    for n in reversed(snapshots(store) if numbers is None else numbers):
        if n <= after:
            break
        if n in skip:
            continue
        d = os.path.join(store, str(n))
        why = fits(d, bundle)
        if why is None:
            return (n, d), refused
        refused.append((n, why))
    return None, refused


class ProfileSource:
    """One version's profiles in this process (the module docstring): ``users``, ``items`` (``Profiles``),
    ``snapshot`` (its number; 0: the version's own ``profiles/``), ``generation`` (bumped at each switch)."""

    def __init__(self, bundle):
        from jizhi.bundle import Profiles
        self.bundle = bundle
        self.store = store_of(bundle)
        self.generation = 0         # bumped at each switch
        self.items_generation = 0   # bumped at a switch that changed the items (not carried over)
        self.owner = None           # the stage that polls (the first to register)
        self.derivers = {}          # stage -> fn(items) -> a generator building its table a step at a time
        self.prepared = {}          # stage -> its table of the items just switched to (taken by the stage)
        self.pending = None         # (number, users, items, {stage: generator}) while the tables are built
        self._refused = set()       # snapshot numbers that do not fit, or failed: never tried again
        self._last_error = None
        if self.store is None:
            self.snapshot, root = 0, bundle.path / "profiles"
        else:
            found, refused = newest_fitting(self.store, bundle)
            if found is None:
                why = "; ".join(f"snapshot {n}: {w}" for n, w in refused) or "it has no complete snapshot"
                raise BundleError(f"model {bundle.name} version {bundle.version} reads profile store {self.store}, "
                                  f"but no snapshot there fits it ({why})")
            self.snapshot, root = found[0], Path(found[1])
            self._refused.update(n for n, _ in refused)
        self.users = Profiles(bundle, "user", root)
        self.items = Profiles(bundle, "item", root)
        self._next_poll = time.monotonic() + POLL_S

    def register(self, stage):
        """A stage of this version reads the source; the first one is the one whose ``poll`` switches."""
        if self.owner is None:
            self.owner = stage

    def add_deriver(self, stage, fn):
        """``stage`` keeps a table derived from the items (``fn(items)``: a generator that builds it a step at
        a time and returns it): a snapshot whose items changed switches only once every such table of its
        items is ready, built one step per batch boundary (``poll``), and the stage then takes its table
        from ``prepared``."""
        self.derivers[stage] = fn

    def _advance(self):
        """One step of the pending snapshot's tables; True once all are built (False while building, or when
        a build failed and the snapshot was given up)."""
        n, users, items, builders = self.pending
        for st, steps in list(builders.items()):
            try:
                if next(steps) == WAITING:
                    continue           # another worker builds this one (jizhi/sharedtable.py): step the next
            except StopIteration as done:
                self.prepared[st] = done.value
                del builders[st]
                continue
            except Exception as e:     # a table too large for this snapshot, an unreadable file, ...
                log.error("profile snapshot %d not used by %s version %d: building %s's table failed: %s: %s",
                          n, self.bundle.name, self.bundle.version, type(st).__name__, type(e).__name__, e)
                self._refused.add(n)
                self.pending, self.prepared = None, {}
                return False
            return False               # one step per boundary: a batch waits for one chunk at most
        return not builders

    def poll(self, stage, now=None):
        """At ``stage`` 's batch boundary: switch to a newer snapshot that fits, if any (only the owner
        switches; at most every POLL_S; a snapshot whose items changed once the tables derived from them
        are built, a step per boundary). True when it switched."""
        if self.store is None or stage is not self.owner:
            return False
        if self.pending is not None:
            if not self._advance():
                return False
            n, users, items, _ = self.pending
            self.pending = None
            t0 = time.monotonic()
            return self._commit(n, users, items, t0, f"{sum(t.build_s for t in self.prepared.values()):.2f} s "
                                                     "of table builds between batches")
        now = time.monotonic() if now is None else now
        if now < self._next_poll:
            return False
        self._next_poll = now + POLL_S
        try:
            return self._look()
        except Exception as e:         # the store unreadable, a malformed snapshot: serve on, say so once
            if str(e) != self._last_error:
                self._last_error = str(e)
                log.error("profile store %s of %s version %d: %s: %s; serving snapshot %d", self.store,
                          self.bundle.name, self.bundle.version, type(e).__name__, e, self.snapshot)
            return False

    def _look(self):
        have = snapshots(self.store)
        if not have or have[-1] <= self.snapshot:
            return False
        from jizhi.bundle import Profiles
        found, refused = newest_fitting(self.store, self.bundle, after=self.snapshot, skip=self._refused,
                                        numbers=have)
        for n, why in refused:
            if n not in self._refused:
                self._refused.add(n)
                log.error("profile snapshot %d not used by %s version %d: %s", n, self.bundle.name,
                          self.bundle.version, why)
        if found is None:
            return False
        t0 = time.monotonic()
        try:
            users = Profiles(self.bundle, "user", Path(found[1]))
            # Items carried over (hard links to the current snapshot's files): the same profiles, so the
            # tables derived from them (item rows, item table) stay.
            current = os.path.join(self.store, str(self.snapshot)) if self.snapshot else self.items.root
            items = self.items if _same_side(current, found[1], "items") \
                else Profiles(self.bundle, "item", Path(found[1]))
        except (BundleError, OSError, ValueError) as e:
            if found[0] not in self._refused:
                self._refused.add(found[0])
                log.error("profile snapshot %d not used by %s version %d: %s", found[0], self.bundle.name,
                          self.bundle.version, e)
            return False
        if items is not self.items and self.derivers:
            try:
                builders = {st: fn(items) for st, fn in self.derivers.items()}
            except Exception as e:      # a table too large for this snapshot's items, ...: not this snapshot
                self._refused.add(found[0])
                log.error("profile snapshot %d not used by %s version %d: its item tables cannot be built: %s: %s",
                          found[0], self.bundle.name, self.bundle.version, type(e).__name__, e)
                return False
            self.pending = (found[0], users, items, builders)
            self.prepared = {}
            log.info("profile snapshot %d: its items changed; building %d derived table(s) of %s items a step "
                     "per batch before it serves", found[0], len(self.derivers), f"{items.ids.shape[0]:,}")
            return False
        return self._commit(found[0], users, items, t0, "opened")

    def _commit(self, n, users, items, t0, how):
        old = self.snapshot
        if items is not self.items:
            self.items_generation += 1
        self.users, self.items, self.snapshot = users, items, n
        self.generation += 1
        log.info("profiles of %s version %d: snapshot %d -> %d (%s users, %s items; %s, %.1f ms)",
                 self.bundle.name, self.bundle.version, old, self.snapshot, f"{users.ids.shape[0]:,}",
                 f"{items.ids.shape[0]:,}", how, (time.monotonic() - t0) * 1e3)
        return True


def _same_side(current_root, directory, side):
    """True when ``directory``'s ``side`` files are the current snapshot's (hard links: carried over)."""
    a, b = os.path.join(current_root, side), os.path.join(directory, side)
    try:
        names = sorted(os.listdir(b))
        return names == sorted(os.listdir(a)) and all(os.path.samefile(os.path.join(a, n), os.path.join(b, n))
                                                      for n in names)
    except OSError:
        return False


_sources = {}


def source(bundle):
    """This process's ``ProfileSource`` of ``bundle`` 's version (one per version directory)."""
    key = str(bundle.path)
    s = _sources.get(key)
    if s is None:
        s = _sources[key] = ProfileSource(bundle)
    return s


def profiles(bundle, side):
    """The ``Profiles`` of ``side`` ("user" or "item") a version serves in this process: its own, or its
    store's current snapshot (``source``)."""
    if bundle.profile_store is None:
        from jizhi.bundle import Profiles
        return Profiles(bundle, side)
    s = source(bundle)
    return s.users if side == "user" else s.items


def profiles_dir(bundle):
    """The directory whose ``users/`` and ``items/`` a version serves now (its own ``profiles/``, or its
    store's newest snapshot that fits it), without opening them; None when no snapshot fits. For tools
    that only read ids (``jizhictl query --random``, a warm-up's ids)."""
    if bundle.profile_store is None:
        return bundle.path / "profiles"
    found, _ = newest_fitting(bundle.profile_store, bundle)
    return None if found is None else Path(found[1])


def building():
    """True while a source of this process builds a new snapshot's item tables (the worker then runs its
    batch boundaries between requests too, instead of waiting for them: workers/run.py)."""
    return any(s.pending is not None for s in _sources.values())


def forget(bundle):
    """Drop this process's source of a version (a worker done with it; tests)."""
    _sources.pop(str(bundle.path), None)
