"""``jizhictl pin MODEL VERSION``."""
from jizhi.supervisor.commands.base import Command, model_version


class Pin(Command):
    """Serve VERSION of MODEL (a rollback), whatever is newer. Remembered in <models>/MODEL/.pinned across restarts.

    The pinned version is validated and loaded beside the serving one and
    switched in when warm, like any new version. `unpin` returns to the
    pipeline file's policy.
    """
    name = "pin"

    def execute(self, sup, args):
        model, v = model_version(args, True)
        return sup.versions.pin(model, v)
