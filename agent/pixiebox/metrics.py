"""/metrics in Prometheus' text format.

The servers keep plain counters (a `collections.Counter` each, cheap on the hot path); this
collector reads them at scrape time instead of every packet touching a Prometheus metric.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .lifecycle import MachineState


class PixieboxCollector(Collector):
    def __init__(
        self,
        counters: Mapping[str, tuple[str, Counter[str]]],
        machine_states: Callable[[], Mapping[MachineState, int]],
    ) -> None:
        """`counters`: metric name → (help text, the server's outcome counter)."""
        self.counters = counters
        self.machine_states = machine_states

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name, (text, counter) in self.counters.items():
            family = CounterMetricFamily(f"pixiebox_{name}", text, labels=["outcome"])
            for outcome, value in sorted(counter.items()):
                family.add_metric([outcome], value)
            yield family
        states = GaugeMetricFamily(
            "pixiebox_machines", "machines by lifecycle state", labels=["state"]
        )
        counts = self.machine_states()
        for state in MachineState:
            states.add_metric([state.value], counts.get(state, 0))
        yield states


def metrics_renderer(collector: PixieboxCollector) -> Callable[[], bytes]:
    registry = CollectorRegistry()
    registry.register(collector)
    return lambda: generate_latest(registry)
