"""``jizhictl status``."""
from jizhi.supervisor.commands.base import Command


class Status(Command):
    """Processes, pids, uptime, model versions and health of a running jizhid."""
    name = "status"

    def execute(self, sup, args):
        return sup.reports.status()
