"""``jizhictl resume``."""
from jizhi.supervisor.commands.base import Command


class Resume(Command):
    """Admit requests again after `drain`."""
    name = "resume"

    def execute(self, sup, args):
        sup.set_draining(False)
        return {"draining": False}
