"""``jizhictl stats``."""
from jizhi.supervisor.commands.base import Command


class Stats(Command):
    """Per pipeline: ok/s, pairs/s, latency p50/p99/p99.9, candidates dropped for a NaN or infinite score; per stage: pool size, queue, events/s, wait and service p50/p99; errors by code; per A/B group: its fraction, answers, latency and errors."""
    name = "stats"

    def execute(self, sup, args):
        return sup.reports.stats()
