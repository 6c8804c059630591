"""``jizhictl models [MODEL]``."""
from jizhi.supervisor.commands.base import Command


class Models(Command):
    """Models and their versions: state, serving policy, when a version appeared and began serving, its load timeline and error.

    Timeline (ms): detect = rename to noticed; validate = the validation child;
    start = process start of its slowest worker; load = its stages' setup;
    warm = replaying recorded requests; total = rename to serving. A version
    served since jizhid started has one too: validate = the start's check of
    its files (sizes, sha256); warm = its workers' warm-up batch; total =
    jizhid's start to ready.
    """
    name = "models"

    def execute(self, sup, args):
        return sup.versions.registry.summary()
