"""``jizhictl drain``."""
from jizhi.supervisor.commands.base import Command


class Drain(Command):
    """Stop admitting requests (clients get OVERLOADED) and finish those in flight. `resume` undoes it."""
    name = "drain"

    def execute(self, sup, args):
        sup.set_draining(True)
        return {"draining": True}
