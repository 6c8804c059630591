"""Version states: one set of words for a model version's life, whoever holds the version.

Three owners follow a version, each through the part of its life it sees:
the registry (jizhi/supervisor/registry.py: on disk, validated, serving, a
fallback), the loader (jizhi/supervisor/loader.py: one version loaded in one
bank of workers) and the broker (jizhi/broker/versions.py: a version's slots,
its warm-up, the switch). They say a state with the same word, in code, in
``jizhictl models`` and ``status``, in logs and in the plan file; each owner
keeps its own ``TRANSITIONS`` table over the words it uses, in its module's
docstring and checked at run time.

=========== ==================================================== ============================
word        meaning                                              used by
=========== ==================================================== ============================
available   complete on disk, not examined yet                   registry
validating  its validation child is running                      registry
valid       passed validation, not loaded                        registry
rejected    failed validation; never served                      registry
refused     would pass ``models.memory_budget_mb``               registry
loading     its workers start beside the serving ones            registry, loader, broker
warm        its warm-up passed; waits for ACTIVATE               broker
serving     new requests are pinned to it                        registry, loader, broker
draining    answers what it holds after a newer version took     registry, loader, broker
            over
stopping    answered its last request; its workers are retired   loader
standby     served before; a fallback                            registry
failed      broke while loading or serving                       registry, loader, broker
removed     its directory disappeared                            registry
=========== ==================================================== ============================

**On the wire** one word differs: the broker's ``info`` says ``active`` for a
serving version (``jizhictl status`` prints it; tests/test_cli_agree.py), and
a plan file of an older supervisor says it too. ``VersionState.wire`` and
``VersionState.from_wire`` are the only translation.

Base layer: imports nothing of jizhi's; runs in the supervisor and the broker.
"""
import enum

WIRE_SERVING = "active"     # serving, as the broker's info says it


class VersionState(str, enum.Enum):
    AVAILABLE = "available"
    VALIDATING = "validating"
    VALID = "valid"
    REJECTED = "rejected"
    REFUSED = "refused"
    LOADING = "loading"
    WARM = "warm"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"
    STANDBY = "standby"
    FAILED = "failed"
    REMOVED = "removed"

    @property
    def wire(self):
        """The word the broker's ``info`` uses (module docstring)."""
        return WIRE_SERVING if self is VersionState.SERVING else self.value

    @classmethod
    def from_wire(cls, word):
        """A state from ``info``'s or a plan file's word; ``ValueError`` for a word that is none."""
        return cls.SERVING if word == WIRE_SERVING else cls(word)
