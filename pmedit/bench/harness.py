"""Timing and reporting shared by every benchmark section.

Every comparison is measured in one run: the candidates are called in interleaved rounds
(A B C, A B C, ...) so that drift in clock speed or machine load hits all of them alike, and
each is summarised by its median (with 20th/80th percentiles). A ratio is always
reference-median / candidate-median from the same rounds.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Row:
    """One measured case of one provider."""

    section: str
    case: str  # e.g. "d=2048 n=16384 fp32"
    provider: str  # e.g. "cpu", "reference"
    median_s: float
    p20_s: float
    p80_s: float
    work: float = 0.0  # units processed per call (tokens, edits, records...)
    unit: str = ""  # name of that unit, for the throughput column
    flops: float = 0.0  # useful flops per call, for TFLOP/s
    ratio: float | None = None  # reference median / this median, same run
    reference: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.work / self.median_s if self.work and self.median_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["throughput"] = self.throughput
        d["tflops"] = self.flops / self.median_s / 1e12 if self.flops and self.median_s > 0 else None
        return d


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
    min_time_s: float = 0.0,
) -> dict[str, list[float]]:
    """Call each fn ``warmup`` times, then ``repeats`` interleaved rounds; seconds per call.

    With ``min_time_s`` > 0 each measurement repeats the call until that much time has passed
    (for calls far shorter than timer resolution), and reports the per-call mean.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n = 0
            _sync(device)
            t0 = time.perf_counter()
            while True:
                fn()
                n += 1
                _sync(device)
                elapsed = time.perf_counter() - t0
                if elapsed >= min_time_s:
                    break
            times[name].append(elapsed / n)
    return times


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def compare(
    section: str,
    case: str,
    fns: dict[str, Callable[[], object]],
    *,
    reference: str | None,
    work: float = 0.0,
    unit: str = "",
    flops: float | dict[str, float] = 0.0,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
    min_time_s: float = 0.0,
    extra: dict | None = None,
) -> list[Row]:
    """Time ``fns`` interleaved and return one Row each, with ratios against ``reference``."""
    if reference is not None and reference not in fns:
        raise ValueError(f"reference {reference!r} is not among {list(fns)}")
    times = time_interleaved(fns, repeats=repeats, warmup=warmup, device=device, min_time_s=min_time_s)
    rows = []
    ref_med = statistics.median(times[reference]) if reference else None
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            Row(
                section=section,
                case=case,
                provider=name,
                median_s=med,
                p20_s=_pct(ts, 0.2),
                p80_s=_pct(ts, 0.8),
                work=work,
                unit=unit,
                flops=flops.get(name, 0.0) if isinstance(flops, dict) else flops,
                ratio=(ref_med / med) if ref_med is not None and med > 0 else None,
                reference=reference,
                extra=dict(extra or {}),
            )
        )
    return rows


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def format_table(rows: list[Row]) -> str:
    header = ("section", "case", "provider", "median", "p20-p80", "throughput", "TFLOP/s", "vs ref")
    lines = [header]
    for r in rows:
        d = r.to_dict()
        lines.append(
            (
                r.section,
                r.case,
                r.provider,
                _fmt_time(r.median_s),
                f"{_fmt_time(r.p20_s)}-{_fmt_time(r.p80_s)}",
                f"{r.throughput:,.0f} {r.unit}/s" if r.throughput else "",
                f"{d['tflops']:.3f}" if d["tflops"] else "",
                "ref" if r.provider == r.reference else (f"{r.ratio:.2f}x" if r.ratio else ""),
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for j, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
