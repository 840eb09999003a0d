"""The exposition of the proxy's own families, written without building prometheus-client's
`Metric` and `Sample` objects at every scrape: `/metrics` is answered on the event loop the
data plane shares, so its cost is every in-flight request's wait (issue 20: 9 ms text and
16 ms OpenMetrics a scrape with routes, 1,600 lines, almost all of it per-sample objects,
label sorting and escaping; now a fraction of a millisecond).

Rules:
1. prometheus-client stays the authority on the format. Every family's HELP/TYPE lines and
   every sample's head (its name and labels, up to the value) are cut from what the
   negotiated encoder itself writes for that family or label set, once; a scrape then only
   writes the values after them. What it writes is byte for byte the encoder's output for
   the same data (`Family.metric` builds the library's family from it; tests compare both,
   text and OpenMetrics, every escaping).
2. A histogram's row becomes one `%`-template (every bucket, the count, the sum), filled by
   one formatting call with the cumulative counts: no per-bucket Python work while the
   counts are below 10**6 (written `n.0` then, as `floatToGoString` writes them); from
   there on each value goes through `floatToGoString`, as the library does.
3. What is cached is bounded by the label sets, which rule 2 of `metrics` keeps bounded;
   past `HEADS_MAX` the cache starts over. An encoder whose output does not split into a
   header and one line per sample (never prometheus-client's own) is not cached at all:
   `render` says so (None) and the caller lets the library encode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from itertools import accumulate
from typing import Any, Final

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

Encoder = Callable[[Any], bytes]
COUNTER: Final = "counter"
GAUGE: Final = "gauge"
INFO: Final = "info"
HISTOGRAM: Final = "histogram"
HEADS_MAX: Final = 4096  # cached sample heads, per format (rule 3)
_SMALL: Final = 1_000_000  # below it, floatToGoString(n) is f"{n}.0" for an int n


def go(value: float) -> str:
    """`floatToGoString(value)`, without its work for the common small count."""
    if type(value) is int and 0 <= value < _SMALL:
        return f"{value}.0"
    return floatToGoString(value)


class Family:
    """One metric family as plain data: its rows are what the library's family of the same
    kind would be given (`add_metric`). A histogram row holds the per-bucket counts (the
    last bucket +Inf, not cumulative) and the sum; `les` names the buckets."""

    __slots__ = ("documentation", "kind", "labelnames", "les", "name", "rows")

    def __init__(
        self,
        name: str,
        documentation: str,
        kind: str,
        labelnames: Sequence[str] = (),
        les: Sequence[str] = (),
    ) -> None:
        self.name = name  # as the library's Metric holds it: a counter's without `_total`
        self.documentation = documentation
        self.kind = kind
        self.labelnames = tuple(labelnames)
        self.les = tuple(les)
        self.rows: list[tuple[tuple[str, ...], Any, float]] = []

    def add(self, labels: Sequence[str], value: float) -> None:
        self.rows.append((tuple(labels), value, 0.0))

    def add_histogram(self, labels: Sequence[str], counts: Sequence[int], sum_s: float) -> None:
        self.rows.append((tuple(labels), counts, sum_s))

    def metric(self, rows: Iterable[tuple[tuple[str, ...], Any, float]] | None = None) -> Metric:
        """The library's family with these rows (all of this family's by default)."""
        rows = self.rows if rows is None else rows
        name, doc, labelnames = self.name, self.documentation, self.labelnames
        metric: Metric
        if self.kind == INFO:
            metric = InfoMetricFamily(name, doc, labels=())
            for labels, _, _ in rows:
                metric.add_metric([], dict(zip(labelnames, labels, strict=True)))
        elif self.kind == HISTOGRAM:
            metric = HistogramMetricFamily(name, doc, labels=labelnames)
            for labels, counts, sum_s in rows:
                buckets = list(zip(self.les, accumulate(counts), strict=True))
                metric.add_metric(list(labels), buckets, sum_value=sum_s)
        else:
            kind = CounterMetricFamily if self.kind == COUNTER else GaugeMetricFamily
            metric = kind(name, doc, labels=labelnames)
            for labels, value, _ in rows:
                metric.add_metric(list(labels), value)
        return metric


class _Only:
    """A collector of the given metrics (what an encoder is handed)."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


class Unsplittable(Exception):
    """The encoder's output is not a header then one line per sample (rule 3)."""


class Format:
    """One encoder's headers and sample heads, cut from its own output (rule 1)."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.trailer = self._encode([])  # OpenMetrics' "# EOF", nothing in text
        self.headers: dict[str, str] = {}  # by family name
        self.heads: dict[tuple[str, tuple[str, ...]], Any] = {}  # by (family, labels)
        self.built = 0  # encoder calls made to cut headers and heads: the cache's misses

    def _encode(self, metrics: list[Metric]) -> str:
        return self.encoder(_Only(metrics)).decode("utf-8")

    def _lines(self, family: Family, row: tuple[tuple[str, ...], Any, float]) -> list[str]:
        """The sample lines the encoder writes for this one row, checked to be lines."""
        self.built += 1
        out = self._encode([family.metric([row])])
        header = self.header(family)
        if not out.startswith(header) or not out.endswith(self.trailer):
            raise Unsplittable(family.name)
        body = out[len(header) : len(out) - len(self.trailer)]
        if not body.endswith("\n"):
            raise Unsplittable(family.name)
        return body[:-1].split("\n")

    def header(self, family: Family) -> str:
        header = self.headers.get(family.name)
        if header is None:
            self.built += 1
            out = self._encode([family.metric([])])
            if not out.endswith(self.trailer):
                raise Unsplittable(family.name)
            header = self.headers[family.name] = out[: len(out) - len(self.trailer)]
        return header

    def _cached(self, family: Family, labels: tuple[str, ...]) -> Any:
        heads = self.heads
        if len(heads) >= HEADS_MAX:
            heads.clear()
        if family.kind == HISTOGRAM:
            zeros = [0] * len(family.les)
            lines = self._lines(family, (labels, zeros, 0.0))
            # Buckets, then _count and _sum, each written with the value 0.0.
            if len(lines) != len(zeros) + 2 or not all(line.endswith(" 0.0") for line in lines):
                raise Unsplittable(family.name)
            cut = [line[:-3] for line in lines]  # up to the value, its space kept
            template = "".join(head.replace("%", "%%") + "%d.0\n" for head in cut[:-1])
            template += cut[-1].replace("%", "%%") + "%s\n"
            # The template, the heads, and the last row written with its values.
            heads[(family.name, labels)] = entry = [template, cut, None, ""]
            return entry
        value = 1 if family.kind == INFO else 0
        lines = self._lines(family, (labels, value, 0.0))
        written = " " + floatToGoString(value)
        if len(lines) != 1 or not lines[0].endswith(written):
            raise Unsplittable(family.name)
        heads[(family.name, labels)] = head = lines[0][: -len(written) + 1]
        return head

    def write(self, family: Family, out: list[str]) -> None:
        """The family's lines, appended to `out`."""
        out.append(self.header(family))
        heads = self.heads
        name = family.name
        if family.kind == HISTOGRAM:
            for labels, counts, sum_s in family.rows:
                entry = heads.get((name, labels)) or self._cached(family, labels)
                seen = (*counts, sum_s)
                if seen == entry[2]:  # unchanged since the last scrape
                    out.append(entry[3])
                    continue
                cumulative = list(accumulate(counts))
                total = cumulative[-1]
                if type(total) is int and total < _SMALL and min(counts) >= 0:
                    text = entry[0] % (*cumulative, total, floatToGoString(sum_s))
                else:
                    values = [*cumulative, total, sum_s]
                    text = "".join(
                        f"{head}{floatToGoString(v)}\n"
                        for head, v in zip(entry[1], values, strict=True)
                    )
                entry[2], entry[3] = seen, text
                out.append(text)
        elif family.kind == INFO:
            for labels, _, _ in family.rows:
                out.append((heads.get((name, labels)) or self._cached(family, labels)) + "1.0\n")
        else:
            for labels, value, _ in family.rows:
                head = heads.get((name, labels)) or self._cached(family, labels)
                out.append(f"{head}{go(value)}\n")


def _key(encoder: Encoder) -> Any:
    if isinstance(encoder, partial):
        return (encoder.func, encoder.args, tuple(sorted(encoder.keywords.items())))
    return encoder


class Exposition:
    """The formats met so far (choose_encoder makes a new encoder at every scrape; the key
    is what it wraps), each with its cut headers and heads."""

    def __init__(self) -> None:
        self.formats: dict[Any, Format | None] = {}

    def format(self, encoder: Encoder) -> Format | None:
        key = _key(encoder)
        if key not in self.formats:
            self.formats[key] = Format(encoder)
        return self.formats[key]

    def render(self, families: Iterable[Family], encoder: Encoder) -> str | None:
        """The families' exposition without the format's trailer; None when the encoder's
        output does not split (the caller encodes with the library then)."""
        fmt = self.format(encoder)
        if fmt is None:
            return None
        out: list[str] = []
        try:
            for family in families:
                fmt.write(family, out)
        except Unsplittable:
            self.formats[_key(encoder)] = None
            return None
        return "".join(out)

    @property
    def built(self) -> int:
        return sum(f.built for f in self.formats.values() if f is not None)
