"""/metrics in Prometheus' text format.

The servers keep plain counters (a `collections.Counter` each, cheap on the hot path); this
collector reads them at scrape time instead of every packet touching a Prometheus metric.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from pixiebox.core.lifecycle import MachineState


class PixieboxCollector(Collector):
    def __init__(
        self,
        counters: Mapping[str, tuple[str, Counter[str]]],
        machine_states: Callable[[], Mapping[MachineState, int]],
        boot_durations: Callable[[], Iterable[float]] = tuple,
    ) -> None:
        """`counters`: metric name → (help text, a server's counter); the label is "outcome",
        or "type" for a name ending in `_by_type`."""
        self.counters = counters
        self.machine_states = machine_states
        self.boot_durations = boot_durations

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | SummaryMetricFamily]:
        durations = list(self.boot_durations())
        yield SummaryMetricFamily(
            "pixiebox_boot_duration_seconds",
            "first boot request to the OS phoning home, recent boots",
            count_value=len(durations),
            sum_value=sum(durations),
        )
        for name, (text, counter) in self.counters.items():
            label = "type" if name.endswith("_by_type") else "outcome"
            family = CounterMetricFamily(f"pixiebox_{name}", text, labels=[label])
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
