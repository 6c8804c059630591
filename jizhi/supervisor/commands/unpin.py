"""``jizhictl unpin MODEL``."""
from jizhi.supervisor.commands.base import Command, model_version


class Unpin(Command):
    """Return MODEL to its pipeline file's policy (usually the latest good version)."""
    name = "unpin"

    def execute(self, sup, args):
        model, _ = model_version(args, False)
        return sup.versions.pin(model, None)
