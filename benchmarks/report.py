"""Turns the scenario JSON files into benchmarks/results.md and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peers as P

US = 1e6


def fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def fmt_ms(x: float) -> str:
    if x != x:  # nan
        return "-"
    return f"{x * 1000:.2f}" if x < 0.1 else f"{x * 1000:.0f}"


def fmt_delay(d: float) -> str:
    return "0 (min)" if d == 0 else f"{d * 1000:g} ms"


def _index(data: dict) -> dict[tuple, dict[str, dict]]:
    by: dict[tuple, dict[str, dict]] = {}
    for r in data["rows"]:
        by.setdefault(tuple(r["config"]), {})[r["peer"]] = r
    return by


def _peers(data: dict) -> list[str]:
    return [p for p in P.PEERS if p in data["peers"] or p in data.get("missing", {})]


def throughput_table(data: dict, extra: str | None = None) -> tuple[str, list[str]]:
    """Rows = configs, columns = peers; cell = req/s (batched_fn's lead) and p50/p99 ms.

    Returns the markdown and a list of the cells where a peer beat batched_fn.
    """
    peers = _peers(data)
    head = "| mode | callers | max_delay | " + " | ".join(peers) + " |"
    lines = [head, "|" + "---|" * (3 + len(peers))]
    wins: list[str] = []
    for cfg, cell in _index(data).items():
        mode, n, d = cfg
        best = max(cell, key=lambda p: cell[p].get("rps", 0))
        ours = cell.get("batched_fn", {}).get("rps")
        out = []
        for p in peers:
            if p in data.get("missing", {}):
                out.append("not installed")
                continue
            r = cell.get(p)
            if r is None:
                out.append("n/a")
                continue
            txt = f"{fmt_rate(r['rps'])} req/s"
            if p != "batched_fn" and ours:
                txt += f" (bf ×{ours / r['rps']:.2f})" if r["rps"] else ""
            txt += f"<br>{fmt_ms(r['p50'])} / {fmt_ms(r['p99'])} ms"
            if extra and extra in r:
                txt += f"<br>{extra.replace('_', ' ')} {r[extra]:.1f}"
            if p == best:
                txt = f"**{txt}**"
            out.append(txt)
        if best != "batched_fn":
            wins.append(f"{data['scenario']} {mode} {n} callers, max_delay {fmt_delay(d)}: {best} "
                        f"{fmt_rate(cell[best]['rps'])} vs batched_fn {fmt_rate(ours or 0)} req/s")
        lines.append(f"| {mode} | {n} | {fmt_delay(d)} | " + " | ".join(out) + " |")
    return "\n".join(lines), wins


def gil_table(data: dict) -> str:
    peers = _peers(data)
    idle = next(r for r in data["rows"] if r["peer"] == "idle")
    lines = [f"Idle baseline: the counter thread alone runs {idle['counter_rate'] / 1e6:.1f} M loop iterations/s.",
             "", "| mode | callers | " + " | ".join(peers) + " |", "|" + "---|" * (2 + len(peers))]
    for cfg, cell in _index(data).items():
        mode, n, _ = cfg
        if set(cell) == {"idle"}:
            continue
        out = []
        for p in peers:
            r = cell.get(p)
            out.append("n/a" if r is None else
                       f"counter at {r['counter_pct']:.0f} % of idle<br>batcher {fmt_rate(r['rps'])} req/s")
        lines.append(f"| {mode} | {n} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def timer_table(data: dict) -> str:
    peers = _peers(data)
    lines = ["| mode | max_delay | " + " | ".join(peers) + " |", "|" + "---|" * (2 + len(peers))]
    for cfg, cell in _index(data).items():
        mode, _, d = cfg
        out = []
        for p in peers:
            r = cell.get(p)
            out.append("n/a" if r is None else
                       f"{r['over_p50'] * US:.0f} / {r['over_p99'] * US:.0f} µs"
                       f"<br>(round trip {fmt_ms(r['rtt_p50'])} ms)")
        lines.append(f"| {mode} | {fmt_delay(d)} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def cost_table(data: dict) -> str:
    lines = ["| batching | req/s | p50 ms | p99 ms | mean batch | model calls per batch "
             "| largest padded model call (tokens) | peak RSS above start |",
             "|---|---|---|---|---|---|---|---|"]
    rows = {r["peer"]: r for r in data["rows"]}
    for name, label in (("cost", "cost = token count, max_batch_cost"), ("count", "count only, max_batch_size")):
        r = rows.get(name)
        if r:
            lines.append(f"| {label} | {fmt_rate(r['rps'])} | {fmt_ms(r['p50'])} | {fmt_ms(r['p99'])} | "
                         f"{r['mean_batch']:.1f} | {r.get('model_calls_per_batch', 0):.2f} | "
                         f"{r['max_padded_tokens']:.0f} | {r['peak_rss_mb']:.0f} MB |")
    if "cost" in rows and "count" in rows and rows["count"]["rps"]:
        lines.append("")
        lines.append(f"Cost-aware / count-only throughput: ×{rows['cost']['rps'] / rows['count']['rps']:.2f} "
                     f"(same run, medians of {rows['cost']['rounds']} interleaved rounds).")
    return "\n".join(lines)


def ring_table(ring: dict[str, Any]) -> str:
    if "error" in ring:
        return f"Ring micro-benchmark not run: {ring['error']}"
    lines = ["| case | ns per item (median) | best |", "|---|---|---|"]
    for r in ring["rows"]:
        case = ("push then pop, one thread" if r["kind"] == "same_thread" else
                f"{r['producers']} producer thread(s) → 1 consumer thread")
        lines.append(f"| {case} | {r['ns']:.1f} | {r['min']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def plots(noop: dict | None, sim: dict | None, outdir: Path) -> list[str]:
    """throughput vs concurrency (no-op) and latency CDFs; returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    written = []
    if noop:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        by = _index(noop)
        colors = {p: f"C{i}" for i, p in enumerate(P.PEERS)}
        for ax, mode in zip(axes, ("asyncio", "threads")):
            for peer in noop["peers"]:
                for d, style in ((0.0, "-"), (0.001, "--")):
                    pts = sorted((cfg[1], cell[peer]["rps"]) for cfg, cell in by.items()
                                 if cfg[0] == mode and cfg[2] == d and peer in cell)
                    if pts:
                        ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o",
                                color=colors[peer], label=f"{peer}, max_delay {fmt_delay(d)}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"concurrent {mode} callers")
            ax.set_ylabel("requests/s")
            ax.set_title(f"No-op handler, {mode}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(outdir / "throughput_vs_concurrency.png", dpi=90)
        plt.close(fig)
        written.append("throughput_vs_concurrency.png")
    panels = []
    if noop:
        panels.append((noop, ("asyncio", 64, 0.001), "No-op, 64 asyncio tasks, 1 ms"))
        panels.append((noop, ("threads", 64, 0.001), "No-op, 64 threads, 1 ms"))
    if sim:
        panels.append((sim, ("asyncio", 64, 0.001), "Simulated model, 64 asyncio tasks, 1 ms"))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
        axes = list(axes) if len(panels) > 1 else [axes]
        for ax, (data, cfg, title) in zip(axes, panels):
            cell = _index(data).get(cfg, {})
            for i, peer in enumerate(P.PEERS):
                r = cell.get(peer)
                if r and "cdf" in r:
                    ax.plot([x * 1000 for x in r["cdf"]], [i / 100 for i in range(101)], color=f"C{i}",
                            label=peer)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())   # minor labels overlap on short ranges
            ax.set_xlabel("latency (ms)")
            ax.set_ylabel("fraction of requests")
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(outdir / "latency_cdf.png", dpi=90)
        plt.close(fig)
        written.append("latency_cdf.png")
    return written
